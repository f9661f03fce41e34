"""inhouse: run, serve and fine-tune open-weight Llama models on your own machines, offline.

    from inhouse import LLM, SamplingParams, LoRARequest
"""

from inhouse.engine.outputs import CompletionOutput, RequestOutput
from inhouse.engine.params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in the model, tokenizers and weights loaders: import it on first use.
    if name == "LLM":
        from inhouse.engine.llm import LLM

        return LLM
    if name == "LoRARequest":
        from inhouse.finetune.adapters import LoRARequest

        return LoRARequest
    raise AttributeError(f"module 'inhouse' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "LoRARequest", "RequestOutput", "CompletionOutput", "__version__"]
