"""lightning_peft: parameter-efficient fine-tuning for PyTorch Lightning, as callbacks.

The public names below load on first use (PEP 562), so ``import lightning_peft`` and the
``lightning-peft`` command start without importing torch, Lightning and transformers; reading any of
them (``from lightning_peft import PEFT``) imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TokenAugmentation": "lightning_peft.data.augment",
    "AdapterRegularization": "lightning_peft.callbacks",
    "AdversarialTraining": "lightning_peft.callbacks",
    "CurriculumSchedule": "lightning_peft.callbacks",
    "Distillation": "lightning_peft.callbacks",
    "Evaluation": "lightning_peft.callbacks",
    "LayerwiseLR": "lightning_peft.callbacks",
    "MultiTaskSchedule": "lightning_peft.callbacks",
    "NEFTune": "lightning_peft.callbacks",
    "PEFT": "lightning_peft.callbacks",
    "layerwise_param_groups": "lightning_peft.callbacks",
    "TextAugmentation": "lightning_peft.callbacks.augment",
    "load_from_checkpoint": "lightning_peft.callbacks.checkpoint",
    "ExportResult": "lightning_peft.formats",
    "export_adapter": "lightning_peft.formats",
    "export_merged": "lightning_peft.formats",
    "load_adapter": "lightning_peft.formats",
    "read_adapter": "lightning_peft.formats",
    "MultiTaskLoader": "lightning_peft.data.mixing",
    "TaskSampler": "lightning_peft.data.mixing",
    "MemoryPlan": "lightning_peft.planning",
    "plan": "lightning_peft.planning",
    "Adapter": "lightning_peft.strategies",
    "Compose": "lightning_peft.strategies",
    "Freeze": "lightning_peft.strategies",
    "IA3": "lightning_peft.strategies",
    "LoRA": "lightning_peft.strategies",
    "PEFTStrategy": "lightning_peft.strategies",
    "PrefixTuning": "lightning_peft.strategies",
    "PromptTuning": "lightning_peft.strategies",
    "QLoRA": "lightning_peft.strategies",
    "active_adapters": "lightning_peft.strategies",
    "adapter_names": "lightning_peft.strategies",
    "adapter_state_dict": "lightning_peft.strategies",
    "add_adapter": "lightning_peft.strategies",
    "delete_adapter": "lightning_peft.strategies",
    "disable_adapters": "lightning_peft.strategies",
    "load_adapter_state_dict": "lightning_peft.strategies",
    "load_base_weights": "lightning_peft.strategies",
    "load_trainable_state_dict": "lightning_peft.strategies",
    "reset_adapters": "lightning_peft.strategies",
    "set_active_adapters": "lightning_peft.strategies",
    "trainable_state_dict": "lightning_peft.strategies",
    "ALPACA": "lightning_peft.data.templates",
    "CHAT": "lightning_peft.data.templates",
    "InstructionCollator": "lightning_peft.data.templates",
    "PromptTemplate": "lightning_peft.data.templates",
}

if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from lightning_peft.callbacks import (
        PEFT,
        AdapterRegularization,
        AdversarialTraining,
        CurriculumSchedule,
        Distillation,
        Evaluation,
        LayerwiseLR,
        MultiTaskSchedule,
        NEFTune,
        layerwise_param_groups,
    )
    from lightning_peft.callbacks.augment import TextAugmentation
    from lightning_peft.callbacks.checkpoint import load_from_checkpoint
    from lightning_peft.data.augment import TokenAugmentation
    from lightning_peft.data.mixing import MultiTaskLoader, TaskSampler
    from lightning_peft.data.templates import ALPACA, CHAT, InstructionCollator, PromptTemplate
    from lightning_peft.formats import ExportResult, export_adapter, export_merged, load_adapter, read_adapter
    from lightning_peft.planning import MemoryPlan, plan
    from lightning_peft.strategies import (
        IA3,
        Adapter,
        Compose,
        Freeze,
        LoRA,
        PEFTStrategy,
        PrefixTuning,
        PromptTuning,
        QLoRA,
        active_adapters,
        adapter_names,
        adapter_state_dict,
        add_adapter,
        delete_adapter,
        disable_adapters,
        load_adapter_state_dict,
        load_base_weights,
        load_trainable_state_dict,
        reset_adapters,
        set_active_adapters,
        trainable_state_dict,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "ALPACA",
    "CHAT",
    "InstructionCollator",
    "PromptTemplate",
    "TextAugmentation",
    "TokenAugmentation",
    "AdapterRegularization",
    "AdversarialTraining",
    "Distillation",
    "Evaluation",
    "LayerwiseLR",
    "NEFTune",
    "layerwise_param_groups",
    "MultiTaskLoader",
    "MultiTaskSchedule",
    "TaskSampler",
    "CurriculumSchedule",
    "IA3",
    "Adapter",
    "PEFT",
    "Compose",
    "ExportResult",
    "Freeze",
    "LoRA",
    "PEFTStrategy",
    "PrefixTuning",
    "PromptTuning",
    "QLoRA",
    "__version__",
    "active_adapters",
    "adapter_names",
    "adapter_state_dict",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "export_adapter",
    "export_merged",
    "load_adapter",
    "load_adapter_state_dict",
    "set_active_adapters",
    "load_from_checkpoint",
    "load_trainable_state_dict",
    "read_adapter",
    "trainable_state_dict",
    "MemoryPlan",
    "plan",
    "reset_adapters",
    "load_base_weights",
]
