"""Technique callbacks that compose with PEFT: distillation, weight penalties, NEFTune, layer-wise lr."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import VOCAB, tiny_llama
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import PEFT, LoRA
from lightning_peft.callbacks.distill import Distillation
from lightning_peft.callbacks.layerwise_lr import LayerwiseLR, layerwise_param_groups
from lightning_peft.callbacks.noise import NEFTune
from lightning_peft.callbacks.regularization import AdapterRegularization
from lightning_peft.strategies.base import adapter_parameter_names


class Net(L.LightningModule):
    """A user's module: ``task`` says which loss ``training_step`` returns."""

    def __init__(self, task: str = "ce", lr: float = 0.1, optimizer: str = "sgd", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        self.task, self.lr, self.optimizer = task, lr, optimizer
        self.direction = torch.linspace(-1, 1, 16 * 8).view(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.task == "zero":  # a loss whose gradient is zero: only the penalty moves the weights
            return 0.0 * logits.sum()
        if self.task == "linear":  # gradient -direction on the first weight
            return -(self.direction * self.model[0].weight).sum() + 0.0 * logits.sum()
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.Adam(params, lr=self.lr)


class CausalLM(L.LightningModule):
    def __init__(self, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.model = tiny_llama().train()
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def vectors(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(
        TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()), batch_size=batch_size
    )


def sequences(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(torch.randint(3, VOCAB, (n, 10), generator=g), batch_size=4)


def fit(tmp_path: Path, module: L.LightningModule, data: DataLoader, callbacks=(), **kwargs) -> L.Trainer:
    options = {
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "default_root_dir": tmp_path,
    }
    trainer = L.Trainer(callbacks=list(callbacks), **{**options, **kwargs})
    trainer.fit(module, data)
    return trainer


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    p_t, p_s = torch.softmax(teacher / t, -1), torch.softmax(student / t, -1)
    return (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * t * t


class LossRecorder(Callback):
    """Before each step: the expected loss computed by hand; after it: the loss Lightning backpropagated."""

    def __init__(self, expected) -> None:
        self.expected_fn, self.expected, self.returned = expected, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            self.expected.append(self.expected_fn(pl_module, batch).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.returned.append(outputs["loss"].item())


# --- distillation -------------------------------------------------------------------------------


def test_distillation_loss_is_weighted_task_loss_plus_t2_kl(tmp_path):
    teacher = Net(seed=1).model
    alpha, t = 0.3, 2.0

    def expected(pl_module, batch):
        x, y = batch
        student = pl_module(x)
        task = nn.functional.cross_entropy(student, y)
        return (1 - alpha) * task + alpha * kl_by_hand(student, teacher(x), t)

    recorder = LossRecorder(expected)
    fit(tmp_path, Net(), vectors(), [Distillation(teacher, alpha=alpha, temperature=t), recorder])
    assert len(recorder.returned) == 4
    assert recorder.returned == pytest.approx(recorder.expected, rel=1e-5)


def test_distillation_moves_the_student_toward_the_teacher(tmp_path):
    teacher = Net(seed=1).model
    x = torch.cat([b[0] for b in vectors()])

    def kl_to_teacher(module: Net) -> float:
        with torch.no_grad():
            return kl_by_hand(module(x), teacher(x), 1.0).item()

    plain, distilled = Net(lr=0.05, optimizer="adam"), Net(lr=0.05, optimizer="adam")
    before = kl_to_teacher(plain)
    fit(tmp_path, plain, vectors(), max_epochs=3)
    fit(tmp_path, distilled, vectors(), [Distillation(teacher, alpha=0.9, temperature=1.0)], max_epochs=3)
    assert kl_to_teacher(distilled) < 0.5 * before
    assert kl_to_teacher(distilled) < 0.5 * kl_to_teacher(plain)


class KLRecorder(Callback):
    def __init__(self, distillation: Distillation) -> None:
        self.distillation, self.kls = distillation, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.kls.append(self.distillation.last_kl.item())


def test_base_teacher_is_the_model_without_adapters_and_no_copy(tmp_path):
    module = CausalLM(lr=5e-2)
    distill = Distillation(teacher="base", module="model")
    regularize = AdapterRegularization(l2_sp=1e-3, parameters="adapters")
    recorder = KLRecorder(distill)
    peft = PEFT(LoRA(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), module="model", verbose=False)
    fit(tmp_path, module, sequences(), [peft, distill, regularize, recorder], max_epochs=2)
    # LoRA starts as the identity: the student is exactly the base model at the first step, then departs
    assert recorder.kls[0] == pytest.approx(0.0, abs=1e-7)
    assert recorder.kls[-1] > 1e-4
    # no second model: every parameter the run saw belongs to the module, and the callback holds none
    tensors = {id(t) for t in module.parameters()}
    assert not any(isinstance(v, nn.Module) for v in vars(distill).values())
    assert len(tensors) == len(list(tiny_llama().parameters())) + 4 * 2
    # both wrappers of training_step are gone after the fit
    assert "training_step" not in module.__dict__


@pytest.mark.filterwarnings("ignore:Distillation.*has no adapters")
def test_distillation_names_the_submodule_when_training_step_never_calls_the_target(tmp_path):
    module = CausalLM()
    with pytest.raises(ValueError, match=r"never called CausalLM.*module='model'.*submodules: model"):
        fit(tmp_path, module, sequences(), [Distillation()], max_steps=1)


# --- weight penalties ---------------------------------------------------------------------------


def test_l1_and_l2_penalties_follow_hand_computed_sgd_steps(tmp_path):
    lr, l1, l2, steps = 0.1, 0.02, 0.5, 4
    module = Net(task="zero", lr=lr)
    with torch.no_grad():
        module.model[0].weight[0, :4] = torch.tensor([0.5, -0.2, 0.005, -0.001])  # two small weights
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(tmp_path, module, vectors(), [AdapterRegularization(l1=l1, l2=l2)])
    for name, param in module.named_parameters():
        w = start[name].clone()
        for _ in range(steps):  # gradient of l1*|w| + l2*w^2 is l1*sign(w) + 2*l2*w
            w = w - lr * (l1 * torch.sign(w) + 2 * l2 * w)
        torch.testing.assert_close(param.detach(), w, atol=1e-6, rtol=1e-5)
    # L1 pushes the small weights across zero: they end near zero, not at their start
    assert module.model[0].weight[0, 2:4].abs().max() < 0.005


def test_l2_sp_pulls_toward_the_start_values_by_the_hand_computed_amount(tmp_path):
    lr, l2_sp, steps = 0.1, 4.0, 4
    plain, held = Net(task="linear", lr=lr), Net(task="linear", lr=lr)
    start = held.model[0].weight.detach().clone()
    fit(tmp_path, plain, vectors())
    fit(tmp_path, held, vectors(), [AdapterRegularization(l2_sp=l2_sp)])
    drift = torch.zeros_like(start)
    for _ in range(steps):  # d <- d - lr * (-direction + 2 * l2_sp * d)
        drift = drift - lr * (-held.direction + 2 * l2_sp * drift)
    torch.testing.assert_close(held.model[0].weight.detach() - start, drift, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plain.model[0].weight.detach() - start, steps * lr * held.direction)
    assert drift.norm() < 0.5 * (steps * lr * held.direction).norm()


def test_regularization_covers_adapters_only_when_asked():
    module = Net()
    LoRA(r=2, lora_alpha=4, target_modules=["0"]).apply(module.model)
    module.model[2].bias.requires_grad_(True)
    adapters = set(AdapterRegularization(parameters="adapters").regularized(module))
    trainable = set(AdapterRegularization().regularized(module))
    assert adapters == set(adapter_parameter_names(module)) and len(adapters) == 2
    assert trainable == adapters | {"model.2.bias"}


def test_l2_sp_start_values_survive_a_resume():
    callback, restored = AdapterRegularization(l2_sp=1.0), AdapterRegularization(l2_sp=1.0)
    callback.start = {"w": torch.ones(2)}
    restored.load_state_dict(callback.state_dict())
    assert torch.equal(restored.start["w"], torch.ones(2))


# --- NEFTune ------------------------------------------------------------------------------------


def noisy_embeddings(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """What the first decoder block receives: the input embeddings after every hook."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        model(input_ids=ids, **kwargs)
    finally:
        handle.remove()
    return seen[0]


def test_neftune_noise_is_uniform_within_alpha_over_sqrt_length_times_dim(token_ids):
    model, alpha = tiny_llama().train(), 5.0
    NEFTune(alpha=alpha).attach(model)
    clean = model.get_input_embeddings().weight[token_ids].detach()  # (B, L, d)
    mask = torch.ones_like(token_ids)
    mask[1, 6:] = 0  # the second sample has 6 real tokens
    noise = noisy_embeddings(model, token_ids, attention_mask=mask) - clean
    d = clean.shape[-1]
    for sample, length in ((0, 10), (1, 6)):
        bound = alpha / math.sqrt(length * d)
        largest = noise[sample].abs().max().item()
        assert 0.95 * bound < largest <= bound * (1 + 1e-6)
    # without a mask every sample counts the padded length
    noise = noisy_embeddings(model, token_ids) - clean
    assert noise.abs().max().item() <= alpha / math.sqrt(10 * d) * (1 + 1e-6)


def test_neftune_leaves_eval_mode_bit_identical(token_ids):
    model = tiny_llama()
    with torch.no_grad():
        reference = model(input_ids=token_ids).logits
        NEFTune(alpha=15.0).attach(model)
        assert torch.equal(model(input_ids=token_ids).logits, reference)
        assert not torch.equal(model.train()(input_ids=token_ids).logits, reference)


class HookCounter(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.during = len(pl_module.model.get_input_embeddings()._forward_hooks)


def test_neftune_hooks_are_on_during_training_and_removed_at_teardown(tmp_path):
    module = CausalLM()
    embeddings = module.model.get_input_embeddings()
    counter = HookCounter()
    fit(tmp_path, module, sequences(), [NEFTune(module="model"), counter], max_steps=1)
    assert counter.during == 1
    assert len(embeddings._forward_hooks) == 0 and len(module.model._forward_pre_hooks) == 0


# --- layer-wise learning rates ------------------------------------------------------------------


def lr_table(model: nn.Module, base: float, decay: float) -> dict[str, float]:
    """Hand-written: embeddings below block 0, block 0 one step below block 1, norm and head at base."""
    table = {}
    for name, _ in model.named_parameters():
        if name.startswith("model.embed_tokens"):
            table[name] = base * decay**2
        elif name.startswith("model.layers.0."):
            table[name] = base * decay
        else:  # model.layers.1.*, model.norm, lm_head
            table[name] = base
    return table


def test_layerwise_param_groups_match_the_hand_table_on_tiny_llama():
    model = tiny_llama()
    groups = layerwise_param_groups(model, base_lr=1e-2, decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    got = {n: lr_of[id(p)] for n, p in model.named_parameters()}
    assert got == pytest.approx(lr_table(model, 1e-2, 0.5))
    assert len(groups) == 3


def test_layerwise_callback_splits_optimizer_groups_keeping_hyperparameters(tmp_path):
    module = CausalLM(lr=1e-2, weight_decay=0.05)
    peft = PEFT(LoRA(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]), module="model", verbose=False)
    trainer = fit(tmp_path, module, sequences(), [peft, LayerwiseLR(decay=0.5, module="model")], max_steps=1)
    groups = trainer.optimizers[0].param_groups
    got = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = {id(p): n for n, p in module.model.named_parameters() if p.requires_grad}
    table = lr_table(module.model, 1e-2, 0.5)
    assert set(got) == set(names)
    assert {names[i]: lr for i, lr in got.items()} == pytest.approx(
        {names[i]: table[names[i]] for i in names}
    )
    assert {g["weight_decay"] for g in groups} == {0.05} and len(groups) == 2


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "problems"),
    [
        (lambda: Distillation(teacher="big", alpha=2, temperature=0), ["teacher", "alpha", "temperature"]),
        (lambda: AdapterRegularization(l1=-1, l2_sp=-1, parameters="all"), ["l1", "l2_sp", "parameters"]),
        (lambda: NEFTune(alpha=0, module="a..b"), ["alpha", "module"]),
        (lambda: LayerwiseLR(decay=1.5, base_lr=-1), ["decay", "base_lr"]),
    ],
    ids=["distillation", "regularization", "neftune", "layerwise_lr"],
)
def test_every_bad_argument_is_reported_in_one_error(build, problems):
    with pytest.raises(ValueError) as error:
        build()
    for problem in problems:
        assert f"{problem} must" in str(error.value)


class IteratorNet(Net):
    """A user's module whose ``training_step`` takes Lightning's ``dataloader_iter`` flavour."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[str] = []

    def training_step(self, dataloader_iter):
        self.received.append(type(dataloader_iter).__name__)
        batch, _, _ = next(dataloader_iter)
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


@pytest.mark.parametrize("technique", ["regularization", "distillation", "both"])
def test_a_dataloader_iter_training_step_still_gets_the_iterator_under_loss_terms(tmp_path, technique):
    module = IteratorNet()
    callbacks = {
        "regularization": [AdapterRegularization(l2=0.1)],
        "distillation": [
            PEFT(LoRA(r=2, target_modules=["0", "2"]), module="model"),
            Distillation(module="model"),
        ],
        "both": [
            PEFT(LoRA(r=2, target_modules=["0", "2"]), module="model"),
            Distillation(module="model"),
            AdapterRegularization(l2=0.1),
        ],
    }[technique]
    fit(tmp_path, module, vectors(n=16), callbacks)
    assert module.received and all(name != "list" for name in module.received)
    assert set(module.received) == {"_DataFetcherWrapper"}
