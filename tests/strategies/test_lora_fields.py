"""LoRA's peft fields (``lora_bias``, ``rank_pattern``/``alpha_pattern``, ``trainable_token_indices``),
each checked both ways against peft 0.21 on small models of each layer type, trained through the PEFT
callback and resumed; and the peft settings that stay unsupported, refused naming the field."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
from conftest import VOCAB, cnn, tiny_gpt2, tiny_llama
from peft.tuners.lora import config as peft_lora_config
from torch import nn

from lightning_peft import PEFT, LoRA, export_adapter, load_adapter
from lightning_peft.strategies.base import APPLIED_ATTR
from lightning_peft.strategies.trainable_tokens import TrainableTokens

Build = Callable[[], nn.Module]
TOKENS = [5, 3, 7]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.simplefilter("ignore")  # peft and transformers warn about tiny random models


def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every trainable tensor away from its start, so that outputs tell whether it was carried."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def outputs(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if any(isinstance(m, nn.Conv2d) for m in model.modules()):
            return model(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
        ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
        ids[:, :3] = torch.tensor(TOKENS)  # the trainable tokens are read
        return model(input_ids=ids).logits


def tiny_mixtral(seed: int = 0) -> nn.Module:
    """A tiny mixture of experts whose experts are 3-D nn.Parameter stacks (transformers' MixtralExperts)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return transformers.MixtralForCausalLM(config).eval()


EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
# each case: (base model, the config fields, given alike to LoRA and to peft's LoraConfig)
CASES: dict[str, tuple[Build, dict]] = {
    "lora_bias-linear": (tiny_llama, {"target_modules": ["q_proj", "down_proj"], "lora_bias": True}),
    "lora_bias-conv1d": (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "lora_bias": True}),
    "lora_bias-conv2d": (cnn, {"target_modules": ["0", "2"], "lora_bias": True}),
    "patterns-linear-embedding": (
        tiny_llama,
        {
            "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
            "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 6, "embed_tokens": 3},
            "alpha_pattern": {"down_proj": 3, "embed_tokens": 5},
        },
    ),
    "patterns-conv1d": (
        tiny_gpt2,
        {
            "target_modules": ["c_attn", "c_proj"],
            "rank_pattern": {"h.0.attn.c_attn": 2},
            "alpha_pattern": {"c_proj": 2},
        },
    ),
    "patterns-conv2d": (
        cnn,
        {"target_modules": ["0", "2"], "rank_pattern": {"2": 6}, "alpha_pattern": {"0": 1}},
    ),
    "target_parameters-experts": (
        tiny_mixtral,
        {
            "target_modules": ["q_proj"],
            "target_parameters": EXPERTS,
            "rank_pattern": {"layers.1.mlp.experts.down_proj": 3},
        },
    ),
    "target_parameters-2d": (
        tiny_llama,
        {
            "target_modules": [],
            "target_parameters": ["self_attn.o_proj.weight"],
            "alpha_pattern": {"o_proj.weight": 2},
        },
    ),
    "trainable_tokens-list": (tiny_llama, {"target_modules": ["q_proj"], "trainable_token_indices": TOKENS}),
    "trainable_tokens-dict": (
        tiny_llama,
        {"target_modules": ["v_proj"], "trainable_token_indices": {"embed_tokens": TOKENS}},
    ),
}


def _ours(case: str) -> LoRA:
    return LoRA(r=4, lora_alpha=8, **CASES[case][1])


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_peft_with_equal_outputs(case, tmp_path):
    build, _ = CASES[case]
    ours = perturb(_ours(case).apply(build()))
    export_adapter(ours, tmp_path / "adapter", format="peft")
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path / "adapter"))
    torch.testing.assert_close(outputs(ours), outputs(theirs), atol=1e-5, rtol=0)
    assert not torch.equal(outputs(ours), outputs(build())), (
        "the adapter changes nothing: the test tells nothing"
    )


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_saved_by_peft_loads_with_equal_outputs(case, tmp_path):
    build, fields = CASES[case]
    theirs = perturb(peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, **fields)))
    theirs.save_pretrained(str(tmp_path / "adapter"))
    ours = load_adapter(build(), tmp_path / "adapter")
    torch.testing.assert_close(outputs(ours), outputs(theirs), atol=1e-5, rtol=0)


def test_rank_pattern_gives_each_module_its_rank_and_alpha():
    model = LoRA(r=4, lora_alpha=8, **CASES["patterns-linear-embedding"][1]).apply(tiny_llama())
    layers = model.model.layers
    assert layers[0].self_attn.v_proj.r == 2 and layers[1].self_attn.v_proj.r == 2
    assert layers[0].self_attn.q_proj.r == 4 and layers[1].self_attn.q_proj.r == 6
    assert layers[0].mlp.down_proj.scaling == pytest.approx(3 / 4)
    assert model.model.embed_tokens.lora_embedding_A.shape == (3, VOCAB)
    assert model.model.embed_tokens.scaling == pytest.approx(5 / 3)


