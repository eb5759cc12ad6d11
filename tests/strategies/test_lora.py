"""LoRA, rsLoRA and DoRA layers in pure PyTorch: forward against the paper's formula and against peft,
merge/unmerge, ``disable_adapters``, bias modes, frozen base weights and config validation."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import cnn, mlp, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.strategies import LoRA, LoRAConv2d, LoRAEmbedding, LoRALinear, disable_adapters
from lightning_peft.strategies.base import adapter_parameter_names, strategy_from_config
from lightning_peft.strategies.lora import LORA_LAYERS
from lightning_peft.strategies.lora_autograd import keep_mask

IN, OUT, RANK, ALPHA = 8, 6, 2, 6.0
SCALE = ALPHA / RANK  # 3.0, computed by hand rather than read from the layer


# ---------------------------------------------------------------------------------------------- helpers


def _base_layer(kind: str) -> nn.Module:
    """One layer of each supported type, with a random (non-zero) bias."""
    torch.manual_seed(0)
    layer: nn.Module = {
        "linear": lambda: nn.Linear(IN, OUT),
        "conv1d": lambda: Conv1D(OUT, IN),  # weight stored (in, out)
        "embedding": lambda: nn.Embedding(10, OUT),
        "conv2d": lambda: nn.Conv2d(3, OUT, 3, stride=2, padding=1),
    }[kind]()
    if getattr(layer, "bias", None) is not None:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


def _input(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "embedding":
        return torch.randint(0, 10, (2, 5), generator=generator)
    if kind == "conv2d":
        return torch.randn(2, 3, 8, 8, generator=generator)
    return torch.randn(4, IN, generator=generator)


def _adapted(kind: str, **lora: object) -> tuple[nn.Sequential, nn.Module]:
    """``Sequential(layer)`` with LoRA on the layer (random A and B unless told otherwise)."""
    settings = {"r": RANK, "lora_alpha": ALPHA, "target_modules": ["0"], "init_lora_weights": False}
    settings.update(lora)
    model = LoRA(**settings).apply(nn.Sequential(_base_layer(kind)))
    return model, model[0]


def _weight_out_in(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in, ...): Conv1D stores it transposed."""
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def _randomise_magnitude(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.lora_magnitude_vector.uniform_(0.5, 1.5)


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ identity at init

IDENTITY_CASES: dict[str, tuple[Callable[[], nn.Module], object]] = {
    # every Linear and the token embedding
    "llama": (tiny_llama, r".*(_proj|embed_tokens)"),
    # every Conv1D and the (tied) token embedding
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte"]),
    # every Linear including the classifier, and the word embeddings
    "bert": (tiny_bert, ["query", "key", "value", "dense", "classifier", "word_embeddings"]),
}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", list(IDENTITY_CASES))
def test_lora_is_identity_at_init(case: str, use_dora: bool, token_ids: torch.Tensor) -> None:
    make, targets = IDENTITY_CASES[case]
    base = make()
    if use_dora:  # DoRA does not adapt embeddings
        targets = "all-linear"
    adapted = LoRA(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora).apply(copy.deepcopy(base))
    assert any(isinstance(m, LORA_LAYERS) for m in adapted.modules())
    expected, got = _logits(base, token_ids), _logits(adapted, token_ids)
    if use_dora:
        # gain m / ||W|| is exactly 1, but W x and b are added in another order than the fused addmm
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    else:
        assert torch.equal(got, expected)


def test_lora_on_conv2d_is_identity_at_init(images: torch.Tensor) -> None:
    base = cnn()
    adapted = LoRA(r=4, target_modules=["0", "2", "6"]).apply(copy.deepcopy(base))
    assert isinstance(adapted[0], LoRAConv2d) and isinstance(adapted[2], LoRAConv2d)
    assert torch.equal(_logits(adapted, images), _logits(base, images))


# ----------------------------------------------------------------------------- forward = hand formula


def test_lora_linear_forward_matches_hand_formula() -> None:
    model, layer = _adapted("linear")
    x = _input("linear")
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + SCALE * (x @ A.T) @ B.T
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-6, rtol=1e-6)


