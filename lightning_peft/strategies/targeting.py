"""Finding the modules a strategy acts on.

The rules are peft's, so configs carry over:

- a string is a regular expression that must match the *whole* qualified module name;
- a list matches a name exactly or as a dotted suffix (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``);
- ``"all-linear"`` takes every linear layer except the output head (the ``get_output_embeddings()``
  of any Hugging Face model inside, and the modules trained whole through ``modules_to_save``);
- ``exclude_modules`` follows the same rules and wins over the targets;
- every entry the user gives (of ``target_modules``, ``exclude_modules``, ``modules_to_save``) must
  match a module of the model: a misspelled name is an error that suggests close names, never a
  silently smaller selection (peft drops such entries while another one matches);
- ``layers_to_transform`` keeps only modules inside the numbered blocks given (the number after
  ``layers_pattern`` in the name: ``layers.3.``, ``h.3.``, ``layer.3.``, ``blocks.3.``).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import regex
from torch import nn

from lightning_peft.strategies.base import PEFTLayer

TargetSpec = str | Sequence[str] | None

ALL_LINEAR = "all-linear"

# set while a named adapter is added next to others: targets that carry an adapter may be wrapped again
_STACKING = contextvars.ContextVar("lightning_peft_stacking", default=False)


@contextlib.contextmanager
def stacking_adapters():
    """Inside the block, strategies may put their adapters around layers that already carry one."""
    token = _STACKING.set(True)
    try:
        yield
    finally:
        _STACKING.reset(token)


DEFAULT_LAYERS_PATTERNS = ("layers", "layer", "h", "blocks", "block")


def validation_error(owner: str, problems: list[str]) -> None:
    """Raise one ``ValueError`` that lists every problem found, or nothing if there is none."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"{owner} is misconfigured:\n{lines}")


def check_spec(name: str, spec: TargetSpec, problems: list[str]) -> None:
    """Append a problem if ``spec`` is not a valid target description (bad type or bad regex)."""
    if spec is None:
        return
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            return
        try:
            re.compile(spec)
        except re.error as err:
            problems.append(f"{name}={spec!r} is not a valid regular expression ({err})")
        return
    if not isinstance(spec, Sequence) or not all(isinstance(s, str) for s in spec):
        problems.append(f"{name} must be a regex string, a list of module names, or None; got {spec!r}")


