"""End to end: a training step under Lightning with the PEFT callback against a plain PyTorch loop.

Both train the same LoRA model (a Llama built from a config, random weights) on the same batches with
the same AdamW (lr 1e-4, no weight decay, as the task module's). The Lightning side is what ``lightning-peft fit`` runs: ``lightning_peft``'s
``CausalLM`` task module, the ``PEFT`` callback, a CSV logger, the learning-rate monitor, the
progress bar, logging every ``--log-every`` steps. The plain side is ``loss.backward()``,
``optimizer.step()``, ``optimizer.zero_grad()``.

Each round runs ``--steps`` steps of one, then of the other (interleaved, so a busy machine slows
both alike); a step's time is taken from the start of one batch to the start of the next (the last
step ends at its batch's end: the end of training is not a step), the first step of each round left
out (Lightning starts a fit there). The ratio is the median of the per-round
ratios of the mean step times.

    python benchmarks/fit_step.py                       # hidden 512, 2 layers, batch 2x128, 11 rounds
    python benchmarks/fit_step.py --profile             # also: where the Lightning step's extra time goes
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_peft import PEFT, LoRA  # noqa: E402
from lightning_peft.models.tasks import CausalLM  # noqa: E402


class StepClock(L.Callback):
    """Records the time at the start of every training batch, and at the end of the last one (not at the
    end of training: the epoch's end, the logger's flush and the bar's teardown are not a step's cost)."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.last_end = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.last_end = time.perf_counter()

    def step_times(self) -> list[float]:
        """The step times after the first (Lightning starts the fit there)."""
        marks = [*self.marks, self.last_end]
        return [b - a for a, b in zip(marks[1:-1], marks[2:], strict=True)]


def build(args: argparse.Namespace) -> CausalLM:
    config = {
        "model_type": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.hidden // 64,
        "max_position_embeddings": args.seq + 32,
    }
    return CausalLM(config=config, lr=1e-4, seed=0)


def lightning_steps(
    module: CausalLM, batches: list[torch.Tensor], args: argparse.Namespace, out: Path
) -> list[float]:
    """One ``fit`` over ``batches``; the step times after the first."""
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=[
            PEFT(LoRA(r=16, lora_alpha=32, target_modules="all-linear"), verbose=False),
            clock,
            LearningRateMonitor("step"),
        ],
        logger=CSVLogger(out, name="logs"),
        log_every_n_steps=args.log_every,
        enable_progress_bar=not args.no_progress_bar,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(batches, batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    return clock.step_times()


def plain_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]
) -> list[float]:
    marks = []
    for ids in batches:
        marks.append(time.perf_counter())
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks[1:-1], marks[2:], strict=True)]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    module = build(args)
    plain = copy.deepcopy(module.model)
    LoRA(r=16, lora_alpha=32, target_modules="all-linear").apply(plain)
    plain.train()
    # the task module's optimizer: AdamW, lr 1e-4, no weight decay
    trainable = [p for p in plain.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator) for _ in range(args.steps)
    ]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.warmup + args.rounds):
            ours = lightning_steps(module, batches, args, Path(tmp))
            theirs = plain_steps(plain, optimizer, batches)
            if index >= args.warmup:
                rounds.append({"lightning_s": statistics.mean(ours), "plain_s": statistics.mean(theirs)})
            print(f"round {index + 1}/{args.warmup + args.rounds} done", flush=True)
    ratios = [r["lightning_s"] / r["plain_s"] for r in rounds]
    return {
        "x_plain": statistics.median(ratios),
        "x_plain_min": min(ratios),
        "x_plain_max": max(ratios),
        "lightning_step_s": statistics.median(r["lightning_s"] for r in rounds),
        "plain_step_s": statistics.median(r["plain_s"] for r in rounds),
        "rounds": rounds,
    }


def profile(args: argparse.Namespace) -> str:
    """cProfile of one Lightning fit, the functions outside torch's own ops with the most own time."""
    import cProfile
    import pstats

    module = build(args)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator) for _ in range(args.steps)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        lightning_steps(module, batches, args, Path(tmp))  # warm
        profiler = cProfile.Profile()
        profiler.enable()
        lightning_steps(module, batches, args, Path(tmp))
        profiler.disable()
    import io

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="steps per round (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=5, help="as conf/trainer/cpu.yaml")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result = run(args)
    machine = {
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(
        f"\nLlama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, LoRA r=16 all-linear, "
        f"AdamW, {args.threads} threads; median of {args.rounds} interleaved rounds of {args.steps} steps\n{machine}\n"
    )
    print("| loop | step s | x plain (spread) |\n|---|---:|---:|")
    print(f"| plain PyTorch | {result['plain_step_s']:.4f} | 1.000 |")
    print(
        f"| Lightning + PEFT callback | {result['lightning_step_s']:.4f} | {result['x_plain']:.3f} "
        f"({result['x_plain_min']:.3f}-{result['x_plain_max']:.3f}) |"
    )
    if args.profile:
        print(profile(args))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": vars(args), "machine": machine, **result}, indent=1)
        )
    return result


if __name__ == "__main__":
    main()
