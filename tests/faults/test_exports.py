"""Export folders: one export at a time per folder, --overwrite only over our own exports, a crash at
any point leaves the old export or the new one, leftovers are cleaned and reported, modes follow the umask."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import lora, tiny_llama, write_checkpoint

from lightning_peft import export_adapter
from lightning_peft.cli.main import main as cli
from lightning_peft.formats.tensor_files import read_safetensors

pytestmark = pytest.mark.filterwarnings("ignore")  # tiny random models make transformers and Lightning warn

HERE = Path(__file__).parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",
}

SLOW_EXPORT = """
import sys, time
from pathlib import Path
from lightning_peft import export_adapter

class SlowTokenizer:  # written inside the staging folder: keeps the export busy for a while
    def save_pretrained(self, folder):
        time.sleep(1.5)
        (Path(folder) / "tokenizer.json").write_text("{}")

go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
export_adapter(sys.argv[1], sys.argv[2], tokenizer=SlowTokenizer())
"""


def test_of_two_concurrent_exports_to_one_folder_exactly_one_succeeds(tmp_path):
    write_checkpoint(tmp_path / "a.ckpt")
    script = tmp_path / "export.py"
    script.write_text(SLOW_EXPORT)
    go = tmp_path / "go"
    args = [sys.executable, str(script), str(tmp_path / "a.ckpt"), str(tmp_path / "out"), str(go)]
    processes = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    time.sleep(4)  # both have imported torch and wait for the signal
    go.touch()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    (error,) = [err for code, err in results if code != 0]
    assert "FileExistsError: another export to" in error and "is running" in error, error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "export.py", "go", "out"]


def test_overwrite_refuses_a_folder_that_is_no_export_naming_what_is_inside(tmp_path, capsys):
    write_checkpoint(tmp_path / "a.ckpt")
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("four years of work")
    (tmp_path / "thesis" / "figures").mkdir()
    assert cli(["export", str(tmp_path / "a.ckpt"), str(tmp_path / "thesis"), "--overwrite"]) == 1
    error = capsys.readouterr().err
    assert "is not a folder that lightning_peft exported, so overwrite does not replace it" in error
    assert "figures/, thesis.tex" in error
    assert (tmp_path / "thesis" / "thesis.tex").read_text() == "four years of work"
    # a folder that holds our files and one of the user's is refused too
    export_adapter(tmp_path / "a.ckpt", tmp_path / "adapter")
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="it holds notes.txt"):
        export_adapter(tmp_path / "a.ckpt", tmp_path / "adapter", overwrite=True)


def test_overwrite_replaces_an_earlier_export(tmp_path):
    write_checkpoint(tmp_path / "a.ckpt")
    first = export_adapter(lora().apply(tiny_llama()), tmp_path / "out")
    export_adapter(tmp_path / "a.ckpt", tmp_path / "out", overwrite=True)
    tensors = read_safetensors(tmp_path / "out" / "adapter_model.safetensors")
    assert first.tensors == len(tensors) and all(
        v.abs().sum() > 0 for v in tensors.values()
    )  # the new B != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "out"]


KILLED_EXPORTS = """
import sys
from pathlib import Path
from lightning_peft import export_adapter

out, sources = sys.argv[1], sys.argv[2:]
print("ready", flush=True)
for k in range(10**6):
    export_adapter(sources[k % 2], out, overwrite=True)
"""


def test_a_kill_at_any_point_of_overwriting_leaves_the_old_or_the_new_export(tmp_path):
    sources = []
    for k in range(2):
        write_checkpoint(tmp_path / f"{k}.ckpt", scale=0.2 * (k + 1))
        export_adapter(tmp_path / f"{k}.ckpt", tmp_path / f"ref{k}")
        sources.append(read_safetensors(tmp_path / f"ref{k}" / "adapter_model.safetensors"))
    export_adapter(tmp_path / "0.ckpt", tmp_path / "out")
    script = tmp_path / "loop.py"
    script.write_text(KILLED_EXPORTS)
    rng = random.Random(0)
    for _ in range(6):
        process = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(tmp_path / "out"),
                str(tmp_path / "0.ckpt"),
                str(tmp_path / "1.ckpt"),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        tensors = read_safetensors(tmp_path / "out" / "adapter_model.safetensors")  # complete: checksum holds
        (which,) = [k for k, ref in enumerate(sources) if all(torch.equal(tensors[n], ref[n]) for n in ref)]
        assert which in (0, 1)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.is_dir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_adapter(tmp_path / "0.ckpt", tmp_path / "out", overwrite=True)
    reported = " ".join(str(w.message) for w in caught)
    assert all(name in reported for name in leftovers), (leftovers, reported)  # each named
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_an_export_killed_between_the_two_renames_is_restored_by_the_next(tmp_path):
    """Where RENAME_EXCHANGE is missing, a swap is two renames; a kill between them leaves OUT missing."""
    export_adapter(lora().apply(tiny_llama()), tmp_path / "out")
    (tmp_path / "out").rename(tmp_path / ".out.old-1234abcd")
    (tmp_path / ".out.partial-5678abcd").mkdir()
    (tmp_path / ".out.partial-5678abcd" / "adapter_config.json").write_text("{")
    with (
        pytest.warns(
            UserWarning, match=r"restored .*out from \.out\.old-1234abcd; removed \.out\.partial-5678abcd"
        ),
        pytest.raises(FileExistsError, match="exists already"),
    ):
        export_adapter(lora().apply(tiny_llama()), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert read_safetensors(tmp_path / "out" / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("umask", "folder", "file"), [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664), (0o077, 0o700, 0o600)]
)
def test_exported_folders_and_files_follow_the_umask(tmp_path, umask, folder, file):
    previous = os.umask(umask)
    try:
        export_adapter(lora().apply(tiny_llama()), tmp_path / "out")
        export_adapter(lora().apply(tiny_llama()), tmp_path / "out", overwrite=True)
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == folder
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {file}
