"""Prompt templates and a collator for instruction tuning a causal language model.

A record is a dict of named text fields (``instruction``, ``input``, ``output``, or any others). A
:class:`PromptTemplate` turns it into a ``(prompt, response)`` pair of strings; the
:class:`InstructionCollator` tokenizes a list of records into one right-padded batch in which only
the response is learned::

    tokens:  [bos] p p p p p p  r r r </s>  <pad> <pad>
    labels:  -100  -100 ...     r r r </s>  -100  -100      # the model shifts labels itself

Prompt and response are tokenized separately, so the boundary between them is exact whatever the
tokenizer (a BPE merge never straddles it). transformers' ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` gives the same labels, but only for chat templates that mark the
assistant's text with ``{% generation %}`` (many do not), and it masks whole tokens of a conversation
tokenized in one piece; the split here works with any chat template and with plain prompt templates.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100  # labels that cross-entropy skips (torch's and transformers' default)


def _field_names(text: str, what: str) -> tuple[str, ...]:
    """The record fields a ``str.format`` string refers to (``{user.name}`` refers to ``user``)."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise ValueError(f"PromptTemplate: {what}={text!r} is not a valid format string: {err}") from err
    names = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        base = field.split(".", 1)[0].split("[", 1)[0]
        if not base or base.isdigit():
            raise ValueError(
                f"PromptTemplate: {what}={text!r} has a positional field {{{field}}}; name the record field, "
                "as in {instruction}"
            )
        names.append(base)
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class PromptTemplate:
    """Format a record into a ``(prompt, response)`` pair of strings with ``str.format`` fields.

    Args:
        prompt: the text before the response, e.g. ``"Q: {question}\\nA: "``.
        response: the text the model learns to write, usually ``"{output}"``.
        optional_field: a field that may be missing or blank in a record (alpaca's ``input``).
        prompt_if_empty: the prompt used when ``optional_field`` is missing or blank; it must not
            refer to that field. Without it the blank value is formatted into ``prompt`` as ``""``.
        chat: render through the tokenizer's chat template instead: the formatted ``prompt`` is the
            user message, the formatted ``response`` the assistant message, and the pair returned is
            (the conversation up to the assistant's turn, the rest). Needs a tokenizer with a
            ``chat_template``.
        system: with ``chat``, a system message put first (may use fields too).

    Every other field a chosen string refers to is required: a record without it raises a
    ``ValueError`` naming the field and the record's keys.

    Example::

        template = PromptTemplate(prompt="Q: {question}\\nA: ", response="{answer}")
        template.render({"question": "2 + 2?", "answer": "4"})   # ("Q: 2 + 2?\\nA: ", "4")
        ALPACA.render({"instruction": "Uppercase the word.", "input": "", "output": "CAT"})[0]
        # 'Carry out the instruction below.\\n\\n### Instruction:\\nUppercase the word.\\n\\n### Response:\\n'
    """

    prompt: str
    response: str = "{output}"
    optional_field: str | None = None
    prompt_if_empty: str | None = None
    chat: bool = False
    system: str | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("prompt", "response", "prompt_if_empty", "system"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                problems.append(f"{name} must be a string, got {type(value).__name__}")
        if self.optional_field is not None and not isinstance(self.optional_field, str):
            problems.append(f"optional_field must be a field name or None, got {self.optional_field!r}")
        if not isinstance(self.chat, bool):
            problems.append(f"chat must be True or False, got {self.chat!r}")
        if problems:
            raise TypeError("PromptTemplate: " + "; ".join(problems))
        for name in ("prompt", "response", "prompt_if_empty", "system"):
            if getattr(self, name) is not None:
                _field_names(getattr(self, name), name)  # raises on a malformed string
        if self.prompt_if_empty is not None:
            if self.optional_field is None:
                problems.append(
                    "prompt_if_empty is set but optional_field is not: name the field that may be blank"
                )
            elif self.optional_field in _field_names(self.prompt_if_empty, "prompt_if_empty"):
                problems.append(
                    f"prompt_if_empty refers to {{{self.optional_field}}}, the field it replaces when blank"
                )
        if self.system is not None and not self.chat:
            problems.append("system is only used with chat=True")
        if problems:
            raise ValueError("PromptTemplate is misconfigured: " + "; ".join(problems))

    def required_fields(self) -> tuple[str, ...]:
        """The record fields this template reads that a record must have (all but ``optional_field``)."""
        texts = [(getattr(self, name), name) for name in ("prompt", "response", "prompt_if_empty", "system")]
        names = [f for text, what in texts if text is not None for f in _field_names(text, what)]
        return tuple(f for f in dict.fromkeys(names) if f != self.optional_field)

    def _is_blank(self, record: Mapping[str, Any]) -> bool:
        value = record.get(self.optional_field) if self.optional_field else None
        return value is None or (isinstance(value, str) and not value.strip())

    def _format(self, text: str, what: str, record: Mapping[str, Any]) -> str:
        values = dict(record)
        if self.optional_field is not None and self._is_blank(record):
            values[self.optional_field] = ""
        missing = [f for f in _field_names(text, what) if values.get(f) is None]
        if missing:
            raise ValueError(
                f"PromptTemplate: the record has no {missing[0]!r} field, which {what}={text!r} needs; "
                f"the record's keys: {sorted(record)}"
            )
        return text.format(**values)

    def format_prompt(self, record: Mapping[str, Any]) -> str:
        """The prompt text alone (no response field needed): for generation, or the chat's user message."""
        if self.prompt_if_empty is not None and self._is_blank(record):
            return self._format(self.prompt_if_empty, "prompt_if_empty", record)
        return self._format(self.prompt, "prompt", record)

    def format_response(self, record: Mapping[str, Any]) -> str:
        """The response text alone."""
        return self._format(self.response, "response", record)

    def messages(self, record: Mapping[str, Any], with_response: bool = True) -> list[dict[str, str]]:
        """The record as chat messages: an optional system message, the user's, then the assistant's."""
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": self._format(self.system, "system", record)})
        messages.append({"role": "user", "content": self.format_prompt(record)})
        if with_response:
            messages.append({"role": "assistant", "content": self.format_response(record)})
        return messages

    def prompt_text(self, record: Mapping[str, Any], tokenizer: Any = None) -> str:
        """The text a model continues to answer ``record`` (no ``output`` needed): what generation reads.

        With ``chat`` it is the tokenizer's chat template up to the assistant's turn.
        """
        if not self.chat:
            return self.format_prompt(record)
        self._check_chat_tokenizer(tokenizer)
        return tokenizer.apply_chat_template(
            self.messages(record, with_response=False), tokenize=False, add_generation_prompt=True
        )

    def render(self, record: Mapping[str, Any], tokenizer: Any = None) -> tuple[str, str]:
        """``(prompt, response)`` for ``record``; ``tokenizer`` is needed (and only used) with ``chat``."""
        if not self.chat:
            return self.format_prompt(record), self.format_response(record)
        prompt = self.prompt_text(record, tokenizer)
        full = tokenizer.apply_chat_template(self.messages(record), tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "PromptTemplate(chat=True): the tokenizer's chat template renders the conversation with the "
                "assistant's answer so that it does not begin with the prompt rendered with "
                f"add_generation_prompt=True, so the response cannot be split off:\n  prompt: {prompt!r}\n"
                f"  full:   {full!r}"
            )
        return prompt, full[len(prompt) :]

    @staticmethod
    def _check_chat_tokenizer(tokenizer: Any) -> None:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            name = "no tokenizer" if tokenizer is None else f"the tokenizer {type(tokenizer).__name__}"
            raise ValueError(
                f"PromptTemplate(chat=True) renders through a tokenizer's chat template, and {name} has none: "
                "pass a tokenizer whose chat_template is set (char_tokenizer(chat_template=...), "
                "tokenizer.chat_template = ...), or use chat=False"
            )


TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "conf" / "template"


def load_template(name_or_path: str | Path) -> PromptTemplate:
    """A :class:`PromptTemplate` from a YAML file, or by name from the shipped ``conf/template/``.

    The YAML holds the constructor's arguments (a Hydra ``_target_`` key is ignored), as the shipped
    ``alpaca.yaml`` and ``chat.yaml`` do.

    Example::

        load_template("alpaca").prompt_text({"instruction": "Uppercase the word.", "input": "cat"})
    """
    from lightning_peft.generation.settings import read_settings_file

    path = Path(name_or_path)
    if not path.is_file():
        path = TEMPLATE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml")))
        raise ValueError(f"no template {str(name_or_path)!r}: give a YAML file or one of {shipped}")
    values = {k: v for k, v in read_settings_file(path).items() if k != "_target_"}
    try:
        return PromptTemplate(**values)
    except TypeError as err:
        raise ValueError(f"{path}: {err}") from err


ALPACA = PromptTemplate(
    prompt=(
        "Carry out the instruction below.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
        "### Response:\n"
    ),
    response="{output}",
    optional_field="input",
    prompt_if_empty="Carry out the instruction below.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
)
"""Alpaca-style sections (instruction, optional input, response), in our own words."""

CHAT = PromptTemplate(
    prompt="{instruction}\n\n{input}",
    response="{output}",
    optional_field="input",
    prompt_if_empty="{instruction}",
    chat=True,
)
"""Instruction (and input, when given) as the user's message, output as the assistant's, through the
tokenizer's chat template."""


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its bos token before plain text (Llama's does, GPT-2's does not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def prompt_ids(tokenizer: Any, text: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """``(head, body)``: a prompt's ids as training and generation both encode it. ``text`` is
    tokenized without special tokens; ``head`` is the bos when the text already starts with it (a chat
    template wrote it: kept apart so that truncation keeps it) or ``add_bos`` asks for it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] == [bos]:
        return [bos], ids[1:]
    return ([bos] if add_bos else []), ids


class InstructionCollator:
    """Tokenize records into a causal-LM batch whose labels cover the response only.

    Each row is ``[bos] + prompt + response + [eos]``, right-padded with the tokenizer's pad id (its
    eos id when it has no pad token). ``labels`` is ``-100`` on the bos, the prompt and the padding
    and equals ``input_ids`` on the response and eos; Hugging Face causal LMs shift the labels
    themselves, so the logits at position ``t`` are scored against the token at ``t + 1``.

    Truncation to ``max_length`` never cuts the response: the prompt loses tokens from its left
    (its start, usually a fixed preamble) first, keeping the bos; a record whose response (with bos
    and eos) alone is longer than ``max_length`` raises a ``ValueError``, as it cannot be learned
    whole. Chat templates that already put the bos or eos in the text do not get a second one.

    Args:
        tokenizer: a Hugging Face tokenizer.
        template: turns a record into (prompt, response) strings.
        max_length: the longest row, in tokens.
        add_bos: prepend the bos token; None does so when the tokenizer adds one to plain text.
        add_eos: append the eos token, so the model learns to stop.

    Example::

        collate = InstructionCollator(char_tokenizer(), ALPACA, max_length=128)
        batch = collate([{"instruction": "Reverse the word.", "input": "cat", "output": "tac"}])
        batch["input_ids"].shape, batch["labels"][0, -4:]   # (1, 101), the ids of "tac" and </s>
        loader = DataLoader(records, batch_size=16, collate_fn=collate)
    """

    def __init__(
        self,
        tokenizer: Any,
        template: PromptTemplate,
        max_length: int = 256,
        add_bos: bool | None = None,
        add_eos: bool = True,
    ) -> None:
        problems = []
        if not isinstance(template, PromptTemplate):
            problems.append(f"template must be a PromptTemplate, got {type(template).__name__}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            problems.append(f"max_length must be an int >= 2, got {max_length!r}")
        if add_bos is None:
            add_bos = adds_bos(tokenizer)
        if add_bos and tokenizer.bos_token_id is None:
            problems.append(f"add_bos=True but the tokenizer {type(tokenizer).__name__} has no bos token")
        if add_eos and tokenizer.eos_token_id is None:
            problems.append(f"add_eos=True but the tokenizer {type(tokenizer).__name__} has no eos token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            problems.append(
                f"the tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token to pad with"
            )
        if template.chat and not getattr(tokenizer, "chat_template", None):
            problems.append(
                f"template.chat is True but the tokenizer {type(tokenizer).__name__} has no chat_template"
            )
        if problems:
            raise ValueError("InstructionCollator: " + "; ".join(problems))
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.pad_token_id = int(pad)

    def encode(self, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of one record, with bos/eos and truncation applied."""
        prompt_text, response_text = self.template.render(record, self.tokenizer)
        head, prompt = prompt_ids(self.tokenizer, prompt_text, self.add_bos)
        response = self.tokenizer(response_text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if self.add_eos and response[-1:] != [eos]:
            response = [*response, eos]
        if not response:
            raise ValueError(
                f"InstructionCollator: a record's response is empty and add_eos=False, so it has nothing to "
                f"learn (its keys: {sorted(record)})"
            )
        room = self.max_length - len(head) - len(response)
        if room < 0:
            raise ValueError(
                f"InstructionCollator: a response of {len(response)} tokens (with eos) does not fit in "
                f"max_length={self.max_length} even without its prompt; raise max_length or drop the record "
                f"(its keys: {sorted(record)})"
            )
        prompt = prompt[len(prompt) - room :] if len(prompt) > room else prompt
        return head + prompt, response

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not records:
            raise ValueError("InstructionCollator: got an empty list of records")
        encoded = [self.encode(r) for r in records]
        width = max(len(p) + len(r) for p, r in encoded)
        input_ids = torch.full((len(records), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(records), width), dtype=torch.long)  # (B, T)
        labels = torch.full((len(records), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, (prompt, response) in enumerate(encoded):
            n, m = len(prompt), len(response)
            input_ids[row, : n + m] = torch.tensor(prompt + response)
            attention_mask[row, : n + m] = 1
            labels[row, n : n + m] = torch.tensor(response)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
