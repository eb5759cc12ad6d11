"""Interoperability: adapters to and from the Hugging Face PEFT format, our own layout, merged models.

Hugging Face PEFT layout (what ``peft.PeftModel.from_pretrained`` loads)::

    out/
      adapter_config.json          peft_type, task_type, r, lora_alpha, target_modules, ... (only the
                                   keys needed, so that older peft versions load it too)
      adapter_model.safetensors    base_model.model.<module>.lora_A.weight ... ; metadata {"format": "pt"}

It carries LoRA (Linear, GPT-2 ``Conv1D``, Embedding, Conv2d), DoRA, rsLoRA, IA3, prompt tuning and
prefix tuning (the computed prefix: a projection MLP is not saved), each with modules trained whole
(``modules_to_save``, stored under the module's own key). See ``peft_layout.py`` for the key table.

lightning_peft layout, for what the PEFT format cannot carry (bottleneck adapters, ``Compose`` of
several methods, the whole-LightningModule checkpoints of ``PEFT(module=None)``)::

    out/
      lightning_peft_config.json   {"format": "lightning_peft", "format_version": 1,
                                    "strategy": PEFTStrategy.to_config(), "module": "model" or null,
                                    "adapter_name": "default", "base_model_name_or_path": ...}
      adapter_model.safetensors    the trainable tensors, keyed relative to the adapted module without
                                   the links that stacking named adapters adds (``canonical_name``);
                                   metadata {"format": "pt"}

Both load back with :func:`load_adapter` or ``PEFT.from_pretrained``. :func:`export_merged` writes a
plain transformers model folder (``save_pretrained``) with LoRA, DoRA and IA3 folded in.

Every writer stages its folder next to the destination and renames it when complete; readers use
safetensors, or ``torch.load(weights_only=True)``, and turn corrupt files into ``ValueError``.
"""

from lightning_peft.formats.adapter import (
    ExportResult,
    SavedAdapter,
    export_adapter,
    load_adapter,
    read_adapter,
)
from lightning_peft.formats.merged import export_merged, merge_and_unwrap
from lightning_peft.formats.peft_layout import NotInPeftFormat

__all__ = [
    "ExportResult",
    "NotInPeftFormat",
    "SavedAdapter",
    "export_adapter",
    "export_merged",
    "load_adapter",
    "merge_and_unwrap",
    "read_adapter",
]
