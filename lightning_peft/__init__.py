"""lightning_peft: parameter-efficient fine-tuning for PyTorch Lightning, as callbacks."""

from lightning_peft.callbacks import PEFT, CurriculumSchedule, MultiTaskSchedule
from lightning_peft.checkpoint import load_from_checkpoint
from lightning_peft.formats import ExportResult, export_adapter, export_merged, load_adapter, read_adapter
from lightning_peft.mixing import MultiTaskLoader, TaskSampler
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
    load_trainable_state_dict,
    set_active_adapters,
    trainable_state_dict,
)

__version__ = "0.1.0"

__all__ = [
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
]
