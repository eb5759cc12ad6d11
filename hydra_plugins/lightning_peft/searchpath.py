"""Lets any Hydra app compose lightning_peft's configs (``peft: lora``, ``model: tiny_llama``, ...).

Hydra imports every module under ``hydra_plugins`` at start-up, so this file imports nothing heavy.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LightningPEFTSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="lightning-peft", path="pkg://lightning_peft.conf")