def test_lora_conv1d_forward_matches_hand_formula() -> None:
    model, layer = _adapted("conv1d")
    x = _input("conv1d")
    assert layer.fan_in_fan_out
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    assert W.shape == (IN, OUT) and A.shape == (RANK, IN) and B.shape == (OUT, RANK)
    expected = x @ W + b + SCALE * (x @ A.T) @ B.T  # Conv1D computes x W, not x W^T
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-6, rtol=1e-6)


def test_lora_embedding_forward_matches_hand_formula() -> None:
    model, layer = _adapted("embedding")
    ids = _input("embedding")
    assert isinstance(layer, LoRAEmbedding)
    E, A, B = layer.base_layer.weight, layer.lora_embedding_A, layer.lora_embedding_B
    assert A.shape == (RANK, 10) and B.shape == (OUT, RANK)
    expected = E[ids] + SCALE * A.T[ids] @ B.T
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-6, rtol=1e-6)


def test_lora_conv2d_forward_matches_hand_formula() -> None:
    model, layer = _adapted("conv2d")
    x = _input("conv2d")
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    assert A.shape == (RANK, 3, 3, 3) and B.shape == (OUT, RANK, 1, 1)
    # the update is linear in the weight: one convolution with W + s * B A gives the same result
    delta = SCALE * (B.flatten(1) @ A.flatten(1)).view_as(W)
    expected = F.conv2d(x, W + delta, b, stride=2, padding=1)
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_lora_dropout_in_train_mode_drops_only_the_adapter_input(kind: str) -> None:
    model, layer = _adapted(kind, lora_dropout=0.5)
    model.train()
    x = _input(kind)
    torch.manual_seed(123)
    got = model(x)
    torch.manual_seed(
        123
    )  # the same seed draws the same mask: LoRA's own for linear layers, nn.Dropout's for convs
    if kind == "conv2d":
        mask = F.dropout(torch.ones_like(x), p=0.5, training=True)
    else:
        keep, keep_p = keep_mask(x.shape, 0.5)
        mask = keep / keep_p
    assert (mask == 0).any() and (mask == 2).any()
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    if kind == "linear":
        expected = x @ W.T + b + SCALE * ((x * mask) @ A.T) @ B.T
    elif kind == "conv1d":
        expected = x @ W + b + SCALE * ((x * mask) @ A.T) @ B.T
    else:
        base = F.conv2d(x, W, b, stride=2, padding=1)
        expected = base + SCALE * F.conv2d(F.conv2d(x * mask, A, stride=2, padding=1), B)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_lora_dropout_is_off_in_eval_mode() -> None:
    model, layer = _adapted("linear", lora_dropout=0.5)
    model.eval()
    x = _input("linear")
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + SCALE * (x @ A.T) @ B.T
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("use_rslora", "scale"), [(False, 8 / 4), (True, 8 / 2)], ids=["lora", "rslora"])
def test_rslora_scales_by_alpha_over_sqrt_r(use_rslora: bool, scale: float) -> None:
    model, layer = _adapted("linear", r=4, lora_alpha=8, use_rslora=use_rslora)
    x = _input("linear")
    assert layer.scaling == scale
    update = _logits(model, x) - layer.base_layer(x).detach()
    torch.testing.assert_close(update, scale * (x @ layer.lora_A.T) @ layer.lora_B.T.detach())


# ------------------------------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_linear_forward_matches_hand_formula(kind: str) -> None:
    model, layer = _adapted(kind, use_dora=True)
    _randomise_magnitude(layer)
    x = _input(kind)
    W, b = _weight_out_in(layer.base_layer), layer.base_layer.bias
    A, B, m = layer.lora_A, layer.lora_B, layer.lora_magnitude_vector
    row_norm = (W + SCALE * B @ A).norm(dim=1)  # (out,)
    expected = m / row_norm * (x @ W.T + SCALE * (x @ A.T) @ B.T) + b
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-6, rtol=1e-6)


