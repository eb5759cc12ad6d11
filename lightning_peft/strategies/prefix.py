"""Prefix tuning (Li & Liang, 2021): trainable keys and values before every attention layer's own.

See ``prompt.py`` for the overview of both virtual-token methods and ``virtual_tokens.py`` for the
hook they share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.strategies.base import PEFTStrategy
from lightning_peft.strategies.targeting import validation_error
from lightning_peft.strategies.transformers_compat import cache_argument, call_cache, new_cache
from lightning_peft.strategies.virtual_tokens import (
    CACHE_MARK,
    PREFIX_ATTR,
    attach_encoder,
    detach_encoders,
    embedding_weight,
    find_language_model,
    positional_names,
    positive_int,
    widen_inputs,
)


def _attention_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class PrefixEncoder(nn.Module):
    """Trainable keys and values for every attention layer, computed as peft's ``PrefixEncoder`` does.

    Without projection the parameter is ``prefix`` of shape ``(n, layers * 2 * kv_heads * head_dim)``;
    with it, ``prefix_embeddings`` ``(n, kv_heads * head_dim)`` and an MLP ``transform`` (Linear, Tanh,
    Linear) that maps them to that shape.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        encoder_hidden_size: int | None = None,
        forward_params: tuple[str, ...] = (),
        config: Any = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens, self.layers = num_virtual_tokens, layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        width = kv_heads * head_dim
        if encoder_hidden_size is None:
            self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, layers * 2 * width))
        else:
            self.prefix_embeddings = nn.Parameter(torch.randn(num_virtual_tokens, width))
            self.transform = nn.Sequential(
                nn.Linear(width, encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, layers * 2 * width),
            )
        self.forward_params = forward_params
        self.config = config  # for a cache laid out like the model's own (sliding-window layers)
        self.enabled = True
        self.hook_handle: RemovableHandle | None = None

    def adapter_params(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def prefix_values(self) -> torch.Tensor:
        """The prefix that attention sees: ``(n, layers * 2 * kv_heads * head_dim)``."""
        if "prefix" in self._parameters:
            return self.prefix
        return self.transform(self.prefix_embeddings)

    def export_embeddings(self) -> torch.Tensor:
        """The tensor peft saves as ``prompt_embeddings`` (the projection, if any, already applied)."""
        with torch.no_grad():
            return self.prefix_values().detach()

    def forward(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per layer, each ``(B, kv_heads, n, head_dim)``."""
        prefix = self.prefix_values().to(dtype)  # (n, layers * 2 * kv_heads * head_dim)
        states = prefix.view(self.num_virtual_tokens, 2 * self.layers, self.kv_heads, self.head_dim)
        states = states.permute(1, 2, 0, 3).unsqueeze(1)  # (2 * layers, 1, kv_heads, n, head_dim)
        states = states.expand(-1, batch_size, -1, -1, -1)  # (2 * layers, B, kv_heads, n, head_dim)
        return [(states[2 * i], states[2 * i + 1]) for i in range(self.layers)]

    def prepend(self, model: nn.Module, kwargs: dict[str, Any], batch: int, length: int) -> None:
        """Rewrite the keyword arguments of ``model``'s call (in place): a cache that holds the prefix."""
        cache = call_cache(kwargs)
        if cache is None:
            cache = kwargs[cache_argument(model) or "past_key_values"] = new_cache(self.config)
            setattr(cache, CACHE_MARK, self.num_virtual_tokens)
        for layer, (keys, values) in enumerate(self(batch, embedding_weight(model).dtype)):
            cache.update(keys, values, layer)
        widen_inputs(kwargs, self.num_virtual_tokens, batch, length)


@dataclass
class PrefixTuning(PEFTStrategy):
    """Trainable key/value prefixes in every attention layer (Li & Liang, 2021).

    Supported: transformers 5 models whose attention reads a key/value cache: decoders
    (Llama and its relatives, GPT-2) and BERT-style encoders (the prefix is prepended in the
    backbone). Not supported: encoder-decoder models, gradient checkpointing.

    Args:
        num_virtual_tokens: prefix length (the paper uses 10 for table-to-text, 200 for summarisation).
        prefix_projection: compute the prefix with an MLP from smaller embeddings while training
            (sec. 4.3: more stable optimisation); the export saves the computed prefix.
        encoder_hidden_size: hidden width of that MLP; default the model's key/value width
            (``kv_heads * head_dim``), as peft.

    Example::

        model = PrefixTuning(num_virtual_tokens=8).apply(model)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)   # out.logits: (B, T, vocab)
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        positive_int("num_virtual_tokens", self.num_virtual_tokens, problems)
        if not isinstance(self.prefix_projection, bool):
            problems.append(f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        if self.encoder_hidden_size is not None:
            positive_int("encoder_hidden_size", self.encoder_hidden_size, problems)
            if self.prefix_projection is False:
                problems.append("encoder_hidden_size is used only with prefix_projection=True")
        validation_error(type(self).__name__, problems)

    def inject(self, model: nn.Module) -> None:
        target = find_language_model(model, "PrefixTuning", needs_cache=True)
        config = getattr(target, "config", None)
        problems = []
        if config is None or not hasattr(config, "num_hidden_layers"):
            problems.append(
                f"{type(target).__name__} has no transformers config to read its attention shape from"
            )
        elif getattr(config, "is_encoder_decoder", False):
            problems.append(
                f"{type(target).__name__} is an encoder-decoder model; PrefixTuning supports decoders"
            )
        checkpointed = [
            n for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True
        ]
        if checkpointed:
            problems.append(
                "gradient checkpointing is on (it drops the key/value cache that carries the prefix) in "
                f"{', '.join(checkpointed[:4])}; switch it off first (activation_checkpointing_disable(), gradient_checkpointing_disable() "
                "before transformers 5.2x)"
            )
        validation_error("PrefixTuning", problems)
        layers, kv_heads, head_dim = _attention_shape(config)
        width = kv_heads * head_dim
        hidden = (self.encoder_hidden_size or width) if self.prefix_projection else None
        device = embedding_weight(target).device
        encoder = PrefixEncoder(
            self.num_virtual_tokens, layers, kv_heads, head_dim, hidden, positional_names(target), config
        ).to(device)
        attach_encoder(target, "PrefixTuning", PREFIX_ATTR, encoder)

    def remove(self, model: nn.Module) -> nn.Module:
        """Take the prefix and its hook out of ``model`` (it is then the base model again)."""
        return detach_encoders(model, PrefixEncoder)
