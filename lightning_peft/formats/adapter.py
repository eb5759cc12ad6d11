"""Adapter folders: :func:`export_adapter` writes one, :func:`read_adapter` and :func:`load_adapter` read one.

Two layouts (see the package docstring): the Hugging Face PEFT one, which peft (and, for LoRA, vLLM)
loads, and our own for what the PEFT format cannot carry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_peft.formats import peft_layout as hf
from lightning_peft.formats.checks import check_finite, check_sizes, strategy_from_record
from lightning_peft.formats.export_files import (
    NATIVE_CONFIG,
    NATIVE_FORMAT_VERSION,
    adapter_files,
    export_facts,
)
from lightning_peft.formats.files import copy_tokenizer, read_json, staged_directory, write_json
from lightning_peft.formats.source import (
    source_from_checkpoint,
    source_from_module,
)
from lightning_peft.formats.tensor_files import read_safetensors, read_weights, write_safetensors
from lightning_peft.strategies.base import APPLIED_ATTR, PEFTStrategy
from lightning_peft.strategies.named import (
    adapter_state_dict,
    add_adapter,
    canonical_name,
    load_adapter_state_dict,
)
from lightning_peft.strategies.state import load_trainable_state_dict, trainable_names

Format = Literal["auto", "peft", "lightning_peft"]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``format`` is ``"peft"``, ``"lightning_peft"`` or ``"merged"``; ``note``
    says why the PEFT format was not used, or what was left out."""

    path: Path
    format: str
    tensors: int
    note: str | None = None


def export_adapter(
    source: str | Path | nn.Module,
    out_dir: str | Path,
    adapter_name: str | None = None,
    base_model_name_or_path: str | None = None,
    *,
    format: Format = "auto",
    task_type: str | None = None,
    root: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    tokenizer: Any = None,
    allow_non_finite: bool = False,
) -> ExportResult:
    """Write the adapter of a checkpoint or an adapted module to the folder ``out_dir``.

    The Hugging Face PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``) when it can
    carry the adapter, else ours (``lightning_peft_config.json`` + the same weights file); the result
    says which, and why. A checkpoint needs no base model weights.

    Args:
        source: a Lightning checkpoint written with the ``PEFT`` callback, or an adapted module (a
            LightningModule the callback adapted, or a model adapted with ``strategy.apply``, whose
            config is written as it was set; a model adapted twice is read from its layers).
        out_dir: the folder to create; written next to it first and renamed when complete.
        adapter_name: which named adapter to export when the model carries several.
        base_model_name_or_path: recorded in the config; a local model folder also tells the task type.
        format: ``"auto"``, ``"peft"`` (raise if it cannot carry the adapter) or ``"lightning_peft"``.
        task_type: peft's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...); found from the model's class
            when the source is a module. Prompt and prefix tuning need it.
        root: dotted path, inside the adapted module, of the Hugging Face model the PEFT paths are relative
            to. Default: the adapted module itself, or for a module source the outermost transformers
            model in it. Needed for checkpoints of ``PEFT(module=None)`` that adapted a whole LightningModule.
        overwrite: replace an existing ``out_dir`` that an export wrote (other files: refused, named).
        progress: called with a line of text for each step (the command line prints them).
        tokenizer: also written into the folder (an object with ``save_pretrained`` or a folder
            holding tokenizer files), as ``lightning-peft generate`` and peft's users read it.
        allow_non_finite: export tensors that hold NaN or infinity (refused by default, naming them).

    A second export to the same ``out_dir`` at once fails with ``FileExistsError``; a crash leaves
    ``out_dir`` as it was or complete (see ``staged_directory``).

    Example::

        export_adapter("epoch=2.ckpt", "my-adapter", base_model_name_or_path="meta-llama/Llama-3.2-1B")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(...), "my-adapter")
    """
    _check_choices(format, task_type)
    say = progress or (lambda line: None)
    say(f"reading {source if isinstance(source, str | Path) else type(source).__name__}")
    is_module = isinstance(source, nn.Module)
    adapter = (source_from_module if is_module else source_from_checkpoint)(source, adapter_name)
    check_finite(adapter.tensors, adapter.origin, allow_non_finite)
    facts = export_facts(adapter, root, base_model_name_or_path, task_type)
    files, note = adapter_files(adapter, facts, format)
    config, tensors = files
    written = "peft" if hf.CONFIG_FILE in config else "lightning_peft"
    say(f"writing {len(tensors)} tensors ({written} format) to {out_dir}")
    _write_folder(out_dir, overwrite, config, tensors, tokenizer)
    if adapter.left_out:
        left_out = f"{len(adapter.left_out)} tensors outside the adapted module left out"
        note = f"{note}; {left_out}" if note else left_out
    return ExportResult(Path(out_dir), written, len(tensors), note)