def test_export_writes_the_patterns_and_fields_as_set(tmp_path):
    model = perturb(_ours("patterns-linear-embedding").apply(tiny_llama()))
    export_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 2, "layers.1.self_attn.q_proj": 6, "embed_tokens": 3}
    assert config["alpha_pattern"] == {"down_proj": 3, "embed_tokens": 5}


def test_export_of_an_applied_strategy_keeps_the_fields_the_user_set(tmp_path):
    model = perturb(LoRA(r=16, lora_alpha=3, use_rslora=True, target_modules=["q_proj"]).apply(tiny_llama()))
    export_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config.get("use_rslora")) == (16, 3, True)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    torch.testing.assert_close(outputs(model), outputs(theirs), atol=1e-5, rtol=0)


def test_lora_bias_trains_and_merges_into_the_base_bias():
    model = perturb(LoRA(r=4, target_modules=["c_attn"], lora_bias=True).apply(tiny_gpt2()))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_B_bias.requires_grad and layer.lora_B_bias.shape == (96,)
    before = outputs(model)
    LoRA().merge(model)
    torch.testing.assert_close(outputs(model), before, atol=1e-5, rtol=0)


def test_lora_bias_refuses_to_merge_into_a_layer_without_bias():
    model = LoRA(r=4, target_modules=["q_proj"], lora_bias=True).apply(tiny_llama())
    with pytest.raises(ValueError, match="lora_bias=True but its base layer has no bias"):
        LoRA().merge(model)


def test_trainable_tokens_train_only_the_chosen_rows():
    model = LoRA(r=4, target_modules=["q_proj"], trainable_token_indices=TOKENS).apply(tiny_llama())
    embedding = model.model.embed_tokens
    assert isinstance(embedding, TrainableTokens) and not embedding.base_layer.weight.requires_grad
    assert embedding.trainable_tokens_delta.shape == (3, 32)
    ids = torch.tensor([[5, 9, 7]])
    embedding(ids).sum().backward()
    assert embedding.trainable_tokens_delta.grad.abs().sum(dim=1).gt(0).tolist() == [True, False, True]
    perturb(model)
    before = outputs(model)
    LoRA().merge(model)
    torch.testing.assert_close(outputs(model), before, atol=1e-5, rtol=0)


def test_fields_given_as_hydra_containers_become_plain_dicts_and_lists():
    from omegaconf import OmegaConf

    fields = OmegaConf.create(
        {"rank_pattern": {"v_proj": 2}, "trainable_token_indices": {"embed_tokens": [3, 5]}}
    )
    strategy = LoRA(r=4, **fields)
    assert strategy.to_config()["config"]["trainable_token_indices"] == {"embed_tokens": [3, 5]}
    assert (
        type(strategy.rank_pattern) is dict and type(strategy.trainable_token_indices["embed_tokens"]) is list
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lora_bias": True, "use_dora": True}, "lora_bias=True needs use_dora=False"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive int"),
        ({"alpha_pattern": {"(": 2}}, "alpha_pattern key '\\(' is not a valid regex"),
        ({"trainable_token_indices": [3, 3]}, "trainable_token_indices must be a non-empty list of distinct"),
        ({"init_lora_weights": "eva"}, "init_lora_weights must be True, False, 'gaussian', 'pissa'"),
    ],
)
def test_bad_field_values_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        LoRA(r=4, **fields)


def test_trainable_tokens_refuse_ids_beyond_the_vocabulary_and_tied_embeddings():
    with pytest.raises(ValueError, match=f"ids must be below its {VOCAB} rows"):
        LoRA(target_modules=["q_proj"], trainable_token_indices=[VOCAB]).apply(tiny_llama())
    tied = tiny_gpt2()  # GPT-2 ties its output head to the input embedding
    with pytest.raises(ValueError, match="trainable_token_indices: 'transformer.wte' shares its weight"):
        LoRA(target_modules=["c_attn"], trainable_token_indices=[3]).apply(tied)


# ------------------------------------------------------------------------------ refused peft settings

