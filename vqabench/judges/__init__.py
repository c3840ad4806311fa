"""Judges grade predicted answers against references: `exact`, `semantic`, `together`, `openai`, `auto`.

`make_judge` builds one from a JudgeSpec. `auto` is `together` when TOGETHER_API_KEY is
set, else `openai` when VQABENCH_JUDGE_URL names an OpenAI-compatible server, else the
offline `semantic` judge. Heavy imports (torch, the API clients) happen only when such a
judge is built. See docs/judges.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from vqabench.judges.base import (
    Grade,
    Judge,
    JudgeAuthError,
    JudgeError,
    JudgeItem,
    JudgeQuotaError,
    JudgeRequestError,
    JudgeSummary,
    JudgeUnavailableError,
    Preference,
    Verdict,
    score,
)
from vqabench.judges.batch import JudgeInputError, cached_compare, judge_file, judge_items, read_items
from vqabench.judges.cache import CachedJudge, JudgmentCache, default_cache_path
from vqabench.spec import JudgeSpec

__all__ = [
    "CachedJudge",
    "Grade",
    "Judge",
    "JudgeAuthError",
    "JudgeError",
    "JudgeInputError",
    "JudgeItem",
    "JudgeQuotaError",
    "JudgeRequestError",
    "JudgeSummary",
    "JudgeUnavailableError",
    "JudgmentCache",
    "Preference",
    "Verdict",
    "cached_compare",
    "default_cache_path",
    "judge_file",
    "judge_items",
    "make_judge",
    "read_items",
    "resolve_judge_name",
    "score",
]


def resolve_judge_name(name: str) -> str:
    """The judge `name` stands for: `auto` is `together` with its API key, else `openai` with
    VQABENCH_JUDGE_URL set, else `semantic`."""
    if name == "auto":
        if os.environ.get("TOGETHER_API_KEY"):
            return "together"
        return "openai" if os.environ.get("VQABENCH_JUDGE_URL") else "semantic"
    return name


def make_judge(spec: JudgeSpec, cache_path: Path | str | None = None) -> Judge:
    """Build the judge a JudgeSpec names; with `cache_path` it answers from that SQLite cache."""
    name = resolve_judge_name(spec.name)
    judge: Judge
    if name == "exact":
        from vqabench.judges.exact import ExactJudge

        judge = ExactJudge()
    elif name == "semantic":
        from vqabench.judges.semantic import SemanticJudge

        judge = SemanticJudge(threshold=spec.threshold)
    elif name == "together":
        from vqabench.judges.together import TogetherJudge

        judge = TogetherJudge.from_spec(spec)
    elif name == "openai":
        from vqabench.judges.openai_compatible import OpenAICompatibleJudge

        judge = OpenAICompatibleJudge.from_spec(spec, from_environment=spec.name == "auto")
    else:
        raise JudgeError(f"judge.name is {spec.name!r}; allowed values are auto, exact, semantic, together, openai.")
    if cache_path is not None and judge.uses_cache:
        return CachedJudge(judge, JudgmentCache(cache_path))
    return judge
