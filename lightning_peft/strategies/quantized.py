"""Layers that bitsandbytes quantized: recognising them and reading their weights back as floats.

Used by LoRA (DoRA's norm and merging need a dense weight, LoftQ quantizes) and by QLoRA. Only
:func:`import_bitsandbytes` imports bitsandbytes; the readers below find it loaded, as a quantized weight
can only exist if it was.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn


class _HubKernelNotice(logging.Filter):
    """Keeps back bitsandbytes' warning that its optional CPU kernel could not be fetched from the hub.

    bitsandbytes 0.50 tries, when it is imported on a CPU with AVX512-BF16, to download a faster 4-bit
    matmul from the Hugging Face hub, and logs a long warning (advice to install ``kernels``) when that
    fails, which it always does offline. Its own CPU code then does the work, correctly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held_back = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" in record.getMessage():
            self.held_back = True
            return False
        return True


def import_bitsandbytes(
    needed_by: str = "QLoRA quantizes", instead: str = "use LoRA on the unquantized model"
) -> Any:
    """The ``bitsandbytes`` module, or a ``ValueError`` that says who needs it, how to get it and what
    to do ``instead``."""
    notice = _HubKernelNotice()
    # bitsandbytes' own warning, and the hub client's (the ``kernels`` package) about the same fetch
    loggers = [
        logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
    ]
    for logger in loggers:
        logger.addFilter(notice)
    try:
        import bitsandbytes
    except Exception as err:  # a broken install raises more than ImportError
        raise ValueError(
            f"{needed_by} with bitsandbytes, which cannot be imported ({type(err).__name__}: {err}); "
            f"install it with `pip install 'bitsandbytes>=0.50'` or {instead}"
        ) from err
    finally:
        for logger in loggers:
            logger.removeFilter(notice)
    if notice.held_back:
        logging.getLogger(__name__).info(
            "bitsandbytes: its optional hub-hosted CPU 4-bit kernel is not available (offline); "
            "it uses its built-in CPU code"
        )
    return bitsandbytes


def quantized_kind(layer: nn.Module) -> str | None:
    """``"4-bit"`` or ``"8-bit"`` for a layer whose weight bitsandbytes has quantized, else None."""
    weight = getattr(layer, "weight", None)
    if getattr(weight, "quant_state", None) is not None:
        return "4-bit"
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.int8:
        return "8-bit"
    return None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a floating-point tensor, in the layer's own storage order.

    Dense layers (``nn.Linear``, ``Conv1D``, ...) return their weight itself. bitsandbytes layers return
    a new, dequantized ``(out, in)`` tensor: 4-bit weights in the dtype they were quantized from,
    8-bit (LLM.int8) weights in float32.
    """
    kind = quantized_kind(layer)
    if kind is None:
        return layer.weight
    functional = sys.modules["bitsandbytes.functional"]  # loaded: the weight is one of its tensors
    weight = layer.weight
    if kind == "4-bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights in place for its CPU inference kernel; restore the
            # standard layout first, as bitsandbytes itself does before saving
            weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        return functional.dequantize_4bit(weight.data, weight.quant_state)
    # LLM.int8 keeps one scale per output row, on the weight until the first forward, then on the layer
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return functional.int8_vectorwise_dequant(weight.data, scales)


def dequantized_linear(layer: nn.Module) -> nn.Linear:
    """A dense ``nn.Linear`` equal to the quantized ``layer`` (same bias, dequantized weight).

    Its dtype is the one the weight had before quantization (so the model around it still fits):
    the ``dense_dtype`` that QLoRA records on the layers it quantizes, otherwise the dequantized
    weight's own dtype.
    """
    weight = dense_weight(layer)
    dtype = getattr(layer, "dense_dtype", weight.dtype)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=layer.bias.requires_grad)
    return dense.train(layer.training)