def test_dora_conv2d_forward_matches_hand_formula() -> None:
    model, layer = _adapted("conv2d", use_dora=True)
    _randomise_magnitude(layer)
    x = _input("conv2d")
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, m = layer.lora_A, layer.lora_B, layer.lora_magnitude_vector
    updated = W + SCALE * (B.flatten(1) @ A.flatten(1)).view_as(W)
    gain = m / updated.flatten(1).norm(dim=1)  # (out,)
    expected = F.conv2d(x, updated * gain.view(-1, 1, 1, 1), b, stride=2, padding=1)
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-5, rtol=1e-5)


def test_dora_magnitude_starts_at_the_row_norms_of_the_base_weight() -> None:
    _, layer = _adapted("conv1d", use_dora=True)
    expected = layer.base_layer.weight.T.norm(dim=1)  # Conv1D rows are columns of its storage
    assert torch.equal(layer.lora_magnitude_vector.detach(), expected.detach())


def test_dora_rejects_grouped_convolutions_naming_the_field() -> None:
    with pytest.raises(ValueError, match="use_dora needs groups=1"):
        LoRA(r=4, target_modules=["0"], use_dora=True).apply(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))


# ---------------------------------------------------------------------------------- against peft itself


def _copy_from_peft(ours: nn.Module, peft_model: nn.Module) -> int:
    """Copy peft's adapter tensors into our layers (same module paths); returns how many were copied."""
    state = peft_model.state_dict()
    copied = 0
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if not isinstance(layer, LORA_LAYERS):
                continue
            for local in layer.adapter_params():
                suffix = "" if local.startswith("lora_embedding") else ".weight"
                getattr(layer, local).copy_(state[f"base_model.model.{name}.{local}.default{suffix}"])
                copied += 1
    return copied


PEFT_CASES = {
    "lora-llama": (tiny_llama, {"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]}),
    "rslora-llama": (tiny_llama, {"target_modules": ["q_proj", "up_proj"], "use_rslora": True}),
    "dora-llama": (tiny_llama, {"target_modules": ["q_proj", "o_proj", "gate_proj"], "use_dora": True}),
    "lora-gpt2-conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"]}),
    "dora-gpt2-conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "use_dora": True}),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_lora_logits_match_peft(case: str, token_ids: torch.Tensor) -> None:
    make, settings = PEFT_CASES[case]
    base = make()
    extra = {"fan_in_fan_out": True} if "gpt2" in case else {}
    config = peft.LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, **settings, **extra)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    ours = LoRA(r=4, lora_alpha=12, **settings).apply(copy.deepcopy(base)).eval()
    assert _copy_from_peft(ours, theirs) > 0
    expected = _logits(theirs, token_ids)
    assert not torch.allclose(expected, _logits(base, token_ids), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(_logits(ours, token_ids), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ merge and unmerge

MERGE_CASES = {
    "linear": ("linear", False),
    "conv1d": ("conv1d", False),
    "embedding": ("embedding", False),
    "conv2d": ("conv2d", False),
    "dora-linear": ("linear", True),
    "dora-conv1d": ("conv1d", True),
    "dora-conv2d": ("conv2d", True),
}


def _merge_case(case: str) -> tuple[nn.Sequential, nn.Module, torch.Tensor]:
    kind, use_dora = MERGE_CASES[case]
    model, layer = _adapted(kind, use_dora=use_dora)
    if use_dora:
        _randomise_magnitude(layer)
    return model, layer, _input(kind)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_keeps_outputs(case: str) -> None:
    model, layer, x = _merge_case(case)
    before_weight = layer.base_layer.weight.detach().clone()
    expected = _logits(model, x)
    LoRA().merge(model)
    assert layer.merged
    assert not torch.allclose(layer.base_layer.weight, before_weight)  # the update went into W
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_unmerge_restores_base_weights_and_outputs(case: str) -> None:
    model, layer, x = _merge_case(case)
    before_weight = layer.base_layer.weight.detach().clone()
    expected = _logits(model, x)
    strategy = LoRA()
    strategy.merge(model)
    strategy.unmerge(model)
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(), before_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-5, rtol=1e-5)


def test_merge_of_gpt2_keeps_logits(token_ids: torch.Tensor) -> None:
    base = tiny_gpt2()
    model = LoRA(r=4, target_modules="all-linear", init_lora_weights=False).apply(copy.deepcopy(base))
    expected = _logits(model, token_ids)
    LoRA().merge(model)
    torch.testing.assert_close(_logits(model, token_ids), expected, atol=1e-5, rtol=1e-5)


def test_merge_refuses_an_embedding_tied_to_the_output_head() -> None:
    model = LoRA(target_modules=["wte", "c_attn"], init_lora_weights=False).apply(tiny_gpt2())
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"transformer\.wte.*lm_head\.weight"):
        LoRA().merge(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LORA_LAYERS))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_merge_after_untying_the_head_keeps_logits(token_ids: torch.Tensor) -> None:
    model = LoRA(target_modules=["wte", "c_attn"], init_lora_weights=False).apply(tiny_gpt2())
    expected = _logits(model, token_ids)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    LoRA().merge(model)
    torch.testing.assert_close(_logits(model, token_ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["linear", "dora-linear", "embedding"])
def test_merge_refuses_non_finite_weights(case: str) -> None:
    model, layer, _ = _merge_case(case)
    with torch.no_grad():
        (layer.lora_embedding_B if case == "embedding" else layer.lora_B).fill_(float("inf"))
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        LoRA().merge(model)
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, before)


