"""Multi-task and continual training: the task-mixing loader alone, then the schedule in a Trainer."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import PEFT, Freeze, LoRA, active_adapters, adapter_names
from lightning_peft.callbacks.multitask import MultiTaskLoader, MultiTaskSchedule

TARGETS = ["0", "2", "4"]  # every Linear of the nets below, the output layer included


def net(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, outputs))


class TaskModule(L.LightningModule):
    """A user's module that knows nothing of tasks or adapters; it records what each step saw."""

    def __init__(self, loss: str = "mse", lr: float = 2e-2, build_in: str = "init") -> None:
        super().__init__()
        self.loss_name, self.lr, self.build_in = loss, lr, build_in
        # (loader's task, active adapters, first input value as the batch's id), one per step
        self.seen: list[tuple[str, list[str], float]] = []
        self.val: dict[tuple[int, str], float] = {}  # (epoch, task) -> loss or accuracy
        if build_in == "init":
            self.configure_model()

    def configure_model(self) -> None:
        if not hasattr(self, "model"):
            self.model = net(1 if self.loss_name == "mse" else 2)

    def loss(self, batch):
        x, y = batch
        out = self.model(x)
        return (
            nn.functional.mse_loss(out, y) if self.loss_name == "mse" else nn.functional.cross_entropy(out, y)
        )

    def training_step(self, batch, batch_idx):
        task = self.trainer.train_dataloader.current_task
        self.seen.append((task, active_adapters(self.model), batch[0][0, 0].item()))
        return self.loss(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        task = list(self.trainer.val_dataloaders)[dataloader_idx]
        x, y = batch
        if self.loss_name == "mse":
            self.val[(self.current_epoch, task)] = self.loss(batch).item()
        else:
            self.val[(self.current_epoch, task)] = (self.model(x).argmax(-1) == y).float().mean().item()
        self.seen.append((f"val:{task}", active_adapters(self.model), x[0, 0].item()))

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def opposite_tasks(n: int = 64) -> dict[str, TensorDataset]:
    """The same inputs, opposite targets: y = +f(x) for "up", y = -f(x) for "down" (mean f² about 1)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    f = x @ w / w.norm()
    return {"up": TensorDataset(x, f), "down": TensorDataset(x, -f)}


def boundary_tasks(n: int) -> dict[str, TensorDataset]:
    """Two classification tasks on the same inputs with orthogonal boundaries (x0 > 0, x1 > 0)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return {"t1": TensorDataset(x, (x[:, 0] > 0).long()), "t2": TensorDataset(x, (x[:, 1] > 0).long())}


def loaders(datasets: dict[str, TensorDataset], batch_size: int = 16) -> dict[str, DataLoader]:
    return {task: DataLoader(data, batch_size=batch_size) for task, data in datasets.items()}


def lora() -> LoRA:
    return LoRA(r=4, target_modules=TARGETS)


def trainer(tmp_path: Path, callbacks=(), **kwargs) -> L.Trainer:
    defaults = {
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "default_root_dir": tmp_path,
    }
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def train_tasks(module: TaskModule) -> list[str]:
    return [task for task, _, _ in module.seen if not task.startswith("val:")]


# --- the loader alone ------------------------------------------------------------------------------


def frequencies(loader: MultiTaskLoader) -> dict[str, float]:
    counts = Counter(loader.task_order(0))
    return {t: counts[t] / loader.steps_per_epoch for t in loader.tasks}


def test_proportional_and_temperature_sampling_match_their_probabilities():
    sizes = {"a": 10, "b": 30, "c": 60}
    batches = {t: list(range(n)) for t, n in sizes.items()}
    proportional = MultiTaskLoader(batches, sampling="proportional", steps_per_epoch=20_000)
    tempered = MultiTaskLoader(batches, sampling="temperature", temperature=2.0, steps_per_epoch=20_000)
    roots = {t: math.sqrt(n) for t, n in sizes.items()}
    expected = {t: r / sum(roots.values()) for t, r in roots.items()}
    assert proportional.probabilities == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    assert tempered.probabilities == pytest.approx(expected)
    assert frequencies(proportional) == pytest.approx(proportional.probabilities, abs=0.015)
    assert frequencies(tempered) == pytest.approx(expected, abs=0.015)


def test_sizes_are_counted_in_examples_when_the_loaders_have_datasets():
    # 100 examples each, but 10 batches against 2
    loader = MultiTaskLoader(
        {"a": DataLoader(range(100), batch_size=10), "b": DataLoader(range(100), batch_size=50)}
    )
    assert loader.probabilities == pytest.approx({"a": 0.5, "b": 0.5})
    assert len(loader) == 12  # one pass over all the batches


def test_round_robin_cycles_exactly_across_epochs():
    loader = MultiTaskLoader({"a": [0], "b": [1], "c": [2]}, sampling="round_robin", steps_per_epoch=4)
    seen = [loader.current_task for epoch in range(3) for _ in loader]
    assert seen == ["a", "b", "c"] * 4


def test_sequential_trains_each_task_for_its_epochs_in_turn():
    loader = MultiTaskLoader({"a": [0, 1], "b": [2]}, sampling="sequential", epochs_per_task=2)
    epochs = [list(loader) for _ in range(4)]
    assert epochs == [[0, 1], [0, 1], [2, 2], [2, 2]]  # an epoch is the longest loader; "b" cycles


def test_batches_pass_unchanged_and_each_epoch_starts_the_task_loaders_again():
    loader = MultiTaskLoader({"a": [10, 11, 12], "b": [20, 21]}, sampling="round_robin", steps_per_epoch=5)
    assert list(loader) == [10, 20, 11, 21, 12]
    assert list(loader) == [20, 10, 21, 11, 20]  # the cycle goes on, the loaders start afresh


def test_set_epoch_chooses_the_epochs_task_sequence():
    loader = MultiTaskLoader({"a": list(range(8)), "b": list(range(8))}, seed=3)
    loader.sampler.set_epoch(4)  # what Lightning does at the start of every epoch
    seen = [loader.current_task for _ in loader]
    assert loader.epoch == 4
    assert seen == loader.task_order(4) != loader.task_order(0)


def test_the_task_sequence_depends_on_seed_and_epoch_only():
    batches = {"a": list(range(8)), "b": list(range(8))}
    same = MultiTaskLoader(batches, seed=3), MultiTaskLoader(batches, seed=3)
    assert same[0].task_order(0) == same[1].task_order(0)
    assert same[0].task_order(0) != same[0].task_order(1)
    assert MultiTaskLoader(batches, seed=4).task_order(0) != same[0].task_order(0)


def test_loader_state_resumes_mid_epoch_with_the_same_tasks_and_batches():
    batches = {"a": list(range(0, 5)), "b": list(range(100, 107))}
    straight = MultiTaskLoader(batches, seed=1)
    expected = [b for _ in range(2) for b in straight]

    first = MultiTaskLoader(batches, seed=1)
    iterator = iter(first)
    head = [next(iterator) for _ in range(7)]  # stopped in the middle of epoch 0
    resumed = MultiTaskLoader(batches, seed=1)
    resumed.load_state_dict(first.state_dict())
    tail = list(resumed) + list(resumed)
    assert head + tail == expected


def test_bad_loader_configuration_lists_every_problem():
    with pytest.raises(ValueError) as err:
        MultiTaskLoader({}, sampling="zipf", temperature=0, steps_per_epoch=-1)
    message = str(err.value)
    for part in (
        "non-empty dict",
        "sampling='zipf' is unknown",
        "proportional, temperature",
        "temperature must be",
        "steps_per_epoch",
    ):
        assert part in message
    with pytest.raises(ValueError, match=r"have no len\(\); give steps_per_epoch"):
        MultiTaskLoader({"a": iter([1]), "b": [1]})


def test_bad_schedule_configuration_lists_every_problem():
    with pytest.raises(ValueError) as err:
        MultiTaskSchedule([], strategy="lora", module="model..encoder", adapter_per_task="yes")
    message = str(err.value)
    for part in ("non-empty list of task names", "strategy:", "dotted attribute path", "adapter_per_task"):
        assert part in message
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        MultiTaskSchedule(["a", "b", "a"])


# --- the schedule in a Trainer ---------------------------------------------------------------------


def test_an_adapter_per_task_learns_conflicting_tasks_that_one_shared_adapter_cannot(tmp_path):
    data = opposite_tasks()
    val = loaders(data, batch_size=64)
    losses = {}
    for per_task in (True, False):
        module = TaskModule()
        schedule = MultiTaskSchedule(
            ["up", "down"], strategy=lora(), module="model", adapter_per_task=per_task
        )
        run = trainer(tmp_path, [schedule], max_epochs=30, check_val_every_n_epoch=30)
        run.fit(module, MultiTaskLoader(loaders(data), sampling="round_robin"), val_dataloaders=val)
        losses[per_task] = {task: module.val[(29, task)] for task in data}
    zero = (data["up"].tensors[1] ** 2).mean().item()
    print(
        f"\nMSE after 240 steps (predicting 0 scores {zero:.3f}): adapter per task {losses[True]}, shared {losses[False]}"
    )
    assert max(losses[True].values()) < 0.05
    # the best one shared model can do is predict about 0 for both: a loss near Var y = 1 on each
    assert min(losses[False].values()) > 0.5


def test_only_the_current_tasks_adapter_is_active_in_training_and_validation(tmp_path):
    data = opposite_tasks()
    module = TaskModule()
    schedule = MultiTaskSchedule(["up", "down"], strategy=lora(), module="model")
    trainer(tmp_path, [schedule], max_epochs=1).fit(
        module, MultiTaskLoader(loaders(data), seed=2), val_dataloaders=loaders(data, batch_size=64)
    )
    assert adapter_names(module.model) == ["down", "up"]
    train = [(task, active) for task, active, _ in module.seen if not task.startswith("val:")]
    assert {task for task, _ in train} == {"up", "down"}
    assert all(active == [task] for task, active in train)
    val = [(task, active) for task, active, _ in module.seen if task.startswith("val:")]
    assert val == [("val:up", ["up"]), ("val:down", ["down"])]


def test_a_peft_adapter_stays_active_next_to_the_tasks_own(tmp_path):
    module = TaskModule()
    callbacks = [
        PEFT(lora(), module="model", verbose=False),
        MultiTaskSchedule(["up", "down"], strategy=lora(), module="model"),
    ]
    trainer(tmp_path, callbacks, max_epochs=1).fit(module, MultiTaskLoader(loaders(opposite_tasks())))
    assert all(active == sorted(["default", task]) for task, active, _ in module.seen)


def test_per_task_losses_and_batch_counts_are_logged(tmp_path):
    module = TaskModule()
    logger = CSVLogger(tmp_path, name="run")
    schedule = MultiTaskSchedule(["up", "down"], strategy=lora(), module="model")
    loader = MultiTaskLoader(loaders(opposite_tasks()), seed=5)
    trainer(tmp_path, [schedule], logger=logger, log_every_n_steps=1).fit(module, loader)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for column in ("train_loss/up", "train_loss/down", "task_batches/up", "task_batches/down"):
        assert column in rows[0]
    per_epoch = [r for r in rows if r["task_batches/up"]]
    assert len(per_epoch) == 2 and all(float(r["train_loss/up"]) > 0 for r in per_epoch)
    counts = Counter(train_tasks(module)[:8])
    assert float(per_epoch[0]["task_batches/up"]) == counts["up"]
    assert float(per_epoch[0]["task_batches/down"]) == counts["down"]


class Snapshot(Callback):
    """Every trainable tensor of the module when training starts (after a checkpoint was restored)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("stop", ["epoch_end", "mid_epoch"])
def test_resume_continues_the_same_task_sequence_and_batches(tmp_path, stop):
    data = opposite_tasks()

    def fit(max_epochs: int, ckpt_path=None, checkpoint=None) -> TaskModule:
        module = TaskModule()
        callbacks = [MultiTaskSchedule(["up", "down"], strategy=lora(), module="model")] + (
            [checkpoint] if checkpoint else []
        )
        run = trainer(tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=checkpoint is not None)
        run.fit(module, MultiTaskLoader(loaders(data), seed=7), ckpt_path=ckpt_path)
        return module

    straight = fit(2).seen
    if stop == "epoch_end":
        first = fit(1, checkpoint=ModelCheckpoint(tmp_path / "ckpt", save_last=True)).seen
        ckpt = tmp_path / "ckpt" / "last.ckpt"
    else:
        checkpoint = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
        first = fit(1, checkpoint=checkpoint).seen[:5]
        ckpt = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    resumed = fit(2, ckpt_path=ckpt).seen
    assert first + resumed == straight  # tasks, active adapters and the batches themselves


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_checkpoint_of_a_multi_task_run_holds_every_task_adapter_and_resumes(tmp_path):
    data = opposite_tasks()

    def callbacks():
        return [
            PEFT(Freeze(), module="model", verbose=False),
            MultiTaskSchedule(["up", "down"], strategy=lora(), module="model"),
        ]

    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    module = TaskModule(build_in="configure_model")
    run = trainer(tmp_path, [*callbacks(), checkpoint], max_epochs=1, enable_checkpointing=True)
    run.fit(module, MultiTaskLoader(loaders(data)))
    written = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    saved = written["state_dict"]
    (recipe,) = [v for k, v in written["callbacks"].items() if k.startswith("MultiTaskSchedule")]
    assert recipe["adapters"] == ["up", "down"] and recipe["strategy"] == lora().to_config()
    adapter_keys = {k for k in saved if ".lora_" in k}
    assert adapter_keys == set(saved)  # adapter-only: nothing of the frozen base
    for task_layer in ("model.0.lora_A", "model.0.base_layer.lora_A"):  # one per stacked adapter
        assert task_layer in saved

    torch.manual_seed(123)  # fresh adapters differ from the saved ones until the checkpoint is loaded
    snapshot = Snapshot()
    resumed = TaskModule(build_in="configure_model")
    trainer(tmp_path, [*callbacks(), snapshot], max_epochs=2).fit(
        resumed, MultiTaskLoader(loaders(data)), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert set(snapshot.state) == set(saved)
    for name, tensor in snapshot.state.items():
        torch.testing.assert_close(tensor, saved[name])
    assert len(resumed.seen) == 8  # only the second epoch ran


def test_continual_learning_with_an_adapter_per_task_does_not_forget(tmp_path):
    data, val = boundary_tasks(128), boundary_tasks(512)
    epochs_per_task = 10
    accuracy = {}
    for per_task in (True, False):
        module = TaskModule(loss="ce")
        schedule = MultiTaskSchedule(["t1", "t2"], strategy=lora(), module="model", adapter_per_task=per_task)
        loader = MultiTaskLoader(loaders(data), sampling="sequential", epochs_per_task=epochs_per_task)
        run = trainer(
            tmp_path, [schedule], max_epochs=2 * epochs_per_task, check_val_every_n_epoch=epochs_per_task
        )
        run.fit(module, loader, val_dataloaders=loaders(val, batch_size=512))
        assert train_tasks(module) == ["t1"] * 80 + ["t2"] * 80
        accuracy[per_task] = {
            "t1 after t1": module.val[(epochs_per_task - 1, "t1")],
            "t1 after t2": module.val[(2 * epochs_per_task - 1, "t1")],
            "t2 after t2": module.val[(2 * epochs_per_task - 1, "t2")],
        }
    print(f"\naccuracy, adapter per task: {accuracy[True]}\naccuracy, one shared adapter: {accuracy[False]}")
    per_task, shared = accuracy[True], accuracy[False]
    assert per_task["t1 after t1"] > 0.9 and per_task["t2 after t2"] > 0.9
    assert per_task["t1 after t2"] >= per_task["t1 after t1"] - 0.02
    assert shared["t1 after t2"] < shared["t1 after t1"] - 0.2  # orthogonal boundaries: near chance


def test_what_the_peft_callback_left_trainable_stays_trainable(tmp_path):
    module = TaskModule()
    callbacks = [
        PEFT(Freeze(trainable_modules=["4"]), module="model", verbose=False),
        MultiTaskSchedule(["up", "down"], strategy=LoRA(r=4, target_modules=["0", "2"]), module="model"),
    ]
    trainer(tmp_path, callbacks, max_epochs=1).fit(module, MultiTaskLoader(loaders(opposite_tasks())))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert {"4.weight", "4.bias"} <= trainable
    assert not any(n.endswith("base_layer.weight") for n in trainable)


def test_an_adapter_per_task_under_ddp_asks_for_find_unused_parameters(tmp_path):
    schedule = MultiTaskSchedule(["up", "down"], strategy=lora(), module="model")
    ddp = trainer(tmp_path, [schedule], strategy="ddp", devices=1)
    # the hook alone: a fit would start a process group that outlives the test
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        schedule.setup(ddp, TaskModule(), "fit")
    shared = MultiTaskSchedule(["up", "down"], strategy=lora(), module="model", adapter_per_task=False)
    shared.setup(trainer(tmp_path, [shared], strategy="ddp", devices=1), TaskModule(), "fit")


def test_schedule_must_come_after_the_peft_callback(tmp_path):
    callbacks = [
        MultiTaskSchedule(["up", "down"], strategy=lora(), module="model"),
        PEFT(Freeze(), module="model"),
    ]
    with pytest.raises(ValueError, match="PEFT callback must come before MultiTaskSchedule"):
        trainer(tmp_path, callbacks, max_epochs=1).fit(
            TaskModule(), MultiTaskLoader(loaders(opposite_tasks()))
        )


def test_train_loader_must_be_a_multitask_loader_with_the_same_tasks(tmp_path):
    schedule = MultiTaskSchedule(["up", "sideways"], strategy=lora(), module="model")
    with pytest.raises(
        ValueError, match=r"tasks \['up', 'down'\] are not the schedule's tasks \['up', 'sideways'\]"
    ):
        trainer(tmp_path, [schedule], max_epochs=1).fit(
            TaskModule(), MultiTaskLoader(loaders(opposite_tasks()))
        )
    plain = DataLoader(opposite_tasks()["up"], batch_size=16)
    with pytest.raises(ValueError, match="needs a MultiTaskLoader as the train dataloader, got DataLoader"):
        trainer(tmp_path, [MultiTaskSchedule(["up"], strategy=lora(), module="model")], max_epochs=1).fit(
            TaskModule(), plain
        )


def test_without_a_strategy_the_task_adapters_must_exist_and_are_named_when_missing(tmp_path):
    schedule = MultiTaskSchedule(["up", "down"], module="model")
    with pytest.raises(ValueError, match=r"no adapter named \['down', 'up'\] in model; adapters here: none"):
        trainer(tmp_path, [schedule], max_epochs=1).fit(
            TaskModule(), MultiTaskLoader(loaders(opposite_tasks()))
        )
