"""Trainable tokens: chosen rows of an embedding train whole, the others stay frozen (peft's
``trainable_token_indices``), e.g. the rows of new special tokens added to a vocabulary.

The layer keeps the chosen rows as one small ``(len(indices), dim)`` parameter, starting as copies of
the base rows, and looks tokens up in the base weight with those rows put in::

    E' = E with rows[indices] := trainable_tokens_delta          y = E'[ids]

so the adapter file holds those rows only, not the whole embedding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.strategies.base import input_embeddings_of
from lightning_peft.strategies.targeting import matches, replace_module, validation_error

TokenIndices = list[int] | dict[str, list[int]] | None


class TrainableTokens(nn.Module):
    """An ``nn.Embedding`` whose rows ``token_indices`` train (``trainable_tokens_delta``)."""

    def __init__(self, base_layer: nn.Embedding, token_indices: list[int]) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        index = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
        self.register_buffer("token_indices", index, persistent=False)
        self.trainable_tokens_delta = nn.Parameter(weight.detach()[index].clone())  # (n, dim)
        self.merged = False
        self.enabled = True

    def adapter_params(self) -> list[str]:
        return ["trainable_tokens_delta"]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged or not self.enabled:
            return base(ids)
        index = self.token_indices.to(base.weight.device)
        weight = base.weight.index_copy(0, index, self.trainable_tokens_delta.to(base.weight.dtype))
        result = F.embedding(ids, weight, base.padding_idx, base.max_norm, base.norm_type)  # (..., dim)
        scale = getattr(base, "embed_scale", None)  # embeddings that scale their output (Gemma)
        return result if scale is None else result * torch.as_tensor(scale).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the trained rows into the base weight (the originals are kept for :meth:`unmerge`)."""
        if self.merged:
            return
        weight = self.base_layer.weight
        self._original_rows = weight[self.token_indices].clone()
        weight[self.token_indices] = self.trainable_tokens_delta.to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight[self.token_indices] = self._original_rows
        self.merged = False


def token_index_problems(value: Any) -> list[str]:
    """What is wrong with a ``trainable_token_indices`` value (empty if it is valid)."""
    if value is None:
        return []
    lists = value.values() if isinstance(value, dict) else [value]
    valid = isinstance(value, list | dict) and all(
        isinstance(ids, list)
        and ids
        and len(set(ids)) == len(ids)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        for ids in lists
    )
    if not valid:
        return [
            "trainable_token_indices must be a non-empty list of distinct token ids or {module name: list of ids}, "
            f"got {value!r}"
        ]
    return []


def token_targets(
    model: nn.Module, indices: TokenIndices, modules_to_save: list[str] | None, owner: str
) -> list[tuple[str, nn.Embedding, list[int]]]:
    """``(name, embedding, ids)`` for each embedding ``indices`` selects; raises ``ValueError`` (naming
    ``trainable_token_indices``) for a name that is no embedding, ids out of range, an embedding that
    ``modules_to_save`` trains whole or whose weight an output head shares."""
    if indices is None:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(indices, dict):
        chosen = [
            (n, m, ids) for key, ids in indices.items() for n, m in model.named_modules() if matches(n, [key])
        ]
        missing = [k for k in indices if not any(matches(n, [k]) for n, _, _ in chosen)]
    else:
        embedding = input_embeddings_of(model)
        chosen = [(names[id(embedding)], embedding, indices)] if id(embedding) in names else []
        missing = [] if chosen else ["the model's input embedding (it has no get_input_embeddings())"]
    problems = [f"trainable_token_indices: {k!r} matches no module" for k in missing]
    for name, module, ids in chosen:
        problems += _embedding_problems(model, name, module, ids, modules_to_save)
    validation_error(owner, problems)
    return chosen


def _embedding_problems(
    model: nn.Module, name: str, module: nn.Module, ids: list[int], modules_to_save: list[str] | None
) -> list[str]:
    if type(module) is not nn.Embedding:
        return [f"trainable_token_indices: {name!r} is a {type(module).__name__}, not an nn.Embedding"]
    problems = []
    size = module.num_embeddings
    if any(i >= size for i in ids):
        problems.append(
            f"trainable_token_indices for {name!r}: ids must be below its {size} rows, got {max(ids)}"
        )
    if modules_to_save and matches(name, modules_to_save):
        problems.append(f"trainable_token_indices: {name!r} is in modules_to_save already (trained whole)")
    shared = [n for n, p in model.named_parameters(remove_duplicate=False) if p is module.weight]
    if len(shared) > 1:
        problems.append(
            f"trainable_token_indices: {name!r} shares its weight with {', '.join(shared[1:])} (tied "
            "embeddings), which is not supported; untie them first"
        )
    return problems


def add_trainable_tokens(model: nn.Module, targets: list[tuple[str, nn.Embedding, list[int]]]) -> None:
    """Wrap each target embedding in a :class:`TrainableTokens` layer."""
    for name, embedding, ids in targets:
        replace_module(model, name, TrainableTokens(embedding, ids))
