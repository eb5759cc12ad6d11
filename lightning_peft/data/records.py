"""Where instruction records come from: a JSON-lines file, generated toy tasks, or the ``datasets``
library (a ``Dataset`` in memory, or local JSON, JSON-lines, CSV or Parquet files).

A record is a plain dict of named fields, the form :class:`~lightning_peft.generation.templates.PromptTemplate`
reads. ``datasets`` is an optional extra (``pip install 'lightning-peft[data]'``), imported only when
one of its sources is used. Nothing here imports Lightning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

SHIPPED_INSTRUCTIONS = Path(__file__).resolve().parent / "instructions.jsonl"
TOY_TASKS = {
    "Uppercase the word.": str.upper,
    "Reverse the word.": lambda word: word[::-1],
    "Repeat the word twice.": lambda word: f"{word} {word}",
}
TOY_WORDS = (
    "ant", "arm", "bee", "box", "bus", "cat", "cow", "cup", "dog", "egg", "fox", "hat", "ice", "jam", "key",
    "leg", "map", "net", "oak", "owl", "pen", "pig", "rug", "sky", "sun", "toy", "van", "web", "yak", "zip",
)  # fmt: skip

# the datasets builder that reads each kind of file, by suffix
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DATA_EXTRA = "pip install 'lightning-peft[data]' (or pip install datasets)"


def toy_instructions(size: int, seed: int = 0) -> list[dict[str, str]]:
    """``size`` records of a toy task (uppercase, reverse or repeat) on one of 30 short words, drawn from ``seed``.

    With 90 task-word pairs the records recur, so a validation split measures whether the pairs were
    learned, not generalisation to new words: a 2-layer, 64-wide character-level Llama learns them in a
    few hundred steps (the tests hold the figures).
    """
    g = torch.Generator().manual_seed(seed)
    names = list(TOY_TASKS)
    records = []
    for _ in range(size):
        word = TOY_WORDS[int(torch.randint(0, len(TOY_WORDS), (1,), generator=g))]
        instruction = names[int(torch.randint(0, len(names), (1,), generator=g))]
        records.append({"instruction": instruction, "input": word, "output": TOY_TASKS[instruction](word)})
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, one a line (blank lines skipped)."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}, line {number}: a record must be a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    return records


def file_builder(data_files: Sequence[str | Path]) -> str | None:
    """The ``datasets`` builder for ``data_files`` (one kind of file), or None if a file is missing or
    of a kind it cannot read; :func:`data_files_problems` says which."""
    kinds = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in data_files}
    if None in kinds or len(kinds) != 1 or not all(Path(f).is_file() for f in data_files):
        return None
    return kinds.pop()


def data_files_problems(data_files: Sequence[str | Path]) -> list[str]:
    """What is wrong with ``data_files``: missing files, unknown suffixes, mixed kinds."""
    if not data_files:
        return ["data_files is empty: give one or more .jsonl, .json, .csv or .parquet files"]
    problems = [f"no file at {f}" for f in data_files if not Path(f).is_file()]
    unknown = [str(f) for f in data_files if Path(f).suffix.lower() not in FILE_BUILDERS]
    if unknown:
        problems.append(f"data_files {unknown} are not {', '.join(FILE_BUILDERS)} files")
    kinds = {
        FILE_BUILDERS[Path(f).suffix.lower()] for f in data_files if Path(f).suffix.lower() in FILE_BUILDERS
    }
    if len(kinds) > 1:
        problems.append(f"data_files mixes kinds of file ({', '.join(sorted(kinds))}); give one kind")
    return problems


def load_data_files(data_files: Sequence[str | Path]) -> Any:
    """The local files as one ``datasets.Dataset``, read by the builder their suffix names."""
    datasets = _import_datasets("data_files")
    builder = file_builder(data_files)
    if builder is None:
        raise ValueError("InstructionData: " + "; ".join(data_files_problems(data_files)))
    return datasets.load_dataset(builder, data_files=[str(f) for f in data_files], split="train")


def dataset_splits(dataset: Any) -> tuple[Any, Any | None]:
    """(training rows, validation rows or None) of a ``Dataset`` or ``DatasetDict``: a dict's ``train``
    split (its only split if it has one), and its ``validation`` split if it has one."""
    datasets = _import_datasets("dataset")
    if isinstance(dataset, datasets.Dataset):
        return dataset, None
    if not isinstance(dataset, datasets.DatasetDict):
        raise ValueError(
            f"InstructionData: dataset must be a datasets.Dataset or DatasetDict, got {type(dataset).__name__}"
        )
    names = list(dataset)
    train = "train" if "train" in names else (names[0] if len(names) == 1 else None)
    if train is None:
        raise ValueError(f"InstructionData: the DatasetDict has no 'train' split; its splits: {names}")
    return dataset[train], dataset["validation"] if "validation" in names else None


def rows_as_records(
    rows: Any, columns: Mapping[str, str], needed: Sequence[str], source: str
) -> list[dict[str, Any]]:
    """``rows`` (a ``Dataset``) as records whose fields are named as the template names them:
    ``columns`` maps a field to the column that holds it. Raises a ``ValueError`` naming every field the
    rows lack and the columns they have."""
    available = list(rows.column_names)
    missing = [
        f"{field!r} (column {columns[field]!r})" if field in columns else repr(field)
        for field in needed
        if columns.get(field, field) not in available
    ]
    if missing:
        raise ValueError(
            f"InstructionData: {source} lacks the columns for the template's fields {', '.join(missing)}; "
            f"its columns: {available} (map a field to a column with columns={{'instruction': 'question'}})"
        )
    renamed = {column: field for field, column in columns.items()}
    return [{renamed.get(k, k): v for k, v in row.items()} for row in rows]


def _import_datasets(argument: str) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"InstructionData({argument}=...) reads data through the datasets library, which is not "
            f"installed: {DATA_EXTRA}"
        ) from err
    return datasets
