"""Controlled generation: the Python API of the ``lightning-peft generate`` command.

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

The pieces live by what they are, and are importable from here too: the settings in
:mod:`lightning_peft.generation.settings`, the controls transformers lacks (forced words, and why the
rest is transformers' own) in :mod:`lightning_peft.generation.controls`, the command line in
:mod:`lightning_peft.cli.generate`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from transformers import LogitsProcessorList, StoppingCriteriaList

from lightning_peft.formats.adapter import load_adapter
from lightning_peft.formats.checks import check_finite
from lightning_peft.formats.files import TOKENIZER_FILES, read_json, write_text_staged
from lightning_peft.formats.source import source_from_checkpoint
from lightning_peft.generation.controls import (
    CompletionStreamer,
    ForceWords,
    StopAtStrings,
    find_stop,
    word_token_ids,
)
from lightning_peft.generation.settings import DEFAULT_SETTINGS_FILE, GenerationSettings, read_settings_file
from lightning_peft.generation.templates import adds_bos, prompt_ids
from lightning_peft.strategies.base import APPLIED_ATTR
from lightning_peft.strategies.state import load_trainable_state_dict

__all__ = [
    "DEFAULT_SETTINGS_FILE",
    "CompletionStreamer",
    "ForceWords",
    "GenerationSettings",
    "StopAtStrings",
    "find_stop",
    "generate",
    "load_for_generation",
    "read_prompts",
    "read_settings_file",
    "word_token_ids",
    "write_jsonl",
]

Progress = Callable[[str], None]
Record = dict[str, Any]


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
    check_finite(source.tensors, str(path))  # NaN weights would generate empty text without an error
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
    object.__setattr__(model, APPLIED_ATTR, source.strategy.to_config())


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

    Works with any transformers causal LM (``model.generate``). Prompts are encoded as
    :class:`~lightning_peft.generation.templates.InstructionCollator` encodes them in training and
    left-padded with an attention mask, so a batch gives what each prompt gives alone. ``stream``
    receives each completion's text as it is generated, then a newline (one completion at a time:
    ``batch_size`` and ``num_return_sequences`` 1). The global random state is left as it was.

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
    forced = [word_token_ids(tokenizer, word, "force_words") for word in settings.force_words]
    needed = sum(min(len(form) for form in forms) for forms in forced)
    if needed > settings.max_new_tokens:
        raise ValueError(
            f"the forced words take {needed} tokens, more than max_new_tokens={settings.max_new_tokens}"
        )
    eos = _eos_ids(model, tokenizer)
    options = _generate_options(tokenizer, settings, eos)
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


def _generate_options(tokenizer: Any, settings: GenerationSettings, eos: list[int]) -> dict[str, Any]:
    """The keyword arguments of ``model.generate`` that transformers' own controls implement."""
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
    banned = [ids for word in settings.bad_words for ids in word_token_ids(tokenizer, word, "bad_words")]
    if banned:
        options["bad_words_ids"] = banned
    return options


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
    input_ids, attention_mask = _left_padded(model, tokenizer, prompts, first, options["pad_token_id"])
    length = input_ids.shape[1]
    processors = [ForceWords(forced, length, settings.max_new_tokens, eos)] if forced else []
    streamer = None
    if stream is not None:
        streamer = CompletionStreamer(tokenizer, stream, settings.stop_strings, settings.force_words)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_processor=LogitsProcessorList(processors),
            streamer=streamer,
            **options,
            **_stopping(tokenizer, prompts, length, settings),
        )
    return [
        _record(tokenizer, prompts[row // settings.num_return_sequences], tokens, settings, eos)
        | {"sequence": row % settings.num_return_sequences, "settings": asdict(settings)}
        for row, tokens in enumerate(output[:, length:].tolist())
    ]


def _left_padded(
    model: nn.Module, tokenizer: Any, prompts: list[str], first: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T): left padding, so every prompt ends where generation
    starts and the mask hides the padding from attention."""
    add_bos = adds_bos(tokenizer)
    encoded = [_prompt_ids(tokenizer, prompt, first + i, add_bos) for i, prompt in enumerate(prompts)]
    length = max(len(ids) for ids in encoded)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in encoded], device=device)
    mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return input_ids, mask


def _stopping(
    tokenizer: Any, prompts: list[str], length: int, settings: GenerationSettings
) -> dict[str, Any]:
    """Stop strings for ``model.generate``: transformers' own (``stop_strings`` with the tokenizer) where
    it behaves as documented here, :class:`StopAtStrings` where it cannot.

    transformers matches a stop string in the whole sequence, prompt included, and knows nothing of forced
    words; ours reads the completion alone and waits for every forced word. The two agree unless forced
    words are set or a prompt ends with the start of a stop string (e.g. ``"...:\\n"`` with ``"\\n\\n"``),
    where transformers could end the completion at its first tokens.
    """
    stops = settings.stop_strings
    if not stops:
        return {}
    straddles = any(
        prompt.endswith(stop[:k]) for prompt in prompts for stop in stops for k in range(1, len(stop))
    )
    if settings.force_words or straddles:
        stop = StopAtStrings(tokenizer, length, stops, settings.force_words)
        return {"stopping_criteria": StoppingCriteriaList([stop])}
    return {"stop_strings": stops, "tokenizer": tokenizer}


def _record(
    tokenizer: Any, prompt: str, tokens: list[int], settings: GenerationSettings, eos: list[int]
) -> Record:
    """One completion's record from the tokens generated after its prompt (padding may follow its end)."""
    ended = next((i + 1 for i, token in enumerate(tokens) if token in eos), None)
    tokens = tokens[:ended]
    stops, forced = settings.stop_strings, settings.force_words
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    found = find_stop(text, stops, forced) if stops else None
    if found is None:
        count, reason = len(tokens), "eos" if ended is not None else "length"
    else:  # generation ended with the token that completed the stop string: the first such prefix
        count = next(
            k
            for k in range(1, len(tokens) + 1)
            if find_stop(tokenizer.decode(tokens[:k], skip_special_tokens=True), stops, forced)
        )
        reason = "stop_string"
    return {
        "prompt": prompt,
        "completion": text[: found[0]] if found else text,
        "num_tokens": count,
        "stop_reason": reason,
        "stop_string": found[1] if found else None,
    }


def _prompt_ids(tokenizer: Any, prompt: str, index: int, add_bos: bool) -> list[int]:
    head, body = prompt_ids(tokenizer, prompt, add_bos)  # as InstructionCollator encodes prompts
    ids = head + body
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


# -------------------------------------------------------------------------------------------- output


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | Path, overwrite: bool = False) -> Path:
    """Write one JSON object per line to ``path``: to a file beside it first, renamed when complete."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return write_text_staged(path, text, overwrite=overwrite)
