"""Fine-tuning on your own data: LoRA, QLoRA (NF4 base) and full, with PEFT-format adapters.

    from inhouse.finetune import FinetuneConfig, run_finetune
    run_finetune(None, "train.jsonl", "out/", FinetuneConfig(method="lora"))

* `data`: JSONL records -> the model's chat format (the renderer serving uses) -> loss on assistant tokens.
* `recipe`: the training loop (AdamW, warm-up + cosine, accumulation, checkpoints, resume).
* `adapters`: PEFT ``adapter_config.json`` + ``adapter_model.safetensors``, load/apply, `LoRARequest`,
  `AdapterBank` (several named adapters served in one batch).
* `merge`: fold an adapter into its base and write Hugging Face safetensors.
"""

from inhouse.finetune.adapters import AdapterBank, LoRARequest, load_adapter, read_adapter, save_adapter
from inhouse.finetune.data import DataError, load_dataset
from inhouse.finetune.merge import export_hf, merge_adapter
from inhouse.finetune.recipe import FinetuneConfig, FinetuneError, run_finetune, train

__all__ = ["AdapterBank", "LoRARequest", "load_adapter", "read_adapter", "save_adapter", "DataError", "load_dataset",
           "export_hf", "merge_adapter", "FinetuneConfig", "FinetuneError", "run_finetune", "train"]
