"""QLoRA (Dettmers et al., 2023): LoRA on a frozen base whose linear layers are quantized to 4 bits.

The base weights are stored as 4-bit NormalFloat (NF4) codes, one 8-bit absmax per block of 64 weights
and, with double quantization, one float32 constant per 256 absmax values (QLoRA sec. 3). A forward
dequantizes each weight on the fly to the compute dtype; only the LoRA matrices train, in float32::

    x ──► dequant(W_nf4) → compute dtype ──► W x ──► (+) ──► y
    └───► dropout ─► A (r × in) ─► B (out × r) ─► · s ──┘

The 8-bit alternative (``quant_type="int8"``) is LLM.int8 (Dettmers et al., 2022): int8 weights with
one scale per output row, and input columns with outliers above 6.0 multiplied in 16 bits.

The quantized layers are bitsandbytes' own (``Linear4bit``, ``Linear8bitLt``), so checkpoints and
device moves behave as bitsandbytes documents; LoRA's layers wrap them unchanged (see ``lora.py``).
Quantization runs on the weights' device, the CPU included (bitsandbytes >= 0.45); Lightning's
``BitsandbytesPrecision`` is not used, as it refuses the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightning_peft.strategies.base import PEFTLayer
from lightning_peft.strategies.lora import LoRA
from lightning_peft.strategies.lora_init import rewrites_base
from lightning_peft.strategies.lora_loftq import LOFTQ, loftq, loftq_steps, set_loftq_pair
from lightning_peft.strategies.modules_to_save import select_modules_to_save
from lightning_peft.strategies.quantized import import_bitsandbytes, quantized_kind
from lightning_peft.strategies.targeting import (
    ALL_LINEAR,
    candidate_modules,
    check_spec,
    describe_modules,
    matches,
    output_heads,
    replace_module,
    validation_error,
)

QuantType = Literal["nf4", "fp4", "int8"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]

QUANT_TYPES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# LLM.int8 sec. 3.2: input columns holding a value above 6 are multiplied in 16 bits
LLM_INT8_THRESHOLD = 6.0


def quantize_linear(
    linear: nn.Linear,
    quant_type: QuantType = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    codes: torch.Tensor | None = None,
) -> nn.Module:
    """A frozen bitsandbytes copy of ``linear``, quantized on the device its weight is on.

    ``double_quant`` and ``compute_dtype`` apply to 4-bit types; LLM.int8 computes in int8 with
    16-bit outlier columns and returns the input's dtype. ``codes``: a 4-bit ``Params4bit`` quantized
    already (by LoftQ, from a weight other than ``linear``'s own), stored as it is. The new layer
    records the weight's dtype as ``dense_dtype``, the dtype a merge dequantizes it back into.
    """
    bnb = import_bitsandbytes()
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if quant_type == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=LLM_INT8_THRESHOLD,
            device="meta",
        )
        # Int8Params quantizes on .to() only when its data starts on the CPU; the functional form works
        # on any device. LLM.int8 quantizes from float16, as bitsandbytes does.
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        layer.weight = bnb.nn.Int8Params(
            codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales
        )
        bias_dtype = weight.dtype
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quant_type,
            device="meta",
        )
        if codes is None:
            params = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                quant_type=quant_type,
                compress_statistics=double_quant,
                module=layer,
            )
            codes = params.to(weight.device)  # moving an unquantized Params4bit quantizes it
        codes.module = layer
        layer.weight = codes
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at the first eval forward:
        # the double-quantized statistics turn to bfloat16 (lossy to undo) and layers whose out_features
        # is not a multiple of 32 fail. Keep the standard layout, the one CUDA and checkpoints use.
        layer.support_avx512bf16_for_cpu = False
        # Linear4bit casts its bias to the compute dtype in place at the first forward; do it now,
        # before an optimizer could hold the bias
        bias_dtype = compute_dtype
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(bias_dtype), requires_grad=False)
    layer.dense_dtype = weight.dtype
    return layer.train(linear.training)


def quantized_weight_bytes(layer: nn.Module) -> int:
    """Bytes held by a bitsandbytes layer's quantized weight: the codes plus every quantization statistic."""
    weight = layer.weight
    kind = quantized_kind(layer)
    if kind == "4-bit":
        state = weight.quant_state
        tensors = [weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
    elif kind == "8-bit":
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        tensors = [weight.data, scales]
    else:
        raise TypeError(f"{type(layer).__name__} holds no bitsandbytes-quantized weight")
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class QLoRA(LoRA):
    """LoRA on a base whose linear layers are quantized by bitsandbytes (QLoRA, Dettmers et al., 2023).

    Takes every :class:`~lightning_peft.strategies.lora.LoRA` argument, plus:

    Args:
        quant_type: ``"nf4"`` (4-bit NormalFloat, QLoRA sec. 3), ``"fp4"`` (4-bit float), or ``"int8"``
            (LLM.int8, Dettmers et al., 2022: twice the memory, about ten times less weight error).
        double_quant: also quantize the per-block scales (QLoRA sec. 3, "Double Quantization"):
            about 0.52 instead of 0.56 bytes per weight. 4-bit types only.
        compute_dtype: the dtype 4-bit layers dequantize into and multiply in; outputs come back in
            the input's dtype. ``"bfloat16"`` (the paper's) is the default on every device: CPUs with
            AVX512-BF16 also train faster in it than in ``"float32"``, whose only gain is float32
            rounding, small next to the 4-bit error. 8-bit layers compute in int8.
        quantize_modules: which layers to quantize, in the same forms as ``target_modules``. The default
            ``"all-linear"`` takes every ``nn.Linear`` except the output head and ``modules_to_save``.
            Only ``nn.Linear`` layers can be quantized (not GPT-2's ``Conv1D``); layers bitsandbytes has
            quantized already are left as they are.

    With ``init_lora_weights="loftq"`` (``quant_type="nf4"``), each targeted layer is quantized by LoftQ
    (see ``lora_loftq.py``): the stored 4-bit weight is the ``Q`` of LoftQ's last step, with this
    strategy's ``double_quant``; ``double_quant=False`` gives peft's LoftQ exactly (float32 absmax).
    Targets that are not quantized (outside ``quantize_modules``) get LoRA's dense LoftQ.

    The adapters train in float32. Merging dequantizes each base layer into a dense ``nn.Linear`` in the
    dtype it had before quantization, with a warning (see ``LoRALinear.merge``).

    Example::

        model = QLoRA(r=16, lora_alpha=32, quant_type="nf4").apply(model)
    """

    quant_type: QuantType = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "bfloat16"
    quantize_modules: str | list[str] = ALL_LINEAR

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.quant_type not in QUANT_TYPES:
            problems.append(f"quant_type must be one of {', '.join(QUANT_TYPES)}; got {self.quant_type!r}")
        if not isinstance(self.double_quant, bool):
            problems.append(f"double_quant must be True or False, got {self.double_quant!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(
                f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}"
            )
        if self.quantize_modules is None:
            problems.append("quantize_modules is required: a regex, a list of names, or 'all-linear'")
        check_spec("quantize_modules", self.quantize_modules, problems)
        if rewrites_base(self.init_lora_weights):
            problems.append(
                f"init_lora_weights={self.init_lora_weights!r} rewrites dense base weights; QLoRA quantizes them "
                "(start from LoRA with it, or use init_lora_weights=True)"
            )
        if self.init_lora_weights == LOFTQ and self.quant_type != "nf4":
            problems.append(f"init_lora_weights='loftq' quantizes to nf4; got quant_type={self.quant_type!r}")
        return problems

    def inject(self, model: nn.Module) -> None:
        import_bitsandbytes()
        # both selections are checked before the model changes: a bad config leaves it as it was
        targets = {name for name, _ in self._checked_targets(model)}
        layers = self._layers_to_quantize(model)
        compute_dtype = getattr(torch, self.compute_dtype)
        # LoftQ's (L, R) per layer it quantized, until LoRA's layers exist (see _start_loftq)
        self._loftq_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            for name, linear in layers:
                if quantized_kind(linear) is not None:
                    continue
                codes = None
                if self.init_lora_weights == LOFTQ and name in targets:
                    r = self.layer_settings(name)[0]
                    codes, *pair = loftq(linear.weight, r, loftq_steps(self.loftq_config), self.double_quant)
                    self._loftq_pairs[name] = tuple(pair)
                new = quantize_linear(linear, self.quant_type, self.double_quant, compute_dtype, codes)
                replace_module(model, name, new)
            super().inject(model)
        finally:
            del self._loftq_pairs

    def _loftq_ready(self, name: str, module: nn.Module) -> bool:
        return name in getattr(self, "_loftq_pairs", {}) or super()._loftq_ready(name, module)

    def _start_loftq(self, name: str, layer: nn.Module) -> None:
        if name in self._loftq_pairs:
            set_loftq_pair(layer, *self._loftq_pairs[name])
        else:  # a target outside quantize_modules: dense LoftQ, as LoRA
            super()._start_loftq(name, layer)

    def _layers_to_quantize(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        saved = select_modules_to_save(model, self.modules_to_save, "QLoRA")
        candidates = [
            (n, m)
            for n, m in candidate_modules(model)
            if not any(n == s or n.startswith(s + ".") for s in saved)
        ]
        if self.quantize_modules == ALL_LINEAR:
            heads = output_heads(model)
            chosen = [(n, m) for n, m in candidates if isinstance(m, nn.Linear) and id(m) not in heads]
        else:
            chosen = [(n, m) for n, m in candidates if matches(n, self.quantize_modules)]
        if not chosen:
            raise ValueError(
                f"QLoRA found nothing to quantize: quantize_modules={self.quantize_modules!r} selects no "
                f"nn.Linear layer (the output head and modules_to_save are never taken by 'all-linear'). "
                f"Modules in this model: {describe_modules(candidates)}"
            )
        problems = []
        for name, module in chosen:
            if isinstance(module, PEFTLayer):
                problems.append(f"{name!r} already carries an adapter ({type(module).__name__})")
            elif not isinstance(module, nn.Linear):
                problems.append(
                    f"{name!r} is a {type(module).__name__}; QLoRA quantizes nn.Linear layers only"
                )
            elif module.weight.device.type == "meta":
                problems.append(
                    f"{name!r} has its weight on the meta device; load the weights before quantizing"
                )
            elif quantized_kind(module) is None and not module.weight.is_floating_point():
                problems.append(f"{name!r} has a {module.weight.dtype} weight; QLoRA quantizes float weights")
        validation_error("QLoRA", problems)
        return chosen
