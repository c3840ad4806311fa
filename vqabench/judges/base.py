"""What every judge shares: the items it grades, its verdicts, its errors and the score.

A judge grades (question, reference answer, predicted answer) as CORRECT, INCORRECT or
UNPARSEABLE, in batches, and compares two answers to the same question for win rates.
Pure Python: judges that need torch or an API client import them in their own module.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

#: Which of two answers a judge prefers; "unparseable" when an LLM judge's reply says neither.
Preference = Literal["A", "B", "tie", "unparseable"]

#: Called with (index into the graded items, its verdict) as soon as that verdict exists.
VerdictCallback = Callable[[int, "Verdict"], None]


class Grade(str, enum.Enum):
    """A judge's decision on one answer."""

    CORRECT = "correct"
    INCORRECT = "incorrect"
    UNPARSEABLE = "unparseable"  # an LLM judge replied, but not with a grade we can read


@dataclass(frozen=True)
class JudgeItem:
    """One answer to grade: the question, the reference answer and the model's prediction."""

    question: str
    reference: str
    prediction: str


@dataclass(frozen=True)
class Verdict:
    """A judge's grade for one item, with the LLM's raw reply or the semantic similarity."""

    grade: Grade
    reply: str = ""  # the LLM judge's reply text; "" for offline judges
    similarity: float | None = None  # semantic judge: cosine(prediction, reference)

    @property
    def is_correct(self) -> bool:
        return self.grade is Grade.CORRECT

    def to_dict(self) -> dict[str, object]:
        return {"verdict": self.grade.value, "reply": self.reply, "similarity": self.similarity}


@dataclass(frozen=True)
class JudgeSummary:
    """A judge score: correct / (n - unparseable); None when nothing could be graded."""

    score: float | None
    n: int  # verdicts, unparseable ones included
    unparseable: int
    correct: int = 0

    def describe(self) -> str:
        """One line for a console: the score and what it was computed over."""
        graded = self.n - self.unparseable
        if self.score is None:
            return f"no score: none of {self.n} answers could be graded ({self.unparseable} unparseable)"
        return (
            f"{self.score:.3f} ({self.correct} of {graded} graded answers correct; "
            f"{self.n} judged, {self.unparseable} unparseable)"
        )


def score(verdicts: Sequence[Verdict]) -> JudgeSummary:
    """Summarise verdicts; UNPARSEABLE replies are left out of the denominator and counted."""
    n = len(verdicts)
    unparseable = sum(1 for v in verdicts if v.grade is Grade.UNPARSEABLE)
    correct = sum(1 for v in verdicts if v.grade is Grade.CORRECT)
    graded = n - unparseable
    return JudgeSummary(score=correct / graded if graded else None, n=n, unparseable=unparseable, correct=correct)


class JudgeError(RuntimeError):
    """Judging cannot go on; the message is one sentence saying what to do."""


class JudgeAuthError(JudgeError):
    """The API rejected the credentials (401/403): retrying cannot help."""


class JudgeQuotaError(JudgeError):
    """The API refuses for lack of credits or quota: retrying now cannot help."""


class JudgeRequestError(JudgeError):
    """The API rejected the request itself (unknown model, bad URL): retrying cannot help."""


class JudgeUnavailableError(JudgeError):
    """Transient failures went on for every allowed attempt."""


class Judge(ABC):
    """Grades answers against references; `name`, `model` and `prompt_version` key the cache."""

    name: str
    model: str
    prompt_version: str
    compare_version: str  # the pairwise comparison's prompt or rule version
    uses_cache: bool = True  # False where a verdict costs less than a cache lookup

    @abstractmethod
    def grade(self, items: Sequence[JudgeItem], on_verdict: VerdictCallback | None = None) -> list[Verdict]:
        """Grade every item, in order; call `on_verdict` in the caller's thread as each is ready."""

    @abstractmethod
    def compare(self, question: str, reference: str, answer_a: str, answer_b: str) -> Preference:
        """Which answer is better against the reference: "A", "B", "tie" (or "unparseable")."""

    def prepare(self) -> None:  # noqa: B027 - optional hook: most judges need nothing loaded
        """Load what grading needs (a model, a client) now rather than in the middle of a measured phase."""

    def describe(self) -> str:
        return f"{self.name} ({self.model}, {self.prompt_version})"
