"""Tokenizer helpers: a locally trained tokenizer for tests/demo, and `<image>` registration.

The real Mamba tokenizer (GPT-NeoX) has pad = eos = bos = `<|endoftext|>` (id 0). The local
tokenizer mirrors that on purpose, so the demo and tests exercise the pad==eos trap that
masks-by-token-id gets wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<image>"


def train_report_tokenizer(texts: Iterable[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE on report text (offline, seconds)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    return fast


def ensure_image_token(tokenizer) -> int:
    """Add `<image>` as a special token if missing and return its id.

    The id may exceed the LLM's embedding table: the model never looks it up.
    """
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return token_id
