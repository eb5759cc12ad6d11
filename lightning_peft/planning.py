"""Training memory of full fine-tuning, LoRA and QLoRA, estimated from a model config alone.

:func:`plan` builds the model on PyTorch's ``meta`` device (shapes and dtypes, no storage), applies
the method there, and runs one training forward on meta tensors while counting what autograd saves
for backward. Nothing is allocated, so a 7B or 70B config is planned on a laptop in seconds::

    weights      parameters and buffers as stored (QLoRA: 4-bit codes plus their statistics)
    gradients    one per trainable parameter, in its dtype
    optimizer    AdamW: two states per trainable parameter (SGD: none)
    activations  the tensors autograd keeps between the forward and the backward, each storage once

The activations are the model's own forward as it runs on this PyTorch and transformers (attention
kernel, loss upcasts, gradient checkpointing), not a formula per architecture. Not counted: the
temporary buffers of single operations (matmul workspaces, the backward's transient gradients), the
CUDA context and allocator fragmentation; on a GPU, plan some headroom over the total.

Example::

    from lightning_peft import plan
    for method in ("full", "lora", "qlora"):
        print(plan("path/to/llama/config.json", method, batch_size=4, seq_len=512, dtype="bfloat16"))
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_peft.strategies.base import PEFTStrategy
from lightning_peft.strategies.transformers_compat import enable_checkpointing

Method = Literal["full", "lora", "qlora"]
METHODS: tuple[str, ...] = ("full", "lora", "qlora")
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}
QLORA_BLOCK = 64  # bitsandbytes' 4-bit block size (one absmax per 64 weights)
NESTED_BLOCK = 256  # double quantization: one float32 constant per 256 absmax values
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one training step holds, by part. ``total_bytes`` is their sum."""

    method: str
    parameters: int
    trainable: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"total_bytes": self.total_bytes}

    def __str__(self) -> str:
        parts = ", ".join(
            f"{name} {value / GIB:.2f} GiB"
            for name, value in (
                ("weights", self.weight_bytes),
                ("gradients", self.gradient_bytes),
                ("optimizer", self.optimizer_bytes),
                ("activations", self.activation_bytes),
            )
        )
        return f"{self.method}: {self.total_bytes / GIB:.2f} GiB ({parts}; {self.trainable:,} trainable)"