def matches(name: str, spec: TargetSpec) -> bool:
    """Whether the qualified module ``name`` is selected by ``spec`` (see the module docstring)."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return _bounded(regex.fullmatch, spec, name) is not None
    return any(name == target or name.endswith("." + target) for target in spec)


REGEX_TIMEOUT_S = 1.0  # per module name; a pattern that backtracks catastrophically would never end


def _bounded(match: Callable[..., Any], pattern: str, name: str) -> Any:
    """``match(pattern, name)`` with the ``regex`` package's time limit: a hostile config cannot hang."""
    try:
        return match(pattern, name, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        raise ValueError(
            f"the regular expression {pattern!r} took over {REGEX_TIMEOUT_S:g} s on the module name {name!r} "
            "(catastrophic backtracking); write a simpler pattern or a list of module names"
        ) from None


def layer_index(name: str, layers_pattern: TargetSpec = None) -> int | None:
    """The block number in a module name (``model.layers.3.mlp`` -> 3), or None outside numbered blocks."""
    if isinstance(layers_pattern, str):
        patterns: Sequence[str] = [layers_pattern]
    else:
        patterns = layers_pattern or DEFAULT_LAYERS_PATTERNS
    for pattern in patterns:
        found = _bounded(regex.match, rf"(?:.*\.)?{pattern}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def linear_types() -> tuple[type[nn.Module], ...]:
    """``nn.Linear`` and, once transformers is imported, its GPT-2 style ``Conv1D``."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return (nn.Linear, conv1d) if conv1d is not None else (nn.Linear,)


def is_conv1d(module: nn.Module) -> bool:
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of the outermost Hugging Face model inside ``model`` (None if there is none)."""
    for module in model.modules():
        kind = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(kind, str) and kind:
            return kind
    return None


def output_heads(model: nn.Module) -> set[int]:
    """ids of the output-embedding modules of every Hugging Face model inside ``model``."""
    heads = set()
    for module in model.modules():
        get_output = getattr(module, "get_output_embeddings", None)
        if callable(get_output):
            try:
                head = get_output()
            except (AttributeError, NotImplementedError):
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
    return heads


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named submodules that a strategy may target: not the root, nothing inside an existing adapter."""
    inside_adapter: list[str] = []
    found = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside_adapter):
            continue
        if isinstance(module, PEFTLayer):
            inside_adapter.append(name)
        found.append((name, module))
    return found


def describe_modules(modules: list[tuple[str, nn.Module]], limit: int = 40) -> str:
    """A compact listing of leaf names and types: ``q_proj (Linear) x12, ...``, for error messages."""
    counts = Counter((name.rsplit(".", 1)[-1], type(module).__name__) for name, module in modules)
    items = [f"{leaf} ({kind})" + (f" x{n}" if n > 1 else "") for (leaf, kind), n in counts.items()]
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _entries(spec: TargetSpec) -> list[str | list[str]]:
    """The entries of ``spec`` that must each match a module: a string is one regex, a list's
    entries are names or suffixes (each wrapped in a list, so :func:`matches` reads it as one)."""
    if spec is None or spec == ALL_LINEAR:
        return []
    if isinstance(spec, str):
        return [spec]
    return [[entry] for entry in dict.fromkeys(spec)]


def _unmatched_entry(field: str, entry: str | list[str], names: list[str]) -> str:
    """Why ``entry`` of ``field`` selects nothing, with the names the user may have meant."""
    if isinstance(entry, str):  # a regex
        partial = [n for n in names if re.search(entry, n)]
        line = (
            f"{field}={entry!r} matched no module: a string is a regular expression that must match a "
            f"whole module name"
        )
        if partial:
            more = f" (and {len(partial) - 1} more)" if len(partial) > 1 else ""
            return (
                f"{line}; it matches only part of {partial[0]!r}{more}: write '.*{entry}', or a list of "
                f"names or dotted suffixes such as [{partial[0].rsplit('.', 1)[-1]!r}]"
            )
        close = difflib.get_close_matches(entry, names, n=3, cutoff=0.6)
    else:
        (name,) = entry
        line = f"{field} entry {name!r} matched no module (an entry matches a whole name or a dotted suffix)"
        depth = name.count(".") + 1  # compare with suffixes of as many parts: 'attn.q_prj' ~ 'attn.q_proj'
        suffixes = sorted({".".join(n.split(".")[-depth:]) for n in names})
        close = difflib.get_close_matches(name, suffixes, n=3, cutoff=0.6)
    return line + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "")


def check_entries(model: nn.Module, owner: str, specs: dict[str, TargetSpec]) -> None:
    """Raise one ``ValueError`` naming every entry of ``specs`` (field name -> spec) that matches no
    module of ``model``, with close names and the modules that exist.

    For what a user wrote (``target_modules``, ``exclude_modules``, ``modules_to_save``); a method's
    own defaults for an architecture may name layers that a variant of it lacks, and need only
    select something as a whole.
    """
    candidates = candidate_modules(model)
    names = [n for n, _ in candidates]
    unmatched = [
        (field, entry)
        for field, spec in specs.items()
        for entry in _entries(spec)
        if not any(matches(n, entry) for n in names)
    ]
    if unmatched:
        fields = " and ".join(dict.fromkeys(field for field, _ in unmatched))
        lines = "\n".join(f"  - {_unmatched_entry(field, entry, names)}" for field, entry in unmatched)
        raise ValueError(
            f"{owner}: every entry of {fields} must match a module:\n{lines}\n"
            f"Modules in this model: {describe_modules(candidates)}"
        )


def inner_layer(module: nn.Module) -> nn.Module:
    """Follow ``base_layer`` links down to the original layer (adapters may be stacked)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def read_through(layer_cls: type[nn.Module], names: Sequence[str]) -> None:
    """Give the adapter class ``layer_cls`` read-only attributes ``names`` that return the original
    layer's (below every ``base_layer`` link): models read them off their layers (Whisper reads its
    convolutions' ``stride``), and an adapted layer must still answer."""

    def reader(name: str) -> property:
        def read(self: nn.Module) -> Any:
            return getattr(inner_layer(self), name)

        return property(read, doc=f"The wrapped layer's ``{name}``.")

    for name in names:
        setattr(layer_cls, name, reader(name))


def find_targets(
    model: nn.Module,
    *,
    owner: str,
    target_modules: TargetSpec,
    supported: tuple[type[nn.Module], ...],
    exclude_modules: TargetSpec = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: TargetSpec = None,
    skip: set[str] | None = None,
    default_targets: bool = False,
) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` selected by a strategy's targeting arguments.

    Raises ``ValueError`` naming the modules that exist when an entry of ``target_modules`` or
    ``exclude_modules`` matches nothing (see :func:`check_entries`; with ``default_targets`` the
    targets are the method's defaults for the architecture and need only match as a whole), when
    nothing is selected, when a match has a type the method cannot adapt, or when a match already
    carries an adapter. Names in ``skip`` are never taken by ``"all-linear"``, and an explicit match
    of one is returned for the caller to judge.
    """
    skip = skip or set()
    given = {"exclude_modules": exclude_modules}
    check_entries(model, owner, given if default_targets else {"target_modules": target_modules} | given)
    candidates = candidate_modules(model)
    if target_modules == ALL_LINEAR:
        heads = output_heads(model)
        kinds = linear_types()
        # a linear layer that already carries an adapter is still selected, so that applying a
        # strategy twice is reported below instead of matching nothing
        selected = [
            (n, m)
            for n, m in candidates
            if isinstance(inner_layer(m), kinds) and id(m) not in heads and n not in skip
        ]
    else:
        selected = [(n, m) for n, m in candidates if matches(n, target_modules)]
    before_filters = len(selected)
    selected = [(n, m) for n, m in selected if not matches(n, exclude_modules)]
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        selected = [(n, m) for n, m in selected if layer_index(n, layers_pattern) in wanted]

    if not selected:
        why = ""
        if before_filters:
            why = (
                f" after exclude_modules={exclude_modules!r} and layers_to_transform={layers_to_transform!r}"
            )
        raise ValueError(
            f"{owner}: target_modules={target_modules!r} matched no module{why}. "
            f"Modules in this model: {describe_modules(candidates)}"
        )
    problems = [
        p
        for name, module in selected
        if name not in skip
        for p in _kind_problems(name, module, owner, supported)
    ]
    validation_error(owner, problems)
    return selected


def _kind_problems(
    name: str, module: nn.Module, owner: str, supported: tuple[type[nn.Module], ...]
) -> list[str]:
    """Why ``owner`` cannot adapt the selected ``module`` (``[]`` if it can)."""
    names = ", ".join(t.__name__ for t in supported)
    if isinstance(module, PEFTLayer) and _STACKING.get():
        inner = inner_layer(module)
        return (
            []
            if isinstance(inner, supported)
            else [f"{name!r} wraps a {type(inner).__name__}; {owner} supports {names}"]
        )
    if isinstance(module, PEFTLayer):
        return [f"{name!r} already carries an adapter ({type(module).__name__}); apply a strategy once"]
    if not isinstance(module, supported):
        return [f"{name!r} is a {type(module).__name__}; {owner} supports {names}"]
    return []


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` was, in the same train/eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)
    setattr(parent, child, new)
