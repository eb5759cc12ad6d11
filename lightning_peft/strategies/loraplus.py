"""LoRA+ (Hayou et al., 2024): ``B`` learns faster than ``A``.

With ``B`` starting at zero, the paper (sec. 3) shows that one learning rate for both matrices is
inefficient at large width; ``lr_B = loraplus_lr_ratio · lr_A`` fixes it (the paper suggests a ratio
around 16). This module only builds optimizer parameter groups, for any ``torch.optim`` optimizer::

    groups: A matrices, DoRA magnitudes, biases, whole modules ─► lr
            B matrices (lora_B, lora_embedding_B) and lora_bias  ─► lr · loraplus_lr_ratio
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_peft.strategies.lora_layers import LoRABase
from lightning_peft.strategies.lora_parameters import LoRAParameter

# the up-projections of every LoRA layer kind (attention has a second pair for its output projection)
B_PARAMETERS = ("lora_B", "lora_embedding_B", "lora_B_bias", "out_proj_lora_B")


def loraplus_param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, loraplus_lr_ratio: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for the trainable parameters of ``model``.

    Without ``loraplus_lr_ratio``: one group at ``lr``. With it: the ``B`` side of every LoRA layer
    at ``lr * loraplus_lr_ratio`` and the rest at ``lr``; empty groups are left out.

    Example::

        optimizer = torch.optim.AdamW(loraplus_param_groups(model, lr=1e-4, loraplus_lr_ratio=16))
    """
    if loraplus_lr_ratio is not None and (
        not isinstance(loraplus_lr_ratio, int | float)
        or isinstance(loraplus_lr_ratio, bool)
        or loraplus_lr_ratio <= 0
    ):
        raise ValueError(f"loraplus_lr_ratio must be a positive number or None, got {loraplus_lr_ratio!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    fast_ids: set[int] = set()
    if loraplus_lr_ratio is not None:
        for module in model.modules():
            if isinstance(
                module, (LoRABase, LoRAParameter)
            ):  # found by the adapter's type, not by parameter names
                fast_ids.update(id(getattr(module, n)) for n in B_PARAMETERS if hasattr(module, n))
    slow = [p for p in trainable if id(p) not in fast_ids]
    fast = [p for p in trainable if id(p) in fast_ids]
    groups = [{"params": slow, "lr": lr, "weight_decay": weight_decay}]
    if fast:
        groups.append({"params": fast, "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]
