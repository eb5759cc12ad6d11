"""Token augmentation: the transform (deterministic, rates, protected positions, alignment) and the callback."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft.callbacks.augment import TextAugmentation
from lightning_peft.data.augment import TokenAugmentation
from lightning_peft.data.datamodules import InstructionData
from lightning_peft.generation.templates import ALPACA, IGNORE_INDEX, InstructionCollator

PAD, BOS, EOS, UNK = 0, 1, 2, 3


def make_batch(rows: int = 4, length: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """bos, distinct ordinary tokens, a labelled 4-token tail with eos, then right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, length), PAD)
    labels = torch.full((rows, length), IGNORE_INDEX)
    mask = torch.zeros((rows, length), dtype=torch.long)
    for r in range(rows):
        n = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        ids[r, :n] = torch.randperm(90, generator=g)[:n] + 10
        ids[r, 0], ids[r, n - 1] = BOS, EOS
        labels[r, n - 4 : n] = ids[r, n - 4 : n]
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def augmentation(**kwargs) -> TokenAugmentation:
    defaults = {"mask_token_id": UNK, "pad_token_id": PAD, "special_token_ids": [PAD, BOS, EOS, UNK]}
    return TokenAugmentation(**{**defaults, **kwargs})


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    batch = make_batch(8, 32)
    first, again, other = (augmentation(delete=0.2, swap=0.2, mask=0.2, seed=s) for s in (0, 0, 1))
    outs = [[aug(batch) for _ in range(3)] for aug in (first, again, other)]
    assert all(same(a, b) for a, b in zip(outs[0], outs[1], strict=True))
    assert not any(same(a, b) for a, b in zip(outs[0], outs[2], strict=True))
    assert not same(outs[0][0], outs[0][1])  # each call draws afresh
    assert same(first(batch, generator=first.generator(1)), outs[0][1])  # call n uses generator(n)


def test_zero_probabilities_leave_the_batch_unchanged_and_the_input_is_never_modified():
    batch = make_batch()
    before = {k: v.clone() for k, v in batch.items()}
    assert same(augmentation()(batch), before)
    augmentation(delete=0.5, swap=0.5, mask=0.5)(batch)
    assert same(batch, before)


def big_batch(rows: int = 64, length: int = 256) -> dict[str, torch.Tensor]:
    ids = torch.arange(length).repeat(rows, 1) + 10  # all ordinary and distinct within a row
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_masking_and_deletion_rates_match_their_probabilities():
    batch = big_batch()
    masked = augmentation(mask=0.2)(batch)["input_ids"]
    assert (masked == UNK).float().mean().item() == pytest.approx(0.2, abs=0.01)
    kept = augmentation(delete=0.1)(batch)["attention_mask"]
    deleted = (kept == 0).sum().item() / kept.numel()  # deletions shift left and leave padding at the end
    assert deleted == pytest.approx(0.1, abs=0.01)


def test_swap_rate_is_the_probability_less_the_skipped_overlaps():
    p = 0.2
    ids = augmentation(swap=p)(big_batch())["input_ids"]
    starts = ids[:, :-1] > ids[:, 1:]  # a swapped pair is the only place the ids decrease
    assert (ids.sort(dim=1).values == big_batch()["input_ids"]).all()  # a permutation, nothing lost
    # a start needs its own draw and no draw at its left neighbour (position 0 has none)
    assert starts.float().mean().item() == pytest.approx(p * (1 - p), abs=0.01)


def test_padding_special_tokens_and_labelled_positions_are_never_edited():
    batch = make_batch(16, 32)
    out = augmentation(swap=0.9, mask=0.9)(batch)
    protected = (batch["attention_mask"] == 0) | (batch["input_ids"] < 10) | (batch["labels"] != IGNORE_INDEX)
    assert torch.equal(out["input_ids"][protected], batch["input_ids"][protected])
    assert (out["input_ids"][~protected] != batch["input_ids"][~protected]).float().mean() > 0.8
    assert torch.equal(out["labels"], batch["labels"]) and torch.equal(
        out["attention_mask"], batch["attention_mask"]
    )


