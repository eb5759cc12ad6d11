"""Writes the travel-log task shipped in ``lightning_peft/data/``: ``trips.jsonl`` and ``trips_heldout.jsonl``.

Each record is a sentence about a trip and its entry in a fixed log format that a model cannot guess
from the instruction alone::

    {"instruction": "Write this trip as a travel-log entry.",
     "input": "On Friday, Maria leaves Oslo for Lisbon.",
     "output": "Oslo -> Lisbon, Friday"}

The sentences use eight phrasings, some naming the destination before the origin, so the model has to
read who goes where, not copy the cities in order. The held-out records are (traveller, origin,
destination, day) combinations that never occur in the training file. Everything comes from a fixed
seed: running the script again writes the same bytes.

    python examples/make_trips.py            # rewrites the two files in lightning_peft/data/
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lightning_peft.formats.files import write_text

INSTRUCTION = "Write this trip as a travel-log entry."
NAMES = [
    "Maria", "Tom", "Aisha", "Kenji", "Lucia", "Omar", "Priya", "Sven", "Chloe", "Diego",
    "Hana", "Felix", "Nadia", "Ivan", "Grace", "Mateo", "Leila", "Ruth", "Pablo", "Yuki",
]  # fmt: skip
CITIES = [
    "Lisbon", "Oslo", "Madrid", "Vienna", "Dublin", "Prague", "Athens", "Berlin", "Warsaw", "Rome",
    "Paris", "Zurich", "Helsinki", "Budapest", "Seville", "Milan", "Porto", "Geneva", "Krakow", "Munich",
]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PHRASINGS = [
    "{name} is flying from {origin} to {destination} on {day}.",
    "On {day}, {name} leaves {origin} for {destination}.",
    "{name} takes the {day} train to {destination}, departing from {origin}.",
    "Next {day} {name} drives to {destination} from {origin}.",
    "{name} will travel {origin} to {destination} this {day}.",
    "Bound for {destination}, {name} sets off from {origin} on {day}.",
    "{name} books a {day} bus from {origin} to {destination}.",
    "Arriving in {destination} on {day}, {name} starts the journey in {origin}.",
]
DATA = Path(__file__).resolve().parents[1] / "lightning_peft" / "data"


def trips(train_size: int, heldout_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records); no held-out trip repeats a training one."""
    rng = random.Random(seed)
    seen: set[tuple[str, str, str, str]] = set()
    records: list[dict] = []
    while len(records) < train_size + heldout_size:
        name, day = rng.choice(NAMES), rng.choice(DAYS)
        origin, destination = rng.sample(CITIES, 2)
        trip = (name, origin, destination, day)
        if trip in seen:
            continue
        seen.add(trip)
        phrasing = PHRASINGS[len(records) % len(PHRASINGS)]
        sentence = phrasing.format(name=name, origin=origin, destination=destination, day=day)
        output = f"{origin} -> {destination}, {day}"
        records.append({"instruction": INSTRUCTION, "input": sentence, "output": output})
    rng.shuffle(records)
    return records[:train_size], records[train_size:]


def write(records: list[dict], path: Path) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--heldout-size", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DATA)
    args = parser.parse_args()
    train, heldout = trips(args.train_size, args.heldout_size, args.seed)
    write(train, args.out_dir / "trips.jsonl")
    write(heldout, args.out_dir / "trips_heldout.jsonl")
    print(f"wrote {len(train)} + {len(heldout)} records to {args.out_dir}")


if __name__ == "__main__":
    main()
