"""Checks on what is read from a file before anything is built from it.

A config and a weights file can disagree (a corrupt or hostile config, a file from another run): the
sizes a config asks for (LoRA's ``r``, the number of virtual tokens, a prefix MLP's width) are compared
with the tensors in the weights file *before* the strategy allocates a layer, so ``r=10**9`` is an
error, not a 256 GB allocation. Tensors holding NaN or infinity are refused unless the caller asks for
them (for forensics). Malformed records give a ``ValueError`` naming the file and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_peft.formats.peft_lora import wraps_parameter
from lightning_peft.strategies.base import PEFTStrategy, strategy_from_config
from lightning_peft.strategies.compose import Compose
from lightning_peft.strategies.lora import LoRA
from lightning_peft.strategies.prompt import PrefixTuning, PromptTuning

# leaf names of the tensors whose shape holds a LoRA rank: (tensor name ending, dimension of r)
_RANK_DIMS = (
    ("lora_A", 0),
    ("lora_A.weight", 0),
    ("lora_embedding_A", 0),
    ("lora_B", 1),
    ("lora_B.weight", 1),
    ("lora_embedding_B", 1),
)
_PROMPT_TENSORS = ("prompt_embeddings", "prefix_encoder.prefix", "prefix_encoder.prefix_embeddings")


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [
        name
        for name, value in tensors.items()
        if isinstance(value, torch.Tensor)
        and (value.is_floating_point() or value.is_complex())
        and not bool(torch.isfinite(value).all())
    ]


def check_finite(tensors: Mapping[str, torch.Tensor], source: str, allow_non_finite: bool = False) -> None:
    """Raise ``ValueError`` naming the tensors of ``source`` that hold NaN or infinity (unless allowed)."""
    if allow_non_finite:
        return
    bad = non_finite_names(tensors)
    if bad:
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ValueError(
            f"{source}: {len(bad)} tensors hold NaN or infinity: {', '.join(bad[:8])}{more} (training "
            "diverged?); pass allow_non_finite=True (--allow-non-finite) to use them anyway"
        )


def _methods(strategy: PEFTStrategy) -> list[PEFTStrategy]:
    if isinstance(strategy, Compose):
        return [m for s in strategy.strategies for m in _methods(s)]
    return [strategy]


def check_sizes(strategy: PEFTStrategy, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` if a size the strategy's config sets disagrees with the saved tensors.

    Called before ``strategy.apply``: it allocates what the config asks for, whatever the file holds.
    """
    problems = []
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for method in _methods(strategy):
        if isinstance(method, LoRA):
            problems += _lora_rank_problems(method, shapes)
        elif isinstance(method, PromptTuning | PrefixTuning):
            rows = {
                f"{name} {shape}": shape[0]
                for name, shape in shapes.items()
                if any(name == t or name.endswith("." + t) for t in _PROMPT_TENSORS) and shape
            }
            if not rows:
                problems.append(
                    f"the config describes {type(method).__name__} but the file holds no prompt tensor"
                )
            wrong = [name for name, n in rows.items() if n != method.num_virtual_tokens]
            if wrong:
                problems.append(
                    f"num_virtual_tokens={method.num_virtual_tokens} in the config, but the tensors hold "
                    f"another number: {', '.join(wrong)}"
                )
            width = getattr(method, "encoder_hidden_size", None)
            mlp = [s for n, s in shapes.items() if n.endswith("prefix_encoder.transform.0.weight")]
            if (
                getattr(method, "prefix_projection", False)
                and width is not None
                and mlp
                and mlp[0][0] != width
            ):
                problems.append(
                    f"encoder_hidden_size={width} in the config, but the saved MLP is {mlp[0][0]} wide"
                )
    if problems:
        raise ValueError(f"{source}: the config does not fit its tensors:\n  - " + "\n  - ".join(problems))


def _lora_rank_problems(method: LoRA, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Each LoRA tensor's rank against the config's (``r``, or ``rank_pattern`` for its module), and
    every ``A`` with its ``B`` (an adapter saved with one of the two is refused, naming it)."""
    found: dict[str, tuple[int, int]] = {}  # tensor -> (rank in the file, rank the config gives)
    pairs: dict[str, set[str]] = {}
    for name, shape in shapes.items():
        for ending, dim in _RANK_DIMS:
            if (name == ending or name.endswith("." + ending)) and len(shape) > dim:
                module = name[: -len(ending)].rstrip(".")
                pairs.setdefault(module, set()).add(ending.split(".")[0].removeprefix("lora_embedding_")[-1])
                if ending.startswith("lora_B") and len(shape) > 2:
                    continue  # a grouped convolution's B holds r / groups channels per group; A carries r
                expected = method.layer_settings(module.removeprefix("base_model.model."))[0]
                found[f"{name} {shape}"] = (shape[dim], expected)
    if not found:
        return [f"the config describes LoRA (r={method.r}) but the file holds no lora_A/lora_B"]
    problems = []
    wrong = [
        f"{name} (config: {expected})"
        for name, (rank, expected) in found.items()
        # a target_parameters stack holds r per expert, r * experts in all
        if rank != expected
        and not (wraps_parameter(name.split(" ")[0].rsplit(".lora_", 1)[0], method) and rank % expected == 0)
    ]
    if wrong:
        source = "r/rank_pattern" if method.rank_pattern else f"r={method.r}"
        problems.append(f"{source} in the config, but the tensors have another rank: {', '.join(wrong[:4])}")
    halves = sorted(m for m, kinds in pairs.items() if kinds != {"A", "B"})
    if halves:
        problems.append(
            f"LoRA layers with only one of lora_A/lora_B (a BD-LoRA or otherwise partial adapter): {', '.join(halves[:4])}"
        )
    return problems


def strategy_from_record(record: Any, source: str, field: str) -> PEFTStrategy:
    """The strategy a saved record (``PEFTStrategy.to_config()``) describes; ``ValueError`` naming
    ``field`` of ``source`` if it is malformed."""
    if not isinstance(record, dict):
        raise ValueError(
            f"{source}: {field} must be a dict (a strategy's config), got {type(record).__name__}"
        )
    if not isinstance(record.get("class"), str):
        raise ValueError(
            f"{source}: {field}['class'] must name a strategy class, got {record.get('class')!r}"
        )
    if not isinstance(record.get("config", {}), dict):
        raise ValueError(f"{source}: {field}['config'] must be a dict, got {type(record['config']).__name__}")
    try:
        return strategy_from_config(record)
    except (TypeError, ValueError, KeyError, AttributeError, ImportError) as err:
        raise ValueError(f"{source}: {field} does not describe a valid strategy: {err}") from err
