"""Every detail of the transformers API that changed between the releases this project supports.

transformers renames arguments and methods between minor releases (5.25 renamed the models' cache
argument). Code elsewhere in the package asks this module instead of naming such details itself, so a
new release means one place to change. Each function says which releases each branch serves; where a
feature can be detected (a signature, an attribute), it is, rather than comparing version strings.
Importing this module does not import transformers: only the functions that build its objects do.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

# the names a model's ``forward`` has used for its key/value cache, newest first:
# ``cache`` from transformers 5.25 on, ``past_key_values`` before (4.x and 5.0 - 5.24)
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a key/value cache, or None if it takes none.

    ``cache`` in transformers 5.25 and later, ``past_key_values`` before. Read from the signature, so a
    model whose code predates the rename (remote code, older releases) is served too.
    """
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented forward has no readable signature
        return None
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def call_cache(kwargs: dict[str, Any]) -> Any:
    """The cache passed in a model call's keyword arguments, under whichever name the caller used.

    ``generate`` passes it under the model's own name; transformers 5.25 - 5.39 still accept the
    old ``past_key_values`` keyword and rename it themselves.
    """
    return next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)


def new_cache(config: Any) -> Any:
    """An empty ``DynamicCache`` laid out for ``config`` (sliding-window layers included).

    ``DynamicCache(config=...)`` exists from transformers 4.56 on; older releases build it without.
    """
    from transformers import DynamicCache

    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()  # transformers < 4.56


def cached_length(cache: Any) -> int:
    """How many positions ``cache`` already holds (0 for None or a legacy tuple cache)."""
    return cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that carry transformers' ``gradient_checkpointing`` flag.

    Every release from 4.35 to 5.25 keeps the flag on the checkpointed blocks (and on the
    decoder/encoder stacks), whatever the public method that sets it is called.
    """
    return [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on anywhere in ``model``.

    Reads the flags rather than ``is_gradient_checkpointing``, which transformers 5.2x deprecates in
    favour of ``is_activation_checkpointing`` (and which a plain ``nn.Module`` does not have).
    """
    return any(module.gradient_checkpointing is True for module in checkpointing_modules(model))


def enable_checkpointing(model: nn.Module, **checkpoint_kwargs: Any) -> None:
    """Switch transformers' activation checkpointing on (``checkpoint_kwargs`` go to torch's checkpoint).

    transformers 5.2x calls it ``activation_checkpointing_enable`` and keeps
    ``gradient_checkpointing_enable`` as a deprecated alias (a FutureWarning); older releases have
    only the latter.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


def disable_checkpointing(model: nn.Module) -> None:
    """Switch transformers' activation checkpointing off (the counterpart of :func:`enable_checkpointing`)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
