"""Greedy answer generation from BLIP's answer decoder, batched, with its key/value cache.

The question (image and text) is encoded once per batch; the decoder then runs one token
per step on its cache of earlier keys and values (self-attention) and of the question's
projections (cross-attention), instead of re-running the whole prefix for every token.
``use_cache=False`` keeps the plain loop that re-runs the prefix: the reference the cached
path is tested against (tests/test_generation.py) and the "before" of
benchmarks/generation.py.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
from torch import nn

from vqabench.engine.model import LoadedModel, encode_questions


@cache
def _cache_argument(forward: Any) -> str:
    """The decoder's name for its cache argument: ``cache`` (newer transformers 5) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _returned_cache(output: Any) -> Any:
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


@torch.no_grad()
def greedy_tokens(
    decoder: nn.Module,
    question_embeds: torch.Tensor,
    question_mask: torch.Tensor,
    *,
    bos_id: int,
    sep_id: int,
    pad_id: int,
    max_new_tokens: int,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy token ids after BOS for each question, up to SEP (excluded) or `max_new_tokens`."""
    n, device = question_embeds.shape[0], question_embeds.device
    seq = torch.full((n, 1), bos_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    past = None
    cache_arg = _cache_argument(type(decoder).forward)
    for _ in range(max_new_tokens):
        step_ids = seq[:, -1:] if past is not None else seq
        kwargs: dict[str, Any] = {cache_arg: past} if use_cache and past is not None else {}
        out = decoder(
            input_ids=step_ids,
            attention_mask=torch.ones_like(seq),
            encoder_hidden_states=question_embeds,
            encoder_attention_mask=question_mask,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        if use_cache:
            past = _returned_cache(out)
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        done |= nxt == sep_id
        if bool(done.all()):
            break
    rows = []
    for row in seq[:, 1:].tolist():
        if sep_id in row:
            row = row[: row.index(sep_id)]
        rows.append(row)
    return rows


@torch.no_grad()
def greedy_answers(
    loaded: LoadedModel,
    pixel_values: torch.Tensor | None,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor,
    max_tokens: int,
    use_cache: bool = True,
    question_embeds: torch.Tensor | None = None,
) -> list[str]:
    """Greedy decoding from BOS until SEP or `max_tokens` answer tokens, for a batch; answer strings.

    `question_embeds` (from the frozen-encoder cache) replaces running the encoders.
    """
    if question_embeds is not None:
        q = question_embeds
    elif pixel_values is not None:
        q = encode_questions(loaded.model, pixel_values, question_ids, question_mask)
    else:
        raise ValueError("greedy_answers needs the images or the cached question encodings")
    rows = greedy_tokens(
        loaded.model.text_decoder,
        q,
        question_mask,
        bos_id=loaded.bos_token_id,
        sep_id=loaded.sep_token_id,
        pad_id=loaded.pad_token_id,
        max_new_tokens=max_tokens,
        use_cache=use_cache,
    )
    return [loaded.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
