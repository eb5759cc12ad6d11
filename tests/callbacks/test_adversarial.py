"""AdversarialTraining: FGM, PGD and FreeLB on the input embeddings, checked against hand computation."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_llama
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import IA3, PEFT, AdapterRegularization, AdversarialTraining, LoRA, PromptTuning

# the tiny models come in eval mode (no dropout): deterministic gradients to compare with the hand's
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")


class Tuned(L.LightningModule):
    """A user's module: a causal LM (``task="causal"``) or a sequence classifier (``"classify"``)."""

    def __init__(
        self,
        model: nn.Module,
        task: str = "causal",
        output: str = "tensor",
        lr: float = 0.1,
        adam: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.task, self.output, self.lr, self.adam = model, task, output, lr, adam
        self.losses: list[torch.Tensor] = []  # every call of training_step, re-runs included
        self.logged: list[str] = []  # names that reached LightningModule.log
        self.val_losses: list[torch.Tensor] = []

    def loss(self, batch) -> torch.Tensor:
        if self.task == "causal":
            return self.model(input_ids=batch, labels=batch).loss
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.losses.append(loss.detach())
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=4)
        return {"loss": loss} if self.output == "dict" else loss

    def validation_step(self, batch, batch_idx):
        self.val_losses.append(self.loss(batch))

    def log(self, name, *args, **kwargs):
        self.logged.append(name)
        super().log(name, *args, **kwargs)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr) if self.adam else torch.optim.SGD(params, lr=self.lr)


class Grads(Callback):
    """The model before the first step; the gradients after Lightning's backward and before each step.

    Listed before AdversarialTraining, its ``on_after_backward`` sees the clean gradients only.
    """

    def __init__(self) -> None:
        self.start: nn.Module | None = None
        self.clean: list[dict[str, torch.Tensor]] = []
        self.total: list[dict[str, torch.Tensor]] = []
        self.hooks: list[int] = []  # forward hooks on the input embeddings, at fit start then at each step

    def on_fit_start(self, trainer, pl_module):
        self.hooks.append(len(pl_module.model.get_input_embeddings()._forward_hooks))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = copy.deepcopy(pl_module.model)

    def on_after_backward(self, trainer, pl_module):
        self.clean.append(trainable_grads(pl_module.model))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.total.append(trainable_grads(pl_module.model))
        self.hooks.append(len(pl_module.model.get_input_embeddings()._forward_hooks))


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def sequences(n: int = 4, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(torch.randint(3, VOCAB, (n, 10), generator=g), batch_size=batch_size)


def labelled(n: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, 10), generator=g)
    return DataLoader(TensorDataset(ids, torch.arange(n) % 2), batch_size=4)


