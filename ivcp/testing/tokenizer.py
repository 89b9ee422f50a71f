"""The byte-level tokenizer of the tiny models: one token per UTF-8 byte (ids 0..255), then a family's
special tokens, and a chat template. Built in memory: nothing comes from the hub."""

from __future__ import annotations


def byte_tokenizer(special_tokens: tuple[str, ...], eos_token: str, pad_token: str, chat_template: str):
    """A ``PreTrainedTokenizerFast``: 256 byte tokens, then ``special_tokens`` (ids 256, 257, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel's alphabet is unordered; order it by the byte each character stands for.
    order = sorted(byte_chars, key=_byte_of_char)
    vocab = {ch: i for i, ch in enumerate(order)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=list(special_tokens),
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _byte_of_char(ch: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+i.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
