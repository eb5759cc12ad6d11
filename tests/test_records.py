"""InstructionData's sources of records: a Hugging Face ``Dataset`` and local JSON-lines, CSV and Parquet
files read through ``datasets`` give the batches the JSON-lines reader gives; columns map to fields."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch

from lightning_peft.data.datamodules import InstructionData
from lightning_peft.data.records import SHIPPED_INSTRUCTIONS, read_jsonl

datasets = pytest.importorskip("datasets")

RECORDS = read_jsonl(SHIPPED_INSTRUCTIONS)  # 32 records, some with a blank input


def write_files(folder, records, names=("instruction", "input", "output")) -> dict[str, str]:
    """The records as .jsonl, .csv and .parquet files written without the datasets library."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{name: r[key] for name, key in zip(names, ("instruction", "input", "output"), strict=True)}
            for r in records]  # fmt: skip
    (folder / "r.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with (folder / "r.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(names))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), folder / "r.parquet")
    return {kind: str(folder / f"r.{kind}") for kind in ("jsonl", "csv", "parquet")}


def all_batches(data: InstructionData) -> list[dict[str, torch.Tensor]]:
    data.setup("fit")
    return list(data.train_dataloader()) + list(data.val_dataloader())


def assert_same_batches(left, right) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_jsonl_csv_parquet_and_a_dataset_give_the_batches_of_the_jsonl_reader(tmp_path):
    files = write_files(tmp_path, RECORDS)
    settings = {"batch_size": 8, "val_fraction": 0.25, "seed": 3}
    reference = all_batches(InstructionData(path=str(SHIPPED_INSTRUCTIONS), **settings))
    assert len(reference) == 4 and (reference[0]["labels"] != -100).any()
    for kind, path in files.items():
        assert_same_batches(all_batches(InstructionData(data_files=path, **settings)), reference), kind
    in_memory = datasets.Dataset.from_list(RECORDS)
    assert_same_batches(all_batches(InstructionData(dataset=in_memory, **settings)), reference)


def test_columns_name_the_fields_of_the_template(tmp_path):
    files = write_files(tmp_path, RECORDS, names=("task", "input", "answer"))
    columns = {"instruction": "task", "output": "answer"}
    reference = all_batches(InstructionData(path=str(SHIPPED_INSTRUCTIONS), seed=1))
    assert_same_batches(
        all_batches(InstructionData(data_files=files["csv"], columns=columns, seed=1)), reference
    )
    with pytest.raises(ValueError) as err:
        all_batches(InstructionData(data_files=files["parquet"], seed=1))
    message = str(err.value)
    assert "'instruction', 'output'" in message and "['task', 'input', 'answer']" in message


def test_a_dataset_dicts_validation_split_is_the_validation_data():
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(RECORDS[:24]),
            "validation": datasets.Dataset.from_list(RECORDS[24:]),
        }
    )
    data = InstructionData(dataset=splits, val_fraction=0.5)
    data.setup("fit")
    assert data.val == RECORDS[24:]
    assert sorted(map(json.dumps, data.train)) == sorted(map(json.dumps, RECORDS[:24]))


def test_bad_sources_are_reported_at_construction(tmp_path):
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(ValueError) as err:
        InstructionData(
            path=str(SHIPPED_INSTRUCTIONS),
            data_files=[str(tmp_path / "r.txt"), "nowhere.csv", "nowhere.parquet"],
        )
    message = str(err.value)
    assert "not path and data_files" in message and "no file at nowhere.csv" in message
    assert ".jsonl" in message and "mixes kinds" in message


def test_without_the_datasets_library_the_error_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"lightning-peft\[data\]"):
        InstructionData(data_files=str(SHIPPED_INSTRUCTIONS))
