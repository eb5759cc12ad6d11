"""CurriculumSchedule in a real Trainer: phases change what trains, the learning rate, the active adapter
and the data exactly at their boundaries, and a resumed run goes on exactly as the uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_peft import PEFT, Freeze, LoRA, active_adapters, add_adapter
from lightning_peft.callbacks.curriculum import CurriculumSchedule, Phase
from lightning_peft.strategies.base import adapter_modules

STEPS_PER_EPOCH = 4
HEAD_ONLY = Freeze(trainable_modules=["head"])


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.embed(x))  # (B, 8)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)  # (B, 2)


class Classifier(L.LightningModule):
    """A user's module that knows nothing of curricula; ``build_in`` says where its network is created."""

    def __init__(self, build_in: str = "init", adapters: bool = False, all_params: bool = True) -> None:
        super().__init__()
        self.build_in, self.adapters, self.all_params = build_in, adapters, all_params
        self.losses: list[float] = []
        self.levels: list[int] = []
        self.optimized: list[nn.Parameter] = []
        if build_in == "init":
            self.configure_model()

    def configure_model(self) -> None:
        if hasattr(self, "model"):
            return
        torch.manual_seed(0)
        self.model = Tower()
        if self.adapters:
            add_adapter(self.model, "task_a", LoRA(r=2, target_modules=["head"]))
            add_adapter(self.model, "task_b", LoRA(r=2, target_modules=["head"]))

    def training_step(self, batch, batch_idx):
        x, y, level = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.losses.append(loss.item())
        self.levels.append(int(level[0]))
        return loss

    def configure_optimizers(self):
        params = self.parameters() if self.all_params else self.model.head.parameters()
        self.optimized = [p for p in params if p.requires_grad]
        # weight decay would move any parameter the optimizer steps, gradient or not
        return torch.optim.AdamW(self.optimized, lr=0.01, weight_decay=0.1)


class Levels(Dataset):
    """16 samples shifted by the datamodule's current level, which every sample carries along.

    ``lazy``: the level is read as each sample is drawn; otherwise it is fixed when the dataset is built.
    """

    def __init__(self, data: LevelData, lazy: bool) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(16, 4, generator=g)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long()
        self.data, self.fixed = data, None if lazy else data.level

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        level = self.data.level if self.fixed is None else self.fixed
        return self.x[i] + level, self.y[i], level


