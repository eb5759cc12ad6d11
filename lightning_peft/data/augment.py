"""Token-level text augmentation for training batches: deletion, neighbour swaps and masking.

Plain PyTorch (no Lightning): :class:`TokenAugmentation` is a callable on a batch dict, for a
DataLoader's ``collate_fn`` or for the :class:`~lightning_peft.callbacks.augment.TextAugmentation`
callback. Only real, ordinary tokens are edited: padding (``attention_mask == 0``), special tokens
and, by default, every position the loss scores (``labels != -100``) are left alone, so an
instruction's prompt is perturbed but its response, the target, never is::

    input_ids  [bos] C a r r y   o u t  :   c a t   T A C </s> <pad>
    editable     .   x x x x x x x x x  x   x x x   . . .  .     .      # x: may change

Deletion moves a row's remaining tokens left and pads the freed slots at its end; the attention mask,
per-token labels and any other per-token tensor move with their tokens, so everything stays aligned.
Randomness comes from a ``torch.Generator`` seeded from ``(seed, step, ...)``: the same seed and steps
give the same augmented batches on any device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lightning_peft.generation.templates import IGNORE_INDEX
from lightning_peft.strategies.targeting import validation_error


def _ids_from(tokenizer: Any, mask_token_id: Any, pad_token_id: Any, special_token_ids: Any) -> tuple:
    """``(mask, pad, special ids)`` with the ones that are None taken from ``tokenizer``."""
    if mask_token_id is None:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
        mask_token_id = tokenizer.unk_token_id if mask_token_id is None else mask_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id
        pad_token_id = tokenizer.eos_token_id if pad_token_id is None else pad_token_id
    if special_token_ids is None:
        special_token_ids = tokenizer.all_special_ids
    return mask_token_id, pad_token_id, special_token_ids


def _is_probability(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value < 1.0


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class TokenAugmentation:
    """Randomly delete, swap and mask the editable tokens of a batch.

    Each editable token is, independently: swapped with its right-hand neighbour with probability
    ``swap`` (when that neighbour is editable too; a draw is skipped when the token to its left drew a
    swap, so pairs never overlap and about ``swap * (1 - swap)`` of tokens start a swap); replaced by
    ``mask_token_id`` with probability ``mask``; deleted with probability ``delete`` (a row never loses
    all of its real tokens). Swaps come first, then masking, then deletion. Three uniform draws of the
    batch's shape are made per call whatever the probabilities, so enabling one edit does not change
    the positions another edit picks.

    Args:
        delete: probability of deleting a token.
        swap: probability of a token starting a swap with its right-hand neighbour.
        mask: probability of replacing a token by ``mask_token_id``.
        mask_token_id: the replacement id; default the tokenizer's mask token, else its unk token.
        pad_token_id: the id put in slots freed by deletion; default the tokenizer's pad (else eos) id.
        special_token_ids: ids never edited; default the tokenizer's special ids, else ``[pad_token_id]``.
        tokenizer: a Hugging Face tokenizer to take the defaults above from. Without one, the
            ``TextAugmentation`` callback takes them from the data module's ``tokenizer`` at setup
            (:meth:`use_tokenizer`); an edit whose id is still missing fails at its first call.
        protect_labels: with per-token ``labels`` (the shape of ``input_ids``), edit only positions
            labelled ``-100``; False edits scored positions too (their labels move with deletions and swaps
            but are not masked).
        seed: seeds every draw, with the step (see :meth:`generator`).

    Example::

        augment = TokenAugmentation(delete=0.1, swap=0.05, mask=0.1, tokenizer=tok, seed=0)
        batch = augment(collate(records))               # a new dict; the input batch is not modified
        loader = DataLoader(records, collate_fn=lambda rs: augment(collate(rs)))
    """

    def __init__(
        self,
        delete: float = 0.0,
        swap: float = 0.0,
        mask: float = 0.0,
        mask_token_id: int | None = None,
        pad_token_id: int | None = None,
        special_token_ids: Iterable[int] | None = None,
        tokenizer: Any = None,
        protect_labels: bool = True,
        seed: int = 0,
    ) -> None:
        # ids left unset here may still come from a tokenizer later (use_tokenizer: the callback hands
        # it the data module's); check_ids() says what is still missing
        self._unset = {
            name
            for name, value in (
                ("mask_token_id", mask_token_id),
                ("pad_token_id", pad_token_id),
                ("special_token_ids", special_token_ids),
            )
            if value is None
        }
        if tokenizer is not None:
            mask_token_id, pad_token_id, special_token_ids = _ids_from(
                tokenizer, mask_token_id, pad_token_id, special_token_ids
            )
            self._unset = set()
        if special_token_ids is None:
            special_token_ids = [] if pad_token_id is None else [pad_token_id]
        special_token_ids = list(special_token_ids)
        problems = [
            f"{name} must be a probability in [0, 1), got {value!r}"
            for name, value in (("delete", delete), ("swap", swap), ("mask", mask))
            if not _is_probability(value)
        ]
        for name, value in (("mask_token_id", mask_token_id), ("pad_token_id", pad_token_id)):
            if value is not None and not _is_token_id(value):
                problems.append(f"{name} must be a token id (an int >= 0), got {value!r}")
        if not all(_is_token_id(i) for i in special_token_ids):
            problems.append(f"special_token_ids must be token ids (ints >= 0), got {special_token_ids!r}")
        if not isinstance(protect_labels, bool):
            problems.append(f"protect_labels must be True or False, got {protect_labels!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            problems.append(f"seed must be an int, got {seed!r}")
        validation_error("TokenAugmentation", problems)
        self.delete = float(delete)
        self.swap = float(swap)
        self.mask = float(mask)
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.special_token_ids = tuple(special_token_ids)
        self.protect_labels = protect_labels
        self.seed = seed
        self.step = 0  # calls made without an explicit generator

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Take the ids that were not given (mask, pad, special) from ``tokenizer``; given ids stay."""
        if not self._unset:
            return
        mask_id, pad_id, special = _ids_from(
            tokenizer,
            None if "mask_token_id" in self._unset else self.mask_token_id,
            None if "pad_token_id" in self._unset else self.pad_token_id,
            None if "special_token_ids" in self._unset else self.special_token_ids,
        )
        self.mask_token_id, self.pad_token_id, self.special_token_ids = mask_id, pad_id, tuple(special)
        self._unset = set()

    def check_ids(self) -> None:
        """Raise ``ValueError`` if an edit that is switched on lacks the id it needs."""
        problems = []
        if self.mask > 0 and self.mask_token_id is None:
            problems.append("mask > 0 needs mask_token_id (or a tokenizer with a mask or unk token)")
        if self.delete > 0 and self.pad_token_id is None:
            problems.append("delete > 0 needs pad_token_id (or a tokenizer with a pad or eos token)")
        validation_error("TokenAugmentation", problems)

    def __repr__(self) -> str:
        return (
            f"TokenAugmentation(delete={self.delete}, swap={self.swap}, mask={self.mask}, "
            f"mask_token_id={self.mask_token_id}, pad_token_id={self.pad_token_id}, "
            f"special_token_ids={list(self.special_token_ids)}, protect_labels={self.protect_labels}, "
            f"seed={self.seed})"
        )

    def generator(self, *keys: int) -> torch.Generator:
        """A CPU generator seeded from ``(seed, *keys)``, e.g. ``(step,)`` or ``(step, rank)``."""
        digest = hashlib.blake2b(repr((self.seed, *keys)).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def _next_generator(self) -> torch.Generator:
        # in a DataLoader worker, torch gives each worker (and each epoch) its own seed, derived from the
        # main process's generator: mixing it in keeps workers from repeating each other's draws
        worker = torch.utils.data.get_worker_info()
        keys = (self.step,) if worker is None else (self.step, worker.seed)
        self.step += 1
        return self.generator(*keys)

    def state_dict(self) -> dict[str, int]:
        """The seed and the number of calls made without an explicit generator."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed = int(state["seed"])
        self.step = int(state["step"])

    def __call__(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """An augmented copy of ``batch``; without ``generator`` the next of :meth:`generator` ``(step)``."""
        if not isinstance(batch, Mapping) or not {"input_ids", "attention_mask"} <= set(batch):
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise TypeError(
                f"TokenAugmentation works on a dict with input_ids and attention_mask tensors, got {keys}"
            )
        ids, attention = batch["input_ids"], batch["attention_mask"]
        if ids.dim() != 2 or attention.shape != ids.shape:
            raise ValueError(
                f"TokenAugmentation: input_ids and attention_mask must be (batch, length) of one shape, got "
                f"{tuple(ids.shape)} and {tuple(attention.shape)}"
            )
        self.check_ids()
        if generator is None:
            generator = self._next_generator()
        out = dict(batch)
        if self.delete == self.swap == self.mask == 0.0:
            return out
        # every tensor of the batch's (B, T) shape is per-token: it moves with its token
        per_token = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape == ids.shape]
        labels = batch.get("labels")
        editable = attention.bool()  # (B, T)
        if self.special_token_ids:
            specials = torch.tensor(self.special_token_ids, device=ids.device)
            editable &= ~torch.isin(ids, specials)
        if self.protect_labels and isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
            editable &= labels == IGNORE_INDEX
        u_swap, u_mask, u_delete = torch.rand((3, *ids.shape), generator=generator).to(ids.device)  # (B, T)

        if self.swap > 0 and ids.shape[1] > 1:
            drawn = editable[:, :-1] & editable[:, 1:] & (u_swap[:, :-1] < self.swap)  # (B, T-1)
            start = drawn.clone()
            start[:, 1:] &= ~drawn[:, :-1]  # never two overlapping pairs
            source = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)  # (B, T)
            source[:, :-1] += start.long()
            source[:, 1:] -= start.long()
            for key in per_token:
                out[key] = out[key].gather(1, source)

        if self.mask > 0:
            out["input_ids"] = out["input_ids"].masked_fill(
                editable & (u_mask < self.mask), self.mask_token_id
            )

        if self.delete > 0:
            drop = editable & (u_delete < self.delete)  # (B, T)
            real = attention.bool().sum(1)
            drop &= (drop.sum(1) < real).unsqueeze(1)  # a row that would lose every real token keeps them all
            order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)  # kept tokens first, in order
            freed = drop.gather(1, order)
            fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
            for key in per_token:
                out[key] = out[key].gather(1, order).masked_fill(freed, fill.get(key, 0))
        return out
