"""LoftQ initialisation: the same base weights, A and B as peft's LoftQ (run on the CPU), for LoRA and
QLoRA; a smaller weight error than plain QLoRA; exports that peft loads on the LoftQ base and peft
adapters that load here; training and resuming through the PEFT callback; refusals naming the field."""

from __future__ import annotations

import inspect
import json
import sys
import warnings

import peft
import pytest
import torch
from conftest import tiny_llama
from peft.tuners.lora import layer as peft_lora_layer
from peft.utils import loftq_utils
from test_lora_fields import _Holder, assert_trains_and_resumes, outputs, perturb
from torch import nn

from lightning_peft import PEFT, LoRA, QLoRA, export_adapter, load_adapter
from lightning_peft.strategies.quantized import dense_weight, quantized_kind

TARGETS = ["q_proj", "v_proj", "down_proj"]
# peft's rule for picking its LoftQ compute device, the one line the CPU patch replaces
_PEFT_DEVICE_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")


@pytest.fixture
def peft_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let peft's LoftQ run on this CPU-only machine.

    peft's ``loftq_init`` moves the weight to a compute device it picks as "xpu" or "cuda", with no CPU
    choice, although bitsandbytes quantizes on the CPU too. The patch rebuilds that function from its
    own source with that one line set to "cpu" (everything else, the quantizer's settings included,
    is peft's) and puts it where peft's LoRA layer looks it up. A peft release that changes the line
    fails here, naming it.
    """
    source = inspect.getsource(loftq_utils.loftq_init)
    assert source.count(_PEFT_DEVICE_LINE) == 1, f"peft's loftq_init no longer holds {_PEFT_DEVICE_LINE!r}"
    rebuilt: dict = {}
    code = compile(source.replace(_PEFT_DEVICE_LINE, 'compute_device = "cpu"'), loftq_utils.__file__, "exec")
    exec(code, loftq_utils.__dict__, rebuilt)  # in peft's module globals: the same helpers and imports
    monkeypatch.setattr(peft_lora_layer, "loftq_init", rebuilt["loftq_init"])


def _peft_loftq(steps: int, **fields) -> nn.Module:
    config = peft.LoraConfig(
        init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=steps), **fields
    )
    return peft.get_peft_model(tiny_llama(), config)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA layers of ours or of a peft model, by their path in the transformers model."""
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if name.endswith(tuple(TARGETS)) and hasattr(m, "base_layer")
    }


def _pair(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer.lora_A, nn.ModuleDict):  # peft's
        return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    return layer.lora_A.detach(), layer.lora_B.detach()


def loftq_base(adapted: nn.Module) -> nn.Module:
    """A fresh tiny Llama holding the base weights of ``adapted`` (ours or peft's): LoftQ's dequantized
    Q in adapted layers, and every other quantized layer dequantized."""
    base = tiny_llama()
    with torch.no_grad():
        for name, module in adapted.named_modules():
            if name.endswith(".base_layer") or quantized_kind(module) is not None:
                path = name.removeprefix("base_model.model.").removesuffix(".base_layer")
                base.get_submodule(path).weight.copy_(dense_weight(module).float())
    return base


def _max_difference(ours: dict, theirs: dict) -> dict[str, float]:
    worst = {"base": 0.0, "A": 0.0, "B": 0.0}
    for name, layer in ours.items():
        other = theirs[name]
        pairs = zip(("A", "B"), _pair(layer), _pair(other), strict=True)
        differences = {kind: (mine - peers).abs().max().item() for kind, mine, peers in pairs}
        differences["base"] = (dense_weight(layer.base_layer) - other.base_layer.weight).abs().max().item()
        worst = {k: max(v, differences[k]) for k, v in worst.items()}
    return worst


