"""What an export writes: ``adapter_config.json`` and the tensors in peft's layout, or our own layout
for what peft cannot carry; with the facts about the model that the PEFT config needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.formats import peft_layout as hf
from lightning_peft.formats.files import read_json
from lightning_peft.formats.peft_lora import wraps_parameter
from lightning_peft.formats.source import AdapterSource, with_plain_lora
from lightning_peft.strategies.base import PEFTLayer
from lightning_peft.strategies.ia3 import IA3
from lightning_peft.strategies.lora import LoRA
from lightning_peft.strategies.named import canonical_name
from lightning_peft.strategies.prompt import PrefixEncoder
from lightning_peft.strategies.targeting import matches

NATIVE_CONFIG = "lightning_peft_config.json"
NATIVE_FORMAT_VERSION = 1
Files = tuple[dict[str, Any], dict[str, torch.Tensor]]


def adapter_files(adapter: AdapterSource, facts: dict[str, Any], format: str) -> tuple[Files, str | None]:
    """(configs by file name, tensors) in peft's layout when it carries the adapter (or ``format`` is
    ``"peft"``, which raises if not), else ours; and a note saying why ours was used."""
    if format != "lightning_peft":
        try:
            return peft_files(adapter, facts), None
        except hf.NotInPeftFormat as err:
            if format == "peft":
                raise
            note = f"written in the lightning_peft layout: {err}"
    else:
        note = None
    return native_files(adapter, facts.get("base_model_name_or_path")), note


def export_facts(
    adapter: AdapterSource, root: str | None, base_path: str | None, task_type: str | None
) -> dict:
    """What adapter_config.json needs beyond the strategy: read from the model, or a local base folder."""
    facts: dict[str, Any] = {"root": root}
    hf_model, config = None, None
    if adapter.model is not None:
        hf_model = _hf_model(adapter.model, root)
        if hf_model is not None:
            facts["root"] = root if root is not None else hf_model[0]
            facts["root_module"] = hf_model[1]
            config = hf_model[1].config.to_dict()
            config["architectures"] = [type(hf_model[1]).__name__]
            base_path = base_path or getattr(hf_model[1].config, "_name_or_path", None) or None
        facts["fan_in_fan_out"] = any(getattr(m, "fan_in_fan_out", False) for m in adapter.model.modules())
        for module in adapter.model.modules():  # a prefix is shaped like the keys and values
            if isinstance(module, PrefixEncoder):
                facts["token_dim"] = module.kv_heads * module.head_dim
                facts["num_attention_heads"] = module.kv_heads
                facts["num_layers"] = module.layers
    elif base_path and (Path(base_path) / "config.json").is_file():
        config = read_json(Path(base_path) / "config.json")
    if config is not None:
        facts.setdefault("task_type", hf.task_type_of((config.get("architectures") or [None])[0]))
        config = config.get("text_config") or config
        for key, names in {
            "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
            "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
            "token_dim": ("hidden_size", "n_embd", "d_model"),
        }.items():
            found = next((config[n] for n in names if isinstance(config.get(n), int)), None)
            if found is not None:
                facts.setdefault(key, found)
    if task_type is not None:
        facts["task_type"] = task_type
    facts["base_model_name_or_path"] = base_path
    return facts


def _hf_model(model: nn.Module, root: str | None) -> tuple[str, nn.Module] | None:
    """(path, module) of the Hugging Face model inside ``model``: at ``root``, or the outermost one."""
    from transformers import PreTrainedModel

    if root is not None:
        try:
            found = model.get_submodule(root) if root else model
        except AttributeError as err:
            raise ValueError(f"root={root!r} is not a submodule of {type(model).__name__}: {err}") from err
        return (root, found) if isinstance(found, PreTrainedModel) else None
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return name, module
    return None


def peft_files(adapter: AdapterSource, facts: dict[str, Any]) -> tuple[dict, dict]:
    method, _ = hf.peft_method(adapter.strategy)
    if isinstance(method, LoRA):
        adapter = with_plain_lora(adapter, method)
    method, extra_saved = hf.peft_method(adapter.strategy)
    root = facts.get("root")
    if adapter.whole_lightning_module and root is None:
        raise hf.NotInPeftFormat(
            "the checkpoint adapted a whole LightningModule (PEFT(module=None)), so its names are not those of "
            "a Hugging Face model; pass root= the attribute holding the model (--root), or train with "
            "PEFT(module='model')"
        )
    prefix = f"{root}." if root else ""
    tensors = hf.with_computed_prefix(adapter.tensors)
    out: dict[str, torch.Tensor] = {}
    outside = []
    targets, feedforward, saved = [], [], []
    for name, value in tensors.items():
        key = hf.peft_name(name, method)
        if key != "prompt_embeddings":
            if not key.startswith(prefix):
                outside.append(name)
                continue
            key = hf.key_prefix(method) + key[len(prefix) :]
        out[key] = hf.to_peft_value(name, value, tensors)
        module, _, leaf = name[len(prefix) :].rpartition(".")
        if leaf in ("lora_A", "lora_embedding_A") or (leaf == "ia3_l" and isinstance(method, IA3)):
            if not wraps_parameter(module, method):  # those are listed in target_parameters
                targets.append(module)
            if leaf == "ia3_l" and value.shape[0] == 1:  # (1, in): the input is scaled, a feed-forward layer
                feedforward.append(module)
        elif ".trained." in name and key.removeprefix(hf.key_prefix(method)) != name[len(prefix) :]:
            saved.append(name[len(prefix) :].partition(".trained.")[0])  # a module trained whole
    if outside:
        raise hf.NotInPeftFormat(
            f"{len(outside)} tensors lie outside the Hugging Face model at {root!r}: {', '.join(outside[:6])}"
        )
    written, ff = hf.written_targets(targets, method, feedforward)
    saved = list(dict.fromkeys(saved)) + extra_saved
    heads, head_names = _task_heads(facts, saved)
    if heads is None:  # peft's task model would look for head weights we do not have
        if hf.is_prompt_learning(method):
            raise ValueError(
                f"peft's {facts['task_type']} models train {' or '.join(hf.TASK_HEADS[facts['task_type']])} whole "
                "and need its weights in the adapter, which this checkpoint does not hold: train the head too "
                "(e.g. Compose([PromptTuning(...), Freeze(trainable_modules=['classifier'])])), or export from "
                "the adapted module"
            )
        facts = {**facts, "task_type": None}  # LoRA and IA3 work the same in peft's plain PeftModel
    else:
        out |= {hf.key_prefix(method) + name: value for name, value in heads.items()}
        saved += head_names
    config = hf.peft_config(method, written, ff, saved, facts)
    return {hf.CONFIG_FILE: config}, out


def _task_heads(facts: dict[str, Any], saved: list[str]) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    """(tensors, module names) of the heads that peft's task model trains whole by itself and that the
    adapter does not hold already, names relative to the Hugging Face model; tensors are None if these
    heads are needed but unknown."""
    endings = hf.TASK_HEADS.get(facts.get("task_type"), ())
    if not endings or any(name.endswith(endings) for name in saved):
        return {}, []
    model = facts.get("root_module")
    if model is None:
        return None, []
    tensors, names = {}, []
    for name, module in model.named_modules():
        # peft picks its heads with a plain str.endswith over module names; so do we
        if name and name.endswith(endings) and not matches(name, saved):
            if isinstance(module, PEFTLayer):
                return None, []  # adapted and trained whole at once: peft has no such layer
            tensors |= {f"{name}.{k}": v.detach().cpu() for k, v in module.state_dict().items()}
            names.append(name)
    return tensors, names


def native_files(adapter: AdapterSource, base_path: str | None) -> tuple[dict, dict]:
    config = {
        "format": "lightning_peft",
        "format_version": NATIVE_FORMAT_VERSION,
        "strategy": adapter.strategy.to_config(),
        "module": adapter.module,
        "adapter_name": adapter.adapter_name,
        "base_model_name_or_path": base_path,
    }
    tensors = {canonical_name(k): v for k, v in adapter.tensors.items()}
    return {NATIVE_CONFIG: config}, tensors
