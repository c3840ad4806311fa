"""Greedy answer generation for a batch, through the model's family, with its key/value cache.

The frozen part runs once per batch (or its output comes from the encoder cache); the
family then decodes one token per step on its cache of earlier keys and values instead of
re-running the whole prefix for every token. ``use_cache=False`` keeps the plain loop that
re-runs the prefix: the reference the cached path is tested against (tests/test_generation.py
and each family's tests) and the "before" of benchmarks/generation.py.
"""

from __future__ import annotations

import torch

from vqabench.models.family import LoadedModel


@torch.no_grad()
def greedy_answers(
    loaded: LoadedModel,
    pixel_values: torch.Tensor | None,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor,
    max_tokens: int,
    use_cache: bool = True,
    features: torch.Tensor | None = None,
) -> list[str]:
    """Greedy decoding until the family's end marker or `max_tokens` answer tokens, for a batch; answer strings.

    `features` (from the frozen-encoder cache) replaces running the frozen part.
    """
    family = loaded.family
    if features is None:
        if pixel_values is None:
            raise ValueError("greedy_answers needs the images or the cached features")
        features = family.features(loaded.model, pixel_values, question_ids, question_mask, loaded.savings)
    rows = family.generate(loaded, features, (question_ids, question_mask), max_tokens, use_cache=use_cache)
    return [loaded.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
