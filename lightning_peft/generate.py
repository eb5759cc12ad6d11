"""Controlled generation: the ``lightning-peft generate`` command and its Python API.

A model comes from one of three places, all local (nothing is downloaded)::

    --model DIR                      a whole transformers folder (a merged export, any causal LM)
    --base DIR --adapter DIR         base model + adapter folder (Hugging Face PEFT format or ours),
                                     loaded with lightning_peft.load_adapter (peft is not needed)
    --base DIR --checkpoint CKPT     base model + adapter-only checkpoint of the PEFT callback

:class:`GenerationSettings` holds the controls (greedy or sampled decoding, stop strings, banned and
forced words, seed); :func:`generate` turns prompts into one record per completion::

    {"prompt": ..., "completion": ..., "num_tokens": 12, "stop_reason": "stop_string",
     "stop_string": "\\n", "sequence": 0, "settings": {...}}

``stop_reason`` is ``"stop_string"`` (the completion is cut just before the stop string, which it
excludes), ``"eos"`` (the model ended it) or ``"length"`` (``max_new_tokens`` ran out).

Forced words: transformers 5 moved constrained beam search (``force_words_ids``, ``constraints``) to a
Hub repository that ``generate`` downloads and runs with ``trust_remote_code``, so it is not used here.
:class:`ForceWords` is a logits processor of our own that works with greedy decoding and sampling: the
model writes freely, the end-of-sequence token is held back while a word is missing, and once the tokens
left just suffice to write the missing words, it writes them (continuing one it has begun). A stop
string counts only after every forced word has appeared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lightning_peft.callbacks.peft import _APPLIED_ATTR
from lightning_peft.formats.adapter import load_adapter
from lightning_peft.formats.files import TOKENIZER_FILES, read_json
from lightning_peft.formats.source import source_from_checkpoint
from lightning_peft.strategies.state import load_trainable_state_dict

Progress = Callable[[str], None]
Record = dict[str, Any]


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
        key (Hydra's) is ignored, so a YAML file with ``_target_: lightning_peft.generate.GenerationSettings``
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


# ------------------------------------------------------------------------------------------- loading


def load_for_generation(
    model: str | Path | None = None,
    *,
    base: str | Path | None = None,
    adapter: str | Path | None = None,
    checkpoint: str | Path | None = None,
    tokenizer: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from local folders only.

    Pass ``model`` (a whole transformers folder), or ``base`` with ``adapter`` (an adapter folder in the
    Hugging Face PEFT format or the lightning_peft layout) or with ``checkpoint`` (an adapter-only
    checkpoint of the ``PEFT`` callback, read with ``torch.load(weights_only=True)``). The tokenizer comes
    from ``tokenizer``, else the adapter folder if it holds one, else the model or base folder.

    Example::

        model, tokenizer = load_for_generation(base="base-model", adapter="my-adapter")
        model, tokenizer = load_for_generation("merged-model", device="cuda")
    """
    if (model is None) == (base is None):
        raise ValueError(
            "pass model= a model folder, or base= a base model folder with adapter= or checkpoint="
        )
    if model is not None and (adapter is not None or checkpoint is not None):
        raise ValueError("adapter= and checkpoint= go with base=; model= is a whole model folder")
    if base is not None and (adapter is None) == (checkpoint is None):
        raise ValueError("base= needs one of adapter= (an adapter folder) or checkpoint= (a checkpoint file)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda line: None)
    folder = Path(model if model is not None else base)
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder at {folder}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: it is not a transformers model folder")
    tokenizer_folder = _tokenizer_folder(tokenizer, adapter, folder)
    say(f"loading {read_json(folder / 'config.json').get('model_type', 'the model')} from {folder}")
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    if adapter is not None:
        say(f"loading the adapter in {adapter}")
        load_adapter(loaded, adapter)
    elif checkpoint is not None:
        say(f"loading the adapter of {checkpoint}")
        _load_checkpoint(loaded, checkpoint)
    loaded_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return loaded.to(device).eval(), loaded_tokenizer


def _tokenizer_folder(tokenizer: str | Path | None, adapter: str | Path | None, model: Path) -> Path:
    def has_tokenizer(folder: Path) -> bool:
        return any((folder / name).is_file() for name in TOKENIZER_FILES)

    if tokenizer is not None:
        if not has_tokenizer(Path(tokenizer)):
            raise FileNotFoundError(
                f"no tokenizer files in {tokenizer} (looked for tokenizer.json, vocab.json, ...)"
            )
        return Path(tokenizer)
    for folder in ([Path(adapter)] if adapter is not None else []) + [model]:
        if has_tokenizer(folder):
            return folder
    raise FileNotFoundError(f"no tokenizer files in {model}; pass a tokenizer folder (--tokenizer DIR)")


def _load_checkpoint(model: nn.Module, path: str | Path) -> None:
    source = source_from_checkpoint(path)
    try:
        source.strategy.apply(model)
        load_trainable_state_dict(model, source.tensors, source=str(path))
    except ValueError as err:
        if not source.whole_lightning_module:
            raise
        raise ValueError(
            f"{err} (the checkpoint adapted a whole LightningModule, PEFT(module=None), so its names are not "
            "those of the model; export its adapter with --root, or train with PEFT(module='model'))"
        ) from err
    object.__setattr__(model, _APPLIED_ATTR, source.strategy.to_config())


# ------------------------------------------------------------------------------------------- prompts


def read_prompts(
    path: str | Path, format_record: Callable[[Mapping[str, Any]], str] | None = None
) -> list[str]:
    """Prompts from a file: one per line (empty lines skipped), or for a ``.jsonl`` file one JSON object
    per line whose ``"prompt"`` field is the prompt, or which ``format_record`` turns into one (a prompt
    template, for instance).

    Example::

        prompts = read_prompts("questions.jsonl", format_record=lambda r: f"Q: {r['question']}\\nA:")
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not JSON: {err}") from err
            if format_record is not None:
                prompt = format_record(record)
            else:
                prompt = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(prompt, str):
                raise ValueError(
                    f'{path}, line {number}: expected an object with a "prompt" string, got {line[:80]}'
                )
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


# ------------------------------------------------------------------------------------------ generation


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    stream: TextIO | None = None,
) -> list[Record]:
    """Complete each prompt; returns one record per completion (see the module docstring), prompts in
    order and, within a prompt, its ``num_return_sequences`` completions.

    ``stream`` receives each completion's text as it is generated, then a newline (one completion at a
    time: ``batch_size`` and ``num_return_sequences`` 1). The global random state is left as it was.

    Example::

        model, tokenizer = load_for_generation("merged-model")
        records = generate(model, tokenizer, ["Once upon a time"], GenerationSettings(max_new_tokens=20))
        print(records[0]["completion"])
    """
    settings = settings or GenerationSettings()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if stream is not None and (settings.batch_size > 1 or settings.num_return_sequences > 1):
        raise ValueError(
            "streaming shows one completion at a time: it needs batch_size=1 and num_return_sequences=1"
        )
    banned = [ids for word in settings.bad_words for ids in word_token_ids(tokenizer, word, "bad_words")]
    forced = [word_token_ids(tokenizer, word, "force_words") for word in settings.force_words]
    needed = sum(min(len(form) for form in forms) for forms in forced)
    if needed > settings.max_new_tokens:
        raise ValueError(
            f"the forced words take {needed} tokens, more than max_new_tokens={settings.max_new_tokens}"
        )
    eos = _eos_ids(model, tokenizer)
    options: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "num_return_sequences": settings.num_return_sequences,
        "repetition_penalty": settings.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0],
        "eos_token_id": eos or None,
    }
    if settings.do_sample:  # greedy decoding would only warn about them
        options |= {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
    if banned:
        options["bad_words_ids"] = banned
    device = next(model.parameters()).device
    records: list[Record] = []
    with torch.random.fork_rng(
        devices=[device] if device.type == "cuda" else [], enabled=settings.seed is not None
    ):
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start : start + settings.batch_size]
            records += _generate_batch(model, tokenizer, batch, start, settings, options, forced, eos, stream)
    return records


def _generate_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    first: int,
    settings: GenerationSettings,
    options: dict[str, Any],
    forced: list[list[list[int]]],
    eos: list[int],
    stream: TextIO | None,
) -> list[Record]:
    encoded = [_prompt_ids(tokenizer, prompt, first + i) for i, prompt in enumerate(prompts)]
    length = max(len(ids) for ids in encoded)
    pad = options["pad_token_id"]
    device = next(model.parameters()).device
    # left padding: every prompt ends where generation starts
    input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor(
        [[0] * (length - len(ids)) + [1] * len(ids) for ids in encoded], device=device
    )
    stop = StopAtStrings(tokenizer, length, settings.stop_strings, settings.force_words)
    processors = LogitsProcessorList(
        [ForceWords(forced, length, settings.max_new_tokens, eos)] if forced else []
    )
    streamer = None
    if stream is not None:
        streamer = CompletionStreamer(tokenizer, stream, settings.stop_strings, settings.force_words)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([stop] if settings.stop_strings else []),
            streamer=streamer,
            **options,
        )
    records = []
    for row, tokens in enumerate(output[:, length:].tolist()):
        index, sequence = divmod(row, settings.num_return_sequences)
        ended = next((i + 1 for i, token in enumerate(tokens) if token in eos), None)
        count = stop.stopped_at.get(row) or ended or len(tokens)
        text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
        found = find_stop(text, settings.stop_strings, settings.force_words)
        if found is not None:
            reason = "stop_string"
        else:
            reason = "eos" if ended is not None and ended <= count else "length"
        records.append(
            {
                "prompt": prompts[index],
                "completion": text[: found[0]] if found else text,
                "num_tokens": count,
                "stop_reason": reason,
                "stop_string": found[1] if found else None,
                "sequence": sequence,
                "settings": asdict(settings),
            }
        )
    return records


def _prompt_ids(tokenizer: Any, prompt: str, index: int) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    if not ids:
        raise ValueError(
            f"prompt {index} is empty and the tokenizer has no beginning-of-text token to start from"
        )
    return ids


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokens generation stops at: the model's generation config, else the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])


def word_token_ids(tokenizer: Any, word: str, setting: str = "word") -> list[list[int]]:
    """The token sequences that write ``word``: alone, and after a space (``"cat"`` and ``" cat"`` are
    different tokens in most subword vocabularies). Raises ``ValueError`` if the word needs a token the
    vocabulary lacks."""
    forms: list[list[int]] = []
    for text in (word,) if word[:1].isspace() else (word, " " + word):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids not in forms:
            forms.append(ids)
    unknown = tokenizer.unk_token_id
    forms = [ids for ids in forms if unknown is None or unknown not in ids]
    if not forms:
        raise ValueError(f"{setting}: {word!r} cannot be written with this tokenizer's vocabulary")
    return forms


def find_stop(
    text: str, stop_strings: Sequence[str], force_words: Sequence[str] = ()
) -> tuple[int, str] | None:
    """(index, stop string) of the first stop string in ``text`` that follows every forced word, or None."""
    hits = sorted(
        (match.start(), order, stop)
        for order, stop in enumerate(stop_strings)
        for match in re.finditer(f"(?={re.escape(stop)})", text)
    )
    for index, _, stop in hits:
        if all(word in text[:index] for word in force_words):
            return index, stop
    return None


class StopAtStrings(StoppingCriteria):
    """Ends a sequence once its completion holds a stop string (after every forced word); records the
    number of tokens each sequence had then in ``stopped_at`` (row -> tokens)."""

    def __init__(
        self, tokenizer: Any, prompt_length: int, stop_strings: Sequence[str], force_words: Sequence[str] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stop_strings = list(stop_strings)
        self.force_words = list(force_words)
        self.stopped_at: dict[int, int] = {}

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        done = []
        for row, tokens in enumerate(input_ids[:, self.prompt_length :].tolist()):
            if row not in self.stopped_at:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if find_stop(text, self.stop_strings, self.force_words) is not None:
                    self.stopped_at[row] = len(tokens)
            done.append(row in self.stopped_at)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class ForceWords(LogitsProcessor):
    """Makes every completion contain each word, with greedy decoding or sampling.

    The model writes freely while the tokens left (``max_new_tokens`` minus those generated) exceed
    what the missing words need; the end-of-sequence tokens are held back meanwhile. From then on each
    step writes the next token of the missing word begun furthest (a word counts as begun when the
    completion ends with the start of one of its forms). Writing a word begun furthest never needs more
    tokens than were counted, so when the words fit in ``max_new_tokens`` (:func:`generate` checks it),
    every one is written.

    Args:
        words: per word, its token sequences (any one writes it; see :func:`word_token_ids`).
        prompt_length: where the completion starts in ``input_ids`` (prompts are left-padded).
        max_new_tokens: the completion's length limit.
        eos_ids: end-of-sequence tokens, held back while a word is missing.
    """

    def __init__(
        self,
        words: Sequence[Sequence[Sequence[int]]],
        prompt_length: int,
        max_new_tokens: int,
        eos_ids: Sequence[int],
    ) -> None:
        self.words = [[list(form) for form in forms] for forms in words]
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.eos_ids = list(eos_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row, generated in enumerate(input_ids[:, self.prompt_length :].tolist()):
            missing = [forms for forms in self.words if not any(_contains(generated, form) for form in forms)]
            if not missing:
                continue
            scores[row, self.eos_ids] = -math.inf
            needed = sum(min(len(form) for form in forms) for forms in missing)
            if needed < self.max_new_tokens - len(generated):
                continue
            # (tokens saved by what is written already, next token) for each form of each missing word
            plans = [
                (min(len(f) for f in forms) - (len(form) - begun), form[begun])
                for forms in missing
                for form in forms
                for begun in [_begun(generated, form)]
            ]
            token = max(plans, key=lambda plan: plan[0])[1]
            scores[row] = -math.inf
            scores[row, token] = 0.0
        return scores


def _contains(tokens: list[int], form: list[int]) -> bool:
    return any(tokens[i : i + len(form)] == form for i in range(len(tokens) - len(form) + 1))


def _begun(tokens: list[int], form: list[int]) -> int:
    """How many tokens of ``form`` the end of ``tokens`` has written already (fewer than all)."""
    return next((k for k in range(len(form) - 1, 0, -1) if tokens[-k:] == form[:k]), 0)


class CompletionStreamer(BaseStreamer):
    """Writes a completion to ``out`` as transformers generates it, then a newline.

    Text that might be the start of a stop string is held back until the next tokens tell, so the
    stream ends, like the record, just before the stop string.
    """

    def __init__(
        self, tokenizer: Any, out: TextIO, stop_strings: Sequence[str] = (), force_words: Sequence[str] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.stop_strings = list(stop_strings)
        self.force_words = list(force_words)
        self.tokens: list[int] = []
        self.shown = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.tokens += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        found = find_stop(text, self.stop_strings, self.force_words)
        if found is not None:
            self.stopped = True
            self._show(text[: found[0]])
            return
        held = max(
            (k for s in self.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        held = max(held, len(text) - len(text.rstrip("\ufffd")))  # an unfinished multi-byte character
        self._show(text[: len(text) - held])

    def end(self) -> None:
        if not self.stopped:
            self._show(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        self.out.write("\n")
        self.out.flush()

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.out.write(text[self.shown :])
            self.out.flush()
            self.shown = len(text)


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | Path, overwrite: bool = False) -> Path:
    """Write one JSON object per line to ``path``: to a file beside it first, renamed when complete."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists already; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, staged = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        os.chmod(staged, 0o644)
        os.replace(staged, out)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return out


