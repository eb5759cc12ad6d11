"""LoRA and DoRA on ``nn.Embedding`` (see ``lora_layers.py`` for the method).

An embedding is a linear map from one-hot token ids, so its ``(out, in)`` weight is the transpose of
the stored ``(num_embeddings, dim)`` table: the update is ``(B A)ᵀ`` and DoRA's magnitude holds one
number per embedding dimension, the norm of a column of the table over the vocabulary (as peft's)::

    y = E[ids] + s · Aᵀ[ids] Bᵀ                       (LoRA)
    y = m / ||E + s (B A)ᵀ||_col  ⊙  (E[ids] + s · Aᵀ[ids] Bᵀ)    (DoRA)

``A`` starts at zero here (as peft), ``B`` random. Token ids are not dropped: no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.strategies.lora_layers import InitLoRA, LoRABase, adapter_dtype, init_pair


class LoRAEmbedding(LoRABase):
    """LoRA (and DoRA) on an ``nn.Embedding``: ``E[ids] + s · (A^T[ids]) B^T``."""

    a_is_zero = True
    stored_in_out = True  # the table is (in, out): base_weight() gives its (out, in) view

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: InitLoRA = True,
    ) -> None:
        super().__init__()
        self._setup(base_layer, r, lora_alpha, use_rslora, init_lora_weights)
        num_embeddings, embedding_dim = base_layer.weight.shape
        kwargs = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer.weight)}
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num_embeddings, **kwargs))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, **kwargs))
        init_pair(self.lora_embedding_A, self.lora_embedding_B, init_lora_weights, r, a_is_zero=True)
        if use_dora:
            with torch.no_grad():
                norm = self.base_weight().float().norm(dim=1).to(kwargs["dtype"])  # (dim,)
            self.lora_magnitude_vector = nn.Parameter(norm)
            self.forward = self._forward_dora  # decided once, not per call

    def adapter_pair(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_embedding_A, self.lora_embedding_B

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A) * self.scaling  # (dim, num_embeddings)

    def _lora(self, ids: torch.Tensor) -> torch.Tensor:
        after_a = F.embedding(
            ids, self.lora_embedding_A.T, padding_idx=self.inner_layer().padding_idx
        )  # (..., r)
        return after_a @ (self.lora_embedding_B * self.scaling).T  # (..., dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)  # (..., dim)
        if self.merged or not self.enabled:
            return result
        return result + self._lora(ids).to(result.dtype)

    def _forward_dora(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)  # (..., dim): E'[ids], E' the table the layers below give
        if self.merged or not self.enabled:
            return result
        if isinstance(self.base_layer, LoRABase):  # on another adapter: the table it gives
            gain = self._dora_gain()
        else:  # the column norms without building the (vocab, dim) sum
            gain = self.lora_magnitude_vector / self._dora_row_norm(self.base_weight())
        gain = gain.to(result.dtype)  # (dim,), the norm a constant for autograd
        return gain * (result + self._lora(ids).to(result.dtype))
