"""Judges that run here without a network: the reply parser, exact, semantic, the cache, files."""

from __future__ import annotations

import json
import sqlite3

import pytest

from vqabench.judges import (
    Grade,
    JudgeError,
    JudgeInputError,
    JudgeItem,
    JudgmentCache,
    Verdict,
    default_cache_path,
    judge_file,
    judge_items,
    make_judge,
    score,
)
from vqabench.judges.cache import CachedJudge
from vqabench.judges.exact import ExactJudge
from vqabench.judges.semantic import SemanticJudge, embed
from vqabench.judges.together import parse_grade, parse_preference
from vqabench.spec import JudgeSpec


@pytest.mark.parametrize(
    "reply, grade",
    [
        ("GRADE: CORRECT", Grade.CORRECT),
        ("GRADE: INCORRECT", Grade.INCORRECT),
        ("Grade: correct.", Grade.CORRECT),
        ("grade:incorrect", Grade.INCORRECT),
        ("**GRADE:** CORRECT", Grade.CORRECT),
        ("GRADE: NOT CORRECT", Grade.INCORRECT),
        ("The capital is Paris.\nGRADE: INCORRECT", Grade.INCORRECT),
        ("INCORRECT", Grade.INCORRECT),
        ("Correct.", Grade.CORRECT),
        ("The answer is correct", Grade.UNPARSEABLE),  # no GRADE line: we do not guess from prose
        ("The answer is incorrect", Grade.UNPARSEABLE),
        ("GRADE: CORRECT or GRADE: INCORRECT", Grade.UNPARSEABLE),  # the format echoed back
        ("GRADE: CORRECT. On reflection the answer is incorrect.", Grade.UNPARSEABLE),
        ("", Grade.UNPARSEABLE),
        (None, Grade.UNPARSEABLE),
        ("I cannot grade this.", Grade.UNPARSEABLE),
        ("GRADE: maybe", Grade.UNPARSEABLE),
    ],
)
def test_grade_parser_on_tricky_replies(reply, grade):
    assert parse_grade(reply) is grade


@pytest.mark.parametrize(
    "text",
    [
        "INCORRECT",
        "GRADE: INCORRECT",
        "grade: not correct",
        "Grade - Incorrect!",
        "GRADE: CORRECT... no wait, INCORRECT",
        "correct? GRADE: INCORRECT",
        "The student is not correct. GRADE: CORRECT",
    ],
)
def test_a_reply_saying_incorrect_never_counts_as_correct(text):
    assert parse_grade(text) is not Grade.CORRECT


@pytest.mark.parametrize(
    "reply, preference",
    [
        ("WINNER: A", "A"),
        ("Winner: b.", "B"),
        ("WINNER: TIE", "tie"),
        ("A", "A"),
        ("WINNER: A\nWINNER: B", "unparseable"),
        ("Answer A is better", "unparseable"),
        ("", "unparseable"),
    ],
)
def test_preference_parser(reply, preference):
    assert parse_preference(reply) == preference


def test_score_leaves_unparseable_out_of_the_denominator():
    verdicts = [Verdict(Grade.CORRECT), Verdict(Grade.INCORRECT), Verdict(Grade.CORRECT), Verdict(Grade.UNPARSEABLE)]
    summary = score(verdicts)
    assert (summary.n, summary.unparseable, summary.correct) == (4, 1, 2)
    assert summary.score == pytest.approx(2 / 3)
    assert score([Verdict(Grade.UNPARSEABLE)]).score is None
    assert "0.667" in summary.describe()


def test_exact_judge_uses_squad_normalisation():
    items = [JudgeItem("q", "circle", "The Circle."), JudgeItem("q", "red", "dark red"), JudgeItem("q", "yes", "")]
    assert [v.grade for v in ExactJudge().grade(items)] == [Grade.CORRECT, Grade.INCORRECT, Grade.INCORRECT]
    assert ExactJudge().compare("q", "dark red", "red", "blue") == "A"
    assert ExactJudge().compare("q", "red", "blue", "green") == "tie"


@pytest.fixture(scope="module")
def semantic() -> SemanticJudge:
    return SemanticJudge(threshold=0.8)


