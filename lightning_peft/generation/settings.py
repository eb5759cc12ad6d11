"""The controls of ``lightning-peft generate`` and :func:`lightning_peft.generate.generate`, as one
validated dataclass, and the YAML files that hold them.

The shipped ``conf/generation.yaml`` (:data:`DEFAULT_SETTINGS_FILE`) lists every field at its default;
the command line reads it when no ``--config`` is given. This module imports nothing heavy (PyYAML only
when a file is read): the command line uses it before torch is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_SETTINGS_FILE = Path(__file__).resolve().parent.parent / "conf" / "generation.yaml"


@dataclass
class GenerationSettings:
    """How to generate; every problem with the values is reported in one ``ValueError``.

    Args:
        max_new_tokens: the most tokens one completion may have.
        do_sample: sample the next token (shaped by ``temperature``, ``top_k``, ``top_p``) instead of
            taking the likeliest one.
        temperature: divides the logits before sampling: below 1 sharpens, above 1 flattens; > 0.
            Greedy decoding ignores it.
        top_p: nucleus sampling (Holtzman et al., 2020): sample from the fewest tokens whose
            probabilities add up to ``top_p``; in (0, 1], 1 is off.
        top_k: sample from the ``top_k`` likeliest tokens; 0 is off.
        repetition_penalty: > 1 makes tokens already in the text less likely (Keskar et al., 2019,
            section 4.1); 1 is off.
        stop_strings: a completion ends at the first of these; the completion excludes it.
        bad_words: words never generated, banned as they tokenize alone and after a space.
        force_words: words every completion contains (see :class:`ForceWords`).
        seed: seeds sampling so that a run repeats (same prompts, batch size and device).
        num_return_sequences: completions per prompt; more than one needs ``do_sample``.
        batch_size: prompts generated together (left-padded); sampled text depends on it.

    Example::

        settings = GenerationSettings(do_sample=True, temperature=0.7, stop_strings=["\\n"], seed=0)
        settings = GenerationSettings.from_file("generate.yaml", max_new_tokens=32)  # file values, one replaced
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    force_words: list[str] = field(default_factory=list)
    seed: int | None = None
    num_return_sequences: int = 1
    batch_size: int = 1

    def __post_init__(self) -> None:
        problems = []
        for name in ("stop_strings", "bad_words", "force_words"):
            value = getattr(self, name)
            value = [value] if isinstance(value, str) else value
            if isinstance(value, Sequence) and all(isinstance(v, str) and v for v in value):
                setattr(self, name, list(value))  # a copy: the caller's list stays theirs
            else:
                problems.append(f"{name} must be a list of non-empty strings, got {value!r}")
        for name, low in (
            ("max_new_tokens", 1),
            ("top_k", 0),
            ("num_return_sequences", 1),
            ("batch_size", 1),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        for name, low in (("temperature", 0.0), ("top_p", 0.0), ("repetition_penalty", 0.0)):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < low:
                problems.append(f"{name} must be a finite number >= {low:g}, got {value!r}")
        if not isinstance(self.do_sample, bool):
            problems.append(f"do_sample must be true or false, got {self.do_sample!r}")
        if self.do_sample is True and self.temperature == 0:
            problems.append(
                "temperature must be > 0 when sampling (do_sample=false takes the likeliest token)"
            )
        if self.top_p == 0 or (_is_number(self.top_p) and self.top_p > 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.repetition_penalty == 0:
            problems.append("repetition_penalty must be > 0 (1 is off)")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            problems.append(f"seed must be an integer >= 0 or null, got {self.seed!r}")
        if self.do_sample is False and _is_int(self.num_return_sequences) and self.num_return_sequences > 1:
            problems.append(
                "num_return_sequences > 1 needs do_sample=true: greedy decoding gives one completion"
            )
        words = (self.bad_words, self.force_words, self.stop_strings)
        if all(isinstance(w, list) for w in words):  # lists of strings by now, unless reported above
            if set(self.bad_words) & set(self.force_words):
                problems.append(
                    f"words both banned and forced: {sorted(set(self.bad_words) & set(self.force_words))}"
                )
            problems += [
                f"forced word {word!r} contains the stop string {stop!r}"
                for word in self.force_words
                for stop in self.stop_strings
                if stop in word
            ]
        if problems:
            raise ValueError("invalid generation settings: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GenerationSettings:
        """Settings from a mapping; unknown keys are an error that lists the known ones. A ``_target_``
        key (Hydra's) is ignored, so a YAML file with ``_target_: lightning_peft.generation.generate.GenerationSettings``
        loads here and with ``hydra.utils.instantiate`` alike."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(k for k in values if k not in known and k != "_target_")
        if unknown:
            raise ValueError(f"unknown generation settings {unknown}; known: {', '.join(known)}")
        return cls(**{k: v for k, v in values.items() if k != "_target_"})

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> GenerationSettings:
        """Settings from a YAML (or JSON) file, with ``overrides`` (those not None) replacing its values."""
        values = read_settings_file(path)
        return cls.from_dict({**values, **{k: v for k, v in overrides.items() if v is not None}})


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON settings file (an empty file is an empty mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no settings file at {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} should hold a mapping of settings, found {type(values).__name__}")
    return values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