@pytest.mark.parametrize("steps", [1, 2])
def test_lora_loftq_equals_peft_base_a_and_b(steps, peft_on_cpu):
    fields = {"r": 4, "lora_alpha": 4, "target_modules": TARGETS}
    ours = LoRA(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": steps}, **fields)
    ours = _layers(ours.apply(tiny_llama()))
    theirs = _layers(_peft_loftq(steps, **fields))
    assert len(ours) == len(theirs) == 6
    worst = _max_difference(ours, theirs)
    assert max(worst.values()) <= 1e-5, worst  # measured: 0 (the same operations in the same order)
    original = tiny_llama().model.layers[0].self_attn.q_proj.weight
    assert (ours["model.layers.0.self_attn.q_proj"].base_layer.weight - original).abs().max() > 1e-3, (
        "the base weight was not replaced by its quantization"
    )


@pytest.mark.parametrize("steps", [1, 2])
def test_qlora_stores_the_4bit_q_whose_dequantization_is_peft_loftq_base(steps, peft_on_cpu):
    fields = {"r": 4, "lora_alpha": 4, "target_modules": TARGETS}
    strategy = QLoRA(
        init_lora_weights="loftq", loftq_config={"loftq_iter": steps}, double_quant=False, **fields
    )
    ours = _layers(strategy.apply(tiny_llama()))
    assert all(quantized_kind(layer.base_layer) == "4-bit" for layer in ours.values())
    worst = _max_difference(ours, _layers(_peft_loftq(steps, **fields)))
    assert max(worst.values()) <= 1e-5, worst


def test_with_double_quant_a_and_b_fit_the_q_that_is_stored():
    strategy = QLoRA(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq")
    model = strategy.apply(tiny_llama())
    original = tiny_llama()
    for name, layer in _layers(model).items():
        assert layer.base_layer.weight.quant_state.nested, "double_quant was not kept"
        lost = original.get_submodule(name).weight.detach() - dense_weight(layer.base_layer)
        u, s, vh = torch.linalg.svd(lost, full_matrices=False)
        a, b = _pair(layer)
        torch.testing.assert_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=0)


def _errors(model: nn.Module) -> tuple[float, float]:
    """(||W - deq(Q)||, ||W - (deq(Q) + s B A)||) summed over the adapted layers (Frobenius norms)."""
    original, quantized, adapted = tiny_llama(), 0.0, 0.0
    for name, layer in _layers(model).items():
        weight = original.get_submodule(name).weight.detach()
        base = dense_weight(layer.base_layer).float()
        a, b = _pair(layer)
        quantized += (weight - base).norm().item()
        adapted += (weight - base - layer.scaling * b @ a).norm().item()
    return quantized, adapted


@pytest.mark.parametrize("steps", [1, 2])
def test_loftq_makes_up_for_part_of_the_quantization_error(steps):
    loftq = QLoRA(
        r=4,
        lora_alpha=4,
        target_modules=TARGETS,
        init_lora_weights="loftq",
        loftq_config={"loftq_iter": steps},
    )
    quantized, adapted = _errors(loftq.apply(tiny_llama()))
    plain, _ = _errors(QLoRA(r=4, lora_alpha=4, target_modules=TARGETS).apply(tiny_llama()))
    # measured, summed over the 6 layers: plain QLoRA 0.611; LoftQ 1 step 0.420 (-31%), 2 steps 0.340 (-44%)
    assert adapted < 0.75 * plain, (steps, plain, quantized, adapted)
    assert adapted < 0.75 * quantized


def test_the_start_is_the_same_for_every_lora_alpha():
    def product(alpha: float) -> dict[str, torch.Tensor]:
        strategy = LoRA(r=4, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="loftq")
        layers = _layers(strategy.apply(tiny_llama()))
        return {name: layer.scaling * (_pair(layer)[1] @ _pair(layer)[0]) for name, layer in layers.items()}

    # peft's A, B do not depend on lora_alpha, so its start s L R does; ours divides by sqrt(s)
    for name, update in product(16).items():
        torch.testing.assert_close(update, product(4)[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["LoRA", "QLoRA"])
def test_export_loads_in_peft_on_the_loftq_base_without_running_loftq_again(kind, tmp_path):
    fields = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": "loftq"}
    strategy = LoRA(**fields) if kind == "LoRA" else QLoRA(**fields, compute_dtype="float32")
    ours = perturb(strategy.apply(tiny_llama()))
    export_adapter(ours, tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and "loftq_config" not in config
    # no CPU patch here: a peft that ran LoftQ again would fail for want of CUDA
    theirs = peft.PeftModel.from_pretrained(loftq_base(ours), str(tmp_path / "adapter"))
    torch.testing.assert_close(outputs(ours), outputs(theirs), atol=1e-5, rtol=0)
    assert not torch.allclose(outputs(ours), outputs(loftq_base(ours)), atol=1e-3)


def test_export_from_a_callback_checkpoint_loads_in_peft_on_the_loftq_base(tmp_path):
    lit = _Holder(tiny_llama())
    callback = PEFT(
        LoRA(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq"), module="model"
    )
    callback.adapt(lit)
    perturb(lit)
    checkpoint = {"state_dict": lit.state_dict()}
    callback.prune_checkpoint(lit, checkpoint)  # adapter tensors only: the LoftQ base is not in it
    torch.save(checkpoint, tmp_path / "adapter.ckpt")
    export_adapter(tmp_path / "adapter.ckpt", tmp_path / "adapter", format="peft")
    theirs = peft.PeftModel.from_pretrained(loftq_base(lit.model), str(tmp_path / "adapter"))
    torch.testing.assert_close(outputs(lit.model), outputs(theirs), atol=1e-5, rtol=0)


def test_the_callback_does_not_run_loftq_again_on_a_model_that_carries_it():
    strategy = QLoRA(r=4, target_modules=TARGETS, init_lora_weights="loftq")
    lit = _Holder(strategy.apply(tiny_llama()))
    before = {name: value.clone() for name, value in lit.state_dict().items()}
    assert PEFT(strategy, module="model", verbose=False).adapt(lit) is False
    for name, value in lit.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_adapter_saved_by_peft_loads_here_on_the_loftq_base(peft_on_cpu, tmp_path):
    theirs = perturb(_peft_loftq(2, r=4, lora_alpha=8, target_modules=TARGETS))
    theirs.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"]["loftq_iter"] == 2
    ours = load_adapter(loftq_base(theirs), tmp_path / "adapter")
    torch.testing.assert_close(outputs(ours), outputs(theirs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["LoRA", "QLoRA"])
def test_trains_through_the_callback_and_resumes_exactly(kind, tmp_path):
    def strategy():
        fields = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": "loftq"}
        return LoRA(**fields, loftq_config={"loftq_iter": 2}) if kind == "LoRA" else QLoRA(**fields)

    assert_trains_and_resumes(tmp_path, strategy)


def test_loftq_without_bitsandbytes_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    model = tiny_llama()
    with pytest.raises(
        ValueError, match="init_lora_weights='loftq' quantizes with bitsandbytes, which cannot"
    ):
        LoRA(target_modules=["q_proj"], init_lora_weights="loftq").apply(model)
    assert not any(hasattr(m, "lora_A") for m in model.modules()), "the model was changed"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loftq_config": {"loftq_bits": 8}}, r"loftq_config\['loftq_bits'\] must be 4"),
        ({"loftq_config": {"loftq_iter": 0}}, r"loftq_config\['loftq_iter'\] must be an integer >= 1"),
        ({"loftq_config": {"bits": 4}}, r"loftq_config has unknown keys \['bits'\]"),
        ({"use_dora": True}, "init_lora_weights='loftq' needs use_dora=False"),
    ],
)
def test_bad_loftq_settings_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        LoRA(init_lora_weights="loftq", **fields)


def test_loftq_config_without_loftq_and_qlora_other_than_nf4_are_refused():
    with pytest.raises(
        ValueError, match="loftq_config is read only with init_lora_weights='loftq', got True"
    ):
        LoRA(loftq_config={"loftq_iter": 2})
    with pytest.raises(ValueError, match="init_lora_weights='loftq' quantizes to nf4; got quant_type='fp4'"):
        QLoRA(init_lora_weights="loftq", quant_type="fp4")


def test_loftq_refuses_layers_other_than_dense_linear_naming_them():
    with pytest.raises(
        ValueError, match="'model.embed_tokens' is a Embedding; init_lora_weights='loftq' quantizes loaded"
    ):
        LoRA(target_modules=["embed_tokens"], init_lora_weights="loftq").apply(tiny_llama())


def test_qlora_targets_outside_quantize_modules_get_the_dense_loftq_base():
    strategy = QLoRA(
        r=4, target_modules=["q_proj", "v_proj"], quantize_modules=["q_proj"], init_lora_weights="loftq"
    )
    model = strategy.apply(tiny_llama())
    dense = LoRA(r=4, target_modules=["v_proj"], init_lora_weights="loftq").apply(tiny_llama())
    layer, reference = model.model.layers[0].self_attn, dense.model.layers[0].self_attn
    assert quantized_kind(layer.q_proj.base_layer) == "4-bit" and type(layer.v_proj.base_layer) is nn.Linear
    torch.testing.assert_close(
        layer.v_proj.base_layer.weight, reference.v_proj.base_layer.weight, atol=0, rtol=0
    )
    torch.testing.assert_close(layer.v_proj.lora_A, reference.v_proj.lora_A, atol=0, rtol=0)
