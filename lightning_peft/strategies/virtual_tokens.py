"""The machinery prompt tuning (``prompt.py``) and prefix tuning (``prefix.py``) share.

Both act through a forward pre-hook on the Hugging Face model (:func:`virtual_token_hook`), so a
``training_step`` that calls ``model(input_ids=..., attention_mask=..., labels=...)`` works unchanged:
the hook hands the call's keyword arguments to the adapter's encoder, whose ``prepend`` puts in the
virtual tokens (soft prompt embeddings, or cached prefix keys and values), widens the attention mask
with ones for them and shifts ``position_ids`` by ``n`` (the virtual tokens take positions
``0 .. n-1``, as in peft). ``generate`` works too: the hook marks the cache it starts, and later
decoding steps, which find the virtual tokens in that cache, get only the mask and positions widened.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_peft.strategies.base import input_embeddings_of
from lightning_peft.strategies.targeting import describe_modules
from lightning_peft.strategies.transformers_compat import cache_argument, cached_length, call_cache

PROMPT_ATTR = "prompt_encoder"
PREFIX_ATTR = "prefix_encoder"
CACHE_MARK = "_lightning_peft_virtual_tokens"


def embedding_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``(vocab, hidden)`` weight of ``module``'s input embeddings, looking through a LoRA wrapper."""
    embedding = input_embeddings_of(module)
    weight = getattr(embedding, "weight", None)
    if weight is None:
        weight = getattr(getattr(embedding, "base_layer", None), "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def find_language_model(model: nn.Module, owner: str, needs_cache: bool = False) -> nn.Module:
    """The outermost module of ``model`` with input embeddings (and, if asked, a key/value cache input)."""
    for _, module in model.named_modules():
        if input_embeddings_of(module) is not None and (not needs_cache or cache_argument(module)):
            return module
    need = (
        "and attention that reads a key/value cache (a `cache` or `past_key_values` argument) "
        if needs_cache
        else ""
    )
    raise ValueError(
        f"{owner} needs a transformers model with input embeddings (get_input_embeddings()) {need}"
        f"inside {type(model).__name__}; modules here: {describe_modules(list(model.named_modules())[1:])}"
    )


def positional_names(module: nn.Module) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(n for n, p in inspect.signature(module.forward).parameters.items() if p.kind in kinds)


def as_kwargs(names: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a call by name (``model(ids, mask)`` -> ``input_ids=ids, attention_mask=mask``)."""
    return {**dict(zip(names, args, strict=False)), **kwargs}


def widen_inputs(kwargs: dict[str, Any], n: int, batch_size: int, length: int) -> None:
    """Make room for ``n`` leading virtual tokens in a ``(B, length)`` mask and shift positions by ``n``."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] == length:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch_size, n), mask], dim=1)  # (B, n + length)
    positions = kwargs.get("position_ids")
    if positions is not None:
        kwargs["position_ids"] = positions + n


def virtual_token_hook(attr: str, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """Forward pre-hook of the adapted model: let its adapter at ``attr`` put in the virtual tokens."""
    encoder = module._modules.get(attr)
    if not hasattr(encoder, "prepend") or not encoder.enabled:  # a PromptEncoder or PrefixEncoder
        return None  # the adapter was deleted or is off: the base model's call, unchanged
    kwargs = as_kwargs(encoder.forward_params, args, kwargs)
    inputs = kwargs.get("input_ids")
    inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
    if inputs is None:
        return None
    n = encoder.num_virtual_tokens
    cache = call_cache(kwargs)
    cached = cached_length(cache)
    if cached:  # a later generation step: the virtual tokens are in the cache if we put them there
        if getattr(cache, CACHE_MARK, None) != n:
            return None
        widen_inputs(kwargs, n, inputs.shape[0], cached - n + inputs.shape[1])
        return (), kwargs
    if cache is not None:
        setattr(cache, CACHE_MARK, n)
    encoder.prepend(module, kwargs, inputs.shape[0], inputs.shape[1])
    return (), kwargs


def attach_encoder(model: nn.Module, owner: str, attr: str, encoder: nn.Module) -> None:
    if attr in model._modules:
        raise ValueError(f"{type(model).__name__} already carries a {owner} adapter; apply a strategy once")
    setattr(model, attr, encoder)
    # a partial of a module-level function: the model still pickles (ddp_spawn) and deep-copies
    hook = partial(virtual_token_hook, attr)
    encoder.hook_handle = model.register_forward_pre_hook(hook, with_kwargs=True)


def detach_encoders(model: nn.Module, kind: type[nn.Module]) -> nn.Module:
    """Remove every ``kind`` adapter and its hook from ``model``: it is its base model again."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    for name, encoder in found:
        if encoder.hook_handle is not None:
            encoder.hook_handle.remove()
        parent_name, _, child = name.rpartition(".")
        delattr(model.get_submodule(parent_name) if parent_name else model, child)
    return model


def positive_int(name: str, value: Any, problems: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        problems.append(f"{name} must be a positive integer, got {value!r}")
