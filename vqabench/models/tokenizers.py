"""Tokenizers trained in-process for the random causal-VLM variants, so no hub is needed.

A byte-level BPE (GPT-2's scheme, which Qwen and many VLMs use) learns its merges from the
run's own questions and answers; any text still encodes, byte by byte. The family's special
tokens (image placeholder, turn markers) are whole tokens, and its chat template is attached,
so prompts are built the same way as for a released checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Merges learned beyond the 256 byte symbols and the special tokens, for a tiny variant.
TINY_MERGES = 256


def train_byte_bpe(
    texts: Iterable[str],
    *,
    special_tokens: dict[str, str],
    chat_template: str,
    merges: int = TINY_MERGES,
) -> Any:
    """A ``PreTrainedTokenizerFast`` whose BPE is learned from `texts` (the same texts give the same tokenizer).

    `special_tokens` maps transformers' roles (``pad_token``, ``eos_token``, ``bos_token``,
    ``unk_token``, or any other name for an extra token such as ``image_token``) to token
    strings; their ids are 0, 1, 2, ... in the order given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(special_tokens.values()))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(alphabet) + merges,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    # Sorted, so the merges depend on which texts there are, not on the order they arrived in.
    bpe.train_from_iterator(sorted(texts), trainer=trainer)
    roles = {"pad_token", "eos_token", "bos_token", "unk_token"}
    named = {role: token for role, token in special_tokens.items() if role in roles}
    extra = [token for role, token in special_tokens.items() if role not in roles]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, extra_special_tokens=extra, **named)
    tokenizer.chat_template = chat_template
    return tokenizer
