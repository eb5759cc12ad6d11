"""Initialisations of LoRA that start from the base weight instead of ``B = 0``: PiSSA and OLoRA.

Both put the weight's principal part into the adapter and leave the rest in the base layer, so the
model computes the same function at the start while training moves the principal part::

    W = W_res + s · B₀ A₀          W_res is written into the base layer; A₀, B₀ start the adapter

- PiSSA (Meng et al., 2024): ``W = U S Vᵀ``; ``B₀ = U_r sqrt(S_r / s)``, ``A₀ = sqrt(S_r / s) V_rᵀ``
  (``"pissa"``: exact SVD; ``"pissa_niter_<k>"``: randomised SVD with ``k`` subspace iterations,
  drawn from a fixed seed so that a resume rebuilds the same residual).
- OLoRA (Büyükakyüz, 2024): ``W = Q R``; ``B₀ = Q_r``, ``A₀ = R_r`` (the first ``r`` rows).

The base weights change, so a trained adapter is only meaningful on ``W_res``. An export converts it
to a plain LoRA on the original ``W``: ``W_res + s B A = W + s (B A - B₀ A₀)``, a rank ``2r`` update
``[B, -B₀] [A; A₀]`` with the same scaling (what peft writes with
``path_initial_model_for_weight_conversion``). The layer keeps ``A₀`` and ``B₀`` for that.
"""

from __future__ import annotations

import re

import torch
from torch import nn

WEIGHT_INITS = ("pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def rewrites_base(init: object) -> bool:
    """Whether ``init_lora_weights=init`` starts from the base weight (and rewrites it)."""
    return isinstance(init, str) and (init in WEIGHT_INITS or _PISSA_NITER.fullmatch(init) is not None)


@torch.no_grad()
def initialise_from_base(layer: nn.Module, init: str) -> None:
    """Set ``layer``'s ``A`` and ``B`` from its base weight by ``init`` and write the residual into it.

    ``layer`` is a ``LoRALinear`` over a dense ``nn.Linear`` (or a ``Conv1D`` for PiSSA); ``A₀``/``B₀`` are kept as buffers
    (``lora_A_initial``, ``lora_B_initial``; not saved: a resume computes them again).
    """
    stored = layer.inner_layer().weight
    flip = getattr(layer, "fan_in_fan_out", False)  # GPT-2's Conv1D stores (in, out)
    weight = stored.float().T if flip else stored.float()  # (out, in)
    r, scaling = layer.r, layer.scaling
    if init == "olora":
        q, upper = torch.linalg.qr(weight)
        b, a = q[:, :r], upper[:r]  # (out, r), (r, in)
    else:
        u, s, vh = _top_singular(weight, r, init)
        root = (s / scaling).sqrt()  # (r,)
        b, a = u * root, root[:, None] * vh
    residual = weight - scaling * (b @ a)
    stored.copy_((residual.T if flip else residual).to(stored.dtype))
    layer.lora_A.copy_(a)
    layer.lora_B.copy_(b)
    layer.register_buffer("lora_A_initial", a.to(layer.lora_A.dtype).clone(), persistent=False)
    layer.register_buffer("lora_B_initial", b.to(layer.lora_B.dtype).clone(), persistent=False)


def _top_singular(weight: torch.Tensor, r: int, init: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, V_rᵀ)`` of ``weight``: exact, or randomised for ``pissa_niter_<k>``."""
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    niter = int(_PISSA_NITER.fullmatch(init).group(1))
    with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
    return u, s, v.T


def plain_lora_pair(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` of rank ``2r`` that give on the original base weight what ``layer`` gives on the
    residual one: ``B' A' = B A - B₀ A₀``."""
    a = torch.cat([layer.lora_A.detach(), layer.lora_A_initial.to(layer.lora_A.dtype)], dim=0)
    b = torch.cat([layer.lora_B.detach(), -layer.lora_B_initial.to(layer.lora_B.dtype)], dim=1)
    return a, b
