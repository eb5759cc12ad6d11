"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning").

During training, uniform noise is added to the input embeddings (Algorithm 1 of the paper)::

    X_emb = emb(input_ids)                                   # (B, L, d)
    X_emb + alpha / sqrt(L * d) * U(-1, 1)                   # L: the sample's real length

``L`` is the number of real tokens of each sample when the model was called with an
``attention_mask`` keyword argument, else the padded sequence length. In eval mode (validation, test,
generation) the embeddings are untouched, bit for bit.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_peft.callbacks.module_path import missing_module_error, module_path_problems, resolve_module
from lightning_peft.strategies.base import find_input_embeddings


class _RecordMask:
    """Forward pre-hook on the model: keeps the call's ``attention_mask`` for the embedding hook."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class _AddNoise:
    """Forward hook on the input embeddings: adds the scaled uniform noise in train mode only."""

    def __init__(self, alpha: float, masks: _RecordMask) -> None:
        self.alpha = alpha
        self.masks = masks

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        batch, length, dim = output.shape  # (B, L, d)
        mask = self.masks.mask
        if mask is not None and tuple(mask.shape) == (batch, length):
            lengths = mask.sum(dim=1).clamp(min=1).to(output.dtype)  # (B,)
        else:
            lengths = torch.full((batch,), float(length), dtype=output.dtype, device=output.device)
        scale = (self.alpha / torch.sqrt(lengths * dim)).view(batch, 1, 1)  # (B, 1, 1)
        return output + torch.empty_like(output).uniform_(-1.0, 1.0) * scale


class NEFTune(Callback):
    """Add NEFTune noise to the input embeddings while training.

    The hooks are put on the model at ``on_fit_start`` and removed at ``teardown``. Noise is added
    only while the embedding module is in train mode: Lightning keeps each submodule's mode, so a
    model loaded with ``from_pretrained`` (eval mode) must be put in train mode (a warning says so).

    Args:
        alpha: noise scale (the paper uses 5, 10 and 15).
        module: dotted path of the submodule holding the Hugging Face model (``"model"``); None searches
            the whole LightningModule.

    Example::

        trainer = L.Trainer(callbacks=[PEFT(LoRA(r=8), module="model"), NEFTune(alpha=5.0, module="model")])
    """

    def __init__(self, alpha: float = 5.0, module: str | None = None) -> None:
        problems = []
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
            problems.append(f"alpha must be a number > 0, got {alpha!r}")
        problems.extend(module_path_problems(module))
        if problems:
            raise ValueError("NEFTune: " + "; ".join(problems))
        self.alpha = float(alpha)
        self.module = module
        self._handles: list[RemovableHandle] = []
        self._embeddings: nn.Module | None = None
        self._warned = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    def attach(self, model: nn.Module) -> nn.Module:
        """Put the noise hooks on ``model`` (once); returns the input embedding module."""
        if self._embeddings is not None:
            return self._embeddings
        owner, embeddings = find_input_embeddings(model, "NEFTune")
        masks = _RecordMask()
        self._handles = [
            owner.register_forward_pre_hook(masks, with_kwargs=True),
            embeddings.register_forward_hook(_AddNoise(self.alpha, masks)),
        ]
        self._embeddings = embeddings
        return embeddings

    def detach(self) -> None:
        """Remove the hooks; the model is as it was before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._embeddings = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = resolve_module(pl_module, self.module)
        if target is None:
            raise missing_module_error("NEFTune", self.module, pl_module)
        self.attach(target)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._embeddings is not None and not self._embeddings.training and not self._warned:
            self._warned = True
            rank_zero_warn(
                "NEFTune adds noise only in train mode, but the input embeddings are in eval mode; "
                "call model.train() (from_pretrained returns a model in eval mode)"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()
