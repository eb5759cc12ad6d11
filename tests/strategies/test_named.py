"""Several named adapters on one base: add, activate, disable, delete, save and load each."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import cnn, tiny_bert, tiny_llama

from lightning_peft.strategies import LoRA, disable_adapters
from lightning_peft.strategies.base import merged_stack
from lightning_peft.strategies.lora import LoRAConv2d, LoRAEmbedding, LoRALinear
from lightning_peft.strategies.named import (
    active_adapters,
    adapter_names,
    adapter_state_dict,
    add_adapter,
    canonical_name,
    delete_adapter,
    load_adapter_state_dict,
    set_active_adapters,
)

TARGETS = ["q_proj", "v_proj"]


def lora(seed: int) -> LoRA:
    torch.manual_seed(seed)  # init_lora_weights=False: each adapter changes the outputs differently
    return LoRA(r=2, target_modules=TARGETS, init_lora_weights=False)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def two_adapters():
    model = tiny_llama()
    torch.manual_seed(1)
    add_adapter(model, "a", LoRA(r=2, target_modules=TARGETS, init_lora_weights=False))
    torch.manual_seed(2)
    add_adapter(model, "b", LoRA(r=2, target_modules=TARGETS, init_lora_weights=False))
    return model


def single(seed: int, state: dict) -> torch.nn.Module:
    """The same base with one adapter holding ``state``: the reference for a stacked model."""
    model = tiny_llama()
    add_adapter(model, "only", LoRA(r=2, target_modules=TARGETS))
    load_adapter_state_dict(model, "only", state)
    return model


def test_first_adapter_is_active_and_later_ones_are_added_inactive(two_adapters):
    assert adapter_names(two_adapters) == ["a", "b"]
    assert active_adapters(two_adapters) == ["a"]


def test_each_active_adapter_gives_the_outputs_of_that_adapter_alone(two_adapters, token_ids):
    for name in ("a", "b"):
        set_active_adapters(two_adapters, name)
        reference = single(0, adapter_state_dict(two_adapters, name))
        torch.testing.assert_close(
            logits(two_adapters, token_ids), logits(reference, token_ids), atol=1e-6, rtol=0
        )


def test_adapters_differ_and_both_active_add_up(two_adapters, token_ids):
    base = logits(tiny_llama(), token_ids)
    set_active_adapters(two_adapters, "a")
    only_a = logits(two_adapters, token_ids)
    set_active_adapters(two_adapters, "b")
    only_b = logits(two_adapters, token_ids)
    assert not torch.allclose(only_a, only_b)
    set_active_adapters(two_adapters, ["a", "b"])
    both = logits(two_adapters, token_ids)
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    set_active_adapters(two_adapters, None)
    assert torch.equal(logits(two_adapters, token_ids), base)


def test_disable_adapters_gives_the_base_and_restores_the_active_set(two_adapters, token_ids):
    set_active_adapters(two_adapters, "b")
    with disable_adapters(two_adapters):
        assert torch.equal(logits(two_adapters, token_ids), logits(tiny_llama(), token_ids))
    assert active_adapters(two_adapters) == ["b"]


def test_adapter_state_uses_canonical_names_of_that_adapter_only(two_adapters):
    state = adapter_state_dict(two_adapters, "a")
    assert set(state) == {
        f"model.layers.{i}.self_attn.{t}.lora_{ab}" for i in (0, 1) for t in TARGETS for ab in "AB"
    }
    stacked_names = {n for n, _ in two_adapters.named_parameters() if ".base_layer.lora_" in n}
    assert stacked_names, "the first adapter sits inside the second one"
    assert canonical_name("x.q_proj.base_layer.lora_A") == "x.q_proj.lora_A"


def test_an_adapter_saved_alone_loads_into_a_stack_in_another_order(two_adapters, token_ids):
    set_active_adapters(two_adapters, "a")
    expected = logits(two_adapters, token_ids)
    other = tiny_llama()
    add_adapter(other, "a", LoRA(r=2, target_modules=TARGETS))  # now the inner one of a different stack
    add_adapter(other, "b", LoRA(r=2, target_modules=TARGETS))
    load_adapter_state_dict(other, "a", adapter_state_dict(two_adapters, "a"))
    set_active_adapters(other, "a")
    torch.testing.assert_close(logits(other, token_ids), expected, atol=1e-6, rtol=0)


def test_loading_a_state_that_does_not_fit_names_the_keys(two_adapters):
    state = adapter_state_dict(two_adapters, "a")
    state.pop("model.layers.0.self_attn.q_proj.lora_A")
    with pytest.raises(
        ValueError, match=r"missing trainable tensors \(1\): model.layers.0.self_attn.q_proj.lora_A"
    ):
        load_adapter_state_dict(two_adapters, "b", state)


def test_delete_adapter_unwraps_its_layers_and_keeps_the_other(two_adapters, token_ids):
    set_active_adapters(two_adapters, "b")
    expected_b = logits(two_adapters, token_ids)
    delete_adapter(two_adapters, "a")
    assert adapter_names(two_adapters) == ["b"]
    q_proj = two_adapters.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base_layer, torch.nn.Linear)
    torch.testing.assert_close(logits(two_adapters, token_ids), expected_b, atol=1e-6, rtol=0)
    delete_adapter(two_adapters, "b")
    assert torch.equal(logits(two_adapters, token_ids), logits(tiny_llama(), token_ids))
    assert {n for n, _ in two_adapters.named_parameters()} == {n for n, _ in tiny_llama().named_parameters()}


def test_all_named_adapters_train_and_the_base_stays_frozen(two_adapters):
    trainable = {n for n, p in two_adapters.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2 * 2  # 2 adapters x 2 layers x 2 targets x (A, B)


def test_only_the_active_adapter_gets_gradients(two_adapters, token_ids):
    set_active_adapters(two_adapters, "b")
    two_adapters(token_ids, labels=token_ids).loss.backward()
    for path, module in two_adapters.named_modules():
        if isinstance(module, LoRALinear):
            got_grad = module.lora_B.grad is not None and bool(module.lora_B.grad.abs().sum() > 0)
            assert got_grad == (module.adapter_name == "b"), path


def test_duplicate_and_unknown_names_are_refused(two_adapters):
    with pytest.raises(ValueError, match="exists already"):
        add_adapter(two_adapters, "a", LoRA(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"no adapter named \['c'\]; adapters here: \['a', 'b'\]"):
        set_active_adapters(two_adapters, "c")
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        delete_adapter(two_adapters, "c")


def test_a_plain_apply_twice_is_still_refused_outside_add_adapter():
    model = tiny_llama()
    LoRA(r=2, target_modules=TARGETS).apply(model)
    with pytest.raises(ValueError, match="already carries an adapter"):
        LoRA(r=2, target_modules=TARGETS).apply(copy.deepcopy(model))


# ------------------------------------------------------------------------ stacks on other layer kinds


def test_a_second_named_adapter_on_conv2d_layers_adds_its_update() -> None:
    model = cnn()
    torch.manual_seed(1)
    add_adapter(model, "a", LoRA(r=2, target_modules=["0", "2"], init_lora_weights=False))
    torch.manual_seed(2)
    add_adapter(model, "b", LoRA(r=2, target_modules=["0", "2"], init_lora_weights=False))
    set_active_adapters(model, ["a", "b"])
    outer = model[0]
    assert isinstance(outer, LoRAConv2d) and isinstance(outer.base_layer, LoRAConv2d)
    conv = outer.inner_layer()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    weight = conv.weight + outer.delta_weight() + outer.base_layer.delta_weight()
    expected = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding)
    with torch.no_grad():
        torch.testing.assert_close(outer(x), expected, atol=1e-5, rtol=0)


def test_a_second_named_adapter_on_an_embedding_adds_its_update(token_ids) -> None:
    model = tiny_llama()
    targets = ["embed_tokens"]
    torch.manual_seed(1)
    add_adapter(model, "a", LoRA(r=2, target_modules=targets, init_lora_weights=False))
    torch.manual_seed(2)
    add_adapter(model, "b", LoRA(r=2, target_modules=targets, init_lora_weights=False))
    set_active_adapters(model, ["a", "b"])
    outer = model.model.embed_tokens
    assert isinstance(outer, LoRAEmbedding) and isinstance(outer.base_layer, LoRAEmbedding)
    # delta_weight() is (out, in) = (dim, vocab), the transpose of the stored table
    weight = outer.inner_layer().weight + (outer.delta_weight() + outer.base_layer.delta_weight()).T
    with torch.no_grad():
        torch.testing.assert_close(outer(token_ids), F.embedding(token_ids, weight), atol=1e-5, rtol=0)


def test_a_dora_adapter_on_an_embedding_adapter_decomposes_the_table_that_adapter_gives(token_ids) -> None:
    model = tiny_llama()
    targets = ["embed_tokens"]
    add_adapter(model, "a", LoRA(r=2, target_modules=targets, init_lora_weights=False))
    add_adapter(model, "b", LoRA(r=2, target_modules=targets, use_dora=True, init_lora_weights=False))
    set_active_adapters(model, ["a", "b"])
    outer = model.model.embed_tokens
    with torch.no_grad():
        # by hand in the (dim, vocab) orientation: a column of the table per token, one norm per dim
        below = outer.inner_layer().weight.T + outer.base_layer.delta_weight()
        expected = _dora_of(below, outer).T  # back to the stored (vocab, dim) table
        torch.testing.assert_close(outer(token_ids), F.embedding(token_ids, expected), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- what trains


def test_adding_an_adapter_keeps_the_biases_an_earlier_one_made_trainable() -> None:
    model = tiny_bert()
    add_adapter(model, "a", LoRA(r=2, target_modules=["query"], bias="all"))
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert biases and all(p.requires_grad for p in biases)
    add_adapter(model, "b", LoRA(r=2, target_modules=["query"]))
    assert all(p.requires_grad for p in biases)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if n.endswith(".bias")} <= trainable
    assert not any(n.endswith(".weight") and "lora_" not in n for n in trainable)


# ------------------------------------------------------------------------------------------- merging


def _weights(model) -> dict[str, torch.Tensor]:
    """The base weights of every adapted layer (under canonical names), as copies."""
    return {
        canonical_name(n): m.inner_layer().weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, LoRALinear) and not isinstance(m.base_layer, LoRALinear)
    }


def _peft_twin(ours, names: tuple[str, ...]):
    """A peft model with named adapters holding the same tensors as ``ours``'s (same base, plain LoRA)."""
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS)
    theirs = peft.get_peft_model(tiny_llama(), config, adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, config)
    inner = theirs.base_model.model
    with torch.no_grad():
        for name in names:
            for key, value in adapter_state_dict(ours, name).items():
                path, tensor = key.rsplit(".", 1)
                getattr(inner.get_submodule(path), tensor)[name].weight.copy_(value)
    return theirs.eval()