def _check_choices(format: str, task_type: str | None) -> None:
    if format not in ("auto", "peft", "lightning_peft"):
        raise ValueError(f"format must be 'auto', 'peft' or 'lightning_peft', got {format!r}")
    if task_type is not None and task_type not in hf.TASK_TYPES:
        raise ValueError(f"task_type must be one of {', '.join(hf.TASK_TYPES)}, got {task_type!r}")


def _write_folder(
    out_dir: str | Path,
    overwrite: bool,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    tokenizer: Any,
) -> None:
    with staged_directory(out_dir, overwrite) as staged:
        for name, data in config.items():
            write_json(data, staged / name)
        write_safetensors(tensors, staged / hf.WEIGHTS_FILE)
        copy_tokenizer(tokenizer, staged)  # inside the staging: the folder appears whole or not at all


# ---------------------------------------------------------------------------------------------- import


@dataclass
class SavedAdapter:
    """An adapter folder read into memory: the strategy that builds it and its tensors (file keys)."""

    path: Path
    format: str
    strategy: PEFTStrategy
    tensors: dict[str, torch.Tensor]

    def load_into(self, model: nn.Module, adapter_name: str | None = None) -> None:
        """Copy the tensors into ``model``, which the strategy has adapted; raises ``ValueError`` naming
        every key that does not fit (nothing is copied then).

        Keys of frozen base tensors are accepted too and copied: peft saves an embedding's base weight
        next to its LoRA matrices, as it may have been resized.
        """
        params = model.state_dict()
        if adapter_name is None:
            own = {n: tuple(params[n].shape) for n in trainable_names(model)}
        else:  # a named adapter: its own tensors, under names without the stacking links
            own = {n: tuple(v.shape) for n, v in adapter_state_dict(model, adapter_name).items()}
        if self.format == "peft":
            method, _ = hf.peft_method(self.strategy)
            file_key = partial(_peft_key, method=method)
        else:
            file_key = canonical_name
        mapping = {file_key(n): n for n in own}
        frozen = {file_key(n): n for n in params if n not in own}
        unknown = [k for k in self.tensors if k not in mapping and k not in frozen]
        if unknown:
            more = f", ... and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            raise ValueError(
                f"{self.path}: {len(unknown)} tensors do not fit this model: {', '.join(unknown[:8])}{more}"
            )
        state, base = {}, {}
        for key, value in self.tensors.items():
            if key in mapping:
                name = mapping[key]
                reshaped = name.endswith(("lora_magnitude_vector", "ia3_l"))
                if reshaped and value.numel() == math.prod(own[name]):
                    value = value.reshape(own[name])  # peft's conv layout: (1, channels, 1, ...)
                state[name] = value
            else:
                base[frozen[key]] = value
        wrong = [
            f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
            for k, v in base.items()
            if v.shape != params[k].shape
        ]
        if wrong:
            raise ValueError(f"{self.path}: base tensors of another shape: {', '.join(wrong[:8])}")
        if adapter_name is None:
            load_trainable_state_dict(model, state, source=str(self.path))
        else:
            load_adapter_state_dict(model, adapter_name, state)
        model.load_state_dict(base, strict=False)


