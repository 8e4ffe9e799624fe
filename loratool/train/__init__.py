"""The minimal SD1 trainer and sampler: the model (``model/``), training data (``data``), the LoRA network
and loop (``loop``), DDIM sampling (``sample``). Imported only by ``train``, ``sample`` and ``demo``; it uses
the shared file I/O and layouts, and no file operation imports it.
"""

from .loop import (
    LoRAModule,
    TrainOptions,
    TrainResult,
    cpu_threads,
    default_resolution,
    inject_lora,
    lora_tensors,
    train,
    write_full_checkpoint,
)

__all__ = [
    "LoRAModule",
    "TrainOptions",
    "TrainResult",
    "cpu_threads",
    "default_resolution",
    "inject_lora",
    "lora_tensors",
    "train",
    "write_full_checkpoint",
]
