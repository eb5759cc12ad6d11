"""lightning_peft: parameter-efficient fine-tuning for PyTorch Lightning, as callbacks.

The public API is the table below, listed once: each name and the module that defines it. The names
load on first use (PEP 562), so ``import lightning_peft`` and the ``lightning-peft`` command start
without importing torch, Lightning and transformers; reading one (``from lightning_peft import PEFT``)
imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC: dict[str, tuple[str, ...]] = {
    "lightning_peft.strategies": (
        "BottleneckAdapter",
        "Compose",
        "Freeze",
        "IA3",
        "LoRA",
        "PEFTStrategy",
        "PrefixTuning",
        "PromptTuning",
        "QLoRA",
        "active_adapters",
        "adapter_names",
        "adapter_state_dict",
        "add_adapter",
        "delete_adapter",
        "disable_adapters",
        "load_adapter_state_dict",
        "load_base_weights",
        "load_trainable_state_dict",
        "reset_adapters",
        "set_active_adapters",
        "trainable_state_dict",
    ),
    "lightning_peft.callbacks": (
        "AdapterRegularization",
        "AdversarialTraining",
        "CurriculumSchedule",
        "Distillation",
        "Evaluation",
        "LayerwiseLR",
        "MultiTaskSchedule",
        "NEFTune",
        "PEFT",
        "layerwise_param_groups",
    ),
    "lightning_peft.callbacks.augment": ("TextAugmentation",),
    "lightning_peft.callbacks.heldout": ("HeldOutEvaluation",),
    "lightning_peft.callbacks.checkpoint": ("load_from_checkpoint",),
    "lightning_peft.formats": (
        "ExportResult",
        "export_adapter",
        "export_merged",
        "load_adapter",
        "read_adapter",
    ),
    "lightning_peft.strategies.loraplus": ("loraplus_param_groups",),
    "lightning_peft.planning": ("MemoryPlan", "plan"),
    "lightning_peft.generation.templates": ("ALPACA", "CHAT", "InstructionCollator", "PromptTemplate"),
    "lightning_peft.data.augment": ("TokenAugmentation",),
    "lightning_peft.data.mixing": ("MultiTaskLoader", "TaskSampler"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = [*_MODULE_OF, "__version__"]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
