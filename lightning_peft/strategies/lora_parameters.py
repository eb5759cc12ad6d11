"""LoRA on ``nn.Parameter`` weights that no ``nn.Linear`` holds (peft's ``target_parameters``), such as
the stacked expert weights of mixture-of-experts models (``experts.gate_up_proj``, shape
``(experts, out, in)``).

Each expert ``e`` gets its own rank-``r`` update; the factors of all experts sit in one ``A`` and one
``B``, laid out as peft lays them out so that files map one to one::

    A: (r · E, in)   rows    e·r .. e·r + r-1   are expert e's A_e  (r × in)
    B: (out, r · E)  columns  k·E + e (k < r)    are expert e's B_e  (out × r)
    W'[e] = W[e] + s · B_e A_e

The module that owns the parameter is wrapped; while the wrapper runs it, the parameter reads as
``W + ΔW`` (a ``torch.nn.utils.parametrize`` parametrization added for the call and removed after),
so the module's own code, whatever it does with the weight, sees the adapted one and gradients reach
``A`` and ``B``. Two targeted parameters of one module nest two wrappers (``base_layer``), the first
parameter innermost, as peft nests them. No dropout, DoRA or ``lora_bias`` here (peft has none either).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize


class _AddDelta(nn.Module):
    """The parametrization ``W -> W + ΔW`` of one wrapper (held in a list: not a submodule of it)."""

    def __init__(self, wrapper: LoRAParameter) -> None:
        super().__init__()
        self.wrapper = [wrapper]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.wrapper[0].delta_weight().to(weight.dtype)


class LoRAParameter(nn.Module):
    """LoRA on the parameter ``parameter_name`` of the module ``base_layer`` wraps (2-D or 3-D)."""

    def __init__(
        self, base_layer: nn.Module, parameter_name: str, r: int, lora_alpha: float, use_rslora: bool = False
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        param = self.param()
        if param.dim() == 3:  # (experts, out, in), or (experts, in, out) for modules marked is_transposed
            experts, first, second = param.shape
            self.transposed = bool(getattr(self.owner(), "is_transposed", False))
            out_features, in_features = (second, first) if self.transposed else (first, second)
        else:
            experts, self.transposed = 1, False
            out_features, in_features = param.shape
        self.num_experts = experts
        kwargs = {
            "device": param.device,
            "dtype": param.dtype if param.is_floating_point() else torch.float32,
        }
        self.lora_A = nn.Parameter(torch.empty(r * experts, in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r * experts, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self.enabled = True

    def owner(self) -> nn.Module:
        """The module that holds the parameter, below any other wrappers."""
        module = self.base_layer
        while isinstance(module, LoRAParameter):
            module = module.base_layer
        return module

    def param(self) -> nn.Parameter:
        return getattr(self.owner(), self.parameter_name)

    def adapter_params(self) -> list[str]:
        return ["lora_A", "lora_B"]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` in the parameter's shape."""
        if self.num_experts == 1:
            return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        experts, r = self.num_experts, self.r
        a = self.lora_A.reshape(experts, r, -1)  # (E, r, in)
        b = self.lora_B.reshape(self.lora_B.shape[0], r, experts).permute(2, 0, 1)  # (E, out, r)
        delta = torch.bmm(b, a) * self.scaling  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def forward(self, *args: object, **kwargs: object) -> object:
        if self.merged or not self.enabled:
            return self.base_layer(*args, **kwargs)
        with self._adapted():
            return self.base_layer(*args, **kwargs)

    @contextlib.contextmanager
    def _adapted(self) -> Iterator[None]:
        owner = self.owner()
        parametrize.register_parametrization(owner, self.parameter_name, _AddDelta(self), unsafe=True)
        try:
            yield
        finally:
            parametrize.remove_parametrizations(owner, self.parameter_name, leave_parametrized=False)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            param = self.param()
            param.add_(self.delta_weight().to(param.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            param = self.param()
            param.sub_(self.delta_weight().to(param.dtype))
            self.merged = False


def parameter_targets(model: nn.Module, entries: list[str]) -> list[tuple[str, str, str]]:
    """``(module name, parameter name, entry)`` for each parameter that ``entries`` select, in peft's
    order: modules in model order, each module's parameters in their registration order. An entry
    selects the parameter whose dotted name equals it or ends with ``.<entry>``."""
    found = []
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}"
            entry = next((e for e in entries if full == e or full.endswith("." + e)), None)
            if entry is not None and module_name:
                found.append((module_name, param_name, entry))
    return found
