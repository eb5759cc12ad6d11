"""The pieces of :func:`lightning_peft.generation.generate.generate` that transformers lacks, handed to
``model.generate``: :class:`ForceWords` (a logits processor), :class:`StopAtStrings` (a stopping
criterion), :class:`CompletionStreamer` (a streamer), and the two functions they share,
:func:`word_token_ids` and :func:`find_stop`.

Everything transformers does itself is left to it: sampling, ``repetition_penalty``, banned words
(``bad_words_ids``) and stop strings (``stop_strings=`` with ``tokenizer=``).

What stays ours, and why:

- Forced words: transformers 5 moved constrained beam search (``force_words_ids``, ``constraints``) to a
  Hub repository that ``generate`` downloads and runs with ``trust_remote_code``, so it cannot be used
  offline. :class:`ForceWords` works with greedy decoding and sampling: the model writes freely, the
  end-of-sequence token is held back while a word is missing, and once the tokens left just suffice to
  write the missing words, it writes them (continuing one it has begun).
- :class:`StopAtStrings`: a stop string counts only after every forced word has appeared, and only in the
  completion. transformers' ``StopStringCriteria`` knows no forced words and also matches a stop string
  that began in the prompt, so it is used only where neither matters.
- :class:`CompletionStreamer`: transformers' ``TextStreamer`` prints the stop string and what its last
  token adds after it; this one holds back text that may begin a stop string, so a stream ends where the
  record's completion does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, TextIO

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer


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
    """Ends a sequence once its completion holds a stop string after every forced word (see the module
    docstring for when it replaces transformers' ``stop_strings``); records the number of tokens each
    sequence had then in ``stopped_at`` (row -> tokens)."""

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
