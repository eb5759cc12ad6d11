"""Train a tiny Llama with LoRA on 2 CPU processes; the distributed tests run this file as a script.

Lightning's ``ddp`` strategy re-launches ``sys.argv`` in its child processes, so the runs cannot
happen inside pytest; ``test_distributed.py`` starts this script with ``subprocess`` and reads what
rank 0 writes to ``--out``:

- ``results.json``: rank 0's loss at every step, the checkpoint paths, the world size;
- ``final_state.safetensors``: the whole model's state gathered after training (base and adapters);
- ``predictions_rank<r>.pt``: each rank's logits on its share of the probe inputs (``PROBE``);
- ``ckpts/epoch=<e>.ckpt`` (``ModelCheckpoint``), ``final.ckpt`` and ``final_weights_only.ckpt``
  (``trainer.save_checkpoint``).

Everything is deterministic: seed-built weights, ``dropout=0``, no shuffling.

With ``--then-resume`` the first run goes to ``OUT/straight`` and a second, resumed from its epoch-0
checkpoint, to ``OUT/resumed``.

Usage::

    python train_adapter.py --strategy ddp --max-epochs 2 --then-resume --out /tmp/run
    python train_adapter.py --strategy fsdp --max-epochs 2 --ckpt-path /tmp/run/ckpts/epoch=0.ckpt --out /tmp/resumed
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from lightning_peft import PEFT, LoRA  # noqa: E402
from lightning_peft.strategies.state import clean_name  # noqa: E402

VOCAB = 64
SEQ_LEN = 8
NUM_SEQUENCES = 32  # 16 per rank: 4 steps of 4 per epoch
BATCH_SIZE = 4
PROBE = 4  # probe sequences, 2 per rank
STRATEGIES = ("ddp", "fsdp", "fsdp-cuda")
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


def build_llama(seed: int) -> transformers.LlamaForCausalLM:
    """The base model: the same weights for the same seed, in every process."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def token_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


class Sequences(Dataset):
    """Fixed token sequences with their index (so ranks can say which samples they saw)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.ids[i]


class TinyLM(L.LightningModule):
    """A user's causal-LM module that knows nothing of PEFT.

    ``build_in="configure_model"`` builds the network where large-model users do, inside the
    strategy's sharding context; ``"init"`` builds it in the constructor.
    """

    def __init__(self, seed: int = 0, lr: float = 1e-2, build_in: str = "init") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.losses: list[float] = []
        if build_in == "init":
            self.model = build_llama(seed)

    def configure_model(self) -> None:
        if not hasattr(self, "model"):  # runs again for every fit/validate/test
            self.model = build_llama(self.hparams.seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits  # (B, T, vocab)

    def training_step(self, batch, batch_idx):
        _, ids = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def on_validation_epoch_start(self) -> None:
        self.probe: list[tuple[torch.Tensor, torch.Tensor]] = []

    def validation_step(self, batch, batch_idx):
        # runs through the strategy's wrapper (the FSDP root gathers its shards), unlike a direct call
        index, ids = batch
        self.probe.append((index, self(ids).float()))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with the three changes it needs to run on the CPU.

    1. ``Trainer(strategy="fsdp", accelerator="cpu")`` raises "The strategy `fsdp` requires a GPU
       accelerator" (``_check_strategy_and_fallback`` in Lightning's ``accelerator_connector.py``
       tests ``type(strategy) is FSDPStrategy``); a subclass is let through.
    2. Lightning wraps with ``device_id=self.root_device.index``, which is None for ``cpu``, and
       PyTorch's FSDP then looks for an accelerator and raises "FSDP needs a non-CPU accelerator
       device" (``_init_device_handle`` in ``torch/distributed/fsdp/_init_utils.py``); with
       ``device_id=torch.device("cpu")`` it runs on the CPU with gloo.
    3. Lightning gathers full state dicts with ``offload_to_cpu=True``, which PyTorch's FSDP
       implements as "copy to the CPU, then reuse or free the source". On the CPU the copy is the
       source itself: the model state-dict hook clones freed memory (``FlatParamHandle.to_cpu`` in
       ``torch/distributed/fsdp/_flat_param.py``: a segmentation fault), and every optimizer state
       of a parameter aliases one all-gather buffer (``_unflatten_orig_param_states`` in
       ``_optim_utils.py`` clones only ``if not cpu_offload``), so ``exp_avg`` is saved equal to
       ``exp_avg_sq``. Here both are gathered without offloading.

    Checkpoint saving and loading stay Lightning's.
    """

    def lightning_module_state_dict(self) -> dict[str, torch.Tensor]:
        with _full_state_dict_without_offload(self.model):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
        with _full_state_dict_without_offload(self.model):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # stored keyed by parameter index, as Lightning does
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def _full_state_dict_without_offload(model: torch.nn.Module):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
    )


