"""Greedy generation with the decoder's key/value cache gives the answers of the plain loop."""

from __future__ import annotations

import pytest
import torch

from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.generation import greedy_answers
from vqabench.models import blip
from vqabench.models.blip import greedy_tokens
from vqabench.spec import DatasetSpec


@pytest.fixture(scope="module")
def tiny():
    data = easyvqa.load_splits(DatasetSpec(eval_size=8, test_size=6), seed=0, limit=8)
    loaded = blip.build_embedded(seed=3)  # random weights: answers run long instead of stopping at SEP
    loaded.model.eval()
    return loaded, encode(data, loaded, 32, 16)


def _tokens(loaded, batch, max_new_tokens, use_cache):
    q = blip.encode_questions(loaded.model, batch.pixel_values, batch.question_ids, batch.question_mask)
    return greedy_tokens(
        loaded.model.text_decoder,
        q,
        batch.question_mask,
        bos_id=loaded.model.config.text_config.bos_token_id,
        sep_id=loaded.model.config.text_config.sep_token_id,
        pad_id=loaded.pad_token_id,
        max_new_tokens=max_new_tokens,
        use_cache=use_cache,
    )


def test_cached_greedy_tokens_equal_the_uncached_loop(tiny):
    loaded, encoded = tiny
    batch = encoded.batch("test", torch.arange(6), torch.device("cpu"))
    assert int(batch.question_mask.sum(1).min()) < batch.question_mask.shape[1]  # questions of mixed length
    bias = loaded.model.text_decoder.cls.predictions.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[loaded.model.config.text_config.sep_token_id] -= (
                50.0  # no SEP: long answers exercise the cache over many steps
            )
        cached = _tokens(loaded, batch, 24, use_cache=True)
        plain = _tokens(loaded, batch, 24, use_cache=False)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert cached == plain
    assert [len(row) for row in cached] == [24] * 6


def test_cached_answers_equal_after_a_weight_change_and_stop_at_sep(tiny):
    loaded, encoded = tiny
    batch = encoded.batch("test", torch.arange(6), torch.device("cpu"))
    bias = loaded.model.text_decoder.cls.predictions.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[loaded.model.config.text_config.sep_token_id] += (
                6.0  # SEP likely after a few tokens: rows finish at different steps
            )
        args = (loaded, batch.pixel_values, batch.question_ids, batch.question_mask, 24)
        cached, plain = greedy_answers(*args, use_cache=True), greedy_answers(*args, use_cache=False)
        assert cached == plain
        assert all("[" not in a for a in cached)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
