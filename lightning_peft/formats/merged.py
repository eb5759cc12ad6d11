"""Merged export: a plain transformers model folder with the adapters folded into its weights."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.formats.adapter import ExportResult, Progress
from lightning_peft.formats.checks import check_finite
from lightning_peft.formats.files import copy_tokenizer, read_json, staged_directory
from lightning_peft.formats.source import adapted_module, source_from_checkpoint
from lightning_peft.formats.tensor_files import write_safetensors
from lightning_peft.strategies.base import APPLIED_ATTR, MergeableLayer, PEFTStrategy, adapter_modules
from lightning_peft.strategies.modules_to_save import ModuleToSave
from lightning_peft.strategies.quantized import dequantized_linear, quantized_kind
from lightning_peft.strategies.state import load_trainable_state_dict, trainable_names, trainable_state_dict
from lightning_peft.strategies.targeting import replace_module

MODULE_WEIGHTS = "module_weights.safetensors"  # what trained beside the transformers model (a head)


def export_merged(
    source: str | Path | nn.Module,
    out_dir: str | Path,
    base: str | Path | nn.Module | None = None,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    allow_non_finite: bool = False,
    root: str | None = None,
) -> ExportResult:
    """Write a full transformers model with the adapters merged in, loadable with ``from_pretrained``.

    LoRA, DoRA and IA3 are folded into the base weights and their layers unwrapped to the original
    ones; modules trained whole (``modules_to_save``) take their trained weights. Bottleneck adapters,
    prompt and prefix tuning cannot be merged: a ``ValueError`` says so. An adapted module is copied
    first, so it is left as it is.

    When a whole LightningModule was adapted and modules beside its transformers model trained (a
    classifier head), their weights go to ``module_weights.safetensors`` in the same folder, keyed as in
    the LightningModule's ``state_dict`` (``classifier.weight``): build the module around the merged model
    and ``module.load_state_dict(load_file(...), strict=False)``.

    Args:
        source: an adapted module (or a LightningModule the ``PEFT`` callback adapted), or a checkpoint
            written with the ``PEFT`` callback.
        out_dir: the folder to create (written next to it first, renamed when complete).
        base: for a checkpoint: the model it was trained on, as a model folder (loaded with the class in
            its ``config.json``) or as a module (then copied).
        tokenizer: saved alongside: an object with ``save_pretrained`` or a folder to copy tokenizer files
            from. Default: the source's ``tokenizer`` attribute, or the tokenizer files of a ``base`` folder.
        overwrite: replace an existing ``out_dir``, if it is a folder that an export wrote.
        progress: called with a line of text for each step.
        allow_non_finite: merge adapters that hold NaN or infinity (refused by default, naming them).
        root: for a checkpoint of a whole adapted LightningModule (``PEFT(module=None)``) and a ``base``
            folder: the attribute of the LightningModule that holds the transformers model (``"model"``).

    Example::

        export_merged("epoch=2.ckpt", "merged-model", base="path/to/base-model")
        model = AutoModelForCausalLM.from_pretrained("merged-model")
    """
    say = progress or (lambda line: None)
    if isinstance(source, nn.Module):
        if base is not None:
            raise ValueError("base= is for checkpoint sources; an adapted module is its own base")
        model, beside = _copy_of_adapted_model(source)
        tokenizer = tokenizer if tokenizer is not None else getattr(source, "tokenizer", None)
    else:
        model, beside = _rebuild_from_checkpoint(source, base, root, say, allow_non_finite)
        if tokenizer is None and not isinstance(base, nn.Module):
            tokenizer = base
    active = sum(1 for _, m in adapter_modules(model) if getattr(m, "enabled", True))
    say(f"merging {active} adapter layers into {type(model).__name__}")
    merge_and_unwrap(model, allow_non_finite=allow_non_finite)
    say(f"writing {out_dir}")
    return _write_merged(model, beside, tokenizer, Path(out_dir), overwrite)


def _rebuild_from_checkpoint(
    source: str | Path,
    base: str | Path | nn.Module | None,
    root: str | None,
    say: Progress,
    allow_non_finite: bool,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The base model with the checkpoint's strategy applied and its tensors loaded, and what trained
    beside the transformers model."""
    if base is None:
        raise ValueError("merging a checkpoint needs base= the model it was trained on (a model folder)")
    say(f"reading {source}")
    adapter = source_from_checkpoint(source)
    check_finite(adapter.tensors, str(source), allow_non_finite)
    whole_module_hint = (
        "pass root= the attribute holding the transformers model (--root model), or base= an instance of "
        "that LightningModule"
    )
    if adapter.whole_lightning_module and root is None and not isinstance(base, nn.Module):
        raise ValueError(
            f"{source} adapted a whole LightningModule (PEFT(module=None)), so its names start at the "
            f"LightningModule, not at the model in the base folder: {whole_module_hint}"
        )
    model = _load_base(base, say)
    if root is not None:
        if not adapter.whole_lightning_module:
            raise ValueError(
                f"root={root!r} is for checkpoints of a whole adapted LightningModule; this one adapted "
                f"{adapter.module!r}, whose base is the model itself"
            )
        model = _lightning_module_stand_in(model, root, adapter.tensors)
    say(f"applying {type(adapter.strategy).__name__} and loading {len(adapter.tensors)} tensors")
    adapter.strategy.apply(model)
    try:
        load_trainable_state_dict(model, adapter.tensors, source=str(source))
    except ValueError as err:
        hint = ""
        if adapter.whole_lightning_module and root is None:
            hint = (
                f"\n(the checkpoint adapted a whole LightningModule, PEFT(module=None): {whole_module_hint})"
            )
        raise ValueError(f"{err}{hint}") from err
    return _copy_of_adapted_model(model, copy_model=False)


