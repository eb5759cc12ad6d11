"""Prompt tuning (Lester et al., 2021) and prefix tuning (Li & Liang, 2021) for transformers models.

Both leave every base weight frozen and learn ``n`` "virtual tokens" that the model attends to.

Prompt tuning prepends ``n`` trainable vectors ``P`` to the input embeddings::

    ids ──► embed ──► [P_1 .. P_n, e_1 .. e_T] ──► transformer ──► n + T outputs

Prefix tuning gives every attention layer ``l`` its own trainable keys and values ``(K_l, V_l)``,
placed before the sequence's own as if ``n`` earlier tokens had been cached::

    attention_l(q_t) = softmax(q_t [K_l ; k_1..k_t]^T / sqrt(d)) [V_l ; v_1..v_t]

The prefix is one tensor of shape ``(n, layers * 2 * kv_heads * head_dim)`` (peft's layout: per
token, layer 0's keys, layer 0's values, layer 1's keys, ...), optionally computed by a small MLP
from ``(n, kv_heads * head_dim)`` embeddings during training (Li & Liang sec. 4.3).

Both act through a forward pre-hook on the Hugging Face model, so a ``training_step`` that calls
``model(input_ids=..., attention_mask=..., labels=...)`` works unchanged: the hook turns ids into
embeddings, extends the attention mask with ones for the virtual tokens, shifts ``position_ids`` by
``n`` (the virtual tokens take positions ``0 .. n-1``, as in peft), and for prompt tuning extends
token-level ``labels`` with -100. With rotary embeddings (Llama) the real tokens are therefore rotated
for positions ``n .. n+T-1``; soft prompts are rotated like tokens at ``0 .. n-1``, while prefix keys
are used as learned, with no rotation. Consequences, as in peft:

- prompt tuning returns ``n + T`` positions (``logits[:, n:]`` line up with the input); a causal LM's
  loss then also scores the first real token, predicted from the prompt; a BERT classifier pools the
  first virtual token in place of ``[CLS]``;
- neither method is an identity at initialisation: outputs change from the first step;
- prefix tuning needs attention that reads a ``transformers`` cache (decoders such as Llama and
  GPT-2; BERT encoders too) and does not work with gradient checkpointing, which drops the cache.

``generate`` works too: the hook marks the cache it starts, and later decoding steps, which find the
virtual tokens in that cache, get only the mask and positions widened. Export: peft saves one tensor,
``prompt_embeddings``; :meth:`PromptEncoder.export_embeddings` and :meth:`PrefixEncoder.export_embeddings`
compute it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.strategies.base import PEFTStrategy, input_embeddings_of, plain_lists
from lightning_peft.strategies.prefix import PrefixEncoder, PrefixTuning
from lightning_peft.strategies.targeting import validation_error
from lightning_peft.strategies.virtual_tokens import (
    PREFIX_ATTR,
    PROMPT_ATTR,
    attach_encoder,
    detach_encoders,
    embedding_weight,
    find_language_model,
    positional_names,
    positive_int,
    widen_inputs,
)

__all__ = ["PREFIX_ATTR", "PROMPT_ATTR", "PrefixEncoder", "PrefixTuning", "PromptEncoder", "PromptTuning"]


class PromptEncoder(nn.Module):
    """``n`` trainable input embeddings; peft saves them as ``prompt_embeddings`` of shape ``(n, hidden)``."""

    def __init__(self, init: torch.Tensor, forward_params: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.prompt_embeddings = nn.Parameter(init.detach().clone().float())  # (n, hidden)
        self.num_virtual_tokens = init.shape[0]
        self.forward_params = forward_params  # positional argument names of the hooked model
        self.enabled = True
        self.hook_handle: RemovableHandle | None = None

    def adapter_params(self) -> list[str]:
        return ["prompt_embeddings"]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def export_embeddings(self) -> torch.Tensor:
        """The tensor peft saves as ``prompt_embeddings``: ``(n, hidden)``."""
        return self.prompt_embeddings.detach()

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.prompt_embeddings.unsqueeze(0).expand(batch_size, -1, -1)  # (B, n, hidden)

    def prepend(self, model: nn.Module, kwargs: dict[str, Any], batch: int, length: int) -> None:
        """Rewrite the keyword arguments of ``model``'s call (in place) to start with the soft prompt."""
        n = self.num_virtual_tokens
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)  # (B, T, hidden)
        prompt = self(batch).to(embeds.dtype)  # (B, n, hidden)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + T, hidden)
        widen_inputs(kwargs, n, batch, length)
        positions = kwargs.get("position_ids")
        if positions is not None:  # shifted by n above; the virtual tokens take 0 .. n-1
            first = torch.arange(n, device=positions.device, dtype=positions.dtype)
            first = first.expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([first, positions], dim=1)  # (B, n + T)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
        labels = kwargs.get("labels")
        # token-level labels (causal LM, token classification) get -100 for the virtual tokens;
        # per-sequence labels (classification, regression, multi-label floats) stay as they are
        if labels is not None and not labels.is_floating_point() and labels.shape == (batch, length):
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)  # (B, n + T)