# ------------------------------------------------------------------------------------------ command line

GENERATE_DESCRIPTION = """\
Generate text, offline, with a whole model folder (--model, e.g. `export --merged` output), a base
model plus an adapter folder (--base --adapter; Hugging Face PEFT format or lightning_peft layout), or
a base model plus a checkpoint of the PEFT callback (--base --checkpoint).

Prompts: PROMPT arguments or --prompt (repeatable), or --prompts FILE (one per line; a .jsonl file:
one object per line with a "prompt" field). Settings: --config FILE, a YAML mapping of
GenerationSettings fields (max_new_tokens: 32, stop_strings: ["\\n"], ...), each flag below
overriding it. --stop understands \\n and \\t.

Completions stream to stdout when it is a terminal (or with --stream); otherwise they are printed
when done, unless --jsonl OUT, which writes one object per completion: prompt, completion,
num_tokens, stop_reason (eos, stop_string or length), stop_string, sequence, settings.

  lightning-peft generate --model merged "Once upon a time"
  lightning-peft generate --base base --adapter my-adapter --prompts prompts.jsonl --jsonl out.jsonl
  lightning-peft generate --base base --checkpoint last.ckpt --do-sample --temperature 0.7 --seed 0 \\
      --stop '\\n' --ban darn --force please "Ask nicely:"
"""


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("model")
    source.add_argument("--model", metavar="DIR", help="a whole transformers model folder")
    source.add_argument("--base", metavar="DIR", help="the base model folder, with --adapter or --checkpoint")
    source.add_argument(
        "--adapter", metavar="DIR", help="an adapter folder (PEFT format or lightning_peft layout)"
    )
    source.add_argument(
        "--checkpoint", metavar="CKPT", help="an adapter-only checkpoint of the PEFT callback"
    )
    source.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder (default: adapter, then model folder)"
    )
    source.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    text = parser.add_argument_group("prompts")
    text.add_argument("prompt_args", nargs="*", metavar="PROMPT", help="prompts to complete")
    text.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    text.add_argument("--prompts", metavar="FILE", help="prompts, one per line, or a .jsonl file")
    controls = parser.add_argument_group("settings (override --config)")
    controls.add_argument("--config", metavar="FILE", help="YAML file of generation settings")
    controls.add_argument("--max-new-tokens", type=int, metavar="N")
    controls.add_argument(
        "--do-sample", action=argparse.BooleanOptionalAction, help="sample instead of greedy"
    )
    controls.add_argument("--temperature", type=float, metavar="T")
    controls.add_argument("--top-p", type=float, metavar="P")
    controls.add_argument("--top-k", type=int, metavar="K")
    controls.add_argument("--repetition-penalty", type=float, metavar="R")
    controls.add_argument(
        "--stop",
        dest="stop_strings",
        action="append",
        metavar="TEXT",
        help="stop string (repeatable; replaces the list in --config)",
    )
    controls.add_argument(
        "--ban",
        dest="bad_words",
        action="append",
        metavar="WORD",
        help="banned word (repeatable; replaces the list in --config)",
    )
    controls.add_argument(
        "--force",
        dest="force_words",
        action="append",
        metavar="WORD",
        help="forced word (repeatable; replaces the list in --config)",
    )
    controls.add_argument("--seed", type=int, metavar="N")
    controls.add_argument("--num-return-sequences", type=int, metavar="N")
    controls.add_argument("--batch-size", type=int, metavar="N")
    output = parser.add_argument_group("output")
    output.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, help="stream completions to stdout"
    )
    output.add_argument("--jsonl", metavar="OUT", help="write one JSON object per completion to OUT")
    output.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run_generate(args: argparse.Namespace) -> int:
    from lightning_peft.cli import EXIT_OK, UsageError, _progress  # the command line imports this module

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model and (args.base or args.adapter or args.checkpoint):
        raise UsageError("--model is a whole model folder; --adapter and --checkpoint go with --base")
    if not args.model and not args.base:
        raise UsageError("pass --model DIR, or --base DIR with --adapter DIR or --checkpoint CKPT")
    if args.base and (args.adapter is None) == (args.checkpoint is None):
        raise UsageError("--base needs one of --adapter DIR or --checkpoint CKPT")
    inline = [*args.prompt_args, *args.prompt]
    if args.prompts and inline:
        raise UsageError("give prompts on the command line or with --prompts FILE, not both")
    if not args.prompts and not inline:
        raise UsageError("no prompt: pass PROMPT, --prompt TEXT or --prompts FILE")
    overrides = {f.name: getattr(args, f.name) for f in fields(GenerationSettings)}
    if args.stop_strings:
        overrides["stop_strings"] = [_unescape(stop) for stop in args.stop_strings]
    values = read_settings_file(args.config) if args.config else {}
    try:
        settings = GenerationSettings.from_dict(
            {**values, **{k: v for k, v in overrides.items() if v is not None}}
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    single = settings.batch_size == 1 and settings.num_return_sequences == 1
    if args.stream and not single:
        raise UsageError(
            "--stream shows one completion at a time: it needs --batch-size 1 and --num-return-sequences 1"
        )
    stream = args.stream if args.stream is not None else single and sys.stdout.isatty()
    if args.jsonl and Path(args.jsonl).exists() and not args.overwrite:
        raise FileExistsError(f"{args.jsonl} exists already; pass --overwrite to replace it")
    prompts = read_prompts(args.prompts) if args.prompts else inline
    if not settings.do_sample and any(
        getattr(args, k) is not None for k in ("temperature", "top_p", "top_k")
    ):
        _progress("note: --temperature, --top-p and --top-k apply only with --do-sample")
    model, tokenizer = load_for_generation(
        args.model,
        base=args.base,
        adapter=args.adapter,
        checkpoint=args.checkpoint,
        tokenizer=args.tokenizer,
        device=args.device,
        progress=_progress,
    )
    _progress(f"generating {len(prompts)} prompt{'s' * (len(prompts) != 1)}")
    records = generate(model, tokenizer, prompts, settings, stream=sys.stdout if stream else None)
    if not stream and not args.jsonl:
        for record in records:
            print(record["completion"])
    if args.jsonl:
        write_jsonl(records, args.jsonl, overwrite=args.overwrite)
        _progress(f"wrote {len(records)} completions to {args.jsonl}")
    return EXIT_OK


def _unescape(text: str) -> str:
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)