def _write_merged(
    model: nn.Module, beside: dict[str, torch.Tensor], tokenizer: Any, out_dir: Path, overwrite: bool
) -> ExportResult:
    with staged_directory(out_dir, overwrite) as staged:
        model.save_pretrained(str(staged), safe_serialization=True)
        copied = copy_tokenizer(tokenizer, staged)
        if beside:
            write_safetensors(beside, staged / MODULE_WEIGHTS)
    note = "tokenizer saved" if copied else "no tokenizer found; none saved"
    if beside:
        modules = sorted({name.rpartition(".")[0] for name in beside})
        note += (
            f"; {len(beside)} trained tensors beside the transformers model ({', '.join(modules[:6])}) saved in "
            f"{MODULE_WEIGHTS}, keyed as in the LightningModule"
        )
    return ExportResult(out_dir, "merged", len(model.state_dict()), note)


def merge_and_unwrap(model: nn.Module, allow_non_finite: bool = False) -> int:
    """Fold every active adapter into ``model``'s weights, drop inactive ones and put the original layers
    back; returns how many adapters were merged. Raises ``ValueError`` if an active one cannot merge, or
    holds NaN or infinity (unless ``allow_non_finite``)."""
    check_finite(trainable_state_dict(model), type(model).__name__, allow_non_finite)
    cannot = [
        f"{path or type(model).__name__} ({type(m).__name__})"
        for path, m in adapter_modules(model)
        if getattr(m, "enabled", True) and not isinstance(m, MergeableLayer | ModuleToSave)
    ]
    if cannot:
        raise ValueError(
            f"cannot merge {', '.join(cannot[:6])}: bottleneck adapters and prompt or prefix tuning add "
            "computation that no weight can hold; export the adapter instead (export_adapter)"
        )
    _remove_adapters(model, only_disabled=True)  # inactive named adapters contribute nothing: drop them
    merged = sum(1 for _ in adapter_modules(model))
    PEFTStrategy().merge(model)  # checks for tied weights first, then merges every layer
    _remove_adapters(model)
    _dequantize(model)
    model.requires_grad_(False)
    if APPLIED_ATTR in model.__dict__:
        object.__delattr__(model, APPLIED_ATTR)
    return merged