def saved_activation_bytes(forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs, each storage once.

    Tensors sharing a storage with ``exclude`` (parameters, buffers) are not counted, nor tensors the
    graph has already dropped when ``forward`` returns (a graph built and detached inside it). Works
    on real and on ``meta`` tensors alike.
    """
    skip = {t.untyped_storage()._cdata for t in exclude}
    saved: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    storages: dict[int, int] = {}
    for ref in saved:
        tensor = ref()
        if tensor is not None:
            storage = tensor.untyped_storage()
            if storage._cdata not in skip:
                storages[storage._cdata] = storage.nbytes()
    del result
    return sum(storages.values())


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward (flash / memory-efficient, as PyTorch picks on
    CUDA and CPU): the inputs, the output and a float32 log-sum-exp per query. On ``meta`` tensors
    PyTorch falls back to the math path, which would also count the (B, H, T, T) probabilities."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> None:
        raise RuntimeError("a memory plan's forward is never differentiated")


class _Planning(TorchFunctionMode):
    """Runs a transformers forward on ``meta`` tensors: fused attention, and data-dependent checks
    (``if mask.all():``, which cannot read a meta tensor) take their common case, True."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _FusedAttention.apply(*args[:3])
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True
        return func(*args, **kwargs)


def profiled_peak_bytes(step: Callable[[], Any]) -> int:
    """The most tensor memory held at once while ``step()`` runs, on top of what was held before it.

    Read from torch's profiler (``profile_memory=True``): every allocation and free of every operator,
    in time order, summed. Works on the CPU, where no allocator keeps a peak counter (on CUDA,
    ``torch.cuda.max_memory_allocated`` gives the same). Tensors created before ``step`` are not
    counted: add the weights and optimizer states held already.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    )
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


def quantized_bytes(out_features: int, in_features: int, quant_type: str, double_quant: bool) -> int:
    """Bytes bitsandbytes stores for one quantized ``(out, in)`` weight, statistics included."""
    n = out_features * in_features
    if quant_type == "int8":  # LLM.int8: int8 codes plus one float32 scale per output row
        return n + 4 * out_features
    blocks = math.ceil(n / QLORA_BLOCK)
    codes = math.ceil(n / 2) + 16 * 4  # two 4-bit codes per byte, plus the 16-entry code book
    if not double_quant:
        return codes + 4 * blocks
    # 8-bit absmax per block, a float32 absmax per 256 of them, its 256-entry code book and an offset
    return codes + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + 4


# Shapes of well-known models, to plan without a config file: `lightning-peft plan llama-7b`.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    ),
    "llama-13b": dict(
        model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
    ),
    "llama-3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    ),
}  # fmt: skip


def model_config(config: Any) -> Any:
    """A ``transformers`` config from a config, a dict with ``model_type``, a model folder or its
    config.json, or a name in :data:`PRESETS`."""
    import transformers

    if isinstance(config, transformers.PretrainedConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        return model_config(PRESETS[config])
    if isinstance(config, dict):
        config = dict(config)
        if "model_type" not in config:
            raise ValueError("a config dict needs a 'model_type' (e.g. 'llama')")
        return transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"no model config at {config}: give a model folder, its config.json, a dict, or one of "
            f"{', '.join(PRESETS)}"
        )
    return model_config(json.loads(path.read_text()))


def _strategy(method: str, strategy: PEFTStrategy | None, r: int) -> PEFTStrategy | None:
    from lightning_peft.strategies.lora import LoRA

    if strategy is not None:
        return strategy
    if method == "full":
        return None
    return LoRA(r=r, lora_alpha=2 * r, target_modules="all-linear")


def _quantized_layers(model: nn.Module) -> list[nn.Linear]:
    """What QLoRA's default quantizes: every ``nn.Linear`` but the output head (and the adapters)."""
    from lightning_peft.strategies.base import PEFTLayer
    from lightning_peft.strategies.targeting import output_heads

    heads = output_heads(model)
    adapter_owned = {
        id(p) for m in model.modules() if isinstance(m, PEFTLayer) for p in m.parameters(recurse=False)
    }
    return [
        m
        for m in model.modules()
        if type(m) is nn.Linear and id(m) not in heads and id(m.weight) not in adapter_owned
    ]


def _meta_model(
    config: Any,
    auto_class: str,
    dtype: torch.dtype,
    method: str,
    strategy: PEFTStrategy | None,
    gradient_checkpointing: bool,
) -> nn.Module:
    """The model on the meta device, with ``strategy`` applied (every weight trains without one)."""
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(model_config(config)).to(dtype)
    if strategy is None:
        model.requires_grad_(True)
    else:
        strategy.apply(model)
    if method == "qlora":  # QLoRA trains its adapters in float32 over an integer base (see qlora.py)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if gradient_checkpointing:
        enable_checkpointing(model, use_reentrant=False)
    return model.train()


def plan(
    config: Any,
    method: Method = "lora",
    *,
    strategy: PEFTStrategy | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str | torch.dtype = "float32",
    optimizer: str = "adamw",
    r: int = 16,
    quant_type: Literal["nf4", "fp4", "int8"] = "nf4",
    double_quant: bool = True,
    gradient_checkpointing: bool = False,
    auto_class: str = "AutoModelForCausalLM",
) -> MemoryPlan:
    """Estimate the memory of one training step without allocating the model.

    Args:
        config: a ``transformers`` config, a dict with ``model_type``, a model folder / config.json,
            or a preset name (``"llama-7b"``, see :data:`PRESETS`).
        method: ``"full"`` (every weight trains), ``"lora"`` or ``"qlora"`` (LoRA r on all linear
            layers; QLoRA also stores the base's linear layers in 4 bits).
        strategy: plan this ``PEFTStrategy`` instead of the default LoRA (``method`` says whether
            the base is quantized).
        batch_size, seq_len: the training batch (token ids; a causal LM's labels are the inputs).
        dtype: the dtype the model's weights and activations are in (QLoRA: its compute dtype).
        optimizer: ``"adamw"``/``"adam"`` (two states per trainable weight), ``"sgd-momentum"``, ``"sgd"``.
        gradient_checkpointing: plan with transformers' gradient checkpointing turned on.
        auto_class: the ``transformers`` auto class that builds the model.
    """
    problems = []
    if method not in METHODS:
        problems.append(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if optimizer not in OPTIMIZER_STATES:
        problems.append(f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZER_STATES)}")
    if batch_size < 1 or seq_len < 1:
        problems.append(f"batch_size and seq_len must be positive (got {batch_size}, {seq_len})")
    if problems:
        raise ValueError("plan: " + "; ".join(problems))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = _meta_model(
        config, auto_class, dtype, method, _strategy(method, strategy, r), gradient_checkpointing
    )
    tensors = [*model.parameters(), *model.buffers()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    if method == "qlora":
        for linear in _quantized_layers(model):
            dense = linear.weight.numel() * linear.weight.element_size()
            quantized = quantized_bytes(linear.out_features, linear.in_features, quant_type, double_quant)
            weight_bytes += quantized - dense
    gradient_bytes = sum(p.numel() * p.element_size() for p in trainable)
    states = OPTIMIZER_STATES[optimizer]
    optimizer_bytes = states * gradient_bytes + (4 * len(trainable) if states == 2 else 0)  # Adam's step

    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    with _Planning():
        activation_bytes = saved_activation_bytes(lambda: model(input_ids=ids, labels=ids).loss, tensors)
    return MemoryPlan(
        method=method,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in trainable),
        weight_bytes=weight_bytes,
        gradient_bytes=gradient_bytes,
        optimizer_bytes=optimizer_bytes,
        activation_bytes=activation_bytes,
    )


def measure_step(model: nn.Module, input_ids: torch.Tensor, method: str = "measured") -> MemoryPlan:
    """What :func:`plan` predicts, counted on a real model: one forward, backward and AdamW step.

    Weights as stored (bitsandbytes layers: codes plus statistics), the gradients and AdamW's states
    that exist after the step, and the tensors autograd saved during the forward. ``model`` must be
    a causal LM (its labels are ``input_ids``); its trainable parameters take one step (lr 1e-3).
    """
    from lightning_peft.strategies.qlora import quantized_weight_bytes
    from lightning_peft.strategies.quantized import quantized_kind

    model.train()
    tensors = [*model.parameters(), *model.buffers()]
    quantized = {id(m.weight): quantized_weight_bytes(m) for m in model.modules() if quantized_kind(m)}
    weight_bytes = sum(quantized.get(id(t), t.numel() * t.element_size()) for t in tensors)
    losses: list[torch.Tensor] = []
    activation_bytes = saved_activation_bytes(
        lambda: losses.append(model(input_ids=input_ids, labels=input_ids).loss), tensors
    )
    losses.pop().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    states = [t for state in optimizer.state.values() for t in state.values()]
    plan_ = MemoryPlan(
        method=method,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in trainable),
        weight_bytes=weight_bytes,
        gradient_bytes=sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None),
        optimizer_bytes=sum(t.numel() * t.element_size() for t in states),
        activation_bytes=activation_bytes,
    )
    optimizer.zero_grad(set_to_none=True)
    return plan_


def plan_table(plans: Iterable[MemoryPlan]) -> str:
    """A Markdown table of plans in GiB."""
    lines = [
        "| method | trainable | weights GiB | gradients GiB | optimizer GiB | activations GiB | total GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in plans:
        cells = (p.weight_bytes, p.gradient_bytes, p.optimizer_bytes, p.activation_bytes, p.total_bytes)
        lines.append(
            f"| {p.method} | {p.trainable:,} | " + " | ".join(f"{c / GIB:.3f}" for c in cells) + " |"
        )
    return "\n".join(lines)
