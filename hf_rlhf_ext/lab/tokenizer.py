"""The lab's word-level tokenizer, built with `tokenizers` and wrapped as a ``PreTrainedTokenizerFast``.

One token per word keeps the models tiny and makes every generated token a readable word. Two details matter for the
experiments:

* the pre-tokenizer splits on whitespace *and* punctuation, so ``prompt + completion`` tokenises the same whether or
  not TRL puts a space between them (``"agent :sorry"`` -> ``agent``, ``:``, ``sorry``);
* decoding joins words with single spaces and never "cleans up" spaces (``clean_up_tokenization_spaces=False``):
  ``"there ."`` must not become ``"there."``, or the word-matching gold reward would see different words.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Sequence

from .task import BOS_ID, EOS_ID, EOS_TOKEN, PAD_ID, SPECIAL_TOKENS, UNK_ID, vocabulary

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def chat_template() -> str:
    """The lab's Jinja chat template (``customer : ... agent : ... [EOS]``)."""
    return resources.files(__package__).joinpath(CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


def build_tokenizer(words: Sequence[str] | None = None, model_max_length: int = 128):
    """A ``PreTrainedTokenizerFast`` over ``words`` (default: the task vocabulary) plus [PAD] [UNK] [BOS] [EOS].

    Special tokens take ids 0-3 (the gold reward relies on EOS = 3); no special tokens are added automatically
    (like GPT-2), so a prompt encodes to exactly its words.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(vocabulary() if words is None else words)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        if w in vocab:
            raise ValueError(f"Word {w!r} collides with a special token or appears twice.")
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # no decoder: `tokenizers` then joins tokens with one space, which is the exact inverse for task text
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="right",
    )
    tok.chat_template = chat_template()
    got = (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id)
    if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):  # the gold reward's default EOS id depends on this
        raise RuntimeError(f"Special token ids are {got}, expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}.")
    return tok


def save_tokenizer(path: str, **kwargs) -> str:
    """Builds the tokenizer and saves it with ``save_pretrained`` (loadable with ``AutoTokenizer.from_pretrained``)."""
    os.makedirs(path, exist_ok=True)
    build_tokenizer(**kwargs).save_pretrained(path)
    return path