def test_merge_twice_is_a_no_op() -> None:
    model, layer, _ = _merge_case("linear")
    strategy = LoRA()
    strategy.merge(model)
    once = layer.base_layer.weight.detach().clone()
    strategy.merge(model)
    assert torch.equal(layer.base_layer.weight, once)


# ------------------------------------------------------------------------------------- disable_adapters


def test_disable_adapters_gives_base_outputs_exactly(token_ids: torch.Tensor) -> None:
    base = tiny_llama()
    model = LoRA(r=4, target_modules=r".*(_proj|embed_tokens)", init_lora_weights=False)
    model = model.apply(copy.deepcopy(base))
    expected = _logits(base, token_ids)
    assert not torch.allclose(_logits(model, token_ids), expected, atol=1e-3)
    with disable_adapters(model):
        assert torch.equal(_logits(model, token_ids), expected)


def test_disable_adapters_turns_adapters_back_on_at_exit(token_ids: torch.Tensor) -> None:
    model = LoRA(r=4, init_lora_weights=False).apply(tiny_llama())
    adapted = _logits(model, token_ids)
    with disable_adapters(model):
        pass
    assert torch.equal(_logits(model, token_ids), adapted)


def test_disable_adapters_gives_base_outputs_when_merged(token_ids: torch.Tensor) -> None:
    base = tiny_gpt2()
    model = LoRA(r=4, target_modules="all-linear", init_lora_weights=False)
    model = model.apply(copy.deepcopy(base))
    LoRA().merge(model)
    with disable_adapters(model):
        # unmerging subtracts the update again: the base weights come back up to float rounding
        torch.testing.assert_close(_logits(model, token_ids), _logits(base, token_ids), atol=1e-5, rtol=0)
    assert all(m.merged for m in model.modules() if isinstance(m, LORA_LAYERS))


def test_disable_adapters_uses_the_original_of_modules_to_save(token_ids: torch.Tensor) -> None:
    base = tiny_bert()
    model = LoRA(target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False)
    model = model.apply(copy.deepcopy(base))
    with torch.no_grad():
        model.classifier.trained.weight.add_(1.0)  # as if the head had trained
    assert not torch.allclose(_logits(model, token_ids), _logits(base, token_ids), atol=1e-3)
    with disable_adapters(model):
        assert torch.equal(_logits(model, token_ids), _logits(base, token_ids))