def _peft_key(name: str, method: PEFTStrategy) -> str:
    key = hf.peft_name(name, method)
    return key if key == "prompt_embeddings" else hf.key_prefix(method) + key


def read_adapter(path: str | Path, allow_non_finite: bool = False) -> SavedAdapter:
    """Read an adapter folder: the Hugging Face PEFT layout, or ours (``lightning_peft_config.json``).

    Checked before anything is built: the files are intact (our safetensors carry a checksum), the
    sizes in the config match the tensors, and no tensor holds NaN or infinity (unless
    ``allow_non_finite``). Each problem is a ``ValueError`` naming the file.
    """
    adapter = _read_adapter(Path(path))
    check_sizes(adapter.strategy, adapter.tensors, str(adapter.path))
    check_finite(adapter.tensors, str(adapter.path), allow_non_finite)
    return adapter


def _read_adapter(folder: Path) -> SavedAdapter:
    if not folder.is_dir():
        raise FileNotFoundError(f"no adapter folder at {folder}")
    if (folder / hf.CONFIG_FILE).is_file():
        config = read_json(folder / hf.CONFIG_FILE)
        weights = folder / hf.WEIGHTS_FILE
        if not weights.is_file() and (folder / "adapter_model.bin").is_file():
            weights = folder / "adapter_model.bin"
        tensors = read_weights(weights)
        config = hf.entries_peft_used(config, tensors)
        return SavedAdapter(folder, "peft", hf.strategy_from_peft_config(config, str(folder)), tensors)
    if (folder / NATIVE_CONFIG).is_file():
        config = read_json(folder / NATIVE_CONFIG)
        version = config.get("format_version")
        if config.get("format") != "lightning_peft" or not isinstance(version, int):
            raise ValueError(f"{folder / NATIVE_CONFIG} is not a lightning_peft adapter config")
        if version > NATIVE_FORMAT_VERSION:
            raise ValueError(
                f"{folder} was written by a newer lightning_peft (format {version}; this one reads "
                f"{NATIVE_FORMAT_VERSION}); upgrade lightning_peft"
            )
        tensors = read_safetensors(folder / hf.WEIGHTS_FILE)
        strategy = strategy_from_record(config.get("strategy"), str(folder / NATIVE_CONFIG), "strategy")
        return SavedAdapter(folder, "lightning_peft", strategy, tensors)
    found = sorted(p.name for p in folder.iterdir())
    raise ValueError(
        f"{folder} holds neither {hf.CONFIG_FILE} nor {NATIVE_CONFIG}; files there: {found or 'none'}"
    )


def load_adapter(
    module: nn.Module, path: str | Path, adapter_name: str | None = None, allow_non_finite: bool = False
) -> nn.Module:
    """Adapt ``module`` with the adapter saved in folder ``path`` and load its weights.

    ``module`` is the model the adapter was saved for (for a peft adapter, the Hugging Face model that
    ``PeftModel.from_pretrained`` would wrap). The strategy is built from the folder's config; with
    ``adapter_name`` the adapter is added as a named adapter next to the ones already there.
    Raises ``ValueError`` naming the keys that do not fit, and for tensors that hold NaN or infinity
    unless ``allow_non_finite`` (see :func:`read_adapter`).

    Example::

        model = load_adapter(AutoModelForCausalLM.from_pretrained("base"), "peft-adapter-folder")
    """
    adapter = read_adapter(path, allow_non_finite)
    if adapter_name is None:
        adapter.strategy.apply(module)
        object.__setattr__(module, APPLIED_ATTR, adapter.strategy.to_config())
    else:
        add_adapter(module, adapter_name, adapter.strategy)
    adapter.load_into(module, adapter_name)
    return module
