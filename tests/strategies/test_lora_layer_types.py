"""LoRA on Conv1d, Conv3d, grouped Conv2d and nn.MultiheadAttention, DoRA on embeddings and
convolutions, IA3 on Conv2d and Conv3d: each against peft 0.21 both ways (our export loads in peft, a
peft save loads here, with equal outputs), merged against unmerged, and trained through the PEFT
callback with a resume."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft import IA3, PEFT, LoRA, add_adapter, export_adapter, load_adapter, set_active_adapters
from lightning_peft.formats.merged import merge_and_unwrap
from lightning_peft.strategies import LoRAConv1d, LoRAConv3d, LoRAEmbedding, LoRAMultiheadAttention
from lightning_peft.strategies.base import adapter_parameter_names
from lightning_peft.strategies.ia3 import IA3Conv


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")  # peft warns about grouped convolutions and custom models


class Attention(nn.Module):
    """A tiny transformer block around ``nn.MultiheadAttention`` (as OpenCLIP's and torch's layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)  # (T, T) causal
        return self.head(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])  # (B, T, 3)


def _conv1d() -> nn.Module:  # an audio stem: Whisper's two Conv1d layers, the second with stride 2
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.GELU(), nn.Conv1d(8, 8, 3, stride=2, padding=1))


def _conv3d() -> nn.Module:  # a video patch embedding, then a grouped 1x1x1 mixer
    return nn.Sequential(nn.Conv3d(3, 6, (2, 3, 3), padding=1), nn.ReLU(), nn.Conv3d(6, 6, 1, groups=3))


def _grouped_conv2d() -> nn.Module:  # a grouped conv, then a depthwise one (groups = channels)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8)
    )


def _conv2d() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))


def _embedding() -> nn.Module:
    return nn.Sequential(nn.Embedding(20, 8, padding_idx=0), nn.Linear(8, 3))