def _dequantize(model: nn.Module) -> None:
    """Replace the layers QLoRA quantized without adapting them by dense ones: a plain
    ``from_pretrained`` cannot read bitsandbytes' 4-bit states (merging already dequantized the others)."""
    quantized = [
        name for name, module in model.named_modules() if name and quantized_kind(module) is not None
    ]
    if quantized:
        warnings.warn(
            f"dequantizing {len(quantized)} quantized layers for the merged model; their weights keep the "
            "quantization error",
            stacklevel=4,
        )
    for name in quantized:
        replace_module(model, name, dequantized_linear(model.get_submodule(name)))


def _remove_adapters(model: nn.Module, only_disabled: bool = False) -> None:
    """Put back what each adapter wraps, outermost first (what it wrapped may be the next adapter)."""
    while True:
        path, module = next(
            (
                (p, m)
                for p, m in adapter_modules(model)
                if not (only_disabled and getattr(m, "enabled", True))
            ),
            (None, None),
        )
        if module is None:
            return
        if isinstance(module, ModuleToSave):
            replace_module(model, path, module.trained if module.enabled else module.original)
        elif isinstance(getattr(module, "base_layer", None), nn.Module):
            replace_module(model, path, module.base_layer)
        else:  # an inactive prompt or prefix encoder: its hook does nothing without it
            parent, _, child = path.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)


def _lightning_module_stand_in(model: nn.Module, root: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module with ``model`` at ``root`` and, for the checkpoint's tensors outside it (a head), modules
    holding parameters of their shapes: the strategy of a whole LightningModule applies to it as it did
    to the LightningModule, without the LightningModule's code."""
    stand_in = nn.Module()
    parent, _, attribute = root.rpartition(".")
    _module_at(stand_in, parent).add_module(attribute, model)
    for name, value in tensors.items():
        if name.startswith(root + "."):
            continue
        path, _, leaf = name.replace(".trained.", ".").rpartition(".")  # a module trained whole: its own name
        holder = _module_at(stand_in, path)
        if leaf not in holder._parameters:
            holder.register_parameter(leaf, nn.Parameter(torch.zeros_like(value)))
    return stand_in


def _module_at(top: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``, creating empty modules where there are none."""
    module = top
    for part in path.split(".") if path else []:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    return module


def _copy_of_adapted_model(
    source: nn.Module, copy_model: bool = True
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The Hugging Face model inside ``source`` that holds all its adapters (a copy, unless told), and
    the trained tensors beside it (a head), keyed as in ``source`` with the trained weights of modules
    trained whole under the module's own name."""
    from transformers import PreTrainedModel

    _, adapted, _ = adapted_module(source)
    found = [(n, m) for n, m in adapted.named_modules() if isinstance(m, PreTrainedModel)]
    if not found:
        raise ValueError(
            f"{type(source).__name__} holds no transformers model (PreTrainedModel) to save with save_pretrained"
        )
    path, model = found[0]
    prefix = f"{path}." if path else ""
    outside = [
        n
        for n, m in adapter_modules(adapted)
        if not (n + ".").startswith(prefix) and not isinstance(m, ModuleToSave)  # a head: saved beside
    ]
    if outside:
        raise ValueError(
            f"adapters outside the transformers model {path or type(model).__name__!r} cannot be saved in its "
            f"folder: {', '.join(outside[:6])}"
        )
    beside: dict[str, torch.Tensor] = {}
    wrapped = []
    for name, module in adapted.named_modules():
        if isinstance(module, ModuleToSave) and not (name + ".").startswith(prefix):
            active = module.trained if module.enabled else module.original
            beside |= {f"{name}.{k}": v.detach().cpu().clone() for k, v in active.state_dict().items()}
            wrapped.append(name + ".")
    state = adapted.state_dict()
    for name in trainable_names(adapted):
        if not name.startswith(prefix) and not name.startswith(tuple(wrapped)):
            beside[name] = state[name].detach().cpu().clone()
    return (copy.deepcopy(model) if copy_model else model), beside


def _load_base(base: str | Path | nn.Module, say: Any) -> nn.Module:
    if isinstance(base, nn.Module):
        return copy.deepcopy(base)
    import transformers

    folder = Path(base)
    config = read_json(folder / "config.json")
    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    cls = cls or transformers.AutoModel
    say(f"loading the base model {cls.__name__} from {folder}")
    return cls.from_pretrained(str(folder))
