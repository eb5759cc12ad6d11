"""Scoring generations against references: exact match and ROUGE-L over a set of instruction records.

Exact match is strict: the completion, stripped of surrounding white space, equals the reference. (The
exact match of torchmetrics' SQuAD metric lowercases and drops punctuation first, so an answer in the
wrong format would count as right, which is what a format task measures.) ROUGE-L is torchmetrics'
``ROUGEScore`` F-measure of the longest common subsequence, which gives partial credit for near misses.

    metrics, samples = evaluate_records(model, tokenizer, records, template)
    metrics   # {"exact_match": ..., "rougeL": ..., "num_records": len(records)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_peft.generation.generate import generate
from lightning_peft.generation.settings import GenerationSettings
from lightning_peft.generation.templates import PromptTemplate


def score_generations(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``exact_match`` (share of stripped completions equal to their reference) and ``rougeL``
    (torchmetrics' mean ROUGE-L F-measure), one reference per completion."""
    from torchmetrics.text.rouge import ROUGEScore

    if len(generated) != len(references) or not references:
        raise ValueError(
            f"score_generations needs one reference per completion and at least one pair; got "
            f"{len(generated)} completions and {len(references)} references"
        )
    exact = sum(g.strip() == r.strip() for g, r in zip(generated, references, strict=True))
    rouge = ROUGEScore(rouge_keys=("rougeL",))(list(generated), list(references))["rougeL_fmeasure"]
    return {"exact_match": exact / len(references), "rougeL": float(rouge)}


def evaluate_records(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    template: PromptTemplate,
    settings: GenerationSettings | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy completions of ``records`` (prompts through ``template``) scored against their responses.

    Returns ``(metrics, samples)``: the metrics of :func:`score_generations` plus ``num_records``, and
    one ``{"prompt", "generated", "reference"}`` dict per record, in order (``prompt`` is the
    template's prompt before any chat formatting). The model is put in eval
    mode for the generation; afterwards every submodule is back in the mode it was in.

    Example::

        metrics, samples = evaluate_records(model, tokenizer, read_jsonl("heldout.jsonl"), CHAT)
    """
    settings = settings or GenerationSettings(max_new_tokens=32, batch_size=8)
    prompts = [template.prompt_text(record, tokenizer) for record in records]
    references = [template.format_response(record) for record in records]
    modes = [(module, module.training) for module in model.modules()]  # some may be in eval mode on purpose
    model.eval()
    try:
        completions = [r["completion"].strip() for r in generate(model, tokenizer, prompts, settings)]
    finally:
        for module, training in modes:
            module.training = training
    metrics: dict[str, float] = {**score_generations(completions, references), "num_records": len(records)}
    samples = [
        {"prompt": template.format_prompt(record), "generated": completion, "reference": reference}
        for record, completion, reference in zip(records, completions, references, strict=True)
    ]
    return metrics, samples
