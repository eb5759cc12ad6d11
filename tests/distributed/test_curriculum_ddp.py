"""A curriculum phase unfreezes a block mid-training under DDP on 2 CPU processes.

DDP registers only the parameters that require grad when it wraps the model, so unfreezing at the
boundary (as Lightning's ``BackboneFinetuning`` does) leaves the block out of gradient averaging, a
known Lightning issue. ``CurriculumSchedule`` lets phase parameters require grad from the start and drops
their gradients outside their phase. ``train_curriculum.py`` runs in a subprocess (Lightning's
``ddp`` re-launches ``sys.argv``, so it cannot run inside pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_curriculum as script  # this folder is on sys.path (pytest's default rootdir import)

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("curriculum-ddp")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(Path(script.__file__)), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    records = [torch.load(out / f"record_rank{r}.pt", weights_only=True) for r in range(2)]
    return {**json.loads((out / "results.json").read_text()), "records": records}


def test_training_goes_on_across_the_unfreezing_boundary(run):
    steps = script.STEPS_PER_EPOCH
    assert run["world_size"] == 2
    assert run["phases"] == [0] * steps + [1] * steps
    assert run["lrs"] == [0.05] * steps + [0.02] * steps


def test_the_block_is_bit_identical_before_its_phase_and_trains_after(run):
    steps = script.STEPS_PER_EPOCH
    for record in run["records"]:
        block = record["block"]
        assert all(torch.equal(block[i], record["initial_block"]) for i in range(steps))
        previous = [record["initial_block"], *block[:-1]]
        assert all(not torch.equal(block[i], previous[i]) for i in range(steps, 2 * steps))


def test_every_rank_holds_the_same_weights_at_every_step(run):
    first, second = run["records"]
    # the unfrozen block's gradients were averaged across ranks: the replicas never drift apart
    assert torch.equal(first["block"], second["block"])
    assert torch.equal(first["head"], second["head"])
    assert not torch.equal(first["head"][0], first["head"][-1])
