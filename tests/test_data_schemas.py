"""Schemas: text from every conversational form, VLFeedback pairing from ratings, detection."""

from __future__ import annotations

import pytest

from vqabench.engine.data.records import DataError
from vqabench.engine.data.schemas import (
    EMPTY_ANSWER,
    EMPTY_QUESTION,
    IDENTICAL_ANSWERS,
    LLAVA,
    MISSING_RATING,
    PREFERENCE,
    RATING_TIE,
    SMALL_MARGIN,
    TOO_FEW_COMPLETIONS,
    VLFEEDBACK,
    RowPair,
    answer_text,
    completion_score,
    question_text,
    rated_pair,
    read_row,
    resolve_schema,
)
from vqabench.spec import DatasetSpec

EQUAL = {"Helpfulness": 1.0, "Visual Faithfulness": 1.0, "Ethical Considerations": 1.0}


def completion(response: str, helpful, faithful, ethical, model: str = "m") -> dict:
    """A VLFeedback completion; ratings are given as the dataset gives them (strings)."""

    def aspect(rating):
        return None if rating is None else {"Rating": rating, "Rationale": "because"}

    return {
        "model": model,
        "response": response,
        "annotations": {
            "Helpfulness": aspect(helpful),
            "Visual Faithfulness": aspect(faithful),
            "Ethical Considerations": aspect(ethical),
        },
    }


# ---------------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    "cell",
    [
        "What colour is the car?",
        "<image>\nWhat colour is the car?",
        "What colour is the car? <image>",
        {"from": "human", "value": "<image>\nWhat colour is the car?"},
        "{'from': 'human', 'value': '<image>\\nWhat colour is the car?'}",  # mllm-dpo stores a Python repr
        '{"from": "human", "value": "<image>\\nWhat colour is the car?"}',
        [{"from": "human", "value": "<image>\nWhat colour is the car?"}, {"from": "gpt", "value": "Red."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What colour is the car?"},
            {"role": "assistant", "content": "Red."},
        ],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the car?"}]}],
    ],
)
def test_question_text_reduces_every_form_to_the_user_turn(cell):
    assert question_text(cell) == "What colour is the car?"


@pytest.mark.parametrize(
    "cell",
    [
        "Red.",
        {"from": "gpt", "value": "Red."},
        "{'from': 'gpt', 'value': 'Red.'}",
        [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
        [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}],
    ],
)
def test_answer_text_reduces_every_form_to_the_assistant_turn(cell):
    assert answer_text(cell) == "Red."


def test_text_that_merely_starts_with_a_bracket_stays_text():
    assert answer_text("[1, 2] are the values") == "[1, 2] are the values"
    assert answer_text("[1, 2]") == "[1, 2]"
    assert question_text("{not a dict") == "{not a dict"


def test_placeholders_and_whitespace_are_removed():
    assert question_text("<Image></Image>  Is it\n\nsunny? <|image|>") == "Is it sunny?"


# ------------------------------------------------------------------------------- ratings


def test_vlfeedback_chosen_is_best_mean_and_rejected_is_worst():
    comps = [
        completion("middle", "3", "3", "5"),
        completion("best", "5", "4", "5"),
        completion("worst", "1", "2", "5"),
        completion("good", "4", "4", "4"),
    ]
    assert rated_pair(comps, EQUAL, 0.0) == ("best", "worst")


def test_vlfeedback_aspect_weights_change_the_winner():
    comps = [
        completion("helpful", "5", "1", "5"),
        completion("faithful", "2", "5", "5"),
        completion("poor", "1", "1", "5"),
    ]
    assert rated_pair(comps, EQUAL, 0.0) == ("faithful", "poor")  # 4.0 vs 3.67
    assert rated_pair(comps, {"Helpfulness": 1.0}, 0.0) == ("helpful", "poor")
    assert rated_pair(comps, {"Helpfulness": 1.0, "Visual Faithfulness": 0.0}, 0.0) == ("helpful", "poor")


def test_vlfeedback_weighted_mean_is_exact():
    score = completion_score(completion("x", "4", "2", "5"), {"Helpfulness": 3.0, "Visual Faithfulness": 1.0})
    assert score == pytest.approx((3 * 4 + 2) / 4)


@pytest.mark.parametrize(
    "comps, reason",
    [
        ([completion("a", "5", "5", "5"), completion("b", "5", "5", "5"), completion("c", "1", "1", "1")], RATING_TIE),
        ([completion("a", "5", "5", "5"), completion("b", "2", "2", "2"), completion("c", "2", "2", "2")], RATING_TIE),
        ([completion("a", "4", "4", "4"), completion("b", "4", "4", "4")], RATING_TIE),
        ([completion("a", "5", "5", "5"), completion("b", "N/A", "2", "2")], MISSING_RATING),
        ([completion("a", "5", "5", "5"), completion("b", "", "2", "2")], MISSING_RATING),
        ([completion("a", "5", "5", "5"), completion("b", "2", None, "2")], MISSING_RATING),
        ([completion("a", "5", "5", "5")], TOO_FEW_COMPLETIONS),
    ],
)
def test_vlfeedback_rows_without_a_clear_pair_give_the_reason(comps, reason):
    assert rated_pair(comps, EQUAL, 0.0) == reason


def test_vlfeedback_margin_below_threshold_is_skipped():
    comps = [completion("a", "4", "4", "4"), completion("b", "3", "4", "4")]  # margin 1/3
    assert rated_pair(comps, EQUAL, 0.5) == SMALL_MARGIN
    assert rated_pair(comps, EQUAL, 0.3) == ("a", "b")


