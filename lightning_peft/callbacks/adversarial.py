"""Adversarial training on the input embeddings: FGM, PGD and FreeLB.

A perturbation ``delta`` of the input embeddings ``x`` (the output of ``get_input_embeddings()``) is
pushed up the loss, kept inside a ball of radius ``epsilon``, and the loss at ``x + delta`` joins the
clean one::

    g_0 = dL(x) / dx                                        # from the normal backward, no extra cost
    delta_k = Proj_eps(delta_{k-1} + alpha * g_{k-1} / ||g_{k-1}||),     delta_0 = 0
    g_k = dL(x + delta_k) / d delta_k

    FGM    (Miyato et al. 2017):  one step, alpha = epsilon:     loss = L(x) + w * L(x + delta_1)
    PGD    (Madry et al. 2018):   K steps, only the last counts: loss = L(x) + w * L(x + delta_K)
    FreeLB (Zhu et al. 2020):     K steps, each one counts:      loss = L(x) + w * mean_k L(x + delta_k)

``w`` is ``adv_weight``; ``delta`` is a constant for the parameters (no gradient flows through it).
FreeLB here keeps the clean loss and starts from ``delta_0 = 0`` (the paper starts from random noise and
drops the clean loss); PGD's ascent passes compute the gradient for ``delta`` only.

How it runs with an unchanged ``training_step`` and automatic optimization:

- ``on_train_batch_start``: keep the batch; put a forward hook on the input embeddings that records
  the gradient of the loss with respect to their output (making the output require grad when the
  embeddings are frozen, so that the gradient exists);
- Lightning runs ``training_step`` and ``backward``: the clean gradients are in place;
- ``on_after_backward``: the ascent steps and the adversarial passes re-run the user's own
  ``training_step`` on the same batch, the hook adding ``delta`` to the embedding output; the weighted
  adversarial loss, divided by ``accumulate_grad_batches`` as Lightning divides the clean one, is
  backpropagated into the same ``.grad`` (AMP's loss scaler applied);
- ``on_train_batch_end``: the hook is removed. Validation, test and prediction never see it.

The re-run calls the module's own ``training_step``: loss terms that other callbacks add to it
(distillation, weight penalties; see ``loss_terms``) count once, on the clean pass, and
``self.log``/``self.log_dict`` do nothing during re-runs, so metrics are logged once. Other side effects
of ``training_step`` (counters, metric objects updated by hand) do happen on every re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_peft.callbacks import loss_terms
from lightning_peft.callbacks.module_path import missing_module_error, module_path_problems, resolve_module
from lightning_peft.strategies.base import find_input_embeddings

Method = Literal["fgm", "pgd", "freelb"]
Norm = Literal["l2", "token_l2", "linf"]
_METHODS = ("fgm", "pgd", "freelb")
_NORMS = ("l2", "token_l2", "linf")
_MISSING = object()


def _norm_dims(tensor: torch.Tensor, norm: Norm) -> tuple[int, ...]:
    """The dimensions one norm is taken over: every one but the batch's ("l2"), or the hidden one."""
    if norm == "token_l2":
        return (tensor.dim() - 1,)
    return tuple(range(1, tensor.dim())) or (0,)


def ascent_direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """``grad`` scaled to unit norm (per example or per token), or its sign for ``"linf"``."""
    if norm == "linf":
        return grad.sign()
    size = grad.float().norm(dim=_norm_dims(grad, norm), keepdim=True)  # (B, 1, 1) or (B, T, 1)
    return grad / size.clamp_min(1e-12).to(grad.dtype)  # a zero gradient gives a zero step


