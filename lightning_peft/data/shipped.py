"""The data files shipped inside the package, by name, wherever it is installed."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent


def shipped_file(name: str) -> str:
    """The path of ``name`` in ``lightning_peft/data/`` (for Hydra configs: ``_target_`` this with ``name``).

    Example::

        InstructionData(path=shipped_file("trips.jsonl"))
    """
    path = SHIPPED / name
    if not path.is_file() or path.suffix == ".py":
        available = sorted(p.name for p in SHIPPED.iterdir() if p.suffix in (".csv", ".jsonl"))
        raise ValueError(f"no shipped data file {name!r}; the package ships {', '.join(available)}")
    return str(path)