class WhisperStem(nn.Module):
    """A tiny Whisper encoder (its audio stem is two Conv1d layers), returning its hidden states."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.WhisperConfig(
            **{"vocab_size": 50, "num_mel_bins": 8, "d_model": 16, "max_source_positions": 6},
            **{"encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32},
            **{"encoder_attention_heads": 2, "decoder_attention_heads": 2, "max_target_positions": 8},
            **{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1},
        )
        self.encoder = transformers.WhisperModel(config).get_encoder()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.encoder(features).last_hidden_state  # (B, 6, 16)


def _ids(n: int, g: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, 20, (n, 6), generator=g)
    ids[:, 0] = 0  # the padding row stays zero in peft and here
    return ids


def _floats(*shape: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda n, g: torch.randn(n, *shape, generator=g)


# case -> (network, inputs(n, generator), our strategy, peft's config for the same adapter)
Case = tuple[Callable[[], nn.Module], Callable, Callable[[], object], Callable[[], object]]
LORA_ARGS = {"r": 4, "lora_alpha": 8}
WHISPER_TARGETS = ["conv1", "conv2", "q_proj", "v_proj"]
CASES: dict[str, Case] = {
    "lora-conv1d": (
        _conv1d,
        _floats(4, 12),
        lambda: LoRA(**LORA_ARGS, target_modules=["0", "2"]),
        lambda: peft.LoraConfig(**LORA_ARGS, target_modules=["0", "2"]),
    ),
    "dora-conv1d": (
        _conv1d,
        _floats(4, 12),
        lambda: LoRA(**LORA_ARGS, target_modules=["0", "2"], use_dora=True),
        lambda: peft.LoraConfig(**LORA_ARGS, target_modules=["0", "2"], use_dora=True),
    ),
    "lora-conv3d": (
        _conv3d,
        _floats(3, 3, 5, 5),
        lambda: LoRA(r=6, lora_alpha=3, target_modules=["0", "2"], use_rslora=True),
        lambda: peft.LoraConfig(r=6, lora_alpha=3, target_modules=["0", "2"], use_rslora=True),
    ),
    "dora-conv3d": (
        _conv3d,
        _floats(3, 3, 5, 5),
        lambda: LoRA(**LORA_ARGS, target_modules=["0"], use_dora=True),
        lambda: peft.LoraConfig(**LORA_ARGS, target_modules=["0"], use_dora=True),
    ),
    "lora-grouped-conv2d": (
        _grouped_conv2d,
        _floats(4, 6, 6),
        lambda: LoRA(r=8, lora_alpha=16, target_modules=["0", "2"]),
        lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"]),
    ),
    "lora-multihead-attention": (
        Attention,
        _floats(5, 16),
        lambda: LoRA(**LORA_ARGS, target_modules=["attn"]),
        lambda: peft.LoraConfig(**LORA_ARGS, target_modules=["attn"]),
    ),
    "dora-embedding": (
        _embedding,
        _ids,
        lambda: LoRA(**LORA_ARGS, target_modules=["0", "1"], use_dora=True),
        lambda: peft.LoraConfig(**LORA_ARGS, target_modules=["0", "1"], use_dora=True),
    ),
    "dora-whisper-encoder": (
        WhisperStem,
        _floats(8, 12),  # (mel bins, frames)
        lambda: LoRA(**LORA_ARGS, target_modules=WHISPER_TARGETS, use_dora=True),
        lambda: peft.LoraConfig(**LORA_ARGS, target_modules=WHISPER_TARGETS, use_dora=True),
    ),
    "ia3-conv2d": (
        _conv2d,
        _floats(3, 6, 6),
        lambda: IA3(target_modules=["0", "2"], feedforward_modules=["2"]),
        lambda: peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]),
    ),
    "ia3-conv3d-grouped": (
        _conv3d,
        _floats(3, 3, 5, 5),
        lambda: IA3(target_modules=["0", "2"], feedforward_modules=["2"]),
        lambda: peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]),
    ),
}
GROUPED = ("lora-grouped-conv2d", "lora-conv3d")  # LoRA on grouped convolutions: no merge
MERGEABLE = [c for c in CASES if c not in GROUPED]
# peft 0.21's conv layers do not expose the wrapped conv's stride, which Whisper's encoder reads: an
# adapted Whisper fails in peft, so that case is checked here (merge, training), not against peft
AGAINST_PEFT = [c for c in CASES if c != "dora-whisper-encoder"]


def _net(case: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[case][0]().eval()


def _inputs(case: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    return CASES[case][1](n, torch.Generator().manual_seed(seed))


def _perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every trainable tensor away from its start (B = 0, l = 1), so that outputs tell."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=g))
    return model


def _comparable(model: nn.Module, case: str) -> nn.Module:
    """peft 0.21 adds the update of nn.MultiheadAttention's out_proj twice (its merge writes W + dW, then
    merges the out_proj layer again: huggingface/peft#3774), so against peft that update is kept at
    zero; :func:`test_attention_update_is_the_low_rank_update_of_both_weights` checks it by hand."""
    if case == "lora-multihead-attention":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "out_proj" in name and "lora_B" in name:
                    param.zero_()
    return model


def _out(model: nn.Module, case: str) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs(case))


@pytest.mark.parametrize("case", AGAINST_PEFT)
def test_our_export_loads_in_peft_with_equal_outputs(case: str, tmp_path: Path) -> None:
    ours = _comparable(_perturb(CASES[case][2]().apply(_net(case))), case)
    assert export_adapter(ours, tmp_path / "out").format == "peft"
    theirs = peft.PeftModel.from_pretrained(_net(case), str(tmp_path / "out")).eval()
    expected = _out(ours, case)
    assert not torch.allclose(expected, _out(_net(case), case), atol=1e-3)  # the adapter acts
    torch.testing.assert_close(_out(theirs, case), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", AGAINST_PEFT)
def test_an_adapter_saved_by_peft_loads_here_with_equal_outputs(case: str, tmp_path: Path) -> None:
    theirs = _comparable(_perturb(peft.get_peft_model(_net(case), CASES[case][3]())), case).eval()
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = load_adapter(_net(case), tmp_path / "adapter").eval()
    assert not torch.allclose(_out(theirs, case), _out(_net(case), case), atol=1e-3)
    torch.testing.assert_close(_out(ours, case), _out(theirs, case), atol=1e-5, rtol=0)


def test_attention_update_is_the_low_rank_update_of_both_weights() -> None:
    case = "lora-multihead-attention"
    model = _perturb(LoRA(r=4, lora_alpha=8, target_modules=["attn"]).apply(_net(case)))
    layer, x = model.attn, _inputs(case)
    reference = _net(case)  # the same seed: the same base weights, then W + s B A set by hand
    with torch.no_grad():
        reference.attn.in_proj_weight.add_(2 * layer.lora_B @ layer.lora_A)  # s = 8 / 4
        reference.attn.out_proj.weight.add_(2 * layer.out_proj_lora_B @ layer.out_proj_lora_A)
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)
    model(x).square().sum().backward()
    assert all(bool(p.grad.abs().sum() > 0) for p in (layer.lora_A, layer.lora_B, layer.out_proj_lora_A))


def test_two_named_attention_adapters_add_both_updates_and_merge_in_order() -> None:
    case = "lora-multihead-attention"
    model = _net(case)
    for name in ("a", "b"):
        add_adapter(model, name, LoRA(r=2, target_modules=["attn"], init_lora_weights=False))
    set_active_adapters(model, ["a", "b"])
    outer, inner, x = model.attn, model.attn.base_layer, _inputs(case)
    reference = _net(case)
    with torch.no_grad():
        reference.attn.in_proj_weight.add_(outer.delta_weight() + inner.delta_weight())
        reference.attn.out_proj.weight.add_(outer.out_delta_weight() + inner.out_delta_weight())
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        LoRA(target_modules=["attn"]).merge(model)
        assert inner.merged and outer.merged
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_a_transformer_encoder_layer_gives_the_adapted_outputs_on_its_inference_fast_path() -> None:
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    base = copy.deepcopy(block).eval()
    model = _perturb(LoRA(r=4, target_modules=["self_attn"]).apply(nn.Sequential(block)))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    expected = model.train()(x).detach()  # training: the module path, through functional_call
    with torch.no_grad():  # eval without grad: torch's fused kernel, reading in_proj_weight and out_proj
        torch.testing.assert_close(model.eval()(x), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(base(x), expected, atol=1e-3)


def test_the_new_layer_kinds_are_the_ones_injected() -> None:
    kinds = {
        "lora-conv1d": LoRAConv1d,
        "lora-conv3d": LoRAConv3d,
        "lora-multihead-attention": LoRAMultiheadAttention,
        "dora-embedding": LoRAEmbedding,
        "ia3-conv2d": IA3Conv,
    }
    for case, kind in kinds.items():
        model = CASES[case][2]().apply(_net(case))
        assert any(isinstance(m, kind) for m in model.modules()), case


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_and_unmerge_keep_the_outputs(case: str) -> None:
    strategy = CASES[case][2]()
    model = _perturb(strategy.apply(_net(case)))
    expected = _out(model, case)
    strategy.merge(model)
    torch.testing.assert_close(_out(model, case), expected, atol=1e-5, rtol=0)
    strategy.unmerge(model)
    torch.testing.assert_close(_out(model, case), expected, atol=1e-5, rtol=0)


def test_merging_lora_on_a_grouped_conv_is_refused_and_changes_nothing() -> None:
    strategy = CASES["lora-grouped-conv2d"][2]()
    model = _perturb(strategy.apply(_net("lora-grouped-conv2d")))
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"(?s)nothing was changed:.*0: LoRA on a convolution with groups=2"):
        merge_and_unwrap(model)  # what export_merged does
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_dora_embedding_magnitude_is_one_norm_per_embedding_dimension() -> None:
    model = LoRA(r=2, target_modules=["0"], use_dora=True).apply(_embedding())
    layer = model[0]
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), layer.base_layer.weight.norm(dim=0))


def test_dora_embedding_column_norms_match_the_norms_of_the_summed_table() -> None:
    torch.manual_seed(0)
    model = LoRA(r=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
    layer = model.apply(nn.Sequential(nn.Embedding(3000, 32)))[0]
    with torch.no_grad():
        summed = layer.inner_layer().weight + layer.delta_weight().T  # (vocab, dim), built by hand
        torch.testing.assert_close(
            layer._dora_row_norm(layer.base_weight()), summed.norm(dim=0), rtol=1e-5, atol=0
        )


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (LoRA(target_modules=["attn"], use_dora=True), "use_dora does not apply"),
        (LoRA(target_modules=["attn.out_proj"]), "output projection of an nn.MultiheadAttention"),
        (LoRA(r=3, target_modules=["0"]), "groups=2: r must be a multiple of it, got r=3"),
    ],
)
def test_settings_these_layers_cannot_take_are_refused_naming_the_field(strategy, message) -> None:
    model = Attention() if "attn" in str(strategy.target_modules) else _grouped_conv2d()
    with pytest.raises(ValueError, match=message):
        strategy.apply(model)


def test_all_linear_leaves_the_attention_out_proj_alone() -> None:
    model = LoRA(target_modules="all-linear").apply(Attention())
    assert isinstance(model.attn, nn.MultiheadAttention)  # all-linear takes linear layers only
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


# ------------------------------------------------------------------------------- through the Trainer


class Regressor(L.LightningModule):
    """A user's module around one of the tiny networks, fitting a teacher's outputs."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.model = _net(case).train()
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.1)


