"""The Hugging Face PEFT layout (peft 0.21): our names and configs to theirs, and back.

Keys are ``base_model.model.<path in the Hugging Face model>.<tensor>`` (``base_model.<path>`` for
prompt learning, whose ``PeftModel`` wraps the model one level less deep):

====================================  ==================================================
ours (relative to the adapted model)  peft
====================================  ==================================================
``<m>.lora_A`` / ``<m>.lora_B``       ``<m>.lora_A.weight`` / ``<m>.lora_B.weight``
``<m>.lora_embedding_A`` / ``_B``     the same (parameters in peft too: no ``.weight``)
``<m>.lora_magnitude_vector``         the same; conv DoRA as ``(1, out, 1, ...)``
``<m>.out_proj_lora_A`` / ``_B``      ``<m>.base_layer.out_proj.lora_A.weight`` / ``_B``
                                      (``nn.MultiheadAttention``'s output projection)
``<m>.ia3_l``                         the same; conv ``(out, 1, 1, ...)`` as ``(1, out, 1, ...)``
``<m>.lora_B_bias`` (``lora_bias``)    ``<m>.lora_B.bias``
``<m>.trainable_tokens_delta``        ``<m>.token_adapter.trainable_tokens_delta``
``<m>.trained.<t>`` (modules_to_save) ``<m>.<t>``: the module's own key
``prompt_encoder.prompt_embeddings``  ``prompt_embeddings`` (no prefix)
``prefix_encoder.prefix`` (or MLP)    ``prompt_embeddings``: the computed prefix
anything else (biases, frozen)        the same name
====================================  ==================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from lightning_peft.formats.peft_lora import lora_config, lora_from_peft, unsupported_settings
from lightning_peft.strategies.base import PEFTStrategy
from lightning_peft.strategies.compose import Compose
from lightning_peft.strategies.freeze import Freeze
from lightning_peft.strategies.ia3 import IA3
from lightning_peft.strategies.lora import LoRA
from lightning_peft.strategies.prompt import PREFIX_ATTR, PROMPT_ATTR, PrefixTuning, PromptTuning
from lightning_peft.strategies.targeting import matches

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUPPORTED_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")

# modules that peft's task models train whole by themselves; the adapter file must hold their weights
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
_SUFFIXED = ("lora_A", "lora_B")  # nn.Linear / nn.Conv2d submodules in peft: their tensor is ".weight"
# our parameter leaf -> peft's key ending, for tensors that peft keeps one module deeper (it wraps
# nn.MultiheadAttention's out_proj in a LoRA layer of its own, under the attention's base_layer)
_RENAMED_LEAVES = {
    "out_proj_lora_A": "base_layer.out_proj.lora_A.weight",
    "out_proj_lora_B": "base_layer.out_proj.lora_B.weight",
    "lora_B_bias": "lora_B.bias",
    "trainable_tokens_delta": "token_adapter.trainable_tokens_delta",
}
_PROMPT_TENSORS = (f"{PROMPT_ATTR}.prompt_embeddings", f"{PREFIX_ATTR}.prefix")
_PREFIX_MLP = f"{PREFIX_ATTR}.prefix_embeddings"
# Hugging Face class name endings -> peft task type (what picks PeftModelForCausalLM & co.)
_TASKS_BY_CLASS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)


class NotInPeftFormat(ValueError):
    """The adapter has no equivalent in the Hugging Face PEFT format; the message says why."""


def task_type_of(class_name: str | None) -> str | None:
    """The peft task type of a transformers model class (``LlamaForCausalLM`` -> ``CAUSAL_LM``)."""
    for ending, task in _TASKS_BY_CLASS:
        if class_name and class_name.endswith(ending):
            return task
    return None


def peft_method(strategy: PEFTStrategy) -> tuple[PEFTStrategy, list[str]]:
    """(the method peft knows, extra modules_to_save) of ``strategy``; raises :class:`NotInPeftFormat`.

    Besides LoRA (DoRA, rsLoRA, QLoRA), IA3, prompt and prefix tuning, a ``Compose`` of one of them with
    a ``Freeze`` that trains whole named modules is carried: those modules become ``modules_to_save``.
    """
    carried = (LoRA, IA3, PromptTuning, PrefixTuning)
    if isinstance(strategy, carried):
        return strategy, []
    if isinstance(strategy, Compose) and len(strategy.strategies) == 2:
        method, extra = strategy.strategies
        if isinstance(extra, carried) and isinstance(method, Freeze):
            method, extra = extra, method
        if (
            isinstance(method, carried)
            and isinstance(extra, Freeze)
            and not extra.last_n_blocks
            and isinstance(extra.trainable_modules, list)
        ):
            return method, list(extra.trainable_modules)
    names = type(strategy).__name__
    if isinstance(strategy, Compose):
        names = "Compose of " + ", ".join(type(s).__name__ for s in strategy.strategies)
    raise NotInPeftFormat(
        f"{names} has no equivalent in the Hugging Face PEFT format (it carries LoRA, DoRA, rsLoRA, IA3, "
        "prompt and prefix tuning, each optionally with modules trained whole)"
    )


def is_prompt_learning(method: PEFTStrategy) -> bool:
    return isinstance(method, PromptTuning | PrefixTuning)


def peft_name(name: str, method: PEFTStrategy) -> str:
    """Our tensor name (relative to the adapted model) -> peft's, without the ``base_model`` prefix."""
    if any(name == t or name.endswith("." + t) for t in _PROMPT_TENSORS):
        return "prompt_embeddings"
    module, _, leaf = name.rpartition(".")
    if leaf in _SUFFIXED:
        return f"{name}.weight"
    if leaf in _RENAMED_LEAVES:
        return f"{module}.{_RENAMED_LEAVES[leaf]}" if module else _RENAMED_LEAVES[leaf]
    head, found, rest = name.partition(".trained.")
    if found and matches(head, getattr(method, "modules_to_save", None)):
        return f"{head}.{rest}"
    return name