_C = peft_lora_config
REFUSED = {
    "kasa_config": lambda: {"kasa_config": _C.KasaConfig()},
    "velora_config": lambda: {"velora_config": _C.VeloraConfig()},
    "monteclora_config": lambda: {"monteclora_config": _C.MontecloraConfig()},
    "use_bdlora": lambda: {
        "use_bdlora": _C.BdLoraConfig(
            target_modules_bd_a=["q_proj"], target_modules_bd_b=["o_proj"], nblocks=2
        )
    },
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_adapters_with_unsupported_settings_are_refused_naming_the_field(field, tmp_path):
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], **REFUSED[field]())
    )
    theirs.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=f"not supported: {field}="):
        load_adapter(tiny_llama(), tmp_path / "adapter")


def test_a_file_with_lora_a_but_no_lora_b_is_refused(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.save_pretrained(str(tmp_path / "adapter"))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(weights).items() if not k.endswith("lora_B.weight")}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="only one of lora_A/lora_B"):
        load_adapter(tiny_llama(), tmp_path / "adapter")


# ------------------------------------------------------------------------ training and resuming


class _LM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama().train()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-2)


def _data() -> torch.utils.data.DataLoader:
    # a pattern to learn: counting up from the trainable tokens
    ids = 3 + (torch.arange(12) + torch.arange(8)[:, None] * 5) % (VOCAB - 3)
    ids[:, :3] = torch.tensor(TOKENS)
    return torch.utils.data.DataLoader(ids, batch_size=4)


def _fit(root: Path, strategy: LoRA, epochs: int, ckpt: Path | None = None) -> tuple[_LM, L.Trainer]:
    module = _LM()
    trainer = L.Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        callbacks=[PEFT(strategy, module="model", verbose=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, _data(), ckpt_path=ckpt)
    return module, trainer


def assert_trains_and_resumes(root: Path, strategy: Callable[[], LoRA]) -> None:
    """``strategy()`` trains through the PEFT callback (the loss falls in 6 epochs), and a run resumed from
    epoch 3's checkpoint gives the uninterrupted run's losses and state (every tensor, 1e-5)."""
    straight, _ = _fit(root / "a", strategy(), epochs=6)
    assert straight.losses[-1] < straight.losses[0] - 0.05, f"the loss did not drop: {straight.losses}"
    _, first = _fit(root / "b", strategy(), epochs=3)
    first.save_checkpoint(root / "half.ckpt")
    resumed, _ = _fit(root / "c", strategy(), epochs=6, ckpt=root / "half.ckpt")
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(straight.losses[6:]), atol=1e-5, rtol=0
    )
    ours = resumed.state_dict()
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=0, msg=name)


TRAINED = {
    "lora_bias": lambda: LoRA(r=4, target_modules=["q_proj", "down_proj"], lora_bias=True),
    "patterns": lambda: LoRA(
        r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}
    ),
    "trainable_tokens": lambda: LoRA(r=4, target_modules=["q_proj"], trainable_token_indices=TOKENS),
}


@pytest.mark.parametrize("case", list(TRAINED))
def test_fields_train_through_the_callback_and_resume_exactly(case, tmp_path):
    straight, _ = _fit(tmp_path / "a", TRAINED[case](), epochs=6)
    assert straight.losses[-1] < straight.losses[0] - 0.05, f"the loss did not drop: {straight.losses}"
    _, first = _fit(tmp_path / "b", TRAINED[case](), epochs=3)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = _fit(tmp_path / "c", TRAINED[case](), epochs=6, ckpt=tmp_path / "half.ckpt")
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(straight.losses[6:]), atol=1e-5, rtol=0
    )
    ours = {k: v for k, v in resumed.state_dict().items()}
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=0, msg=name)


def test_export_without_a_record_reads_ranks_bias_and_tokens_from_the_layers(tmp_path):
    strategy = LoRA(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
        lora_bias=True,
        trainable_token_indices=TOKENS,
    )
    model = perturb(strategy.apply(tiny_llama()))
    object.__delattr__(model, APPLIED_ATTR)  # as a model adapted before strategies were recorded
    export_adapter(model, tmp_path / "a", format="peft")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["trainable_token_indices"] == {"model.embed_tokens": TOKENS}
    assert set(config["rank_pattern"].values()) == {2}
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    torch.testing.assert_close(outputs(model), outputs(theirs), atol=1e-5, rtol=0)


# what every other LoraConfig field is: read into LoRA, bookkeeping, or a companion of an initialisation
_READ = {
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
    "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "trainable_token_indices", "use_dora", "lora_bias", "target_parameters",
    "loftq_config",  # LoRA's own field; an import needs none of it (the weights are a plain LoRA on the LoftQ base)
}  # fmt: skip
_BOOKKEEPING = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip
_INIT_COMPANIONS = {"eva_config", "corda_config", "lora_ga_config"}  # refused with their init