class LevelData(L.LightningDataModule):
    def __init__(self, lazy: bool) -> None:
        super().__init__()
        self.lazy = lazy
        self.level = 0

    def set_phase(self, data: dict) -> None:
        self.level = data["level"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Levels(self, self.lazy), batch_size=16 // STEPS_PER_EPOCH)


class Recorder(Callback):
    """Per optimizer step: the modules whose parameters changed, the learning rate, the phase, the
    active adapters, and whether the optimizer holds state for the last block."""

    def __init__(self, curriculum: CurriculumSchedule) -> None:
        self.curriculum = curriculum
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = dict(pl_module.model.named_parameters())
        changed = {n.rsplit(".", 1)[0] for n, v in self.before.items() if not torch.equal(v, after[n])}
        optimizer = trainer.optimizers[0]
        self.steps.append(
            {
                "changed": changed,
                "lr": optimizer.param_groups[0]["lr"],
                "phase": self.curriculum.phase,
                "adapters": active_adapters(pl_module.model),
                "block_state": pl_module.model.layers[2].weight in optimizer.state,
            }
        )


def trainer(root: Path, callbacks, **kwargs) -> L.Trainer:
    defaults = {
        "max_epochs": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "default_root_dir": root,
    }
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


# unit -> (phase starts, datamodule reading the level lazily, reload_dataloaders_every_n_epochs)
SCHEDULES = {"epoch": ([0, 1, 2], False, 1), "step": ([0, 3, 9], True, 0)}


def three_phases(starts: list[int]) -> list[dict]:
    return [
        {"start": starts[0], "lr": 0.1, "data": {"level": 0}},
        {"start": starts[1], "last_n_blocks": 1, "lr": 0.05, "data": {"level": 1}},
        # last_n_blocks carries on from phase 1
        Phase(start=starts[2], trainable=["embed"], lr=0.02, data={"level": 2}),
    ]


def expected_per_step(starts: list[int], unit: str, steps: int) -> list[int]:
    per_unit = STEPS_PER_EPOCH if unit == "epoch" else 1
    return [sum(s * per_unit <= step for s in starts) - 1 for step in range(steps)]


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_phases_change_trainable_lr_and_data_exactly_at_their_boundaries(tmp_path, unit):
    starts, lazy, reload = SCHEDULES[unit]
    curriculum = CurriculumSchedule(three_phases(starts), unit=unit, module="model")
    recorder = Recorder(curriculum)
    module = Classifier()
    callbacks = [PEFT(HEAD_ONLY, module="model", verbose=False), curriculum, recorder]
    trainer(tmp_path, callbacks, reload_dataloaders_every_n_epochs=reload).fit(
        module, datamodule=LevelData(lazy)
    )

    phases = expected_per_step(starts, unit, 3 * STEPS_PER_EPOCH)
    assert [s["phase"] for s in recorder.steps] == phases
    trained = [{"head"}, {"head", "layers.2"}, {"head", "layers.2", "embed"}]
    # every other module is bit-identical at every step; the last block until its phase begins
    assert [s["changed"] for s in recorder.steps] == [trained[p] for p in phases]
    assert [s["lr"] for s in recorder.steps] == [(0.1, 0.05, 0.02)[p] for p in phases]
    assert module.levels == phases  # the batches of each phase carry its data
    # no optimizer state (momentum, step count) before the phase: the block starts fresh, as if just added
    assert [s["block_state"] for s in recorder.steps] == [p >= 1 for p in phases]


def test_phases_switch_the_active_adapter(tmp_path):
    phases = [{"start": 0, "adapter": "task_a"}, {"start": 1, "adapter": ["task_b"]}]
    curriculum = CurriculumSchedule(phases, module="model")
    recorder = Recorder(curriculum)
    module = Classifier(adapters=True)
    owner = {name: m.adapter_name for name, m in adapter_modules(module.model)}  # "head.base_layer": "task_a"
    trainer(tmp_path, [curriculum, recorder], max_epochs=2).fit(module, datamodule=LevelData(lazy=True))

    assert [s["adapters"] for s in recorder.steps] == [["task_a"]] * 4 + [["task_b"]] * 4
    trained = [{owner.get(n, n) for n in s["changed"]} for s in recorder.steps]
    assert trained == [{"task_a"}] * 4 + [{"task_b"}] * 4


@pytest.fixture(scope="module", params=["epoch", "step"])
def resumed(request, tmp_path_factory):
    """4 epochs straight, and 2 epochs + resume from the epoch-1 checkpoint (in the middle of phase 1)."""
    unit = request.param
    starts = {"epoch": [0, 1, 3], "step": [0, 3, 10]}[unit]
    _, lazy, reload = SCHEDULES[unit]
    root = tmp_path_factory.mktemp(unit)

    def fit(max_epochs: int, ckpt_path: Path | None = None, *extra: Callback) -> tuple[Classifier, Recorder]:
        curriculum = CurriculumSchedule(three_phases(starts), unit=unit, module="model")
        recorder = Recorder(curriculum)
        module = Classifier()
        callbacks = [PEFT(HEAD_ONLY, module="model", verbose=False), curriculum, recorder, *extra]
        fit_trainer = trainer(
            root,
            callbacks,
            max_epochs=max_epochs,
            reload_dataloaders_every_n_epochs=reload,
            enable_checkpointing=bool(extra),
        )
        fit_trainer.fit(module, datamodule=LevelData(lazy), ckpt_path=ckpt_path)
        return module, recorder

    straight = fit(4)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
    fit(2, None, checkpoints)
    path = root / "ckpt" / "epoch=1.ckpt"
    return unit, starts, straight, fit(4, path), torch.load(path, weights_only=True)


RESUME_WITHOUT_CHECKPOINTING = "ignore:Be aware that when using `ckpt_path`"


@pytest.mark.filterwarnings(RESUME_WITHOUT_CHECKPOINTING)
def test_resume_in_the_middle_of_a_phase_goes_on_exactly(resumed):
    unit, starts, (straight, straight_record), (again, again_record), _ = resumed
    half = 2 * STEPS_PER_EPOCH
    assert expected_per_step(starts, unit, half + 1)[half] == 1  # the checkpoint is in the middle of phase 1
    torch.testing.assert_close(
        torch.tensor(again.losses), torch.tensor(straight.losses[half:]), atol=1e-6, rtol=0
    )
    assert again.levels == straight.levels[half:]
    for key in ("phase", "lr", "changed"):
        assert [s[key] for s in again_record.steps] == [s[key] for s in straight_record.steps[half:]], key


@pytest.mark.filterwarnings(RESUME_WITHOUT_CHECKPOINTING)
def test_adapter_only_checkpoint_holds_the_parameters_phases_train(resumed):
    _, _, (straight, _), _, checkpoint = resumed
    phase_modules = {"head", "layers.2", "embed"}
    expected = {
        f"model.{n}" for n, _ in straight.model.named_parameters() if n.rsplit(".", 1)[0] in phase_modules
    }
    assert set(checkpoint["state_dict"]) == expected  # the frozen blocks 0 and 1 are left out
    # the embedding's phase has not begun at the checkpoint: saved as built
    torch.manual_seed(0)
    torch.testing.assert_close(
        checkpoint["state_dict"]["model.embed.weight"], Tower().embed.weight, atol=0, rtol=0
    )
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("CurriculumSchedule")]
    assert state["phase"] == 1 and state["position"] == (2 if resumed[0] == "epoch" else 8)