def test_deletion_keeps_labels_and_mask_aligned_with_their_tokens():
    batch = make_batch(16, 32)
    out = augmentation(delete=0.5)(batch)
    for r in range(16):
        before = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
        mask = out["attention_mask"][r]
        n = int(mask.sum())
        assert mask.tolist() == [1] * n + [0] * (32 - n) and n < len(before)  # still right-padded, shorter
        after = out["input_ids"][r, :n].tolist()
        assert (out["input_ids"][r, n:] == PAD).all() and (out["labels"][r, n:] == IGNORE_INDEX).all()
        assert [t for t in before if t in after] == after  # the survivors, in their order
        assert after[0] == BOS and after[-4:] == before[-4:]  # bos and the labelled tail all survive
        assert out["labels"][r, :n].tolist() == [IGNORE_INDEX] * (n - 4) + before[-4:]


def test_without_label_protection_labels_move_with_their_tokens():
    batch = make_batch(16, 32)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    out = augmentation(delete=0.3, swap=0.3, protect_labels=False)(batch)
    real = out["attention_mask"].bool()
    assert torch.equal(out["labels"][real], out["input_ids"][real])
    assert not torch.equal(out["input_ids"], batch["input_ids"])
    assert (out["labels"][~real] == IGNORE_INDEX).all()


