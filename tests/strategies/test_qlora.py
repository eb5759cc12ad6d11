"""QLoRA on the CPU with bitsandbytes: storage per weight, identity at init, error against full precision,
gradient checkpointing with frozen embeddings, merging into a quantized base, training, LLM.int8, errors.
CUDA variants carry the ``cuda`` marker."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama
from torch import nn

from lightning_peft.strategies import (
    LoRA,
    LoRALinear,
    disable_adapters,
    load_trainable_state_dict,
    trainable_state_dict,
)
from lightning_peft.strategies.base import adapter_parameter_names, count_parameters, strategy_from_config
from lightning_peft.strategies.qlora import QLoRA, quantized_weight_bytes
from lightning_peft.strategies.quantized import dense_weight, quantized_kind
from lightning_peft.strategies.transformers_compat import enable_checkpointing

bnb = pytest.importorskip("bitsandbytes")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# LLM.int8 logs one line per eval matmul with float32 inputs ("inputs will be cast ... to float16")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------- helpers


def _wide_llama() -> nn.Module:
    """One Llama block wide enough (256 x 512) that per-tensor constants no longer dominate storage."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    # the bitsandbytes layers themselves, not the adapters around them (whose .weight is theirs)
    return {
        name: m
        for name, m in model.named_modules()
        if quantized_kind(m) is not None and not isinstance(m, LoRALinear)
    }


def _lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def _lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{p}": getattr(m, p)
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear)
        for p in ("lora_A", "lora_B")
    }