def test_every_configuration_problem_is_reported_at_once():
    phases = [
        {"start": 1, "lr": -1.0, "lrr": 0.1},
        {"start": 1, "trainable": "(", "last_n_blocks": -2},
        {"lr": 1},
    ]
    with pytest.raises(ValueError) as err:
        CurriculumSchedule(phases, unit="minute", set_data=3)
    message = str(err.value)
    for part in [
        "phases[0] has unknown keys ['lrr']; a phase takes ['start', 'trainable', 'last_n_blocks', 'lr', 'adapter', 'data']",
        "phases[0].lr must be a finite number >= 0, got -1.0",
        "phases[1].trainable='(' is not a valid regular expression",
        "phases[1].last_n_blocks must be a non-negative integer, got -2",
        "phases[2] has no 'start'",
        "unit must be 'epoch' or 'step', got 'minute'",
        "set_data must be a method name or a callable, got 3",
        "phase starts must begin at 0 and increase strictly (sorted, no duplicates); got [1, 1]",
    ]:
        assert part in message
    with pytest.raises(ValueError, match=r"begin at 0 and increase strictly.*got \[0, 2, 1\]"):
        CurriculumSchedule([{"start": 0}, {"start": 2}, Phase(start=1)])


def test_phases_that_do_not_fit_the_model_are_reported_at_setup_with_what_exists(tmp_path):
    phases = [
        {"start": 0, "trainable": ["encoder"], "data": {"level": 1}},
        {"start": 1, "last_n_blocks": 5, "adapter": "task_c"},
    ]
    curriculum = CurriculumSchedule(phases, module="model", set_data="set_difficulty")
    with pytest.raises(ValueError) as err:
        trainer(tmp_path, [curriculum]).fit(Classifier(adapters=True), datamodule=LevelData(lazy=True))
    message = str(err.value)
    for part in [
        "phases[0].trainable=('encoder',) matched no module; modules here: embed (Linear), layers (ModuleList)",
        "phases[1].last_n_blocks=5 but 'layers' has 3 blocks",
        "phases[1].adapter: no adapter named ['task_c']; adapters here: ['task_a', 'task_b']",
        "phases give data but LevelData and Classifier have no method 'set_difficulty'",
    ]:
        assert part in message


@pytest.mark.parametrize("peft_first", [True, False])
@pytest.mark.parametrize("build_in", ["init", "configure_model"])
def test_phase_parameters_reach_the_optimizer_whatever_the_callback_order(tmp_path, peft_first, build_in):
    curriculum = CurriculumSchedule([{"start": 0}, {"start": 1, "last_n_blocks": 1}], module="model")
    peft = PEFT(HEAD_ONLY, module="model", verbose=False)
    module = Classifier(build_in)
    callbacks = [peft, curriculum] if peft_first else [curriculum, peft]
    trainer(tmp_path, callbacks, max_epochs=1).fit(module, datamodule=LevelData(lazy=True))
    expected = [*module.model.layers[2].parameters(), *module.model.head.parameters()]
    assert {id(p) for p in module.optimized} == {id(p) for p in expected}


def test_an_optimizer_without_the_phase_parameters_is_refused(tmp_path):
    curriculum = CurriculumSchedule([{"start": 0}, {"start": 1, "last_n_blocks": 1}], module="model")
    callbacks = [PEFT(HEAD_ONLY, module="model", verbose=False), curriculum]
    with pytest.raises(
        ValueError, match=r"no optimizer holds 2 parameters that phases train: model\.layers\.2\.weight"
    ):
        trainer(tmp_path, callbacks).fit(Classifier(all_params=False), datamodule=LevelData(lazy=True))


def test_shipped_config_builds_the_callback():
    config = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "schedule" / "curriculum.yaml")
    from hydra.utils import instantiate

    built = instantiate(config, _convert_="all")
    assert isinstance(built, CurriculumSchedule) and built.phases[0].start == 0