def lora() -> PEFT:
    # both LoRA matrices random, so that every adapter weight gets a gradient at the first step
    strategy = LoRA(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return PEFT(strategy, module="model", verbose=False)


def fit(
    tmp_path: Path, module: L.LightningModule, data: DataLoader, callbacks=(), val=None, **kwargs
) -> L.Trainer:
    options = {
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    trainer = L.Trainer(callbacks=list(callbacks), **{**options, **kwargs})
    trainer.fit(module, data, val)
    return trainer


# --- the reference, written from the papers' equations ------------------------------------------


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=(1, 2), keepdim=True)


def into_ball(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v * torch.clamp(eps / v.norm(dim=(1, 2), keepdim=True), max=1.0)


def by_hand(model: nn.Module, ids: torch.Tensor, method: str, eps: float, alpha: float, steps: int, w: float):
    """(clean + adversarial gradients of the trainable parameters, final delta, clean embedding gradient)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    x = model.get_input_embeddings()(ids).detach()  # (B, T, d)

    def loss(delta: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=x + delta, labels=ids).loss

    zero = torch.zeros_like(x, requires_grad=True)
    g, *total = torch.autograd.grad(loss(zero), [zero, *params])
    g0, delta = g, torch.zeros_like(x)
    if method == "fgm":
        delta = eps * unit(g)
        total = [t + w * a for t, a in zip(total, torch.autograd.grad(loss(delta), params), strict=True)]
    elif method == "pgd":
        for k in range(steps):
            delta = into_ball(delta + alpha * unit(g), eps)
            if k < steps - 1:
                leaf = delta.clone().requires_grad_()
                (g,) = torch.autograd.grad(loss(leaf), [leaf])
        total = [t + w * a for t, a in zip(total, torch.autograd.grad(loss(delta), params), strict=True)]
    else:  # freelb: the mean over every step's loss
        for _ in range(steps):
            delta = into_ball(delta + alpha * unit(g), eps)
            leaf = delta.clone().requires_grad_()
            g, *adv = torch.autograd.grad(loss(leaf), [leaf, *params])
            total = [t + w / steps * a for t, a in zip(total, adv, strict=True)]
    return dict(zip(names, total, strict=True)), delta, g0


# --- the perturbation ---------------------------------------------------------------------------


def test_fgm_delta_is_epsilon_times_the_normalised_clean_embedding_gradient(tmp_path):
    eps = 0.7
    adversarial, grads = AdversarialTraining("fgm", epsilon=eps, module="model"), Grads()
    fit(tmp_path, Tuned(tiny_llama()), sequences(), [lora(), grads, adversarial], max_steps=1)
    _, _, g = by_hand(grads.start, next(iter(sequences())), "fgm", eps, eps, 1, 1.0)
    (delta,) = adversarial.perturbations
    torch.testing.assert_close(delta, eps * g / g.norm(dim=(1, 2), keepdim=True), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(delta.norm(dim=(1, 2)), torch.full((4,), eps))


@pytest.mark.parametrize(
    ("method", "norm"),
    [
        ("fgm", "l2"),
        ("fgm", "token_l2"),
        ("fgm", "linf"),
        ("pgd", "l2"),
        ("pgd", "linf"),
        ("freelb", "token_l2"),
    ],
)
def test_perturbation_stays_inside_the_epsilon_ball(tmp_path, method, norm):
    eps = 0.05 if norm == "linf" else 0.5
    adversarial = AdversarialTraining(method, epsilon=eps, norm=norm, module="model")
    fit(tmp_path, Tuned(tiny_llama()), sequences(), [lora(), adversarial], max_steps=1)
    (delta,) = adversarial.perturbations  # (B, T, d)
    sizes = {
        "l2": delta.norm(dim=(1, 2)),
        "token_l2": delta.norm(dim=-1),
        "linf": delta.abs().amax(dim=(1, 2)),
    }
    size = sizes[norm]
    assert size.max().item() <= eps + 1e-6
    if method == "fgm":  # one full step: on the sphere, except tokens whose gradient is zero
        on_sphere = size > 1e-6
        assert on_sphere.float().mean() > 0.8
        torch.testing.assert_close(size[on_sphere], torch.full_like(size[on_sphere], eps))
    else:  # steps of 2.5 * eps / 3 go past the boundary: projected back onto it
        assert size.max().item() > 0.99 * eps


# --- the gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "accumulate", "output"),
    [("fgm", 1, "tensor"), ("pgd", 1, "dict"), ("freelb", 1, "tensor"), ("fgm", 2, "dict")],
)
def test_adapter_gradients_are_clean_plus_weighted_adversarial_as_by_hand(
    tmp_path, method, accumulate, output
):
    eps, w = 0.5, 0.7
    steps = None if method == "fgm" else 3
    adversarial, grads = (
        AdversarialTraining(method, epsilon=eps, steps=steps, adv_weight=w, module="model"),
        Grads(),
    )
    data = sequences(n=4 * accumulate)
    module = Tuned(tiny_llama(), output=output)
    fit(tmp_path, module, data, [lora(), grads, adversarial], max_steps=1, accumulate_grad_batches=accumulate)
    got = grads.total[-1]
    expected: dict[str, torch.Tensor] = {}
    for ids in data:  # Lightning divides each micro-batch's loss by accumulate_grad_batches
        total, _, _ = by_hand(grads.start, ids, method, eps, adversarial.alpha, adversarial.steps, w)
        expected = {n: expected.get(n, 0) + t / accumulate for n, t in total.items()}
    assert set(got) == set(expected) and len(got) == 8  # A and B of q_proj and v_proj in 2 layers
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)
    assert max((got[n] - grads.clean[-1][n]).abs().max().item() for n in got) > 1e-4


def test_other_callbacks_loss_terms_count_once(tmp_path):
    eps, l2 = 0.5, 0.3
    grads = Grads()
    adversarial = AdversarialTraining("fgm", epsilon=eps, module="model")
    module = Tuned(tiny_llama())
    fit(
        tmp_path, module, sequences(), [lora(), AdapterRegularization(l2=l2), grads, adversarial], max_steps=1
    )
    total, _, _ = by_hand(grads.start, next(iter(sequences())), "fgm", eps, eps, 1, 1.0)
    start = dict(grads.start.named_parameters())
    for name, got in grads.total[
        0
    ].items():  # the penalty's gradient 2 * l2 * w once, not (1 + adv_weight) times
        torch.testing.assert_close(got, total[name] + 2 * l2 * start[name].detach(), atol=1e-5, rtol=1e-4)
    assert module.logged.count("train_reg_penalty") == 1
    assert "training_step" not in vars(module)


@pytest.mark.parametrize(
    ("build", "strategy", "task", "data"),
    [
        (tiny_llama, LoRA(r=2, target_modules=["q_proj", "v_proj"]), "causal", sequences),
        (tiny_llama, IA3(), "causal", sequences),
        (tiny_bert, PromptTuning(num_virtual_tokens=3), "classify", labelled),
    ],
    ids=["lora", "ia3", "prompt_tuning"],
)
def test_adversarial_gradient_reaches_every_kind_of_adapter(tmp_path, build, strategy, task, data):
    torch.manual_seed(0)
    grads = Grads()
    peft = PEFT(strategy, module="model", verbose=False)
    adversarial = AdversarialTraining("pgd", epsilon=1.0, steps=2, module="model")
    fit(tmp_path, Tuned(build(), task=task), data(), [peft, grads, adversarial], max_steps=1)
    clean, total = grads.clean[0], grads.total[0]
    assert clean and set(clean) == set(total)
    assert all(not n.startswith(("model.embed", "bert.embeddings")) for n in total)  # embeddings stay frozen
    extra = torch.cat([(total[n] - clean[n]).flatten() for n in total])
    assert extra.abs().max().item() > 1e-5
    assert torch.cat([t.flatten() for t in total.values()]).abs().max().item() > 1e-5


# --- Lightning glue -----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "passes"), [("fgm", 1), ("pgd", 3), ("freelb", 3)])
def test_training_step_runs_once_per_pass_and_logs_once(tmp_path, method, passes):
    module, grads = Tuned(tiny_llama()), Grads()
    embeddings = module.model.get_input_embeddings()
    steps = None if method == "fgm" else 3
    adversarial = AdversarialTraining(method, epsilon=0.5, steps=steps, module="model")
    trainer = fit(tmp_path, module, sequences(n=8), [lora(), grads, adversarial], max_steps=2)
    assert len(module.losses) == 2 * (1 + passes)
    # the user's metric is logged by the clean pass only: its epoch mean is the clean losses' mean
    assert module.logged == ["train_loss", "train_adv_loss"] * 2
    clean = torch.stack(module.losses[:: 1 + passes])
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(clean.mean().item(), rel=1e-6)
    assert "train_adv_loss" in trainer.callback_metrics
    # one hook during each step, gone afterwards (LoRA's own hook stays), nothing left on the module
    before = grads.hooks[0]
    assert grads.hooks[1:] == [before + 1, before + 1]
    assert len(embeddings._forward_hooks) == before
    assert not {"training_step", "log", "log_dict"} & set(vars(module))


def test_validation_sees_the_model_without_perturbation(tmp_path):
    module = Tuned(tiny_llama())
    data = sequences(n=8)
    fit(tmp_path, module, data, [lora(), AdversarialTraining("pgd", epsilon=1.0, module="model")], val=data)
    # the validation run at the end of fit used the final weights: redoing it without the callback agrees
    during = torch.stack(module.val_losses[-2:])
    with torch.no_grad():
        after = torch.stack([module.loss(batch) for batch in data])
    assert torch.equal(during, after)


def test_training_with_adversarial_terms_still_lowers_the_loss(tmp_path):
    module = Tuned(tiny_llama(), lr=0.02, adam=True)
    batch = next(iter(sequences()))
    repeated = DataLoader([batch[i] for i in range(4)] * 10, batch_size=4)
    peft = PEFT(LoRA(r=4, lora_alpha=8), module="model", verbose=False)
    # epsilon is small next to the tiny model's embeddings (about 0.36 per sequence)
    fit(
        tmp_path,
        module,
        repeated,
        [peft, AdversarialTraining("freelb", epsilon=0.05, steps=2, module="model")],
    )
    clean = torch.stack(module.losses[::3])
    assert len(clean) == 10
    assert clean[-1].item() < clean[0].item() - 0.2
    assert (clean[1:] < clean[0]).all()


def test_a_model_without_input_embeddings_is_named(tmp_path):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(10, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch.float()).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="found no model with get_input_embeddings"):
        fit(tmp_path, Plain(), sequences(), [AdversarialTraining()], max_steps=1)


def test_invalid_arguments_are_reported_together():
    with pytest.raises(ValueError) as error:
        AdversarialTraining("fgsm", epsilon=0, alpha=-1, steps=0, adv_weight=True, norm="l1", module="a..b")
    message = str(error.value)
    for name in ("method", "epsilon", "alpha", "steps", "adv_weight", "norm", "module"):
        assert name in message
    with pytest.raises(ValueError, match="alpha and steps are for 'pgd' and 'freelb'"):
        AdversarialTraining("fgm", steps=3)


def test_defaults_of_the_step_size_and_count():
    pgd = AdversarialTraining("pgd", epsilon=0.3)
    assert (pgd.steps, pgd.alpha) == (3, pytest.approx(0.25))
    fgm = AdversarialTraining("fgm", epsilon=0.3)
    assert (fgm.steps, fgm.alpha) == (1, 0.3)
