"""PEFT methods as pure-PyTorch strategies; nothing here imports Lightning."""

from lightning_peft.strategies.base import (
    PEFTLayer,
    PEFTStrategy,
    disable_adapters,
    reset_adapters,
    strategy_from_config,
)
from lightning_peft.strategies.bottleneck import BottleneckAdapter, BottleneckLayer
from lightning_peft.strategies.compose import Compose
from lightning_peft.strategies.freeze import Freeze
from lightning_peft.strategies.ia3 import IA3, IA3Conv, IA3Linear
from lightning_peft.strategies.lora import (
    LoRA,
    LoRAConv1d,
    LoRAConv2d,
    LoRAConv3d,
    LoRAEmbedding,
    LoRALinear,
    LoRAMultiheadAttention,
)
from lightning_peft.strategies.modules_to_save import ModuleToSave
from lightning_peft.strategies.named import (
    active_adapters,
    adapter_names,
    adapter_state_dict,
    add_adapter,
    delete_adapter,
    load_adapter_state_dict,
    set_active_adapters,
)
from lightning_peft.strategies.prompt import PrefixTuning, PromptTuning
from lightning_peft.strategies.qlora import QLoRA
from lightning_peft.strategies.state import load_base_weights, load_trainable_state_dict, trainable_state_dict

__all__ = [
    "IA3",
    "BottleneckAdapter",
    "BottleneckLayer",
    "IA3Conv",
    "IA3Linear",
    "PEFTLayer",
    "Compose",
    "Freeze",
    "LoRA",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "ModuleToSave",
    "PEFTStrategy",
    "PrefixTuning",
    "QLoRA",
    "PromptTuning",
    "active_adapters",
    "adapter_names",
    "adapter_state_dict",
    "add_adapter",
    "delete_adapter",
    "load_adapter_state_dict",
    "set_active_adapters",
    "disable_adapters",
    "reset_adapters",
    "load_trainable_state_dict",
    "load_base_weights",
    "strategy_from_config",
    "trainable_state_dict",
]