def project(delta: torch.Tensor, epsilon: float, norm: Norm) -> torch.Tensor:
    """``delta`` brought back into the ball of radius ``epsilon`` (per example or per token for l2)."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    size = delta.float().norm(dim=_norm_dims(delta, norm), keepdim=True)
    return delta * (epsilon / size.clamp_min(epsilon)).to(delta.dtype)  # min(1, eps / ||delta||)


class _EmbeddingHook:
    """Forward hook on the input embeddings: records their output's gradient, or adds the perturbation.

    The model may call its embeddings more than once per step; each call with grad enabled is one
    entry, and a re-run must make the same calls in the same order.
    """

    def __init__(self) -> None:
        self.grads: list[torch.Tensor | None] = []
        self.deltas: list[torch.Tensor] | None = None  # None: record
        self.used = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor) or not torch.is_grad_enabled():
            return None
        if self.deltas is None:
            if not output.requires_grad:  # frozen embeddings: a leaf, so its gradient can be asked for
                output.requires_grad_(True)
            output.register_hook(partial(_keep_into, self.grads, len(self.grads)))
            self.grads.append(None)
            return None
        if self.used >= len(self.deltas) or self.deltas[self.used].shape != output.shape:
            raise ValueError(
                "AdversarialTraining: the re-run training_step called the input embeddings differently from "
                "the first run (another number of calls or another shape); the step must be repeatable"
            )
        delta = self.deltas[self.used]
        self.used += 1
        return output + delta.to(output.dtype)

    def record(self) -> None:
        self.grads, self.deltas, self.used = [], None, 0

    def perturb(self, deltas: list[torch.Tensor]) -> None:
        self.deltas, self.used = deltas, 0


def _keep_into(grads: list[torch.Tensor | None], index: int, grad: torch.Tensor) -> None:
    grads[index] = grad.detach()


def _loss_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    return None


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


def users_training_step(pl_module: pl.LightningModule) -> Callable[..., Any] | None:
    """The module's own ``training_step`` under the loss terms other callbacks wrapped around it.

    None when that is the class's method (nothing is set on the instance).
    """
    link = pl_module.__dict__.get("training_step")
    while isinstance(link, partial) and link.func is loss_terms._step_with:
        link = link.args[2]
    return link


@contextmanager
def _quiet_own_step(pl_module: pl.LightningModule) -> Iterator[None]:
    """While inside: ``pl_module.training_step`` is the user's own, and logging does nothing."""
    saved = {name: pl_module.__dict__.get(name, _MISSING) for name in ("training_step", "log", "log_dict")}
    own = users_training_step(pl_module)
    if own is None:
        pl_module.__dict__.pop("training_step", None)
    else:
        pl_module.__dict__["training_step"] = own
    pl_module.__dict__["log"] = _no_log
    pl_module.__dict__["log_dict"] = _no_log
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                pl_module.__dict__.pop(name, None)
            else:
                pl_module.__dict__[name] = value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class AdversarialTraining(Callback):
    """Add the loss at adversarially perturbed input embeddings to the training loss (FGM, PGD, FreeLB).

    Works with any ``PEFTStrategy`` (the perturbation is on the embedding output, whatever is trained),
    with frozen embeddings, an unchanged ``training_step`` returning a loss or a dict with ``"loss"``,
    and gradient accumulation. Logs ``train_adv_loss`` (the unweighted adversarial loss; FreeLB's mean).
    Cost per batch: 1 extra forward and backward for FGM, ``steps`` for PGD and FreeLB.

    Args:
        method: ``"fgm"`` (one step of size ``epsilon``), ``"pgd"`` (``steps`` projected steps, the last
            point's loss is added) or ``"freelb"`` (``steps`` projected steps, the mean loss over them).
        epsilon: radius of the ball the perturbation stays in.
        alpha: step size of pgd and freelb; None takes ``2.5 * epsilon / steps`` (enough to reach the
            boundary and move along it). Not used by fgm.
        steps: number of ascent steps of pgd and freelb (default 3). Not used by fgm.
        adv_weight: weight of the adversarial loss added to the clean one.
        norm: ``"l2"``: Euclidean norm per example, over all of its positions and hidden units (Miyato
            et al.'s choice: one budget per sequence); ``"token_l2"``: per token (every position gets
            its own ball); ``"linf"``: per element (steps follow the gradient's sign).
        module: dotted path of the submodule holding the Hugging Face model (``"model"``); None searches
            the whole LightningModule.

    Attributes:
        perturbations: the last batch's final ``delta`` for each call of the embeddings (detached).

    Example::

        adversarial = AdversarialTraining("pgd", epsilon=1.0, steps=3, module="model")
        trainer = L.Trainer(callbacks=[PEFT(LoRA(r=8), module="model"), adversarial])
    """

    def __init__(
        self,
        method: Method = "fgm",
        epsilon: float = 1.0,
        alpha: float | None = None,
        steps: int | None = None,
        adv_weight: float = 1.0,
        norm: Norm = "l2",
        module: str | None = None,
    ) -> None:
        problems = []
        if method not in _METHODS:
            problems.append(f"method must be 'fgm', 'pgd' or 'freelb', got {method!r}")
        if not _is_number(epsilon) or not epsilon > 0:
            problems.append(f"epsilon must be a number > 0, got {epsilon!r}")
        if alpha is not None and (not _is_number(alpha) or not alpha > 0):
            problems.append(f"alpha must be a number > 0 or None, got {alpha!r}")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            problems.append(f"steps must be an integer >= 1 or None, got {steps!r}")
        if method == "fgm" and (alpha is not None or steps is not None):
            problems.append("fgm takes one step of size epsilon: alpha and steps are for 'pgd' and 'freelb'")
        if not _is_number(adv_weight) or not adv_weight > 0:
            problems.append(f"adv_weight must be a number > 0, got {adv_weight!r}")
        if norm not in _NORMS:
            problems.append(f"norm must be 'l2', 'token_l2' or 'linf', got {norm!r}")
        problems.extend(module_path_problems(module))
        if problems:
            raise ValueError("AdversarialTraining: " + "; ".join(problems))
        self.method = method
        self.epsilon = float(epsilon)
        self.steps = 1 if method == "fgm" else (3 if steps is None else steps)
        if method == "fgm":
            self.alpha = self.epsilon
        else:
            self.alpha = 2.5 * self.epsilon / self.steps if alpha is None else float(alpha)
        self.adv_weight = float(adv_weight)
        self.norm = norm
        self.module = module
        self.perturbations: list[torch.Tensor] = []
        self._embeddings: nn.Module | None = None
        self._hook = _EmbeddingHook()
        self._handle: RemovableHandle | None = None
        self._batch: Any = None
        self._batch_idx = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, module=self.module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AdversarialTraining adds its gradients after Lightning's backward, which needs automatic "
                f"optimization; {type(pl_module).__name__}.automatic_optimization is False"
            )
        target = resolve_module(pl_module, self.module)
        if target is None:
            raise missing_module_error("AdversarialTraining", self.module, pl_module)
        self._embeddings = find_input_embeddings(target, "AdversarialTraining")[1]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._detach()
        if self._embeddings is None:
            return
        self._batch, self._batch_idx = batch, batch_idx
        self._hook.record()
        self._handle = self._embeddings.register_forward_hook(self._hook)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is None:
            return
        grads = self._hook.grads
        if not grads or any(g is None for g in grads):
            raise ValueError(
                f"AdversarialTraining(module={self.module!r}): the loss of "
                f"{type(pl_module).__name__}.training_step did not depend on the output of the input "
                f"embeddings ({type(self._embeddings).__name__}); does training_step call that model?"
            )
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return  # AMP overflow: the scaler skips this step anyway
        try:
            with torch.enable_grad(), _quiet_own_step(pl_module):
                adv_loss = self._attack(trainer, pl_module, grads)
        finally:
            self._hook.record()  # a closure evaluated again (LBFGS) records afresh
        if adv_loss is not None:
            pl_module.log("train_adv_loss", adv_loss, batch_size=grads[0].shape[0])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._detach()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
        self._embeddings = None

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._batch = None
        self._hook.record()

    def _attack(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, grads: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """Ascend from ``delta = 0``, backpropagate the weighted adversarial loss; return it unweighted."""
        weight = self.adv_weight / trainer.accumulate_grad_batches
        deltas = [torch.zeros_like(g) for g in grads]
        losses = []
        for k in range(self.steps):
            deltas = [
                project(d + self.alpha * ascent_direction(g, self.norm), self.epsilon, self.norm)
                for d, g in zip(deltas, grads, strict=True)
            ]
            more = k < self.steps - 1
            if self.method == "pgd" and more:  # an ascent pass: a gradient for delta only
                leaves = [d.requires_grad_(True) for d in deltas]
                loss = self._loss_at(trainer, pl_module, leaves, synced=False)
                if loss is None:
                    return None
                found = torch.autograd.grad(self._scaled(trainer, loss), leaves, allow_unused=True)
                grads = [torch.zeros_like(d) if g is None else g for d, g in zip(deltas, found, strict=True)]
                deltas = [d.detach() for d in deltas]
                continue
            # a pass whose loss counts: all of FreeLB's, the last of PGD, FGM's only one
            leaves = [d.requires_grad_(more) for d in deltas]
            loss = self._loss_at(trainer, pl_module, leaves, synced=True)
            if loss is None:
                return None
            share = weight / self.steps if self.method == "freelb" else weight
            trainer.precision_plugin.backward(self._scaled(trainer, loss * share), pl_module, None)
            losses.append(loss.detach())
            if more:
                grads = [torch.zeros_like(d) if d.grad is None else d.grad for d in leaves]
            deltas = [d.detach() for d in deltas]
        self.perturbations = deltas
        return torch.stack(losses).mean()

    def _loss_at(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, deltas: list[torch.Tensor], synced: bool
    ) -> torch.Tensor | None:
        """The loss of the user's ``training_step`` with ``deltas`` added to the embedding outputs.

        ``synced`` runs it as Lightning runs the step (through the strategy: autocast, DDP's gradient
        synchronisation); otherwise the module is called directly, for passes that touch no parameter.
        """
        step = pl_module.training_step
        args = (self._batch, self._batch_idx)
        if not is_param_in_hook_signature(step, "batch_idx", min_args=2):
            args = args[:1]
        self._hook.perturb(deltas)
        if synced:
            output = trainer.strategy.training_step(*args)
        else:
            with trainer.precision_plugin.train_step_context():
                output = step(*args)
        if self._hook.used != len(deltas):
            raise ValueError(
                "AdversarialTraining: the re-run training_step called the input embeddings "
                f"{self._hook.used} time(s), the first run {len(deltas)}; the step must be repeatable"
            )
        loss = _loss_of(output)
        if loss is None:
            rank_zero_warn(
                "AdversarialTraining: the re-run training_step returned no loss; "
                "this batch has no adversarial term"
            )
        return loss

    @staticmethod
    def _scaled(trainer: pl.Trainer, loss: torch.Tensor) -> torch.Tensor:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler.scale(loss) if scaler is not None else loss
