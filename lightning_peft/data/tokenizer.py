"""A character-level tokenizer built in code, for tiny causal LMs that have no tokenizer of their own.

Tests, the tiny-model configs and the instruction-tuning example need real text in and out of a model
built from a config, with nothing downloaded. ``char_tokenizer()`` returns an ordinary
``transformers`` fast tokenizer (one token per printable ASCII character, plus ``<pad>``, ``<s>``,
``</s>``, ``<unk>`` at ids 0-3) that ``save_pretrained`` writes and ``AutoTokenizer`` reads back, so
``lightning-peft generate`` loads it like any other.
"""

from __future__ import annotations

import string

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3: pad, bos, eos, unk
ALPHABET = "".join(c for c in string.printable if c not in "\x0b\x0c\r")


def char_tokenizer(alphabet: str = ALPHABET, chat_template: str | None = None):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``alphabet``.

    Unknown characters become ``<unk>``; decoding joins the characters back without spaces.

    Example::

        tok = char_tokenizer()
        tok("hi")["input_ids"]        # [21, 22]
        tok.decode([21, 22])          # "hi"
        len(tok)                      # 101: the vocab_size of a model to pair with it
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError("char_tokenizer: alphabet has repeated characters")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *alphabet))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # "." skips newlines
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
