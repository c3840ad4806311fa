"""The `exact` judge: SQuAD-normalised exact match, free and deterministic."""

from __future__ import annotations

from collections.abc import Sequence

from vqabench.judges.base import Grade, Judge, JudgeItem, Preference, Verdict, VerdictCallback
from vqabench.metrics import exact_match, token_f1

#: Two answers whose token F1 to the reference differ by no more than this are a tie.
F1_TIE_EPSILON = 1e-9


class ExactJudge(Judge):
    """CORRECT when the normalised prediction equals the normalised reference."""

    name = "exact"
    model = "squad-normalized"
    prompt_version = "exact-v1"
    compare_version = "token-f1-v1"
    uses_cache = False

    def grade(self, items: Sequence[JudgeItem], on_verdict: VerdictCallback | None = None) -> list[Verdict]:
        verdicts = []
        for index, item in enumerate(items):
            matched = exact_match(item.prediction, item.reference) >= 1.0
            verdict = Verdict(Grade.CORRECT if matched else Grade.INCORRECT)
            verdicts.append(verdict)
            if on_verdict is not None:
                on_verdict(index, verdict)
        return verdicts

    def compare(self, question: str, reference: str, answer_a: str, answer_b: str) -> Preference:
        """The answer with the higher token F1 to the reference wins; equal F1 is a tie."""
        f1_a, f1_b = token_f1(answer_a, reference), token_f1(answer_b, reference)
        if abs(f1_a - f1_b) <= F1_TIE_EPSILON:
            return "tie"
        return "A" if f1_a > f1_b else "B"