def key_prefix(method: PEFTStrategy) -> str:
    return "base_model." if is_prompt_learning(method) else "base_model.model."


def with_computed_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace a prefix MLP (embeddings + Linear, Tanh, Linear) by the prefix it computes, as
    ``PrefixEncoder.prefix_values`` does: peft loads the computed prefix, not the MLP."""
    names = [k for k in tensors if k == _PREFIX_MLP or k.endswith("." + _PREFIX_MLP)]
    if not names:
        return tensors
    (embeddings,) = names
    base = embeddings[: -len("prefix_embeddings")]
    mlp = {
        k[len(base) + len("transform.") :]: v for k, v in tensors.items() if k.startswith(base + "transform.")
    }
    with torch.no_grad():
        hidden = torch.tanh(
            F.linear(tensors[embeddings].float(), mlp["0.weight"].float(), mlp["0.bias"].float())
        )
        prefix = F.linear(hidden, mlp["2.weight"].float(), mlp["2.bias"].float())  # (n, layers * 2 * width)
    kept = {k: v for k, v in tensors.items() if not k.startswith(base)}
    return {**kept, base + "prefix": prefix}


def to_peft_value(name: str, value: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """peft stores conv DoRA magnitudes as ``(1, out, 1, ...)`` (ours are ``(out,)``) and conv IA3
    vectors as ``(1, channels, 1, ...)`` (ours that scale outputs are ``(out, 1, 1, ...)``)."""
    if name.endswith("lora_magnitude_vector"):
        lora_a = tensors.get(name[: -len("lora_magnitude_vector")] + "lora_A")
        if lora_a is not None and lora_a.dim() >= 3:
            return value.reshape(1, -1, *(1,) * (lora_a.dim() - 2))
    if name.endswith("ia3_l") and value.dim() >= 3:
        return value.reshape(1, -1, *(1,) * (value.dim() - 2))
    return value


def written_targets(
    paths: list[str], method: PEFTStrategy, feedforward: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) for adapter_config.json: the names the user gave, if they
    select exactly the adapted modules, else every adapted module's full name."""
    feedforward = sorted(feedforward)
    spec = getattr(method, "target_modules", None)
    plain_list = (
        isinstance(spec, list)
        and getattr(method, "exclude_modules", None) is None
        and getattr(method, "layers_to_transform", None) is None
    )
    if plain_list:
        used = [e for e in dict.fromkeys(spec) if any(matches(p, [e]) for p in paths)]
        ff = [e for e in used if all(p in feedforward for p in paths if matches(p, [e]))]
        covered_ff = sorted(p for p in paths if matches(p, ff))
        if all(matches(p, used) for p in paths) and covered_ff == feedforward:
            return used, ff
    return sorted(paths), feedforward