def test_a_row_never_loses_all_its_tokens():
    ids = torch.tensor([[10, 11], [12, 13]])
    for seed in range(20):
        out = augmentation(delete=0.99, seed=seed)({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert (out["attention_mask"].sum(1) >= 1).all()


def test_defaults_come_from_a_tokenizer(char_tok):
    aug = TokenAugmentation(mask=0.1, delete=0.1, tokenizer=char_tok)
    assert (aug.mask_token_id, aug.pad_token_id) == (char_tok.unk_token_id, char_tok.pad_token_id)
    assert set(aug.special_token_ids) == {0, 1, 2, 3}


def test_bad_arguments_are_reported_together():
    with pytest.raises(ValueError) as err:
        TokenAugmentation(delete=1.0, swap=-0.1, mask=0.1, seed="0")
    message = str(err.value)
    for part in ("delete must be", "swap must be", "seed must be an int"):
        assert part in message
    # an id an edit needs may still come from the data's tokenizer: missing at the first call, it fails
    with pytest.raises(ValueError, match="mask > 0 needs mask_token_id"):
        TokenAugmentation(mask=0.1)(make_batch(2, 8, seed=0))
    with pytest.raises(TypeError, match="must be a TokenAugmentation"):
        TextAugmentation(augmentation={"delete": 0.1})
    with pytest.raises(TypeError, match="input_ids and attention_mask"):
        augmentation(mask=0.1)({"input_ids": torch.ones(2, 3, dtype=torch.long)})


# --- the callback inside a Trainer ---------------------------------------------------------------


class Recorder(L.LightningModule):
    """A tiny model that keeps a copy of every batch its steps receive."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(101, 4)
        self.train_batches: list[dict] = []
        self.val_batches: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.train_batches.append({k: v.clone() for k, v in batch.items()})
        return self.embed(batch["input_ids"]).mean()

    def validation_step(self, batch, batch_idx):
        self.val_batches.append({k: v.clone() for k, v in batch.items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def collate(rows: list[int]) -> dict[str, torch.Tensor]:
    return make_batch(len(rows), 24, seed=rows[0])


def loader() -> DataLoader:
    return DataLoader(list(range(12)), batch_size=4, collate_fn=collate)  # 3 batches, no shuffling


def fit(callback: TextAugmentation, epochs: int, tmp_path, ckpt_path=None) -> tuple[Recorder, L.Trainer]:
    module = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader(), ckpt_path=ckpt_path)
    return module, trainer


def test_only_training_batches_are_augmented_in_a_trainer(tmp_path):
    aug = augmentation(delete=0.2, swap=0.2, mask=0.2, seed=5)
    module, _ = fit(TextAugmentation(aug), 1, tmp_path)
    originals = list(loader())
    assert len(module.val_batches) == 3 and all(map(same, module.val_batches, originals))
    for n, (seen, original) in enumerate(zip(module.train_batches, originals, strict=True)):
        assert not same(seen, original)
        assert same(seen, aug(original, generator=aug.generator(n, 0)))  # batch n, rank 0


def test_a_resumed_run_augments_like_an_uninterrupted_one(tmp_path):
    def callback() -> TextAugmentation:
        return TextAugmentation(augmentation(delete=0.2, swap=0.2, mask=0.2, seed=5))

    straight, _ = fit(callback(), 2, tmp_path / "straight")
    first, trainer = fit(callback(), 1, tmp_path / "first")
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit(callback(), 2, tmp_path / "resumed", ckpt_path=tmp_path / "epoch1.ckpt")
    assert all(map(same, first.train_batches, straight.train_batches[:3]))
    assert len(resumed.train_batches) == 3
    assert all(map(same, resumed.train_batches, straight.train_batches[3:]))
    assert not any(map(same, resumed.train_batches, straight.train_batches[:3]))  # epoch 2 differs from 1


def test_two_callbacks_keep_separate_state_keys():
    a, b = TextAugmentation(augmentation(mask=0.1, seed=0)), TextAugmentation(augmentation(swap=0.1, seed=0))
    assert a.state_key != b.state_key
    assert TextAugmentation(augmentation(mask=0.1, seed=1)).state_key == a.state_key  # the seed is state


def test_instruction_data_augments_prompts_of_training_batches_only(char_tok):
    aug = TokenAugmentation(mask=0.5, tokenizer=char_tok, seed=0)
    data = InstructionData(size=32, batch_size=8, augmentation=aug, seed=0)
    data.setup("fit")
    collate_plain = InstructionCollator(data.tokenizer, ALPACA)
    val = next(iter(data.val_dataloader()))
    assert same(val, collate_plain(data.val[: len(val["input_ids"])]))
    train = data._train_collate(data.train[:8])
    plain = collate_plain(data.train[:8])
    assert (train["input_ids"] == char_tok.unk_token_id).sum() > (
        plain["input_ids"] == char_tok.unk_token_id
    ).sum()
    assert torch.equal(train["labels"], plain["labels"])  # the responses are untouched
    assert data.state_dict() == {"augmentation": {"seed": 0, "step": 1}}


def test_per_example_labels_are_kept_and_do_not_protect_tokens():
    batch = {**big_batch(4, 64), "labels": torch.tensor([0, 1, 0, 1])}
    out = augmentation(mask=0.5)(batch)
    assert torch.equal(out["labels"], batch["labels"]) and (out["input_ids"] == UNK).any()


def test_the_callback_takes_unset_ids_from_the_data_modules_tokenizer(tmp_path, char_tok):
    class Data(L.LightningDataModule):
        tokenizer = char_tok

        def train_dataloader(self):
            return loader()

    aug = TokenAugmentation(mask=0.3, pad_token_id=PAD, seed=5)  # mask id and special ids left unset
    module = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[TextAugmentation(aug)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=Data())
    assert aug.mask_token_id == char_tok.unk_token_id and aug.pad_token_id == PAD  # the given id stays
    assert set(aug.special_token_ids) == set(char_tok.all_special_ids)
    for seen, original in zip(module.train_batches, loader(), strict=True):
        changed = seen["input_ids"] != original["input_ids"]
        assert changed.any() and (seen["input_ids"][changed] == char_tok.unk_token_id).all()
        assert not torch.isin(original["input_ids"][changed], torch.tensor(char_tok.all_special_ids)).any()


def test_the_callback_without_a_tokenizer_fails_at_setup_when_an_id_is_missing(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[TextAugmentation(TokenAugmentation(delete=0.1))],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    module = Recorder()
    with pytest.raises(ValueError, match="delete > 0 needs pad_token_id"):
        trainer.fit(module, train_dataloaders=loader())
    assert module.train_batches == []  # before the first step


def test_a_resume_with_another_seed_keeps_its_position_and_warns(tmp_path):
    _, trainer = fit(TextAugmentation(augmentation(mask=0.2, seed=5)), 1, tmp_path / "first")
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    callback = TextAugmentation(augmentation(mask=0.2, seed=6))
    with pytest.warns(UserWarning, match="seed=5, this run uses seed=6"):
        fit(callback, 2, tmp_path / "resumed", ckpt_path=tmp_path / "epoch1.ckpt")
    assert callback.batches_seen == 6  # 3 restored + 3 of epoch 2


def test_instruction_data_gives_its_tokenizer_ids_to_an_augmentation_without_them(char_tok):
    aug = TokenAugmentation(mask=0.5, seed=0)  # no ids: as conf/data/instructions.yaml can write it
    data = InstructionData(size=32, batch_size=8, augmentation=aug, seed=0)
    assert aug.mask_token_id == char_tok.unk_token_id and aug.pad_token_id == char_tok.pad_token_id
    data.setup("fit")
    train = data._train_collate(data.train[:8])
    assert (train["input_ids"] == char_tok.unk_token_id).sum() > 0
