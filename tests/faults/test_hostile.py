"""Hostile or malformed configs and checkpoints: a bounded, clear ValueError naming the field, never a
hang, a huge allocation, a KeyError or an AttributeError."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import Holder, lora, tiny_llama, write_checkpoint

import lightning_peft.strategies.targeting as targeting
from lightning_peft import LoRA, export_adapter, load_adapter, load_from_checkpoint
from lightning_peft.strategies.lora import LoRA as LoRAClass

pytestmark = pytest.mark.filterwarnings("ignore")  # tiny random models make transformers and Lightning warn

CATASTROPHIC = r"(.|\w)*layers"  # backtracks exponentially on every name with "layers" inside it


@pytest.fixture
def adapter(tmp_path):
    model = lora().apply(tiny_llama())
    export_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.fixture
def quick_timeout(monkeypatch):
    monkeypatch.setattr(targeting, "REGEX_TIMEOUT_S", 0.05)


def test_a_catastrophic_target_regex_in_an_adapter_config_fails_naming_it(adapter, quick_timeout):
    _edit_config(adapter, target_modules=CATASTROPHIC)
    with pytest.raises(ValueError, match=r"the regular expression '\(\.\|\\\\w\)\*layers' took over 0\.05 s"):
        load_adapter(tiny_llama(), adapter)


def test_a_catastrophic_target_regex_in_a_checkpoint_fails_naming_it(tmp_path, quick_timeout):
    checkpoint = write_checkpoint(tmp_path / "a.ckpt")
    checkpoint["lightning_peft"]["strategy"]["config"]["target_modules"] = CATASTROPHIC
    torch.save(checkpoint, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="took over 0.05 s .*catastrophic backtracking"):
        load_from_checkpoint(Holder, tmp_path / "a.ckpt")


def _never_applied(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the strategy was applied (layers allocated) before the sizes were checked")

    monkeypatch.setattr(LoRAClass, "apply", fail)


@pytest.mark.parametrize("r", [10**9, 3_000_000])
def test_a_huge_r_in_an_adapter_config_is_refused_before_any_layer_is_built(adapter, monkeypatch, r):
    _edit_config(adapter, r=r)
    _never_applied(monkeypatch)
    with pytest.raises(
        ValueError, match=rf"r={r} in the config, but the tensors have another rank: .*lora_A"
    ):
        load_adapter(tiny_llama(), adapter)


def test_a_huge_r_in_a_checkpoint_is_refused_before_any_layer_is_built(tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "a.ckpt")
    checkpoint["lightning_peft"]["strategy"]["config"]["r"] = 10**9
    torch.save(checkpoint, tmp_path / "a.ckpt")
    _never_applied(monkeypatch)
    with pytest.raises(ValueError, match=r"a\.ckpt: the config does not fit its tensors:\n  - r=1000000000"):
        load_from_checkpoint(Holder, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="r=1000000000 in the config"):
        export_adapter(tmp_path / "a.ckpt", tmp_path / "out")


def test_a_missing_r_names_the_field(adapter):
    _edit_config(adapter, r=None)
    with pytest.raises(ValueError, match="adapter_config.json lacks r, needed for LORA"):
        load_adapter(tiny_llama(), adapter)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", "eight", "r must be a positive integer"),
        ("target_modules", 5, "target_modules must be a regex string, a list of module names"),
        ("modules_to_save", 7, "adapter_config.json has a malformed field"),
        ("lora_alpha", [1], "adapter_config.json has"),
    ],
)
def test_a_field_of_the_wrong_type_in_an_adapter_config_is_a_value_error(adapter, field, value, message):
    _edit_config(adapter, **{field: value})
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_llama(), adapter)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (["not", "a", "dict"], r"checkpoint\['lightning_peft'\] must be a dict, got list"),
        ({"strategy": "LoRA", "module": "model"}, "'strategy' must be a dict, got str"),
        ({"strategy": {}, "module": 3}, "'module' must be None or a dotted attribute path, got 3"),
        (
            {"strategy": {"class": "lightning_peft.LoRA", "config": {"r": "x"}}, "module": "model"},
            r"lightning_peft\['strategy'\] does not describe a valid strategy",
        ),
    ],
)
def test_a_malformed_lightning_peft_entry_names_the_field(tmp_path, entry, message):
    checkpoint = write_checkpoint(tmp_path / "a.ckpt")
    checkpoint["lightning_peft"] = entry
    torch.save(checkpoint, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=message):
        load_from_checkpoint(Holder, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=message):
        export_adapter(tmp_path / "a.ckpt", tmp_path / "out")


def test_a_malformed_lightning_peft_layout_config_names_the_field(tmp_path):
    model = LoRA(r=2, target_modules=["q_proj"]).apply(tiny_llama())
    export_adapter(model, tmp_path / "native", format="lightning_peft")
    path = tmp_path / "native" / "lightning_peft_config.json"
    config = json.loads(path.read_text())
    config["strategy"] = ["LoRA"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lightning_peft_config\.json: strategy must be a dict"):
        load_adapter(tiny_llama(), tmp_path / "native")
