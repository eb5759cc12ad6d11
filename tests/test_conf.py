"""Every YAML in conf/ composes with Hydra and builds the library's own objects."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_peft import PEFTStrategy

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF)


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_group_option_instantiates(path):
    group = str(path.parent.relative_to(CONF))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{group}={path.stem}"])
    built = instantiate(cfg[group], _convert_="all")
    if group == "peft":
        assert isinstance(built, PEFTStrategy)
        # the YAML lists every constructor argument: the config round-trips without loss
        assert built.to_config()["config"] == {k: v for k, v in cfg[group].items() if k not in ("_target_", "defaults")}


def test_dora_option_is_lora_with_dora_on():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["peft=dora", "peft.r=4"])
    built = instantiate(cfg.peft, _convert_="all")
    assert built.use_dora and built.r == 4 and built.lora_alpha == 16