# ------------------------------------------------------------------------------------------- bias modes


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


ADAPTERS_0_AND_2 = {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}


def test_bias_none_trains_only_adapter_parameters() -> None:
    model = LoRA(target_modules=["0", "2"], bias="none").apply(mlp())
    assert _trainable(model) == ADAPTERS_0_AND_2


def test_bias_all_trains_every_bias() -> None:
    model = LoRA(target_modules=["0", "2"], bias="all").apply(mlp())
    assert _trainable(model) == ADAPTERS_0_AND_2 | {"0.base_layer.bias", "2.base_layer.bias", "4.bias"}


def test_bias_lora_only_trains_biases_of_adapted_layers() -> None:
    model = LoRA(target_modules=["0", "2"], bias="lora_only").apply(mlp())
    assert _trainable(model) == ADAPTERS_0_AND_2 | {"0.base_layer.bias", "2.base_layer.bias"}


def test_bias_all_never_trains_the_frozen_original_of_modules_to_save() -> None:
    model = LoRA(target_modules=["query"], modules_to_save=["classifier"], bias="all").apply(tiny_bert())
    assert "classifier.trained.bias" in _trainable(model)
    assert not any(name.startswith("classifier.original.") for name in _trainable(model))


# -------------------------------------------------------------------------------- frozen base, training


def test_apply_freezes_every_non_adapter_parameter() -> None:
    model = LoRA(r=4, target_modules="all-linear", use_dora=True).apply(tiny_llama())
    adapters = set(adapter_parameter_names(model))
    assert adapters and _trainable(model) == adapters
    assert all(local in ("lora_A", "lora_B", "lora_magnitude_vector") for local in _locals(adapters))


def _locals(names: set[str]) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in names}


# ------------------------------------------------------------------------------------- configuration


def test_invalid_config_raises_one_error_listing_every_problem() -> None:
    with pytest.raises(ValueError) as error:
        LoRA(r=0, lora_dropout=1.5, bias="some", target_modules="(")
    message = str(error.value)
    for problem in ("r must be", "lora_dropout", "bias must be", "not a valid regular expression"):
        assert problem in message


@pytest.mark.parametrize(
    "settings",
    [{"lora_alpha": 0}, {"init_lora_weights": "normal"}, {"layers_to_transform": "0"}, {"r": 2.5}],
    ids=["alpha", "init", "layers", "r-float"],
)
def test_invalid_single_value_is_rejected_at_construction(settings: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(settings))):
        LoRA(**settings)


def test_lora_config_round_trips_through_json() -> None:
    strategy = LoRA(
        r=4,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=r".*\.0\..*",
        layers_to_transform=[1],
        modules_to_save=["lm_head"],
        bias="lora_only",
        use_rslora=True,
        use_dora=True,
        init_lora_weights="gaussian",
    )
    rebuilt = strategy_from_config(json.loads(json.dumps(strategy.to_config())))
    assert isinstance(rebuilt, LoRA)
    assert rebuilt == strategy


def test_lora_linear_adapter_params_are_its_own_tensors_only() -> None:
    _, layer = _adapted("linear", use_dora=True)
    assert isinstance(layer, LoRALinear)
    assert sorted(layer.adapter_params()) == ["lora_A", "lora_B", "lora_magnitude_vector"]


def test_a_failed_apply_leaves_the_model_untouched() -> None:
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="matched no module"):
        LoRA(target_modules=["no_such_layer"], modules_to_save=["classifier"]).apply(model)
    assert isinstance(model.classifier, nn.Linear), "modules_to_save must not be wrapped when apply fails"
    assert model.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in model.parameters())


def test_new_lora_layers_keep_the_train_or_eval_mode_of_the_layer_they_replace() -> None:
    model = mlp().eval()
    LoRA(r=2, lora_dropout=0.5).apply(model)
    assert not any(m.training for m in model.modules())
    model.train()
    LoRA(r=2, target_modules=["0"]).apply(mlp().train())
    assert all(m.training for m in model.modules())
