"""Checkpoint loading: Meta .pth, Hugging Face safetensors and GGUF into one `Transformer`.

Name maps live in `names` as data; `loader` detects the format from the files' contents and
assigns tensors one by one onto a model built on the meta device.
"""

from inhouse.weights.loader import (
    CheckpointInfo,
    WeightsError,
    detect_format,
    inspect_checkpoint,
    load_model,
    random_model,
)
from inhouse.weights.memory import (
    InsufficientMemoryError,
    MemoryEstimate,
    available_bytes,
    check_fits,
    estimate,
    estimate_bytes,
)

__all__ = [
    "CheckpointInfo", "WeightsError", "InsufficientMemoryError", "detect_format", "inspect_checkpoint",
    "load_model", "random_model", "MemoryEstimate", "estimate", "estimate_bytes", "available_bytes", "check_fits",
]