def peft_config(
    method: PEFTStrategy,
    targets: list[str],
    feedforward: list[str],
    modules_to_save: list[str],
    facts: dict[str, Any],
) -> dict[str, Any]:
    """adapter_config.json: only the keys peft needs, so that older peft versions load it too."""
    config: dict[str, Any] = {
        "task_type": facts.get("task_type"),
        "base_model_name_or_path": facts.get("base_model_name_or_path"),
        "modules_to_save": modules_to_save or None,
    }
    if isinstance(method, LoRA):
        config |= lora_config(method, targets, bool(facts.get("fan_in_fan_out", False)))
    elif isinstance(method, IA3):
        config |= {
            "peft_type": "IA3",
            "target_modules": targets,
            "feedforward_modules": feedforward,
            "fan_in_fan_out": bool(facts.get("fan_in_fan_out", False)),
        }
    else:
        if config["task_type"] is None:
            raise ValueError(
                f"{type(method).__name__} needs the model's task type in adapter_config.json (peft applies "
                f"prompts only in its task-specific models): pass task_type= one of {', '.join(TASK_TYPES)} "
                "(--task-type), or base_model_name_or_path= a local model folder"
            )
        config |= {
            "num_virtual_tokens": method.num_virtual_tokens,
            "num_transformer_submodules": 1,
            **{k: facts[k] for k in ("token_dim", "num_layers", "num_attention_heads") if k in facts},
        }
        if isinstance(method, PromptTuning):
            config |= {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM"}
        else:
            config |= {"peft_type": "PREFIX_TUNING", "prefix_projection": False}
    return config


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


# ---------------------------------------------------------------------------------------------- import


def entries_peft_used(config: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``config`` without the list entries of ``target_modules`` and ``modules_to_save`` that selected
    nothing in the model peft saved (no tensor of the file lies under a module they match).

    peft ignores a list entry that matches no module while another one does (its classification
    models add both ``classifier`` and ``score`` to ``modules_to_save``); our strategies refuse such an
    entry as a misspelling, so the entries are narrowed to what peft used. Regexes stay as they are.
    """
    paths = set()
    for key in keys:
        parts = key.split(".")
        paths.update(".".join(parts[:i]) for i in range(1, len(parts)))  # every module path above it
    paths = {p.removeprefix("base_model.model.").removeprefix("base_model.") for p in paths}
    narrowed = dict(config)
    for field in ("target_modules", "modules_to_save"):
        value = config.get(field)
        if isinstance(value, list | tuple) and paths:
            kept = [e for e in value if any(matches(p, [e]) for p in paths)]
            narrowed[field] = kept or (
                [] if field == "target_modules" and config.get("target_parameters") else None
            )
    return narrowed


_REQUIRED = {
    "LORA": ("r",),
    "PROMPT_TUNING": ("num_virtual_tokens",),
    "PREFIX_TUNING": ("num_virtual_tokens",),
}


def strategy_from_peft_config(config: dict[str, Any], source: str) -> PEFTStrategy:
    """The strategy that builds the adapter an ``adapter_config.json`` describes; a ``ValueError`` names
    a missing or malformed field."""
    missing = [key for key in _REQUIRED.get(config.get("peft_type"), ()) if key not in config]
    if missing:
        raise ValueError(
            f"{source}: {CONFIG_FILE} lacks {', '.join(missing)}, needed for {config['peft_type']}"
        )
    try:
        return _strategy_from_peft_config(config, source)
    except (TypeError, KeyError, AttributeError) as err:  # a field of the wrong type
        raise ValueError(f"{source}: {CONFIG_FILE} has a malformed field: {err!r}") from err
    except ValueError as err:
        if str(err).startswith(source):
            raise
        raise ValueError(f"{source}: {CONFIG_FILE} has invalid values: {err}") from err


def _strategy_from_peft_config(config: dict[str, Any], source: str) -> PEFTStrategy:
    kind = config.get("peft_type")
    if kind not in SUPPORTED_TYPES:
        raise ValueError(
            f"{source}: peft_type {kind!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    saved = list(dict.fromkeys(config.get("modules_to_save") or [])) or None
    unsupported = unsupported_settings(config) if kind == "LORA" else []
    if kind != "LORA":
        unsupported = [f"{k}={config[k]!r}" for k in ("trainable_token_indices",) if config.get(k)]
    if (config.get("num_transformer_submodules") or 1) != 1:
        unsupported.append("num_transformer_submodules=2 (encoder-decoder prompts)")
    if unsupported:
        raise ValueError(f"{source}: these peft settings are not supported: {', '.join(unsupported)}")
    if kind == "LORA":
        return lora_from_peft(config, saved, _spec)
    if kind == "IA3":
        return IA3(
            target_modules=_spec(config.get("target_modules")),
            feedforward_modules=_spec(config.get("feedforward_modules")) or [],
            exclude_modules=_spec(config.get("exclude_modules")),
            modules_to_save=saved,
        )
    # the saved tensor is the prefix itself, whether or not an MLP computed it while training
    method = (PromptTuning if kind == "PROMPT_TUNING" else PrefixTuning)(
        num_virtual_tokens=config["num_virtual_tokens"]
    )
    return Compose([method, Freeze(trainable_modules=saved)]) if saved else method


def _spec(value: Any) -> str | list[str] | None:
    return sorted(value) if isinstance(value, list | tuple | set) else value