def test_merge_folds_in_only_the_active_adapters_as_peft_does(two_adapters, token_ids):
    set_active_adapters(two_adapters, "b")
    theirs = _peft_twin(two_adapters, ("a", "b"))
    theirs.base_model.set_adapter("b")
    before = logits(two_adapters, token_ids)
    torch.testing.assert_close(logits(theirs, token_ids), before, atol=1e-5, rtol=0)
    LoRA().merge(two_adapters)
    theirs.merge_adapter()
    outer = two_adapters.model.layers[0].self_attn.q_proj
    assert outer.merged and not outer.base_layer.merged  # "b" wraps "a": only "b" was active
    torch.testing.assert_close(logits(two_adapters, token_ids), before, atol=1e-5, rtol=0)
    peft_weights = {
        k: theirs.base_model.model.get_submodule(k.removesuffix(".weight") + ".base_layer").weight
        for k in (f"model.layers.{i}.self_attn.{t}.weight" for i in (0, 1) for t in TARGETS)
    }
    for key, weight in _weights(two_adapters).items():
        torch.testing.assert_close(weight, peft_weights[key + ".weight"], atol=1e-6, rtol=0)


def test_unmerge_takes_adapters_out_in_reverse_order_as_peft_does(two_adapters, token_ids):
    base = _weights(two_adapters)
    theirs = _peft_twin(two_adapters, ("a", "b"))
    set_active_adapters(two_adapters, "b")  # "b" first, then "a" once activated too
    LoRA().merge(two_adapters)
    set_active_adapters(two_adapters, ["a", "b"])
    LoRA().merge(two_adapters)
    q_proj = two_adapters.model.layers[0].self_attn.q_proj
    assert [m.adapter_name for m in merged_stack(q_proj)] == ["b", "a"]
    theirs.base_model.set_adapter(["a", "b"])  # before merging: peft unmerges when it switches
    theirs.merge_adapter(["b"])
    theirs.merge_adapter(["a"])
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.merged_adapters == ["b", "a"]
    torch.testing.assert_close(logits(two_adapters, token_ids), logits(theirs, token_ids), atol=1e-5, rtol=0)
    LoRA().unmerge(two_adapters)
    theirs.unmerge_adapter()
    assert merged_stack(q_proj) == []
    for key, weight in _weights(two_adapters).items():
        torch.testing.assert_close(weight, base[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(two_adapters, token_ids), logits(theirs, token_ids), atol=1e-5, rtol=0)


def test_a_layer_refuses_to_unmerge_before_an_adapter_merged_after_it(two_adapters):
    set_active_adapters(two_adapters, ["a", "b"])
    LoRA().merge(two_adapters)
    inner = two_adapters.model.layers[0].self_attn.q_proj.base_layer
    with pytest.raises(
        ValueError, match=r"cannot unmerge adapter 'a' while 'b', merged into the same weight"
    ):
        inner.unmerge()


def test_a_layer_refuses_to_merge_on_an_active_unmerged_adapter_below(two_adapters):
    set_active_adapters(two_adapters, ["a", "b"])
    with pytest.raises(
        ValueError, match=r"cannot merge adapter 'b' before the active adapters below it \('a'\)"
    ):
        two_adapters.model.layers[0].self_attn.q_proj.merge()


# ------------------------------------------------------------------------------- DoRA on another adapter


def _stack(first: LoRA, second: LoRA, build=tiny_llama):
    model = build()
    torch.manual_seed(1)
    add_adapter(model, "a", first)
    torch.manual_seed(2)
    add_adapter(model, "b", second)
    set_active_adapters(model, ["a", "b"])
    return model


def _dora(targets=TARGETS) -> LoRA:
    return LoRA(r=2, target_modules=targets, use_dora=True, init_lora_weights=False)


def _dora_of(weight: torch.Tensor, layer) -> torch.Tensor:
    """DoRA's weight by hand: m / ||W + dW|| * (W + dW), per output row."""
    summed = weight + layer.delta_weight()
    norm = summed.flatten(1).norm(dim=1)
    return summed * (layer.lora_magnitude_vector / norm).view(-1, *[1] * (summed.dim() - 1))


def test_dora_on_another_adapter_decomposes_the_weight_that_adapter_gives() -> None:
    model = _stack(lora(1), _dora())
    outer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        below = outer.inner_layer().weight + outer.base_layer.delta_weight()  # W + (B A)_a s_a
        expected = _dora_of(below, outer)
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(outer(x), F.linear(x, expected), atol=1e-5, rtol=0)
        torch.testing.assert_close(outer.adapted_weight(), expected, atol=1e-6, rtol=0)


def test_dora_on_another_adapter_trains_both_adapters(token_ids) -> None:
    model = _stack(lora(1), _dora())
    model(token_ids, labels=token_ids).loss.backward()
    outer = model.model.layers[0].self_attn.q_proj
    for layer in (outer, outer.base_layer):
        assert layer.lora_A.grad is not None and bool(layer.lora_A.grad.abs().sum() > 0), layer.adapter_name
    assert bool(outer.lora_magnitude_vector.grad.abs().sum() > 0)


def test_dora_on_a_conv2d_adapter_decomposes_the_weight_that_adapter_gives() -> None:
    model = _stack(LoRA(r=2, target_modules=["0"], init_lora_weights=False), _dora(["0"]), build=cnn)
    outer = model[0]
    conv = outer.inner_layer()
    with torch.no_grad():
        expected = _dora_of(conv.weight + outer.base_layer.delta_weight(), outer)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        reference = F.conv2d(x, expected, conv.bias, conv.stride, conv.padding)
        torch.testing.assert_close(outer(x), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("first", ["lora", "dora"])
def test_stacked_dora_merges_with_unchanged_outputs_and_unmerges_to_the_base(first, token_ids) -> None:
    model = _stack(lora(1) if first == "lora" else _dora(), _dora())
    base, before = _weights(model), logits(model, token_ids)
    LoRA().merge(model)
    torch.testing.assert_close(logits(model, token_ids), before, atol=1e-5, rtol=0)
    LoRA().unmerge(model)
    for key, weight in _weights(model).items():
        torch.testing.assert_close(weight, base[key], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, token_ids), before, atol=1e-5, rtol=0)


def test_stacked_dora_merged_outer_first_unmerges_to_the_base(token_ids) -> None:
    # "b" (outside) is merged alone, then "a" (inside) on the weight that holds "b" already:
    # unmerging must take "a" out first, whatever the stacking order
    model = _stack(_dora(), _dora())
    base = _weights(model)
    set_active_adapters(model, "b")
    LoRA().merge(model)
    set_active_adapters(model, ["a", "b"])
    before = logits(model, token_ids)  # "a" now applies to the weight "b" was merged into
    LoRA().merge(model)
    torch.testing.assert_close(logits(model, token_ids), before, atol=1e-5, rtol=0)
    with disable_adapters(model):
        torch.testing.assert_close(
            logits(model, token_ids), logits(tiny_llama(), token_ids), atol=1e-5, rtol=0
        )
    torch.testing.assert_close(logits(model, token_ids), before, atol=1e-5, rtol=0)
    LoRA().unmerge(model)
    for key, weight in _weights(model).items():
        torch.testing.assert_close(weight, base[key], atol=1e-5, rtol=0)


def test_deleting_a_merged_adapter_is_refused_and_changes_nothing(two_adapters, token_ids):
    set_active_adapters(two_adapters, "b")
    LoRA().merge(two_adapters)
    before = logits(two_adapters, token_ids)
    with pytest.raises(ValueError, match="adapter 'b' is merged into the base weights; unmerge it first"):
        delete_adapter(two_adapters, "b")
    assert adapter_names(two_adapters) == ["a", "b"]
    torch.testing.assert_close(logits(two_adapters, token_ids), before, atol=0, rtol=0)