def make_strategy(name: str) -> str | FSDPStrategy:
    """``ddp``; ``fsdp`` on the CPU (:class:`CPUFSDPStrategy`); ``fsdp-cuda``: Lightning's own, on GPUs."""
    if name == "ddp":
        return "ddp"
    decoder = transformers.models.llama.modeling_llama.LlamaDecoderLayer
    # one FSDP unit per decoder layer, so parameter names carry `_fsdp_wrapped_module.` inside
    kwargs = {"auto_wrap_policy": {decoder}, "use_orig_params": True, "state_dict_type": "full"}
    if name == "fsdp":
        return CPUFSDPStrategy(process_group_backend="gloo", **kwargs)
    if name == "fsdp-cuda":
        return FSDPStrategy(**kwargs)
    raise ValueError(f"--strategy must be one of {STRATEGIES}, got {name!r}")


class SaveWeightsOnlyAtTrainEnd(L.Callback):
    """A weights-only save while the run lasts: Lightning skips callback hooks for it, so the PEFT
    callback's state-dict hook (removed at teardown) is what prunes it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=True)  # collective under FSDP


def fit(
    strategy: str, devices: int, max_epochs: int, out: Path, ckpt_path: str | None, build_in: str
) -> None:
    """Train a fresh module (resuming from ``ckpt_path`` if given) and write the results to ``out``."""
    accelerator = "cuda" if strategy.endswith("-cuda") else "cpu"
    checkpoints = ModelCheckpoint(dirpath=out / "ckpts", filename="{epoch}", save_top_k=-1)
    weights_only = SaveWeightsOnlyAtTrainEnd(out / "final_weights_only.ckpt")
    trainer = L.Trainer(
        strategy=make_strategy(strategy),
        accelerator=accelerator,
        devices=devices,
        max_epochs=max_epochs,
        callbacks=[PEFT(LoRA(**LORA), module="model", verbose=False), checkpoints, weights_only],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    module = TinyLM(build_in=build_in)
    train = DataLoader(Sequences(token_ids(NUM_SEQUENCES, seed=1)), batch_size=BATCH_SIZE, shuffle=False)
    # validated after the last step, so the probe logits are those of the final weights
    probe = DataLoader(Sequences(token_ids(PROBE, seed=2)), batch_size=PROBE // devices, shuffle=False)
    trainer.fit(module, train, probe, ckpt_path=ckpt_path)

    final_ckpt = out / "final.ckpt"
    trainer.save_checkpoint(final_ckpt)  # collective under FSDP: every rank calls it
    state = trainer.strategy.lightning_module_state_dict()  # gathered whole on rank 0 under FSDP
    rank = trainer.global_rank
    torch.save(
        {
            "index": torch.cat([i for i, _ in module.probe]).cpu(),
            "logits": torch.cat([y for _, y in module.probe]).cpu(),
        },
        out / f"predictions_rank{rank}.pt",
    )
    if rank == 0:
        state = {clean_name(k): v.detach().cpu().contiguous().clone() for k, v in state.items()}
        save_file(state, out / "final_state.safetensors")
        results = {
            "strategy": strategy,
            "world_size": trainer.world_size,
            "resumed_from": ckpt_path,
            "losses": module.losses,
            "global_step": trainer.global_step,
            "checkpoints": sorted(str(p) for p in (out / "ckpts").glob("*.ckpt")),
            "final_checkpoint": str(final_ckpt),
            "weights_only_checkpoint": str(out / "final_weights_only.ckpt"),
        }
        (out / "results.json").write_text(json.dumps(results, indent=2))
    trainer.strategy.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategy", choices=STRATEGIES, required=True)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--ckpt-path", default=None, help="resume from this checkpoint")
    parser.add_argument(
        "--then-resume",
        action="store_true",
        help="afterwards, in a fresh Trainer and module in the same processes, resume from the epoch-0 "
        "checkpoint and train to --max-epochs again (into OUT/resumed; the first run goes to OUT/straight)",
    )
    parser.add_argument("--build-in", choices=["init", "configure_model"], default="init")
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(args.out)
    common = {
        "strategy": args.strategy,
        "devices": args.devices,
        "max_epochs": args.max_epochs,
        "build_in": args.build_in,
    }
    if not args.then_resume:
        fit(out=out, ckpt_path=args.ckpt_path, **common)
        return
    fit(out=out / "straight", ckpt_path=args.ckpt_path, **common)
    # Lightning reuses the launched processes and the process group for a second Trainer
    fit(out=out / "resumed", ckpt_path=str(out / "straight" / "ckpts" / "epoch=0.ckpt"), **common)


if __name__ == "__main__":
    main()
