"""Storage of QLoRA's quantized base weights, in bytes per weight, and the output error they cause.

Builds a Llama-shaped model from a config (random weights, nothing downloaded), applies QLoRA with each
quantization, and prints one row per setting: the bytes that the quantized linear layers hold (codes
plus every statistic: absmax, code books, double-quantization constants, LLM.int8 row scales) divided
by their number of weights, the weights' relative error (Frobenius norm over all quantized layers) and
the logits' relative error against the full-precision model.

NF4 with double quantization should take about 0.52 bytes per weight (QLoRA, Dettmers et al., 2023,
sec. 3: 4 bits + 8/64 bits of absmax + 32/(64*256) bits of second-level constants); the per-tensor
code books add a little on small layers. Random weights give an error that is only indicative.

Run::

    python benchmarks/qlora_memory.py                     # hidden 1024, intermediate 2816, 2 blocks
    python benchmarks/qlora_memory.py --hidden 4096 --intermediate 11008 --layers 1
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch
import transformers

from lightning_peft.strategies.lora import LoRALinear
from lightning_peft.strategies.qlora import QLoRA, quantized_weight_bytes
from lightning_peft.strategies.quantized import dense_weight, quantized_kind

SETTINGS = [
    ("nf4", True),
    ("nf4", False),
    ("fp4", True),
    ("fp4", False),
    ("int8", False),
]


def build_model(hidden: int, intermediate: int, layers: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def measure(
    base: torch.nn.Module, ids: torch.Tensor, quant_type: str, double_quant: bool
) -> dict[str, float]:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    QLoRA(r=8, quant_type=quant_type, double_quant=double_quant, compute_dtype="float32").apply(model)
    seconds = time.perf_counter() - start
    layers = [m for m in model.modules() if quantized_kind(m) is not None and not isinstance(m, LoRALinear)]
    stored = sum(quantized_weight_bytes(m) for m in layers)
    weights = sum(m.in_features * m.out_features for m in layers)
    originals = dict(base.named_modules())
    squared_error = squared_norm = 0.0
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            original = originals[name].weight.float()
            squared_error += (dense_weight(module.base_layer).float() - original).square().sum().item()
            squared_norm += original.square().sum().item()
    with torch.no_grad():
        expected = base(ids).logits
        got = model(ids).logits
    error = ((got - expected).norm() / expected.norm()).item()
    return {
        "bytes": stored / weights,
        "mib": stored / 2**20,
        "weights": weights,
        "weight_error": (squared_error / squared_norm) ** 0.5,
        "error": error,
        "s": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # LLM.int8's per-call cast notice

    base = build_model(args.hidden, args.intermediate, args.layers, args.vocab)
    ids = torch.randint(3, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    print(
        f"Llama-shaped model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} blocks; "
        f"bitsandbytes {__import__('bitsandbytes').__version__}, torch {torch.__version__}"
    )
    rows = [(qt, dq, measure(base, ids, qt, dq)) for qt, dq in SETTINGS]
    weights = rows[0][2]["weights"]
    print(
        f"{weights / 1e6:.1f} M weights in quantized linear layers ({weights * 2 / 2**20:.0f} MiB in bfloat16)\n"
    )
    print(
        "| quant_type | double_quant | bytes / weight | MiB   | weight rel. error | logits rel. error | quantize s |"
    )
    print(
        "|------------|--------------|----------------|-------|-------------------|-------------------|------------|"
    )
    for quant_type, double_quant, r in rows:
        dq = str(double_quant) if quant_type != "int8" else "-"
        print(
            f"| {quant_type:<10} | {dq:<12} | {r['bytes']:<14.4f} | {r['mib']:<5.1f} | "
            f"{r['weight_error']:<17.4f} | {r['error']:<17.4f} | {r['s']:<10.2f} |"
        )


if __name__ == "__main__":
    main()