def test_semantic_judge_accepts_paraphrases_and_rejects_wrong_answers(semantic):
    items = [
        JudgeItem("q", "circle", "circle"),
        JudgeItem("q", "car", "automobile"),
        JudgeItem("q", "cat", "kitty"),
        JudgeItem("q", "circle", "The circle."),
        JudgeItem("q", "red", "blue"),
        JudgeItem("q", "car", "bicycle"),
        JudgeItem("q", "red", ""),
    ]
    verdicts = semantic.grade(items)
    assert [v.grade for v in verdicts] == [Grade.CORRECT] * 4 + [Grade.INCORRECT] * 3
    assert verdicts[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert 0.8 <= verdicts[1].similarity < 1.0
    assert verdicts[5].similarity < 0.7
    assert verdicts[6].similarity is None  # an empty answer is not embedded


def test_semantic_judge_is_weak_on_yes_no_and_the_threshold_decides(semantic):
    item = JudgeItem("Is there a circle?", "yes", "no")
    [strict] = semantic.grade([item])
    [lenient] = SemanticJudge(threshold=0.7).grade([item])
    assert 0.65 < strict.similarity < 0.8  # "yes" vs "no" is about 0.73
    assert strict.grade is Grade.INCORRECT and lenient.grade is Grade.CORRECT


def test_embeddings_are_unit_length_and_batched_consistently():
    texts = [f"answer number {i}" for i in range(70)]  # more than one batch of 64
    together = embed(texts)
    alone = embed(texts[-1:])
    assert together.shape == (70, 384)
    assert together.norm(dim=1).sub(1).abs().max() < 1e-5
    assert float(together[-1] @ alone[0]) == pytest.approx(1.0, abs=1e-5)  # padding does not leak


def test_semantic_compare_prefers_the_answer_closer_to_the_reference(semantic):
    assert semantic.compare("q", "car", "automobile", "bicycle") == "A"
    assert semantic.compare("q", "car", "bicycle", "automobile") == "B"
    assert semantic.compare("q", "car", "car", "car") == "tie"
    assert semantic.compare("q", "car", "", "bicycle") == "B"


def test_make_judge_auto_is_semantic_without_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    judge = make_judge(JudgeSpec(name="auto", threshold=0.75), cache_path=tmp_path / "judgments.db")
    assert isinstance(judge, CachedJudge) and isinstance(judge.inner, SemanticJudge)
    assert judge.inner.threshold == 0.75
    assert isinstance(make_judge(JudgeSpec(name="exact"), cache_path=tmp_path / "x.db"), ExactJudge)
    with pytest.raises(JudgeError, match=r"judge\.name"):
        make_judge(JudgeSpec(name="gpt"))


def test_cache_key_separates_judge_model_prompt_and_texts(tmp_path):
    item = JudgeItem("q", "car", "automobile")
    lenient, strict = SemanticJudge(threshold=0.5), SemanticJudge(threshold=0.9)
    keys = {
        JudgmentCache.grade_key(lenient, item),
        JudgmentCache.grade_key(strict, item),
        JudgmentCache.grade_key(ExactJudge(), item),
        JudgmentCache.grade_key(lenient, JudgeItem("q", "car", "automobiles")),
        JudgmentCache.grade_key(lenient, JudgeItem("q2", "car", "automobile")),
    }
    assert len(keys) == 5
    with JudgmentCache(tmp_path / "j.db") as cache:
        assert judge_items(lenient, [item], cache=cache)[0].grade is Grade.CORRECT
        assert judge_items(strict, [item], cache=cache)[0].grade is Grade.INCORRECT
        assert len(cache) == 2


class CountingJudge(ExactJudge):
    """The exact judge, cacheable, counting what it is asked to grade."""

    uses_cache = True

    def __init__(self) -> None:
        self.graded: list[JudgeItem] = []

    def grade(self, items, on_verdict=None):
        self.graded.extend(items)
        return super().grade(items, on_verdict)


def test_cache_persists_and_judges_each_distinct_item_once(tmp_path):
    path = tmp_path / "cache" / "judgments.db"
    items = [JudgeItem("q", "red", "red"), JudgeItem("q", "red", "blue"), JudgeItem("q", "red", "red")]
    first = CountingJudge()
    with JudgmentCache(path) as cache:
        verdicts = judge_items(first, items, cache=cache)
    assert len(first.graded) == 2
    second = CountingJudge()
    with JudgmentCache(path) as cache:
        assert judge_items(second, [*items, JudgeItem("q", "red", "green")], cache=cache)[:3] == verdicts
    assert second.graded == [JudgeItem("q", "red", "green")]
    rows = sqlite3.connect(path).execute("SELECT judge, model, version, outcome FROM judgments").fetchall()
    assert sorted(r[3] for r in rows) == ["correct", "incorrect", "incorrect"]
    assert {r[:3] for r in rows} == {("exact", "squad-normalized", "exact-v1")}


def test_default_cache_path(tmp_path, monkeypatch):
    assert default_cache_path(tmp_path) == tmp_path / "judgments.db"
    monkeypatch.delenv("VQABENCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "vqabench" / "judgments.db"


def test_judge_file_writes_verdicts_and_returns_the_score(tmp_path):
    source = tmp_path / "answers.jsonl"
    rows = [
        {"id": 1, "question": "What shape?", "reference": "circle", "prediction": "circle"},
        {"id": 2, "question": "What color?", "reference": "red", "prediction": "blue"},
        {"id": 3, "question": "Is it big?", "reference": "yes", "prediction": "Yes."},
    ]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    progress = []
    summary = judge_file(
        source,
        ExactJudge(),
        tmp_path / "out" / "verdicts.jsonl",
        on_progress=lambda done, total: progress.append((done, total)),
    )
    written = [json.loads(line) for line in (tmp_path / "out" / "verdicts.jsonl").read_text().splitlines()]
    assert [w["verdict"] for w in written] == ["correct", "incorrect", "correct"]
    assert [w["id"] for w in written] == [1, 2, 3] and written[0]["judge"] == "exact"
    assert (summary.n, summary.unparseable, summary.correct) == (3, 0, 2)
    assert progress[0] == (0, 3) and progress[-1] == (3, 3)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q", "reference": "r"}', "line 2: key 'prediction' is missing"),
        ('{"question": "q", "reference": "r", "prediction": 3}', "line 2: key 'prediction' has value 3"),
        ('["q", "r", "p"]', "line 2: a list where a JSON object"),
        ('{"question": ', "line 2: not valid JSON"),
    ],
)
def test_judge_file_names_the_bad_line(tmp_path, line, message):
    source = tmp_path / "answers.jsonl"
    source.write_text('{"question": "q", "reference": "r", "prediction": "p"}\n' + line + "\n")
    with pytest.raises(JudgeInputError, match=message):
        judge_file(source, ExactJudge(), tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