def _packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor that stores a quantized base weight (codes and statistics)."""
    tensors = {}
    for name, layer in _quantized_layers(model).items():
        weight = layer.weight
        tensors[f"{name}.codes"] = weight.data.clone()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors[f"{name}.absmax"] = state.absmax.clone()
            if state.nested:
                tensors[f"{name}.absmax2"] = state.state2.absmax.clone()
                tensors[f"{name}.offset"] = state.offset.clone()
    return tensors


def _enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    enable_checkpointing(model, use_reentrant=use_reentrant)


# ------------------------------------------------------------------------------------ what is quantized


def test_qlora_quantizes_every_linear_but_the_output_head() -> None:
    model = QLoRA(r=4).apply(tiny_llama())
    quantized = _quantized_layers(model)
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in quantized.values())
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in _lora_modules(model))
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is nn.Embedding
    # only the adapters train; the parameter count is the logical one (4-bit codes pack two per byte)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_parameter_names(model))
    assert count_parameters(model)[1] == count_parameters(tiny_llama())[1] + sum(
        p.numel() for p in _lora_params(model).values()
    )


def test_quantize_modules_and_modules_to_save_choose_what_is_quantized() -> None:
    model = QLoRA(r=4, quantize_modules=r".*mlp\.(gate|up)_proj", target_modules=["q_proj", "up_proj"]).apply(
        tiny_llama()
    )
    assert sorted(_quantized_layers(model)) == [
        f"model.layers.{i}.mlp.{p}.base_layer" if p == "up_proj" else f"model.layers.{i}.mlp.{p}"
        for i in (0, 1)
        for p in ("gate_proj", "up_proj")
    ]
    saved = QLoRA(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"]).apply(tiny_llama())
    assert not any(".o_proj" in name for name in _quantized_layers(saved))


@pytest.mark.parametrize(
    ("quant_type", "double_quant", "low", "high"),
    [
        ("nf4", True, 0.50, 0.56),
        ("nf4", False, 0.56, 0.58),
        ("fp4", True, 0.50, 0.56),
        ("int8", False, 1.0, 1.02),
    ],
)
def test_quantized_weights_take_the_expected_bytes_per_parameter(
    quant_type: str, double_quant: bool, low: float, high: float
) -> None:
    # 4 bits per weight + an 8-bit absmax per 64 weights + a float32 per 256 absmax (double quant):
    # 0.516 bytes, plus per-tensor code books; without double quant a float32 absmax: 0.5625
    model = QLoRA(r=4, quant_type=quant_type, double_quant=double_quant).apply(_wide_llama())
    layers = _quantized_layers(model).values()
    stored = sum(quantized_weight_bytes(m) for m in layers)
    params = sum(m.in_features * m.out_features for m in layers)
    assert low <= stored / params <= high


# --------------------------------------------------------------------------------------- outputs at init


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_qlora_is_identity_at_init_over_its_quantized_base(quant_type: str, token_ids: torch.Tensor) -> None:
    # eval + no_grad: on AVX512-BF16 CPUs bitsandbytes would repack the weights here unless QLoRA
    # turned that off (and fail on k_proj, whose 16 outputs are not a multiple of 32)
    model = QLoRA(r=4, quant_type=quant_type).apply(tiny_llama())
    with disable_adapters(model):
        quantized_base = _logits(model, token_ids)
    assert torch.equal(_logits(model, token_ids), quantized_base)


def test_4bit_model_equals_the_dense_model_with_dequantized_weights(token_ids: torch.Tensor) -> None:
    """The only difference from full precision is the rounding of the weights (compute in float32)."""
    base = tiny_llama()
    model = QLoRA(r=4, compute_dtype="float32").apply(copy.deepcopy(base))
    reference = copy.deepcopy(base)
    for name, layer in _quantized_layers(model).items():
        with torch.no_grad():
            reference.get_submodule(name.removesuffix(".base_layer")).weight.copy_(dense_weight(layer))
    torch.testing.assert_close(_logits(model, token_ids), _logits(reference, token_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("quant_type", "compute_dtype", "bound"),
    [("nf4", "float32", 0.2), ("nf4", "bfloat16", 0.2), ("fp4", "bfloat16", 0.2), ("int8", "float32", 0.02)],
)
def test_quantized_model_is_close_to_full_precision(
    quant_type: str, compute_dtype: str, bound: float, token_ids: torch.Tensor
) -> None:
    # measured on this tiny model (random weights, 2 blocks): nf4 0.12, fp4 0.13, int8 0.005
    base = tiny_llama()
    model = QLoRA(r=4, quant_type=quant_type, compute_dtype=compute_dtype).apply(copy.deepcopy(base))
    error = _relative_error(_logits(model, token_ids), _logits(base, token_ids))
    assert 0 < error < bound


# ----------------------------------------------------------------------- training with frozen embeddings


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("strategy", [QLoRA, LoRA])
def test_every_adapter_gets_a_gradient_under_gradient_checkpointing(
    strategy: type[LoRA], use_reentrant: bool, token_ids: torch.Tensor
) -> None:
    # random B, so that every A gets a non-zero gradient too
    model = strategy(r=4, init_lora_weights=False).apply(tiny_llama()).train()
    _enable_checkpointing(model, use_reentrant)
    # transformers 5 hooks the embeddings itself when checkpointing is enabled; older versions do not:
    # remove its hook so that only the strategy's own is left
    model.disable_input_require_grads()
    model(token_ids, labels=token_ids).loss.backward()
    embeddings = model.get_input_embeddings().weight
    assert not embeddings.requires_grad and embeddings.grad is None
    grads = [p.grad for p in _lora_params(model).values()]
    assert len(grads) == 2 * 2 * 7
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_training_lowers_the_loss_and_leaves_the_quantized_base_bit_identical(
    token_ids: torch.Tensor,
) -> None:
    torch.manual_seed(0)
    model = QLoRA(r=8, lora_alpha=16).apply(tiny_llama()).train()
    before = _packed_state(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(token_ids, labels=token_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses  # measured: 4.14 -> 3.61, as LoRA on the dense model
    after = _packed_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert set(trainable_state_dict(model)) == set(adapter_parameter_names(model))


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_adapter_only_state_restores_into_a_fresh_qlora_model(
    quant_type: str, token_ids: torch.Tensor
) -> None:
    trained = QLoRA(r=4, quant_type=quant_type, init_lora_weights=False).apply(tiny_llama())
    state = trainable_state_dict(trained)
    assert all(".lora_" in name for name in state)  # no quantized tensor in an adapter-only checkpoint
    fresh = QLoRA(r=4, quant_type=quant_type).apply(tiny_llama())
    load_trainable_state_dict(fresh, state)
    assert torch.equal(_logits(fresh, token_ids), _logits(trained, token_ids))


# ----------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize(
    ("quant_type", "compute_dtype", "use_dora", "tolerance"),
    [
        ("nf4", "float32", False, 1e-5),
        ("nf4", "bfloat16", False, 1e-2),  # the unmerged base multiplies in bfloat16
        ("nf4", "bfloat16", True, 1e-5),  # DoRA multiplies with the dequantized weight itself
        ("int8", "float32", False, 1e-2),  # LLM.int8 quantizes the inputs too
    ],
)
def test_merging_into_a_quantized_base_dequantizes_it_and_keeps_the_outputs(
    quant_type: str, compute_dtype: str, use_dora: bool, tolerance: float, token_ids: torch.Tensor
) -> None:
    strategy = QLoRA(
        r=4, quant_type=quant_type, compute_dtype=compute_dtype, use_dora=use_dora, init_lora_weights=False
    )
    model = strategy.apply(tiny_llama())
    unmerged = _logits(model, token_ids)
    with pytest.warns(UserWarning, match="dequantized to torch.float32"):
        strategy.merge(model)
    assert not _quantized_layers(model)
    # a dense nn.Linear in the model's dtype, whatever the compute dtype was
    assert all(
        type(m.base_layer) is nn.Linear and m.weight.dtype == torch.float32 for m in _lora_modules(model)
    )
    merged = _logits(model, token_ids)
    assert _relative_error(merged, unmerged) < tolerance
    strategy.unmerge(model)  # the base stays dense
    assert _relative_error(_logits(model, token_ids), unmerged) < tolerance


# ----------------------------------------------------------------------------------------------- errors


def test_nothing_to_quantize_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"nothing to quantize: quantize_modules=\['nope'\].*q_proj \(Linear\)"
    ):
        QLoRA(quantize_modules=["nope"]).apply(tiny_llama())
    # GPT-2's Conv1D layers cannot be quantized, and its only Linear is the output head
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"nothing to quantize.*c_attn \(Conv1D\)"):
        QLoRA().apply(model)
    with pytest.raises(
        ValueError, match="'transformer.h.0.attn.c_attn' is a Conv1D; QLoRA quantizes nn.Linear"
    ):
        QLoRA(quantize_modules=["c_attn"]).apply(model)
    assert not _quantized_layers(model) and not _lora_modules(model)  # left as it was


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    model = tiny_llama()
    with pytest.raises(ValueError, match="bitsandbytes, which cannot be imported.*pip install"):
        QLoRA().apply(model)
    assert not _lora_modules(model)


def test_applying_twice_is_refused_before_anything_changes() -> None:
    model = QLoRA(r=4).apply(tiny_llama())
    with pytest.raises(ValueError, match="already carries an adapter"):
        QLoRA(r=4).apply(model)


def test_bad_config_lists_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as err:
        QLoRA(r=0, quant_type="nf3", compute_dtype="fp8", double_quant="yes", quantize_modules="(")
    message = str(err.value)
    assert message.startswith("QLoRA is misconfigured")
    for part in (
        "r must be",
        "quant_type must be",
        "compute_dtype must be",
        "double_quant must be",
        "quantize_modules=",
    ):
        assert part in message


def test_config_round_trips() -> None:
    strategy = QLoRA(
        r=4, quant_type="int8", double_quant=False, compute_dtype="float16", quantize_modules=["q_proj"]
    )
    assert strategy_from_config(strategy.to_config()) == strategy


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_qlora_trains_and_merges_on_cuda(quant_type: str, token_ids: torch.Tensor) -> None:
    strategy = QLoRA(r=4, quant_type=quant_type, init_lora_weights=False)
    model = strategy.apply(tiny_llama().to("cuda", torch.bfloat16))  # quantized on the GPU
    ids = token_ids.cuda()
    assert all(m.weight.device.type == "cuda" for m in _quantized_layers(model).values())
    assert torch.isfinite(_logits(model, ids)).all()
    model.train()
    _enable_checkpointing(model, use_reentrant=True)
    model.disable_input_require_grads()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _lora_params(model).values())
    model.eval()
    unmerged = _logits(model, ids)
    with pytest.warns(UserWarning, match="dequantized to torch.bfloat16"):
        strategy.merge(model)
    assert _relative_error(_logits(model, ids), unmerged) < 0.05


@pytest.mark.cuda
@cuda
def test_a_model_quantized_on_the_cpu_moves_to_cuda(token_ids: torch.Tensor) -> None:
    model = QLoRA(r=4, compute_dtype="float32").apply(tiny_llama())
    on_cpu = _logits(model, token_ids)
    before = _packed_state(model)
    model.to("cuda")
    after = {k: v.cpu() for k, v in _packed_state(model).items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(_logits(model, token_ids.cuda()).cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def test_bf16_qlora_casts_its_float32_adapters_not_the_input() -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 16)).to(torch.bfloat16)
    QLoRA(r=8, target_modules=["0"], quantize_modules=["0"], compute_dtype="bfloat16",
          init_lora_weights=False).apply(model)  # fmt: skip
    layer = model[0]
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(4, 16, 128, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert not [t for t in saved if t.dtype == torch.float32 and t.shape == x.shape]  # no float32 copy of x
    out.float().square().sum().backward()
    # the float32 formulation on the same (dequantized) weights: bf16 matmuls agree to bf16 precision
    a, b = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    inner = layer.base_layer
    base = torch.nn.functional.linear(x.detach().float(), dense_weight(inner).float(), inner.bias.float())
    reference = base + layer.scaling * (x.detach().float() @ a.T) @ b.T
    reference.square().sum().backward()
    assert _relative_error(out.float(), reference) < 2e-2
    assert _relative_error(layer.lora_A.grad, a.grad) < 5e-2
    assert _relative_error(layer.lora_B.grad, b.grad) < 5e-2


def test_importing_bitsandbytes_prints_no_hub_kernel_warning():
    # a fresh process: bitsandbytes logs its hub-kernel warning only on its first import
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from lightning_peft.strategies.qlora import import_bitsandbytes\n"
        "import_bitsandbytes()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in out.stderr + out.stdout
    assert "pip install kernels" not in out.stderr + out.stdout
    # at most one line about it, saying what it means
    assert (out.stderr + out.stdout).count("bitsandbytes") <= 1
