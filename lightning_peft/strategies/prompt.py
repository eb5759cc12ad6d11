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

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.strategies.base import PEFTStrategy, input_embeddings_of
from lightning_peft.strategies.targeting import describe_modules, validation_error

PROMPT_ATTR = "prompt_encoder"
PREFIX_ATTR = "prefix_encoder"
_CACHE_MARK = "_lightning_peft_virtual_tokens"


def _embedding_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``(vocab, hidden)`` weight of ``module``'s input embeddings, looking through a LoRA wrapper."""
    embedding = input_embeddings_of(module)
    weight = getattr(embedding, "weight", None)
    if weight is None:
        weight = getattr(getattr(embedding, "base_layer", None), "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def find_language_model(model: nn.Module, owner: str, needs_cache: bool = False) -> nn.Module:
    """The outermost module of ``model`` with input embeddings (and, if asked, a ``past_key_values`` input)."""
    for _, module in model.named_modules():
        if input_embeddings_of(module) is not None and (
            not needs_cache or _accepts(module, "past_key_values")
        ):
            return module
    need = "and attention that reads a past_key_values cache " if needs_cache else ""
    raise ValueError(
        f"{owner} needs a transformers model with input embeddings (get_input_embeddings()) {need}"
        f"inside {type(model).__name__}; modules here: {describe_modules(list(model.named_modules())[1:])}"
    )


def _positional_names(module: nn.Module) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(n for n, p in inspect.signature(module.forward).parameters.items() if p.kind in kinds)


def _as_kwargs(names: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a call by name (``model(ids, mask)`` -> ``input_ids=ids, attention_mask=mask``)."""
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _widen_inputs(kwargs: dict[str, Any], n: int, batch_size: int, length: int) -> None:
    """Make room for ``n`` leading virtual tokens in a ``(B, length)`` mask and shift positions by ``n``."""
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] == length:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch_size, n), mask], dim=1)  # (B, n + length)
    positions = kwargs.get("position_ids")
    if positions is not None:
        kwargs["position_ids"] = positions + n


def _virtual_token_hook(attr: str, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """Forward pre-hook of the adapted model: let its adapter at ``attr`` put in the virtual tokens."""
    encoder = module._modules.get(attr)
    if not isinstance(encoder, PromptEncoder | PrefixEncoder) or not encoder.enabled:
        return None  # the adapter was deleted or is off: the base model's call, unchanged
    kwargs = _as_kwargs(encoder.forward_params, args, kwargs)
    inputs = kwargs.get("input_ids")
    inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
    if inputs is None:
        return None
    n = encoder.num_virtual_tokens
    cache = kwargs.get("past_key_values")
    cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    if cached:  # a later generation step: the virtual tokens are in the cache if we put them there
        if getattr(cache, _CACHE_MARK, None) != n:
            return None
        _widen_inputs(kwargs, n, inputs.shape[0], cached - n + inputs.shape[1])
        return (), kwargs
    if cache is not None:
        setattr(cache, _CACHE_MARK, n)
    encoder.prepend(module, kwargs, inputs.shape[0], inputs.shape[1])
    return (), kwargs


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
        _widen_inputs(kwargs, n, batch, length)
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


def _attach(model: nn.Module, owner: str, attr: str, encoder: nn.Module) -> None:
    if attr in model._modules:
        raise ValueError(f"{type(model).__name__} already carries a {owner} adapter; apply a strategy once")
    setattr(model, attr, encoder)
    # a partial of a module-level function: the model still pickles (ddp_spawn) and deep-copies
    hook = partial(_virtual_token_hook, attr)
    encoder.hook_handle = model.register_forward_pre_hook(hook, with_kwargs=True)


def _detach(model: nn.Module, kind: type[nn.Module]) -> nn.Module:
    """Remove every ``kind`` adapter and its hook from ``model``: it is its base model again."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    for name, encoder in found:
        if encoder.hook_handle is not None:
            encoder.hook_handle.remove()
        parent_name, _, child = name.rpartition(".")
        delattr(model.get_submodule(parent_name) if parent_name else model, child)
    return model


def _positive_int(name: str, value: Any, problems: list[str]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        problems.append(f"{name} must be a positive integer, got {value!r}")


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
        if isinstance(self.init_token_ids, Sequence) and not isinstance(self.init_token_ids, str):
            self.init_token_ids = list(self.init_token_ids)  # Hydra's ListConfig -> list
        problems: list[str] = []
        _positive_int("num_virtual_tokens", self.num_virtual_tokens, problems)
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
        embedding, weight = input_embeddings_of(target), _embedding_weight(target)
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
        encoder = PromptEncoder(init, _positional_names(target))
        _attach(target, "PromptTuning", PROMPT_ATTR, encoder)

    def remove(self, model: nn.Module) -> nn.Module:
        """Take the soft prompt and its hook out of ``model`` (it is then the base model again)."""
        return _detach(model, PromptEncoder)


def _attention_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class PrefixEncoder(nn.Module):
    """Trainable keys and values for every attention layer, computed as peft's ``PrefixEncoder`` does.

    Without projection the parameter is ``prefix`` of shape ``(n, layers * 2 * kv_heads * head_dim)``;
    with it, ``prefix_embeddings`` ``(n, kv_heads * head_dim)`` and an MLP ``transform`` (Linear, Tanh,
    Linear) that maps them to that shape.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        encoder_hidden_size: int | None = None,
        forward_params: tuple[str, ...] = (),
        config: Any = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens, self.layers = num_virtual_tokens, layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        width = kv_heads * head_dim
        if encoder_hidden_size is None:
            self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, layers * 2 * width))
        else:
            self.prefix_embeddings = nn.Parameter(torch.randn(num_virtual_tokens, width))
            self.transform = nn.Sequential(
                nn.Linear(width, encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, layers * 2 * width),
            )
        self.forward_params = forward_params
        self.config = config  # for a cache laid out like the model's own (sliding-window layers)
        self.enabled = True
        self.hook_handle: RemovableHandle | None = None

    def adapter_params(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def set_adapter_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def prefix_values(self) -> torch.Tensor:
        """The prefix that attention sees: ``(n, layers * 2 * kv_heads * head_dim)``."""
        if "prefix" in self._parameters:
            return self.prefix
        return self.transform(self.prefix_embeddings)

    def export_embeddings(self) -> torch.Tensor:
        """The tensor peft saves as ``prompt_embeddings`` (the projection, if any, already applied)."""
        with torch.no_grad():
            return self.prefix_values().detach()

    def forward(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per layer, each ``(B, kv_heads, n, head_dim)``."""
        prefix = self.prefix_values().to(dtype)  # (n, layers * 2 * kv_heads * head_dim)
        states = prefix.view(self.num_virtual_tokens, 2 * self.layers, self.kv_heads, self.head_dim)
        states = states.permute(1, 2, 0, 3).unsqueeze(1)  # (2 * layers, 1, kv_heads, n, head_dim)
        states = states.expand(-1, batch_size, -1, -1, -1)  # (2 * layers, B, kv_heads, n, head_dim)
        return [(states[2 * i], states[2 * i + 1]) for i in range(self.layers)]

    def prepend(self, model: nn.Module, kwargs: dict[str, Any], batch: int, length: int) -> None:
        """Rewrite the keyword arguments of ``model``'s call (in place): a cache that holds the prefix."""
        from transformers import DynamicCache

        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs["past_key_values"] = DynamicCache(config=self.config)
            setattr(cache, _CACHE_MARK, self.num_virtual_tokens)
        for layer, (keys, values) in enumerate(self(batch, _embedding_weight(model).dtype)):
            cache.update(keys, values, layer)
        _widen_inputs(kwargs, self.num_virtual_tokens, batch, length)


@dataclass
class PrefixTuning(PEFTStrategy):
    """Trainable key/value prefixes in every attention layer (Li & Liang, 2021).

    Supported: transformers 5 models whose attention reads a ``past_key_values`` cache: decoders
    (Llama and its relatives, GPT-2) and BERT-style encoders (the prefix is prepended in the
    backbone). Not supported: encoder-decoder models, gradient checkpointing.

    Args:
        num_virtual_tokens: prefix length (the paper uses 10 for table-to-text, 200 for summarisation).
        prefix_projection: compute the prefix with an MLP from smaller embeddings while training
            (sec. 4.3: more stable optimisation); the export saves the computed prefix.
        encoder_hidden_size: hidden width of that MLP; default the model's key/value width
            (``kv_heads * head_dim``), as peft.

    Example::

        model = PrefixTuning(num_virtual_tokens=8).apply(model)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)   # out.logits: (B, T, vocab)
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        _positive_int("num_virtual_tokens", self.num_virtual_tokens, problems)
        if not isinstance(self.prefix_projection, bool):
            problems.append(f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        if self.encoder_hidden_size is not None:
            _positive_int("encoder_hidden_size", self.encoder_hidden_size, problems)
            if self.prefix_projection is False:
                problems.append("encoder_hidden_size is used only with prefix_projection=True")
        validation_error(type(self).__name__, problems)

    def inject(self, model: nn.Module) -> None:
        target = find_language_model(model, "PrefixTuning", needs_cache=True)
        config = getattr(target, "config", None)
        problems = []
        if config is None or not hasattr(config, "num_hidden_layers"):
            problems.append(
                f"{type(target).__name__} has no transformers config to read its attention shape from"
            )
        elif getattr(config, "is_encoder_decoder", False):
            problems.append(
                f"{type(target).__name__} is an encoder-decoder model; PrefixTuning supports decoders"
            )
        checkpointed = [n for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False)]
        if checkpointed:
            problems.append(
                "gradient checkpointing is on (it drops the key/value cache that carries the prefix) in "
                f"{', '.join(checkpointed[:4])}; call gradient_checkpointing_disable() first"
            )
        validation_error("PrefixTuning", problems)
        layers, kv_heads, head_dim = _attention_shape(config)
        width = kv_heads * head_dim
        hidden = (self.encoder_hidden_size or width) if self.prefix_projection else None
        device = _embedding_weight(target).device
        encoder = PrefixEncoder(
            self.num_virtual_tokens, layers, kv_heads, head_dim, hidden, _positional_names(target), config
        ).to(device)
        _attach(target, "PrefixTuning", PREFIX_ATTR, encoder)

    def remove(self, model: nn.Module) -> nn.Module:
        """Take the prefix and its hook out of ``model`` (it is then the base model again)."""
        return _detach(model, PrefixEncoder)