def _data(case: str) -> DataLoader:
    """Inputs and the outputs of the same network with another adapter: targets the adapter can reach."""
    x = _inputs(case, n=16, seed=3)
    teacher = _perturb(CASES[case][2]().apply(_net(case)), seed=7)
    with torch.no_grad():
        y = teacher(x)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _fit(module: Regressor, case: str, root: Path, ckpt_path: Path | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=root,
        callbacks=[PEFT(CASES[case][2](), module="model", verbose=False)],
    )
    trainer.fit(module, _data(case), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("case", list(CASES))
def test_trains_through_the_peft_callback_and_resumes(case: str, tmp_path: Path) -> None:
    trained = Regressor(case)
    trainer = _fit(trained, case, tmp_path)
    assert trained.losses[-1] < 0.9 * trained.losses[0], trained.losses  # the loss measurably drops
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert set(saved) == {f"model.{n}" for n in adapter_parameter_names(trained.model)}  # adapters only
    resumed = Regressor(case)
    _fit(resumed, case, tmp_path, ckpt_path=tmp_path / "last.ckpt")  # finished: restores, trains no more
    assert resumed.losses == []
    torch.testing.assert_close(
        _out(resumed.model.eval(), case), _out(trained.model.eval(), case), atol=0, rtol=0
    )
