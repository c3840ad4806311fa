"""Question and answer length limits, from the data ("auto") or the spec, capped by the model.

``max_answer_tokens = "auto"`` is the p99 of the chosen and rejected answers' token counts
over the train and eval splits, ``max_question_tokens = "auto"`` the p99 of their questions'
(with the tokenizer's [CLS]/[SEP]): the test split is only scored, so no setting may read its
answers. One width each serves every split; a longer test answer is cut like any other and
counted in the report, whose statistics cover every split. Both are capped by the text
model's position limit (``max_position_embeddings``; an answer also needs room for BOS and
SEP), integers included, so no length can index past the position table. The answer lengths,
the limits and the number of answers cut go into the data quality report, with a one-sentence
warning when more than :data:`TRUNCATION_WARNING_SHARE` of the answers are cut.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vqabench.engine.data.records import DataError, DataSplits, PreferencePair, length_stats, nearest_rank

log = logging.getLogger(__name__)

TRUNCATION_WARNING_SHARE = 0.05
AUTO = "auto"


@dataclass(frozen=True)
class TokenLimits:
    """The resolved limits: question tokens (with [CLS]/[SEP]) and answer tokens (without BOS/SEP)."""

    question: int
    answer: int


def _resolve(setting: int | str, lengths: list[int], cap: int, key: str) -> int:
    auto = nearest_rank(sorted(lengths), 99) if lengths else 1
    wanted = auto if setting == AUTO else int(setting)
    if wanted > cap:
        if setting != AUTO:
            log.warning("%s = %d exceeds the model's position limit; using %d", key, wanted, cap)
        wanted = cap
    return max(wanted, 1)


def resolve_token_limits(
    data: DataSplits,
    *,
    question_setting: int | str,
    answer_setting: int | str,
    question_length: Any,
    answer_length: Any,
    question_cap: int,
    answer_cap: int,
    prompts_can_be_cut: bool = True,
) -> TokenLimits:
    """Resolve "auto" limits from the train and eval pairs; record every split's statistics in ``data.report``.

    `question_length` / `answer_length` map a text to its token count (the run's tokenizer);
    raises DataError when every answer is empty after tokenisation. Where prompts cannot be cut
    (a causal VLM's would lose image tokens) the prompt limit is the longest prompt of every
    split, a prompt beyond `question_cap` raises DataError naming its row, and the answer cap
    is what the positions leave after the longest prompt.
    """
    fitted: list[PreferencePair] = [*data.train, *data.eval]  # what "auto" may read; test is only scored
    pairs: list[PreferencePair] = [*fitted, *data.test]
    answers = [a for p in pairs for a in (p.chosen, p.rejected) if a]
    answer_lengths = [int(answer_length(a)) for a in answers]
    if answers and not any(answer_lengths):
        raise DataError(
            f"every answer of dataset '{data.name or 'the dataset'}' is empty after tokenisation with the model's "
            f"tokenizer; check the answer columns (dataset.columns) and the tokenizer."
        )
    question_lengths = [int(question_length(p.question)) for p in pairs]
    fitted_answers = sum(1 for p in fitted for a in (p.chosen, p.rejected) if a)  # `answers` lists them first
    if prompts_can_be_cut:
        question = _resolve(question_setting, question_lengths[: len(fitted)], question_cap, "max_question_tokens")
    else:
        question = _uncut_prompt_limit(data, pairs, question_lengths, question_cap)
        answer_cap = max(1, min(answer_cap, question_cap - question))
    limits = TokenLimits(
        question=question,
        answer=_resolve(answer_setting, answer_lengths[:fitted_answers], answer_cap, "max_answer_tokens"),
    )
    answer_stats = length_stats(answer_lengths, limits.answer)
    question_stats = length_stats(question_lengths, limits.question)
    data.report.token_stats = {
        "answers": answer_stats["count"],
        "max_answer_tokens": limits.answer,
        "max_answer_tokens_setting": answer_setting,
        "truncated": answer_stats["truncated"],
        **{k: answer_stats[k] for k in ("p50", "p90", "p99", "max") if k in answer_stats},
        "questions": question_stats["count"],
        "max_question_tokens": limits.question,
        "max_question_tokens_setting": question_setting,
        "questions_truncated": question_stats["truncated"],
        "question_p99": question_stats.get("p99"),
    }
    warning = truncation_warning(answer_stats["truncated"], answer_stats["count"], limits.answer, answer_cap)
    if warning:
        log.warning("%s", warning)
        data.report.warnings.append(warning)
    return limits


def _uncut_prompt_limit(data: DataSplits, pairs: list[PreferencePair], lengths: list[int], cap: int) -> int:
    """The longest prompt; DataError naming the first row whose prompt leaves no room for an answer."""
    for i, (pair, length) in enumerate(zip(pairs, lengths, strict=True)):
        if length >= cap:
            split, row = _split_row(data, i)
            raise DataError(
                f"{split} row {row} (image '{pair.image_id}'): its prompt is {length} tokens, image tokens "
                f"included, and the model has {cap} positions, so no answer fits; prompts are never cut "
                f"(that would cut image tokens): drop the row or shorten its question."
            )
    return max(lengths, default=1)


def _split_row(data: DataSplits, index: int) -> tuple[str, int]:
    """Which split and row the `index`-th pair of train + eval + test is."""
    for name in ("train", "eval", "test"):
        n = len(getattr(data, name))
        if index < n:
            return name, index
        index -= n
    return "test", index


def truncation_warning(truncated: int, total: int, limit: int, cap: int) -> str | None:
    """One sentence when more than 5% of the answers are cut, naming the key to raise."""
    if not total or truncated / total <= TRUNCATION_WARNING_SHARE:
        return None
    share = f"{truncated} of {total} answers ({truncated / total:.0%})"
    if limit >= cap:
        return (
            f"{share} are longer than the model's {cap}-token answer limit (its position limit) "
            f"and are cut; they are scored without their end."
        )
    return f"{share} are longer than max_answer_tokens = {limit} and are cut; raise max_answer_tokens (up to {cap})."