def test_every_peft_lora_field_is_read_or_refused_and_the_readme_names_each_refusal():
    import dataclasses

    from lightning_peft.formats.peft_lora import UNSUPPORTED_LORA_FIELDS

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - _READ - _BOOKKEEPING - _INIT_COMPANIONS == set(UNSUPPORTED_LORA_FIELDS)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [field for field in UNSUPPORTED_LORA_FIELDS if f"`{field}`" not in readme]
    assert not missing, f"the README's unsupported list lacks {missing}"


def test_a_model_adapted_by_apply_resumes_through_the_callback_with_the_same_strategy(tmp_path):
    _, first = _fit(tmp_path / "b", TRAINED["lora_bias"](), epochs=1)
    first.save_checkpoint(tmp_path / "half.ckpt")
    module = _LM()
    TRAINED["lora_bias"]().apply(module.model)  # recorded: the callback finds it adapted already
    trainer = L.Trainer(
        default_root_dir=tmp_path / "c",
        max_epochs=2,
        callbacks=[PEFT(TRAINED["lora_bias"](), module="model", verbose=False)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _data(), ckpt_path=tmp_path / "half.ckpt")
    layers = [m for m in module.model.modules() if hasattr(m, "lora_B_bias")]
    assert len(layers) == 4 and all(not hasattr(m.base_layer, "lora_B_bias") for m in layers), "adapted twice"


class _Holder(L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


@pytest.mark.parametrize(
    "strategy",
    [
        _ours("patterns-linear-embedding"),
        _ours("lora_bias-linear"),
        _ours("trainable_tokens-dict"),
        LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa"),
        LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="olora"),
    ],
    ids=["patterns", "lora_bias", "tokens", "pissa", "olora"],
)
def test_export_from_a_callback_checkpoint_loads_in_peft_with_equal_outputs(strategy, tmp_path):
    lit = _Holder(tiny_llama())
    callback = PEFT(strategy, module="model", verbose=False)
    callback.adapt(lit)
    perturb(lit)
    checkpoint = {"state_dict": lit.state_dict()}
    callback.prune_checkpoint(lit, checkpoint)
    torch.save(checkpoint, tmp_path / "adapter.ckpt")
    export_adapter(tmp_path / "adapter.ckpt", tmp_path / "adapter", format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    torch.testing.assert_close(outputs(lit.model), outputs(theirs), atol=1e-5, rtol=0)


def test_target_parameters_give_each_expert_its_own_update():
    model = LoRA(r=2, target_modules=[], target_parameters=EXPERTS).apply(tiny_mixtral())
    outer = model.model.layers[0].mlp.experts  # down_proj's wrapper around gate_up_proj's
    inner = outer.base_layer
    assert (outer.parameter_name, inner.parameter_name) == ("down_proj", "gate_up_proj")
    assert inner.lora_A.shape == (2 * 4, 32) and inner.lora_B.shape == (96, 2 * 4)
    perturb(model)
    delta = inner.delta_weight()  # (experts, 96, 32)
    a, b = inner.lora_A.detach(), inner.lora_B.detach()
    for e in range(4):  # expert e: rows e*r.. of A, columns k*E + e of B (peft's layout)
        expected = b[:, [k * 4 + e for k in range(2)]] @ a[e * 2 : e * 2 + 2] * inner.scaling
        torch.testing.assert_close(delta[e], expected)
    assert not any("parametrizations" in n for n in model.state_dict()), (
        "the parametrization outlives the call"
    )


def test_target_parameters_refuse_dropout_and_names_without_a_module():
    with pytest.raises(ValueError, match="target_parameters needs lora_dropout=0"):
        LoRA(target_modules=[], target_parameters=EXPERTS, lora_dropout=0.1)
    with pytest.raises(ValueError, match="'<module>.<parameter>' names"):
        LoRA(target_modules=[], target_parameters=["gate_up_proj"])
    with pytest.raises(ValueError, match="target_parameters: 'experts.nope' matches no parameter"):
        LoRA(target_modules=[], target_parameters=["experts.nope"]).apply(tiny_mixtral())


class _MoE(_LM):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_mixtral().train()


def test_target_parameters_train_through_the_callback_and_resume_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_LM", _MoE)  # _fit builds the mixture of experts

    def strategy():
        return LoRA(r=4, target_modules=[], target_parameters=EXPERTS)

    assert_trains_and_resumes(tmp_path, strategy)


def test_target_parameters_merge_and_unmerge_with_outputs_unchanged():
    strategy = LoRA(r=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    model = perturb(strategy.apply(tiny_mixtral()))
    before = outputs(model)
    strategy.merge(model)
    torch.testing.assert_close(outputs(model), before, atol=1e-5, rtol=0)
    strategy.unmerge(model)
    torch.testing.assert_close(outputs(model), before, atol=1e-5, rtol=0)