@dataclass
class PromptTuning(PEFTStrategy):
    """Soft prompts: ``num_virtual_tokens`` trained input embeddings before every input (Lester et al., 2021).

    Args:
        num_virtual_tokens: length of the soft prompt (the paper's ablations, sec. 3.2, use 1 to 150).
        prompt_tuning_init: ``"random"`` (N(0, 1), as peft), ``"sample_vocab"`` (embeddings of random
            vocabulary tokens) or ``"text"`` (embeddings of a text's tokens, repeated or cut to length;
            sec. 3.2 finds vocabulary-based starts better than random ones).
        prompt_tuning_init_text: the text for ``"text"``, tokenized with ``tokenizer_name_or_path``
            (a local folder or hub name, loaded with ``AutoTokenizer``, special tokens included as peft).
        tokenizer_name_or_path: see above.
        init_token_ids: for ``"text"``, the token ids directly instead of a text and a tokenizer.

    Example::

        model = PromptTuning(num_virtual_tokens=8).apply(model)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)   # out.logits: (B, 8 + T, vocab)
    """

    num_virtual_tokens: int = 20
    prompt_tuning_init: Literal["random", "sample_vocab", "text"] = "random"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    init_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        plain_lists(self)
        problems: list[str] = []
        positive_int("num_virtual_tokens", self.num_virtual_tokens, problems)
        init, ids = self.prompt_tuning_init, self.init_token_ids
        has_text = self.prompt_tuning_init_text is not None or self.tokenizer_name_or_path is not None
        if init not in ("random", "sample_vocab", "text"):
            problems.append(f"prompt_tuning_init must be 'random', 'sample_vocab' or 'text', got {init!r}")
        elif init == "text":
            if ids is None and (not self.prompt_tuning_init_text or not self.tokenizer_name_or_path):
                problems.append(
                    "prompt_tuning_init='text' needs init_token_ids, or prompt_tuning_init_text "
                    "together with tokenizer_name_or_path"
                )
            if ids is not None and has_text:
                problems.append(
                    "give init_token_ids or prompt_tuning_init_text/tokenizer_name_or_path, not both"
                )
        elif ids is not None or has_text:
            problems.append(
                "prompt_tuning_init_text, tokenizer_name_or_path and init_token_ids are used only with "
                f"prompt_tuning_init='text', got prompt_tuning_init={init!r}"
            )
        if ids is not None and not (
            isinstance(ids, list) and ids and all(isinstance(i, int) and i >= 0 for i in ids)
        ):
            problems.append(f"init_token_ids must be a non-empty list of token ids (ints >= 0), got {ids!r}")
        validation_error(type(self).__name__, problems)

    def initial_token_ids(self) -> list[int] | None:
        """The ids whose embeddings start the prompt for ``"text"`` (repeated or cut to length), else None."""
        if self.prompt_tuning_init != "text":
            return None
        ids = self.init_token_ids
        if ids is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
            ids = list(tokenizer(self.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ValueError(f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} gives no tokens")
        n = self.num_virtual_tokens
        return (ids * math.ceil(n / len(ids)))[:n]

    def inject(self, model: nn.Module) -> None:
        target = find_language_model(model, "PromptTuning")
        embedding, weight = input_embeddings_of(target), embedding_weight(target)
        if weight is None:
            raise ValueError(f"PromptTuning cannot read the weight of {type(embedding).__name__}")
        vocab, hidden = weight.shape
        n = self.num_virtual_tokens
        ids = self.initial_token_ids()
        if self.prompt_tuning_init == "sample_vocab":
            ids = torch.randint(0, vocab, (n,)).tolist()
        if ids is None:
            init = torch.randn(n, hidden, device=weight.device)
        else:
            too_big = sorted({i for i in ids if i >= vocab})
            if too_big:
                raise ValueError(
                    f"PromptTuning: token ids {too_big} are outside the vocabulary (size {vocab})"
                )
            with torch.no_grad():
                init = embedding(torch.tensor(ids, device=weight.device)).float()  # (n, hidden)
        encoder = PromptEncoder(init, positional_names(target))
        attach_encoder(target, "PromptTuning", PROMPT_ATTR, encoder)

    def remove(self, model: nn.Module) -> nn.Module:
        """Take the soft prompt and its hook out of ``model`` (it is then the base model again)."""
        return detach_encoders(model, PromptEncoder)