def test_vlfeedback_accepts_numeric_ratings_and_a_dict_of_lists():
    # datasets returns a Sequence of structs as a dict of lists
    as_columns = {
        "model": ["m1", "m2"],
        "response": ["good", "bad"],
        "annotations": [completion("", 5, 4.5, "5")["annotations"], completion("", "2", "2", "2")["annotations"]],
    }
    assert rated_pair(as_columns, EQUAL, 0.0) == ("good", "bad")


# ------------------------------------------------------------------------------- schemas


def test_detects_trl_rlaif_llava_and_vlfeedback():
    spec = DatasetSpec(source="x")
    trl = resolve_schema(
        spec, ["prompt", "images", "chosen", "rejected"], {"chosen": [{"role": "assistant", "content": "a"}]}, "trl"
    )
    assert (trl.kind, trl.question, trl.image) == (PREFERENCE, "prompt", "images")
    rlaif = resolve_schema(
        spec, ["ds_name", "image", "question", "chosen", "rejected", "image_path"], {"chosen": "a"}, "rlaif"
    )
    assert (rlaif.kind, rlaif.question, rlaif.image) == (PREFERENCE, "question", "image")
    llava = resolve_schema(
        spec,
        ["image", "question", "chosen", "rejected", "ref_win_logp"],
        {"chosen": {"from": "gpt", "value": "a"}},
        "mllm-dpo",
    )
    assert (llava.kind, llava.question, llava.image) == (LLAVA, "question", "image")
    vlf = resolve_schema(
        spec,
        ["id", "prompt", "models", "completions", "img_path"],
        {"completions": [completion("a", "1", "1", "1")]},
        "vlf",
    )
    assert (vlf.kind, vlf.question, vlf.image, vlf.completions) == (VLFEEDBACK, "prompt", "img_path", "completions")
    assert vlf.aspect_weights == EQUAL


def test_dataset_without_chosen_rejected_names_its_columns_and_the_mapping():
    with pytest.raises(DataError) as err:
        resolve_schema(DatasetSpec(source="x"), ["question", "image", "answer"], {}, "qa")
    message = str(err.value)
    assert "question, image, answer" in message and "dataset.columns.chosen" in message


def test_column_mapping_overrides_detection_and_is_checked():
    spec = DatasetSpec(source="x", columns={"question": "q", "image": "pic", "chosen": "good", "rejected": "bad"})
    schema = resolve_schema(spec, ["q", "pic", "good", "bad"], {"good": "a"}, "mapped")
    assert (schema.question, schema.image, schema.chosen, schema.rejected) == ("q", "pic", "good", "bad")
    with pytest.raises(DataError, match=r"dataset.columns.chosen = 'best'.*its columns are q, pic, good, bad"):
        resolve_schema(DatasetSpec(source="x", columns={"chosen": "best"}), ["q", "pic", "good", "bad"], {}, "m")
    with pytest.raises(DataError, match=r"dataset.columns.answer: unknown name"):
        resolve_schema(DatasetSpec(source="x", columns={"answer": "a"}), ["a"], {}, "m")


def test_unknown_aspect_weight_is_rejected_with_the_aspects_present():
    spec = DatasetSpec(source="x", aspect_weights={"Helpfulnes": 1.0})
    with pytest.raises(DataError, match=r"aspect_weights.Helpfulnes.*Helpfulness, Visual Faithfulness"):
        resolve_schema(
            spec, ["prompt", "completions", "img_path"], {"completions": [completion("a", "1", "1", "1")]}, "vlf"
        )


def test_read_row_reports_empty_and_identical_answers():
    schema = resolve_schema(DatasetSpec(source="x"), ["question", "image", "chosen", "rejected"], {"chosen": "a"}, "d")
    row = {"question": "Q?", "image": "a.png", "chosen": "Yes", "rejected": "no"}
    assert read_row(schema, row) == RowPair("Q?", "a.png", "Yes", "no")
    assert read_row(schema, {**row, "rejected": "  "}) == EMPTY_ANSWER
    assert read_row(schema, {**row, "rejected": None}) == EMPTY_ANSWER
    assert read_row(schema, {**row, "rejected": "yes"}) == IDENTICAL_ANSWERS
    assert read_row(schema, {**row, "question": "<image>"}) == EMPTY_QUESTION


def test_question_comes_from_the_chosen_conversation_when_there_is_no_prompt_column():
    schema = resolve_schema(
        DatasetSpec(source="x"),
        ["images", "chosen", "rejected"],
        {"chosen": [{"role": "user", "content": "Q?"}]},
        "implicit",
    )
    row = {
        "images": ["a.png"],
        "chosen": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "A"}],
        "rejected": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "B"}],
    }
    assert read_row(schema, row) == RowPair("Q?", ["a.png"], "A", "B")


def test_image_template_builds_a_path_from_the_row():
    spec = DatasetSpec(source="x", columns={"image": "{id}.jpg"})
    schema = resolve_schema(spec, ["id", "prompt", "completions"], {"completions": []}, "vlf-raw")
    row = {
        "id": "svit-123",
        "prompt": "Q?",
        "completions": [completion("a", "5", "5", "5"), completion("b", "1", "1", "1")],
    }
    assert read_row(schema, row) == RowPair("Q?", "svit-123.jpg", "a", "b")
