"""The package's public names: one list for tools (__all__), one table for lazy loading, kept equal."""

from __future__ import annotations

import subprocess
import sys

import lightning_peft


def test_every_public_name_is_in_the_lazy_table_and_resolves():
    assert set(lightning_peft.__all__) - {"__version__"} == set(lightning_peft._EXPORTS)
    for name, module in lightning_peft._EXPORTS.items():
        value = getattr(lightning_peft, name)
        assert value is getattr(sys.modules[module], name)


def test_importing_the_package_loads_neither_torch_nor_lightning():
    code = "import sys, lightning_peft.cli.main; print('torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
