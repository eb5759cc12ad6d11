"""Which tensors an adapted model must save, and checking that a saved state fits a model.

An adapted model's checkpoint holds its *trainable* tensors: every parameter with ``requires_grad``
and every adapter parameter (a temporarily frozen adapter still belongs to the adapter). Names are
those of ``model.state_dict()``; wrapper prefixes that FSDP, activation checkpointing or
``torch.compile`` add are removed, so the same names come out however the model is wrapped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_peft.strategies.base import adapter_parameter_names

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """``encoder._fsdp_wrapped_module.layer.0.weight`` -> ``encoder.layer.0.weight``."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def trainable_names(model: nn.Module) -> list[str]:
    """State-dict names of the tensors an adapter-only checkpoint of ``model`` holds, in model order."""
    adapters = {clean_name(n) for n in adapter_parameter_names(model)}
    names = []
    for name, param in model.named_parameters():
        name = clean_name(name)
        if param.requires_grad or name in adapters:
            names.append(name)
    return names


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter-only state of ``model``: its trainable tensors, detached, keyed as in ``state_dict()``.

    Example::

        torch.save(trainable_state_dict(model), "adapter.pt")
    """
    wanted = set(trainable_names(model))
    return {clean_name(k): v.detach() for k, v in model.state_dict().items() if clean_name(k) in wanted}


def mismatches(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Sequence[int]],
    known: set[str] | None = None,
) -> list[str]:
    """Problems between the shapes a model expects and the shapes a checkpoint holds.

    ``expected`` are the model's trainable tensors (all must be present), ``found`` the checkpoint's,
    ``known`` every name the model has (a checkpoint may hold frozen tensors too, but no stranger).
    """
    problems = []
    missing = [k for k in expected if k not in found]
    if missing:
        problems.append(f"missing trainable tensors ({len(missing)}): {_first(missing)}")
    wrong = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {_first(wrong)}")
    if known is not None:
        unexpected = [k for k in found if k not in known]
        if unexpected:
            problems.append(f"tensors the model does not have ({len(unexpected)}): {_first(unexpected)}")
    return problems


def _first(items: list[str], limit: int = 8) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def config_differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Field-by-field differences between two strategy configs (``to_config()`` output)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += config_differences(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
        return out
    if saved != current:
        return [f"{path}: checkpoint {saved!r} vs this run {current!r}"]
    return []


def load_trainable_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state"
) -> None:
    """Copy an adapter-only ``state`` into ``model`` after checking that it fits.

    Raises ``ValueError`` naming every missing, misshapen or unknown tensor; nothing is copied then.
    Frozen tensors present in ``state`` are loaded too; frozen tensors absent from it are left as they are.
    Names are compared without wrapper prefixes on either side (see :func:`clean_name`), so a state
    saved from a ``torch.compile``-d or FSDP-wrapped model loads into the plain one and back.
    """
    raw_names = {clean_name(k): k for k in model.state_dict()}  # cleaned -> the model's own key
    params = {clean_name(k): v for k, v in model.state_dict().items()}
    state = {clean_name(k): v for k, v in state.items()}
    expected = {n: tuple(params[n].shape) for n in trainable_names(model) if n in params}
    problems = mismatches(expected, {k: tuple(v.shape) for k, v in state.items()}, known=set(params))
    if problems:
        raise ValueError(f"{source} does not fit this model:\n  - " + "\n  - ".join(problems))
    model.load_state_dict({raw_names[k]: v for k, v in state.items()}, strict=False)


_WRAPPING_LINKS = (".base_layer", ".trained", ".original")  # adapter layers and ModuleToSave


def base_name(name: str) -> str:
    """``q_proj.base_layer.weight`` -> ``q_proj.weight``: the name in the unadapted model."""
    for link in _WRAPPING_LINKS:
        name = name.replace(link + ".", ".")
    return name


def load_base_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy the *unadapted* model's weights (``state``, keyed as the base model names them) into an
    adapted ``model``; returns the adapter tensors the base cannot fill (to initialise with
    :func:`~lightning_peft.strategies.base.reset_adapters`).

    The way to adapt a model too large to build twice: create it on the ``meta`` device, apply the
    strategy there, ``to_empty`` it (then ``model.tie_weights()``: ``to_empty`` unties tied input and
    output embeddings, and a checkpoint keeps one of their names), then load the base checkpoint with
    this. Raises ``ValueError`` naming every base tensor that is missing from ``state`` or has another
    shape; nothing is copied then.
    """
    adapter = set(adapter_parameter_names(model))
    # tied weights (input and output embeddings) are one tensor under several names; checkpoints
    # (save_pretrained) keep one of them
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(base_name(name))
    tied = {name: names for names in names_of.values() if len(names) > 1 for name in names}
    mapped: dict[str, torch.Tensor] = {}
    problems, left = [], []
    for name, tensor in model.state_dict().items():
        source = state.get(base_name(name))
        if source is None:
            if name in adapter:
                left.append(name)
            elif not any(other in state for other in tied.get(base_name(name), ())):
                problems.append(f"{base_name(name)} is missing")
        elif tuple(source.shape) != tuple(tensor.shape):
            problems.append(
                f"{base_name(name)} has shape {tuple(source.shape)}, the model {tuple(tensor.shape)}"
            )
        else:
            mapped[name] = source
    if problems:
        raise ValueError(f"the base weights do not fit this model: {_first(problems)}")
    model.load_state_dict(mapped, strict=False)
    return left
