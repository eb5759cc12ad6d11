"""Checks and helpers for LoRA's per-module and peft-parity fields (``rank_pattern``, ``alpha_pattern``,
``lora_bias``, ``trainable_token_indices``, ``target_parameters``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_peft.strategies.trainable_tokens import token_index_problems


def field_problems(self: Any) -> list[str]:
    """Problems with the fields LoRA shares with peft beyond the basics: per-module patterns,
    ``lora_bias``, trainable tokens and ``target_parameters``."""
    problems = []
    for name, kind in (("rank_pattern", int), ("alpha_pattern", int | float)):
        pattern = getattr(self, name)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            problems.append(f"{name} must be a dict {{module pattern: value}}, got {pattern!r}")
            continue
        for key, value in pattern.items():
            if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                problems.append(
                    f"{name}[{key!r}] must be a positive {kind.__name__ if kind is int else 'number'}, got {value!r}"
                )
            try:
                re.compile(key)
            except re.error as err:
                problems.append(f"{name} key {key!r} is not a valid regex: {err}")
    if not isinstance(self.lora_bias, bool):
        problems.append(f"lora_bias must be True or False, got {self.lora_bias!r}")
    elif self.lora_bias and (self.use_dora or self.init_lora_weights not in (True, False)):
        problems.append(
            "lora_bias=True needs use_dora=False and init_lora_weights True or False (as in peft)"
        )
    problems += token_index_problems(self.trainable_token_indices)
    params = self.target_parameters
    if params is not None:
        if not (isinstance(params, list) and params and all(isinstance(e, str) and "." in e for e in params)):
            problems.append(
                "target_parameters must be a non-empty list of '<module>.<parameter>' names (e.g. "
                f"'experts.gate_up_proj'), got {params!r}"
            )
        elif self.lora_dropout or self.use_dora or self.lora_bias:
            problems.append(
                "target_parameters needs lora_dropout=0, use_dora=False and lora_bias=False (as peft)"
            )
    elif self.target_modules == []:
        problems.append("target_modules=[] adapts nothing: name modules, or parameters in target_parameters")
    return problems


def plain(value: object) -> object:
    """Mappings and sequences (Hydra's DictConfig and ListConfig too) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [plain(v) for v in value]
    return value


def pattern_value(pattern: dict[str, float] | None, name: str, default: float) -> float:
    """The value of the first key of ``pattern`` that matches the end of module ``name`` as a regex
    (a whole dotted part onwards, as peft matches ``rank_pattern``), else ``default``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
