"""LoftQ (Li et al., 2023): a LoRA start that makes up for what quantizing the base weight loses.

QLoRA trains ``B = 0`` on ``deq(Q)``, a copy of ``W`` with the quantization error in it. LoftQ
quantizes and fits the adapter to the quantization error in turn (the paper's alternating
optimisation, sec. 3), ``T = loftq_iter`` times::

    Q₁ = nf4(W)
    for t = 1 .. T:   L R = svd_r(W - deq(Q_t))        the best rank-r fit of what Q_t lost
                      Q_t+1 = nf4(W - L R)             (not after the last step)

    base weight ← deq(Q_T) (LoRA: a dense weight) or Q_T itself (QLoRA: the stored 4-bit weight)
    L = U_r sqrt(S_r),  R = sqrt(S_r) V_rᵀ,   B₀ = L / sqrt(s),  A₀ = R / sqrt(s)

so that ``deq(Q_T) + s B₀ A₀ ≈ W`` closer than ``deq(Q_T)`` alone. NF4 is bitsandbytes' (blocks of
64, one float32 absmax each, as peft's LoftQ; under QLoRA with ``double_quant`` the absmax values are
quantized too, and LoftQ fits what that stored ``Q`` loses).

Unlike PiSSA/OLoRA the model does not start unchanged: it starts as the quantized model plus the fit.

Scaling: peft sets ``A₀ = R`` and ``B₀ = L`` whatever ``lora_alpha`` is, so its start is ``deq(Q) +
s L R``, LoftQ's only when ``s = 1`` (``lora_alpha = r``, or ``sqrt(r)`` with rsLoRA). Here both are
divided by ``sqrt(s)`` (as PiSSA is, here and in peft), so ``s B₀ A₀ = L R`` for every ``lora_alpha``;
with ``s = 1`` ``A₀`` and ``B₀`` are peft's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_peft.strategies.quantized import import_bitsandbytes

LOFTQ = "loftq"
# peft's LoftQConfig defaults: 4 bits, one step
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}


def loftq_problems(strategy: Any) -> list[str]:
    """Problems with ``init_lora_weights='loftq'`` and ``loftq_config`` of a LoRA strategy."""
    init, config = strategy.init_lora_weights, strategy.loftq_config
    problems = []
    if init == LOFTQ and strategy.use_dora:
        problems.append("init_lora_weights='loftq' needs use_dora=False")
    if config is None:
        return problems
    if init != LOFTQ:
        return [f"loftq_config is read only with init_lora_weights='loftq', got {init!r}"]
    if not isinstance(config, dict):
        return [f"loftq_config must be a dict such as {LOFTQ_DEFAULTS}, got {config!r}"]
    unknown = sorted(set(config) - set(LOFTQ_DEFAULTS))
    if unknown:
        problems.append(f"loftq_config has unknown keys {unknown}; it takes loftq_bits and loftq_iter")
    bits = config.get("loftq_bits", 4)
    if bits != 4 or isinstance(bits, bool):
        problems.append(
            f"loftq_config['loftq_bits'] must be 4 (NF4; 8-bit LoftQ is not implemented), got {bits!r}"
        )
    steps = config.get("loftq_iter", 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(
            f"loftq_config['loftq_iter'] must be an integer >= 1 (alternating steps), got {steps!r}"
        )
    return problems


def loftq_steps(config: dict[str, int] | None) -> int:
    """``loftq_iter`` of a checked ``loftq_config`` (``None``: peft's default, 1)."""
    return (config or {}).get("loftq_iter", LOFTQ_DEFAULTS["loftq_iter"])


def require_bitsandbytes() -> Any:
    """bitsandbytes, or a ``ValueError`` naming ``init_lora_weights='loftq'`` as what needs it."""
    return import_bitsandbytes("init_lora_weights='loftq' quantizes", "use init_lora_weights=True")


@torch.no_grad()
def loftq(
    weight: torch.Tensor, r: int, steps: int, double_quant: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q_T, L, R)`` of LoftQ (see the module docstring) for an ``(out, in)`` float ``weight``.

    ``Q_T`` is a quantized bitsandbytes ``Params4bit`` (NF4, blocks of 64) on ``weight``'s device, the
    one the last step fitted ``L`` (out × r) and ``R`` (r × in) to; all in float32.
    """
    bnb = require_bitsandbytes()
    target = weight.detach().to(torch.float32, copy=True)  # the layer's weight is overwritten later
    kept = target
    for step in range(steps):
        codes = bnb.nn.Params4bit(
            kept, requires_grad=False, quant_type="nf4", compress_statistics=double_quant
        ).to(kept.device)  # moving an unquantized Params4bit quantizes it
        lost = target - bnb.functional.dequantize_4bit(codes.data, codes.quant_state)
        u, s, vh = torch.linalg.svd(lost, full_matrices=False)
        root = s[:r].sqrt()  # (r,)
        left, right = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in)
        if step + 1 < steps:
            kept = target - left @ right
    return codes, left, right


def set_loftq_pair(layer: nn.Module, left: torch.Tensor, right: torch.Tensor) -> None:
    """Start ``layer``'s adapter at ``s B A = L R``: ``B = L / sqrt(s)``, ``A = R / sqrt(s)``."""
    root = layer.scaling**0.5
    with torch.no_grad():
        layer.lora_A.copy_(right / root)
        layer.lora_B.copy_(left / root)


@torch.no_grad()
def initialise_loftq(layer: nn.Module, config: dict[str, int] | None) -> None:
    """LoftQ on a ``LoRALinear`` over a dense ``nn.Linear``: its weight becomes ``deq(Q_T)`` (in its
    own dtype) and its adapter starts from the fit of what ``Q_T`` lost."""
    bnb = require_bitsandbytes()
    stored = layer.inner_layer().weight
    codes, left, right = loftq(stored, layer.r, loftq_steps(config))
    stored.copy_(bnb.functional.dequantize_4bit(codes.data, codes.quant_state).to(stored.dtype))
    set_loftq_pair(layer, left, right)
