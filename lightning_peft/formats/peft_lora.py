"""The LoRA part of ``adapter_config.json`` (peft 0.21): the keys we write, the ones we read back, and
the settings we refuse, each with the reason the README gives."""

from __future__ import annotations

from typing import Any

from lightning_peft.strategies.lora import LoRA
from lightning_peft.strategies.lora_init import WEIGHT_INITS
from lightning_peft.strategies.lora_loftq import LOFTQ

# peft settings we cannot build, with the reason the README gives; each is refused naming its field
UNSUPPORTED_LORA_FIELDS = {
    "use_qalora": "QA-LoRA pools inputs per quantization group: a different layer",
    "layer_replication": "copies transformer blocks while loading: the model's structure changes",
    "alora_invocation_tokens": "activated LoRA switches on per token after an invocation sequence",
    "megatron_config": "Megatron tensor-parallel layers",
    "velora_config": "VeLoRA compresses activations with its own autograd",
    "monteclora_config": "MonteCLoRA samples its adapters at every step",
    "use_bdlora": "BD-LoRA shares block-diagonal factors across devices (an A- or B-only adapter)",
    "kasa_config": "KaSA adds singular-value parameters and their own loss",
    "arrow_config": "Arrow routes between several adapters per token",
}


def unsupported_settings(config: dict[str, Any]) -> list[str]:
    """``field=value (reason)`` for each setting of a LoRA ``config`` that we cannot build."""
    found = [
        f"{key}={config[key]!r} ({reason})"
        for key, reason in UNSUPPORTED_LORA_FIELDS.items()
        if config.get(key) not in (None, False, [], {})
    ]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        found.append(
            f"init_lora_weights={init!r} (its randomised SVD cannot be repeated: save it from peft with "
            "path_initial_model_for_weight_conversion, which writes a plain LoRA)"
        )
    elif init not in (True, False, "gaussian", LOFTQ, *WEIGHT_INITS):
        # EVA, CorDA, LoRA-GA & co. need data, gradients or other layers to rebuild their start
        found.append(f"init_lora_weights={init!r} (not implemented; see the README)")
    return found


def lora_config(method: LoRA, targets: list[str], fan_in_fan_out: bool) -> dict[str, Any]:
    """The LoRA keys of adapter_config.json; the optional ones only when they differ from peft's default."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": method.r,
        "lora_alpha": _number(method.lora_alpha),
        "lora_dropout": method.lora_dropout,
        "target_modules": targets,
        "bias": method.bias,
        "fan_in_fan_out": fan_in_fan_out,
    }
    config |= {key: True for key in ("use_rslora", "use_dora", "lora_bias") if getattr(method, key)}
    if method.init_lora_weights == LOFTQ:
        # A LoftQ adapter is a plain LoRA on the LoftQ base (the dequantized or 4-bit Q_T). With "loftq"
        # peft would run LoftQ again at load, quantizing that base once more, on CUDA only; peft's own
        # LoftQ example sets init_lora_weights=True before saving for this reason. loftq_config goes too.
        config["init_lora_weights"] = True
    elif method.init_lora_weights is not True:
        config["init_lora_weights"] = method.init_lora_weights
    if method.rank_pattern:
        config["rank_pattern"] = dict(method.rank_pattern)
    if method.alpha_pattern:
        config["alpha_pattern"] = {k: _number(v) for k, v in method.alpha_pattern.items()}
    if method.target_parameters:
        config["target_parameters"] = list(method.target_parameters)
    if method.trainable_token_indices is not None:
        config["trainable_token_indices"] = method.trainable_token_indices
    return config


def lora_from_peft(config: dict[str, Any], saved: list[str] | None, spec: Any) -> LoRA:
    """The ``LoRA`` an adapter_config.json describes; ``spec`` normalises its module lists.

    ``init_lora_weights="loftq"`` comes in as ``True``: the saved ``A``, ``B`` are a plain LoRA on the
    base LoftQ made (its dequantized ``Q``), which the model it is loaded onto must hold already; LoftQ
    is not run again (it would quantize that base a second time).
    """
    init = config.get("init_lora_weights", True)
    return LoRA(
        r=config["r"],
        lora_alpha=config.get("lora_alpha", 8),
        lora_dropout=config.get("lora_dropout", 0.0),
        target_modules=spec(config.get("target_modules")),
        exclude_modules=spec(config.get("exclude_modules")),
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
        modules_to_save=saved,
        bias=config.get("bias", "none"),
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        init_lora_weights=True if init == LOFTQ else init,
        rank_pattern=config.get("rank_pattern") or None,
        alpha_pattern=config.get("alpha_pattern") or None,
        lora_bias=bool(config.get("lora_bias", False)),
        trainable_token_indices=config.get("trainable_token_indices"),
        target_parameters=config.get("target_parameters") or None,
    )


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def wraps_parameter(path: str, method: object) -> bool:
    """Whether the adapter at module ``path`` is a ``target_parameters`` wrapper (its module, without
    the ``.base_layer`` links of nested wrappers, owns a parameter that an entry names)."""
    entries = getattr(method, "target_parameters", None) or []
    owner = path
    while owner.endswith(".base_layer"):
        owner = owner[: -len(".base_layer")]
    for entry in entries:
        module = entry.rpartition(".")[0]
        if owner == module or owner.endswith("." + module):
            return True
    return False
