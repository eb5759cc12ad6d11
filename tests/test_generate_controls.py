"""Generation controls on a tiny character-level Llama trained to repeat a sentence: the settings and
their files, prompt files, and what stop strings, banned and forced words, batching and streaming do to
the text it writes (transformers' own controls compared with the text they replace)."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import BASE_TEXT, fit_to_text, tiny_char_llama
from transformers import StoppingCriteriaList

from lightning_peft.data.tokenizer import char_tokenizer
from lightning_peft.generation.generate import (
    DEFAULT_SETTINGS_FILE,
    GenerationSettings,
    StopAtStrings,
    generate,
    read_prompts,
    word_token_ids,
)


@pytest.fixture(scope="module")
def trained() -> dict:
    """A base model that writes BASE_TEXT, and its tokenizer."""
    base = tiny_char_llama()
    fit_to_text(base, BASE_TEXT, steps=150, lr=1e-2)
    return {"base": base, "tokenizer": char_tokenizer()}


def _greedy(model, tokenizer, prompts=("the ", "a d", "on "), **settings) -> list[str]:
    settings = {"max_new_tokens": 24, **settings}
    records = generate(model, tokenizer, list(prompts), GenerationSettings(**settings))
    return [r["completion"] for r in records]


# ------------------------------------------------------------------------------------------- settings


def test_settings_report_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        GenerationSettings(do_sample=True, temperature=0, top_p=1.5, max_new_tokens=0, stop_strings=[""])
    message = str(err.value)
    for part in (
        "temperature must be > 0 when sampling",
        "top_p must be in (0, 1]",
        "max_new_tokens",
        "stop_strings",
    ):
        assert part in message


def test_greedy_decoding_accepts_temperature_zero_and_several_completions_need_sampling():
    assert GenerationSettings(temperature=0).temperature == 0
    with pytest.raises(ValueError, match="num_return_sequences > 1 needs do_sample"):
        GenerationSettings(num_return_sequences=2)
    with pytest.raises(ValueError, match="both banned and forced"):
        GenerationSettings(bad_words=["cat"], force_words=["cat"])


def test_a_settings_file_builds_the_same_settings_here_and_with_hydra(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    text = '_target_: lightning_peft.generation.generate.GenerationSettings\nmax_new_tokens: 9\nstop_strings: ["\\n"]\n'
    (tmp_path / "s.yaml").write_text(text)
    ours = GenerationSettings.from_file(tmp_path / "s.yaml", seed=4, top_k=None)
    assert ours == GenerationSettings(max_new_tokens=9, stop_strings=["\n"], seed=4)
    assert instantiate(OmegaConf.load(tmp_path / "s.yaml"), _convert_="all") == GenerationSettings(
        max_new_tokens=9, stop_strings=["\n"]
    )


def test_the_shipped_settings_file_lists_every_field_at_its_default():
    from dataclasses import fields

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    assert DEFAULT_SETTINGS_FILE.name == "generation.yaml" and DEFAULT_SETTINGS_FILE.parent.name == "conf"
    node = OmegaConf.load(DEFAULT_SETTINGS_FILE)
    assert set(node) - {"_target_"} == {f.name for f in fields(GenerationSettings)}
    assert GenerationSettings.from_file(DEFAULT_SETTINGS_FILE) == GenerationSettings()
    assert instantiate(node, _convert_="all") == GenerationSettings()


def test_settings_file_with_an_unknown_key_names_the_known_ones(tmp_path):
    (tmp_path / "s.yaml").write_text("temprature: 0.5\n")
    with pytest.raises(
        ValueError, match=r"unknown generation settings \['temprature'\]; known: max_new_tokens"
    ):
        GenerationSettings.from_file(tmp_path / "s.yaml")


# -------------------------------------------------------------------------------------------- prompts


def test_prompts_are_read_from_lines_or_jsonl_with_an_optional_formatter(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\\nb", "q": "x"}\n{"prompt": "c", "q": "y"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a\nb", "c"]
    assert read_prompts(tmp_path / "p.jsonl", format_record=lambda r: f"Q: {r['q']}") == ["Q: x", "Q: y"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_prompts(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------- banned, stop, forced


def test_a_banned_word_never_appears_in_sampled_completions(trained):
    model, tokenizer = trained["base"], trained["tokenizer"]
    sampled = {"do_sample": True, "temperature": 1.5, "num_return_sequences": 8, "seed": 0}
    free = _greedy(model, tokenizer, **sampled)
    assert sum("cat" in text for text in free) >= len(free) // 2  # the model writes it when allowed
    banned = _greedy(model, tokenizer, bad_words=["cat"], **sampled)
    assert len(banned) == 24 and not any("cat" in text for text in banned)


def test_a_word_is_banned_alone_and_after_a_space():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["cat sat on the cat mat"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    forms = word_token_ids(tokenizer, "cat")
    assert forms == [tokenizer("cat")["input_ids"], tokenizer(" cat")["input_ids"]]
    assert len(forms) == 2 and forms[0] != forms[1] and all(len(form) == 1 for form in forms)


def test_a_stop_string_ends_the_completion_just_before_it(trained):
    model, tokenizer = trained["base"], trained["tokenizer"]
    (free,) = generate(model, tokenizer, "the ", GenerationSettings(max_new_tokens=30))
    assert free["completion"].startswith("cat sat on the mat.") and free["stop_reason"] == "length"
    assert free["num_tokens"] == 30
    (stopped,) = generate(
        model, tokenizer, "the ", GenerationSettings(max_new_tokens=30, stop_strings=["mat", "."])
    )
    assert stopped["completion"] == "cat sat on the "
    assert stopped["stop_reason"] == "stop_string" and stopped["stop_string"] == "mat"
    assert stopped["num_tokens"] == len("cat sat on the mat")


def test_forced_words_appear_with_greedy_decoding_and_sampling(trained):
    model, tokenizer = trained["base"], trained["tokenizer"]
    assert not any("dog" in text or "xyz" in text for text in _greedy(model, tokenizer))
    forced = _greedy(model, tokenizer, force_words=["dog", "xyz"])
    sampled = _greedy(model, tokenizer, force_words=["dog"], do_sample=True, num_return_sequences=4, seed=1)
    assert all("dog" in text and "xyz" in text for text in forced)
    assert all("dog" in text for text in sampled)
    with pytest.raises(ValueError, match="more than max_new_tokens=4"):
        _greedy(model, tokenizer, force_words=["dog", "xyz"], max_new_tokens=4)


def test_a_stop_string_counts_only_after_the_forced_words(trained):
    model, tokenizer = trained["base"], trained["tokenizer"]
    settings = GenerationSettings(max_new_tokens=24, stop_strings=["."], force_words=["dog"])
    (record,) = generate(model, tokenizer, "the ", settings)
    text = record["completion"]
    assert "." in text and "dog" in text  # the first "." came before "dog" and did not stop it
    assert record["stop_reason"] in ("length", "stop_string")


def test_the_same_seed_samples_the_same_text_and_leaves_the_global_random_state(trained):
    model, tokenizer = trained["base"], trained["tokenizer"]
    state = torch.get_rng_state()
    settings = {"do_sample": True, "temperature": 2.0, "num_return_sequences": 4}
    first = _greedy(model, tokenizer, seed=3, **settings)
    assert _greedy(model, tokenizer, seed=3, **settings) == first
    assert torch.equal(torch.get_rng_state(), state)


def test_batched_prompts_give_the_completions_of_single_ones(trained):
    model, tokenizer = trained["base"], trained["tokenizer"]
    prompts = ["the ", "a long prompt: the ", "on "]
    assert _greedy(model, tokenizer, prompts, batch_size=3) == _greedy(model, tokenizer, prompts)


def _tiny_char_gpt2(seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("build", [tiny_char_llama, _tiny_char_gpt2], ids=["llama", "gpt2"])
def test_left_padded_batches_equal_each_prompt_generated_alone_by_transformers(build):
    model, tokenizer = build(seed=3), char_tokenizer()
    prompts = ["a", "a much longer prompt, padded least", "mid length"]
    batched = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12, batch_size=3))
    for prompt, record in zip(prompts, batched, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False, pad_token_id=0, eos_token_id=2)  # fmt: skip
        tokens = alone[0, ids.shape[1] :].tolist()
        assert record["completion"] == tokenizer.decode(tokens, skip_special_tokens=True)
        assert record["num_tokens"] == len(tokens) == 12


def _spy_generate(model, monkeypatch) -> list[dict]:
    calls: list[dict] = []
    original = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return calls


@pytest.mark.parametrize("stops", [["mat"], ["sat", "."], ["at ", "zzz"]])
def test_transformers_stop_strings_cut_where_the_free_completion_first_holds_one(trained, monkeypatch, stops):
    model, tokenizer = trained["base"], trained["tokenizer"]
    prompts = ["the ", "a d", "on "]
    free = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=30))
    calls = _spy_generate(model, monkeypatch)
    stopped = generate(
        model, tokenizer, prompts, GenerationSettings(max_new_tokens=30, stop_strings=stops, batch_size=3)
    )
    assert all(call["stop_strings"] == stops and "stopping_criteria" not in call for call in calls)
    cut = 0
    for before, after in zip(free, stopped, strict=True):
        text = before["completion"]
        hits = [(text.index(s), order, s) for order, s in enumerate(stops) if s in text]
        if not hits:
            assert after == before | {"settings": after["settings"]}
            continue
        index, _, stop = min(hits)
        assert after["completion"] == text[:index] and after["stop_string"] == stop
        assert after["num_tokens"] == index + len(stop)  # one token per character
        assert after["stop_reason"] == "stop_string"
        cut += 1
    assert cut >= 2
    # and they are the records of the stopping criterion used before transformers' (ours, still used
    # with forced words), on the same model and prompts
    settings = GenerationSettings(max_new_tokens=30, stop_strings=stops, batch_size=3)

    def ours(tokenizer, prompts, length, settings):
        stop = StopAtStrings(tokenizer, length, settings.stop_strings)
        return {"stopping_criteria": StoppingCriteriaList([stop])}

    monkeypatch.setattr("lightning_peft.generation.generate._stopping", ours)
    assert generate(model, tokenizer, prompts, settings) == stopped


def test_a_stop_string_begun_in_the_prompt_is_looked_for_in_the_completion_alone(trained, monkeypatch):
    model, tokenizer = trained["base"], trained["tokenizer"]
    (free,) = generate(model, tokenizer, "the cat sat on the m", GenerationSettings(max_new_tokens=30))
    assert free["completion"].startswith("at. the cat sat on the mat")
    calls = _spy_generate(model, monkeypatch)
    settings = GenerationSettings(max_new_tokens=30, stop_strings=["mat"])
    (record,) = generate(model, tokenizer, "the cat sat on the m", settings)
    assert "stop_strings" not in calls[0]  # transformers would stop at once: "m" + "at"
    assert record["completion"] == "at. the cat sat on the " and record["stop_string"] == "mat"


def test_streaming_writes_the_completion_as_it_grows_and_stops_before_the_stop_string(trained):
    model, tokenizer = trained["base"], trained["tokenizer"]

    class Chunks(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    out = Chunks()
    settings = GenerationSettings(max_new_tokens=30, stop_strings=["on the mat"])
    (record,) = generate(model, tokenizer, "the ", settings, stream=out)
    assert out.getvalue() == record["completion"] + "\n" == "cat sat \n"
    assert out.writes > 3
