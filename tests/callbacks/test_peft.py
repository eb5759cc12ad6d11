"""The PEFT callback inside a real Trainer: when it applies, what checkpoints hold, how they resume."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import PEFT, Freeze, LoRA, load_from_checkpoint
from lightning_peft.strategies.lora import LoRALinear

LORA = {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}


class Classifier(L.LightningModule):
    """A user's module that knows nothing of PEFT; ``build_in`` says where its network is created."""

    def __init__(self, build_in: str = "init", lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.losses: list[float] = []
        self.optimized: list[nn.Parameter] = []
        if build_in == "init":
            self._build()

    def _build(self) -> None:
        if not hasattr(self, "model"):
            torch.manual_seed(0)
            self.model = nn.Sequential(
                nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
            )

    def setup(self, stage: str) -> None:
        if self.hparams.build_in == "setup":
            self._build()

    def configure_model(self) -> None:
        if self.hparams.build_in == "configure_model":
            self._build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        self.optimized = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(self.optimized, lr=self.hparams.lr)


def data(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def trainer(tmp_path: Path, callbacks=(), **kwargs) -> L.Trainer:
    defaults = {
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "default_root_dir": tmp_path,
    }
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def base_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen weights keyed by their name in the unadapted model."""
    return {
        k.replace(".base_layer", ""): v.clone() for k, v in module.state_dict().items() if "lora_" not in k
    }


@pytest.mark.parametrize("build_in", ["init", "setup", "configure_model"])
def test_adapters_exist_before_the_optimizer_wherever_the_model_is_built(tmp_path, build_in):
    module = Classifier(build_in)
    trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")], max_epochs=1).fit(module, data())
    layers = [m for m in module.model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 3
    adapter_ids = {id(p) for m in layers for p in (m.lora_A, m.lora_B)}
    assert {id(p) for p in module.optimized} == adapter_ids


def test_callback_can_target_the_whole_module_or_a_submodule(tmp_path):
    whole = Classifier()
    trainer(tmp_path, [PEFT(LoRA(**LORA))], max_epochs=1).fit(whole, data())
    assert isinstance(whole.model[0], LoRALinear)


def test_missing_submodule_is_reported_with_the_ones_that_exist(tmp_path):
    with pytest.raises(ValueError, match=r"module='encoder'.*submodules of Classifier: model"):
        trainer(tmp_path, [PEFT(LoRA(**LORA), module="encoder")], max_epochs=1).fit(Classifier(), data())


def test_summary_is_printed_and_counts_are_logged_as_hyperparameters(tmp_path, caplog):
    logger = CSVLogger(tmp_path, name="run")
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")], logger=logger, max_epochs=1).fit(
            Classifier(), data()
        )
    expected_trainable = 2 * (8 + 16) + 2 * (16 + 16) + 2 * (16 + 2)
    assert "LoRALinear(Linear)" in caplog.text and f"trainable params: {expected_trainable:,}" in caplog.text
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["peft/trainable_params"] == expected_trainable
    assert hparams["peft/total_params"] == expected_trainable + (8 * 16 + 16) + (16 * 16 + 16) + (16 * 2 + 2)


@pytest.mark.parametrize("weights_only", [False, True])
def test_every_checkpoint_holds_only_trainable_tensors(tmp_path, weights_only):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=weights_only, save_top_k=-1)
    module = Classifier()
    fit = trainer(tmp_path, [PEFT(LoRA(**LORA), module="model"), checkpoint], enable_checkpointing=True)
    fit.fit(module, data())
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    if not weights_only:  # after the run only the callback hook acts, which Lightning skips for weights-only
        fit.save_checkpoint(tmp_path / "manual.ckpt", weights_only=weights_only)
        files.append(tmp_path / "manual.ckpt")
    assert len(files) == 2 + (not weights_only)
    for path in files:
        saved = torch.load(path, weights_only=True)
        assert set(saved["state_dict"]) == {f"model.{i}.lora_{ab}" for i in (0, 2, 4) for ab in "AB"}
        # weights-only files carry the record in the state dict's metadata (read by load_from_checkpoint)
        record = (
            saved["state_dict"]._metadata[""]["lightning_peft"] if weights_only else saved["lightning_peft"]
        )
        assert record["strategy"]["config"]["r"] == 2
        assert record["trainable"]["model.0.lora_A"] == [2, 8]
    assert "model.0.base_layer.weight" in module.state_dict()  # after the run state_dict() is whole again


def test_resume_from_adapter_only_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    straight = Classifier()
    initial_base = base_weights(straight)
    trainer(tmp_path / "a", [PEFT(LoRA(**LORA), module="model")], max_epochs=2).fit(straight, data())

    first = Classifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=-1)
    trainer(
        tmp_path / "b",
        [PEFT(LoRA(**LORA), module="model"), checkpoint],
        max_epochs=1,
        enable_checkpointing=True,
    ).fit(first, data())
    resumed = Classifier()
    trainer(tmp_path / "c", [PEFT(LoRA(**LORA), module="model")], max_epochs=2).fit(
        resumed, data(), ckpt_path=checkpoint.best_model_path
    )
    steps_per_epoch = len(data())
    assert len(resumed.losses) == steps_per_epoch
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(straight.losses[steps_per_epoch:]), atol=1e-6, rtol=0
    )
    for name, value in base_weights(resumed).items():
        assert torch.equal(value, initial_base[name]), f"base weight {name} changed"
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def _adapter_checkpoint(tmp_path: Path, strategy=None) -> Path:
    fit = trainer(tmp_path, [PEFT(strategy or LoRA(**LORA), module="model")], max_epochs=1)
    fit.fit(Classifier(), data())
    fit.save_checkpoint(tmp_path / "adapter.ckpt")
    return tmp_path / "adapter.ckpt"


def test_resume_with_another_rank_names_the_config_and_the_shapes(tmp_path):
    path = _adapter_checkpoint(tmp_path)
    module = Classifier()
    other = trainer(tmp_path, [PEFT(LoRA(**{**LORA, "r": 4}), module="model")], max_epochs=2)
    with pytest.raises(ValueError) as err:
        other.fit(module, data(), ckpt_path=path)
    message = str(err.value)
    assert "config.r: checkpoint 2 vs this run 4" in message
    assert "model.0.lora_A: checkpoint (2, 8) vs model (4, 8)" in message


def test_checkpoint_missing_adapter_tensors_names_them_and_leaves_weights_alone(tmp_path):
    path = _adapter_checkpoint(tmp_path)
    saved = torch.load(path, weights_only=True)
    del saved["state_dict"]["model.2.lora_B"]
    torch.save(saved, tmp_path / "broken.ckpt")
    module = Classifier()
    with pytest.raises(ValueError, match=r"missing trainable tensors \(1\): model.2.lora_B"):
        trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")]).fit(
            module, data(), ckpt_path=tmp_path / "broken.ckpt"
        )
    assert torch.count_nonzero(module.model[0].lora_B) == 0, (
        "nothing may be loaded from a checkpoint that does not fit"
    )


def test_full_checkpoint_of_the_unadapted_model_is_refused(tmp_path):
    fit = trainer(tmp_path, max_epochs=1)
    fit.fit(Classifier(), data())
    fit.save_checkpoint(tmp_path / "full.ckpt")
    with pytest.raises(ValueError, match=r"missing trainable tensors \(6\)"):
        trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")]).fit(
            Classifier(), data(), ckpt_path=tmp_path / "full.ckpt"
        )


def test_repeated_fit_validate_and_test_calls_apply_the_strategy_once(tmp_path):
    module = Classifier()
    callback = PEFT(LoRA(**LORA), module="model")
    fit = trainer(tmp_path, [callback], max_epochs=1)
    fit.fit(module, data(), data())
    fit.validate(module, data())
    trainer(tmp_path, [callback], max_epochs=2).fit(module, data())
    assert isinstance(module.model[0], LoRALinear) and isinstance(module.model[0].base_layer, nn.Linear)


def test_a_second_strategy_on_an_adapted_module_is_refused(tmp_path):
    module = Classifier()
    trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")], max_epochs=1).fit(module, data())
    with pytest.raises(ValueError, match="already adapted with another strategy"):
        trainer(tmp_path, [PEFT(LoRA(**{**LORA, "r": 8}), module="model")], max_epochs=1).fit(module, data())


def test_two_peft_callbacks_are_refused_with_the_list_form_suggested(tmp_path):
    callbacks = [PEFT(LoRA(**LORA), module="model"), PEFT(Freeze(trainable_modules=["model.4"]))]
    with pytest.raises(ValueError, match=r"PEFT\(\[LoRA"):
        trainer(tmp_path, callbacks).fit(Classifier(), data())


def test_list_of_strategies_trains_adapters_and_the_named_module(tmp_path):
    module = Classifier()
    callback = PEFT([LoRA(r=2, target_modules=["0", "2"]), Freeze(trainable_modules=["4"])], module="model")
    trainer(tmp_path, [callback], max_epochs=1).fit(module, data())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {
        "model.0.lora_A",
        "model.0.lora_B",
        "model.2.lora_A",
        "model.2.lora_B",
        "model.4.weight",
        "model.4.bias",
    }


@pytest.mark.parametrize("build_in", ["init", "setup", "configure_model"])
def test_load_from_checkpoint_rebuilds_the_adapted_module(tmp_path, build_in):
    module = Classifier(build_in)
    fit = trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")], max_epochs=2)
    fit.fit(module, data())
    fit.save_checkpoint(tmp_path / "adapter.ckpt")
    loaded = load_from_checkpoint(Classifier, tmp_path / "adapter.ckpt")
    x = torch.randn(5, 8)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), module.eval()(x), atol=0, rtol=0)


def test_load_from_checkpoint_refuses_a_checkpoint_without_peft_metadata(tmp_path):
    fit = trainer(tmp_path, max_epochs=1)
    fit.fit(Classifier(), data())
    fit.save_checkpoint(tmp_path / "full.ckpt")
    with pytest.raises(ValueError, match="not written with the PEFT callback"):
        load_from_checkpoint(Classifier, tmp_path / "full.ckpt")


def test_load_from_checkpoint_reports_a_truncated_file(tmp_path):
    path = _adapter_checkpoint(tmp_path)
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_from_checkpoint(Classifier, tmp_path / "cut.ckpt")


def _no_callback_inside(module: nn.Module) -> None:
    """Nothing of a PEFT callback on ``module``: no method replaced on the instance, no module hook."""
    for name in ("configure_model", "on_save_checkpoint", "on_load_checkpoint", "training_step"):
        assert name not in module.__dict__, name
    assert not module._state_dict_hooks and not module._load_state_dict_pre_hooks


def test_a_second_trainer_with_another_peft_callback_acts_through_its_own_hooks(tmp_path):
    module = Classifier()
    trainer(tmp_path / "a", [PEFT(LoRA(**LORA), module="model")], max_epochs=1).fit(module, data())
    _no_callback_inside(module)  # the first run left nothing behind
    second = PEFT(LoRA(**LORA), module="model")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    fit = trainer(tmp_path / "b", [second, checkpoint], max_epochs=1, enable_checkpointing=True)
    fit.fit(module, data())
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert set(saved) == {f"model.{i}.lora_{ab}" for i in (0, 2, 4) for ab in "AB"}
    assert isinstance(module.model[0].base_layer, nn.Linear)  # adapted once, not twice
    _no_callback_inside(module)


class HookedClassifier(Classifier):
    """A user's module with its own checkpoint and configure_model hooks."""

    calls: list[str]

    def configure_model(self) -> None:
        self.__dict__.setdefault("calls", []).append("configure_model")
        super().configure_model()

    def on_save_checkpoint(self, checkpoint):
        self.__dict__.setdefault("calls", []).append("on_save_checkpoint")
        checkpoint["mine"] = 42

    def on_load_checkpoint(self, checkpoint):
        self.__dict__.setdefault("calls", []).append(f"on_load_checkpoint:{checkpoint.get('mine')}")


@pytest.mark.parametrize("build_in", ["init", "configure_model"])
def test_the_modules_own_hooks_still_run(tmp_path, build_in):
    module = HookedClassifier(build_in)
    calls = module.__dict__.setdefault("calls", [])

    def save_on_the_instance(checkpoint):  # set on the instance, as other code may do: not replaced
        calls.append("instance on_save_checkpoint")
        checkpoint["mine"] = 43

    module.on_save_checkpoint = save_on_the_instance
    fit = trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")], max_epochs=1)
    fit.fit(module, data())
    fit.save_checkpoint(tmp_path / "a.ckpt")
    assert calls == ["configure_model", "instance on_save_checkpoint"]
    assert torch.load(tmp_path / "a.ckpt", weights_only=True)["mine"] == 43
    resumed = HookedClassifier(build_in)
    trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")], max_epochs=2).fit(
        resumed, data(), ckpt_path=tmp_path / "a.ckpt"
    )
    assert resumed.calls[:2] == ["configure_model", "on_load_checkpoint:43"]
    assert isinstance(resumed.model[0], LoRALinear)


def test_a_deep_copy_after_fit_carries_no_callback(tmp_path):
    import copy

    module = Classifier()
    trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")], max_epochs=1).fit(module, data())
    twin = copy.deepcopy(module)
    _no_callback_inside(twin)
    assert "model.0.base_layer.weight" in twin.state_dict()


class CopyDuringFit(L.Callback):
    """What an EMA or SWA callback does: a deep copy of the module during training."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.copy = __import__("copy").deepcopy(pl_module)


def test_a_deep_copy_during_fit_shares_the_hooks_and_keeps_a_whole_state_dict(tmp_path):
    copier = CopyDuringFit()
    callback = PEFT(LoRA(**LORA), module="model")
    module = Classifier()
    trainer(tmp_path, [callback, copier], max_epochs=1).fit(module, data())
    hooks = list(copier.copy._state_dict_hooks.values())
    assert hooks and all(hook.callback is callback for hook in hooks)  # shared, not copies of the callback
    assert "model.0.base_layer.weight" in copier.copy.state_dict()  # the copy is not pruned


class FilledAfterAssignment(Classifier):
    """Assigns an empty container in configure_model and fills it afterwards."""

    def configure_model(self) -> None:
        if not hasattr(self, "model"):
            self.model = nn.Sequential()
            self.model.append(nn.Linear(8, 2))


def test_a_model_that_gets_its_parameters_after_assignment_is_refused_with_the_reason(tmp_path):
    with pytest.raises(
        ValueError, match=r"found the model only after configure_optimizers.*build the model, then"
    ):
        trainer(tmp_path, [PEFT(LoRA(**LORA), module="model")], max_epochs=1).fit(
            FilledAfterAssignment("configure_model"), data()
        )
