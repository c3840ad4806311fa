"""Answer and question limits from the data, capped by the model; truncation without SEP."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vqabench.engine.data.batching import TextEncoder, encode
from vqabench.engine.data.records import DataError, DataSplits, PreferencePair
from vqabench.engine.data.token_limits import resolve_token_limits
from vqabench.models import blip
from vqabench.spec import SpecError, spec_from_dict


def words(text: str) -> int:
    return len(text.split())


def splits(answers: list[tuple[str, str]], question: str = "what is it?") -> DataSplits:
    pairs = [PreferencePair(f"img{i % 3}", question, c, r) for i, (c, r) in enumerate(answers)]
    image = Image.new("RGB", (8, 8))
    return DataSplits(train=pairs[:-2], eval=pairs[-2:-1], test=pairs[-1:], images={f"img{i}": image for i in range(3)})


def resolve(data: DataSplits, answer_setting="auto", question_setting="auto", cap: int = 510):
    return resolve_token_limits(
        data,
        question_setting=question_setting,
        answer_setting=answer_setting,
        question_length=words,
        answer_length=words,
        question_cap=cap + 2,
        answer_cap=cap,
    )


def test_auto_answer_limit_is_the_p99_of_chosen_and_rejected_lengths():
    # 200 answers of 1..100 words (each length twice): p99 by nearest rank is 99
    data = splits([("w " * n, "v " * n) for n in range(1, 101)])
    limits = resolve(data)
    assert limits.answer == 99
    stats = data.report.token_stats
    assert (stats["answers"], stats["truncated"], stats["p50"], stats["p99"], stats["max"]) == (200, 2, 50, 99, 100)
    assert stats["max_answer_tokens_setting"] == "auto"
    assert data.report.warnings == []  # 1% cut: below the 5% that warns


def test_auto_limits_come_from_train_and_eval_and_long_test_answers_are_only_counted():
    short = PreferencePair("img0", "what is it?", "w " * 3, "v " * 2)
    long = PreferencePair("img1", "what colour is the big shape on the left of the picture?", "w " * 40, "v " * 30)
    image = Image.new("RGB", (8, 8))
    data = DataSplits(train=[short] * 10, eval=[short] * 2, test=[long] * 3, images={"img0": image, "img1": image})
    limits = resolve(data)
    assert (limits.answer, limits.question) == (3, 3)  # the test split's 40 words and 11-word questions unread
    stats = data.report.token_stats
    assert (stats["answers"], stats["truncated"], stats["max"]) == (30, 6, 40)  # the test answers, cut and counted
    assert stats["questions"] == 15 and stats["questions_truncated"] == 3


def test_limits_are_capped_by_the_position_limit_and_integers_still_work():
    data = splits([("w " * 300, "v " * 200)] * 4)
    assert resolve(data, cap=62).answer == 62
    assert resolve(data, answer_setting=1000, cap=62).answer == 62  # never an index past the positions
    assert resolve(data, answer_setting=7, question_setting=5).answer == 7
    assert resolve(data, answer_setting=7, question_setting=5).question == 5


def test_more_than_five_percent_cut_warns_in_one_sentence_naming_the_key():
    data = splits([("w " * 30, "v " * 3)] * 10)
    resolve(data, answer_setting=16)
    assert data.report.warnings == [
        "10 of 20 answers (50%) are longer than max_answer_tokens = 16 and are cut; "
        "raise max_answer_tokens (up to 510)."
    ]


def test_every_answer_empty_after_tokenisation_is_one_sentence():
    data = splits([("   ", "\t")] * 4)
    data.name = "blank"
    with pytest.raises(DataError, match=r"^every answer of dataset 'blank' is empty after tokenisation[^.]*\.[^.]*\.$"):
        resolve(data)


def test_a_cut_answer_gets_no_sep_and_fits_the_decoders_positions():
    loaded = blip.build_embedded(seed=0)
    loaded.model.eval()
    long_answer = " ".join(["blue"] * 100)  # 100 tokens against the embedded decoder's 62
    data = splits([(long_answer, "red"), ("red", long_answer), ("yes", "no"), ("no", "yes")])
    text = TextEncoder(loaded)
    limits = resolve_token_limits(
        data,
        question_setting="auto",
        answer_setting=1000,
        question_length=text.question_length,
        answer_length=text.answer_length,
        question_cap=loaded.question_token_cap,
        answer_cap=loaded.answer_token_cap,
    )
    assert limits.answer == loaded.answer_token_cap == 62
    assert data.report.token_stats["truncated"] == 2
    encoded = encode(data, loaded, limits.question, limits.answer, text)
    ids, mask = encoded.splits["train"].chosen_ids, encoded.splits["train"].chosen_mask
    assert (
        int(mask[0].sum()) == 1 + 62 and int(ids[0, 62]) != loaded.model.config.text_config.sep_token_id
    )  # BOS + 62 tokens, no SEP
    assert (
        int(ids[1, int(mask[1].sum()) - 1]) == loaded.model.config.text_config.sep_token_id
    )  # a whole answer ends with SEP
    batch = encoded.batch("train", torch.arange(2), torch.device("cpu"))
    with torch.no_grad():
        q = blip.encode_questions(loaded.model, batch.pixel_values, batch.question_ids, batch.question_mask)
        logps, lengths = blip.answer_logps(loaded.model.text_decoder, q, batch.question_mask, *batch.chosen)
    assert lengths.tolist() == [62.0, 2.0] and bool(torch.isfinite(logps).all())


@pytest.mark.parametrize("value", ["auto", 1, 48])
def test_token_limit_keys_take_auto_or_a_positive_integer(value):
    spec = spec_from_dict({"name": "x", "method": "sft", "max_answer_tokens": value, "max_question_tokens": value})
    assert spec.max_answer_tokens == value and spec.max_question_tokens == value


@pytest.mark.parametrize("value", [0, -3, "long", 2.5, True])
def test_token_limit_keys_reject_anything_else_in_one_sentence(value):
    with pytest.raises(SpecError, match=r"key 'max_answer_tokens' has value .*; it must be \"auto\" or at least 1\.$"):
        spec_from_dict({"name": "x", "method": "sft", "max_answer_tokens": value})


#: A causal VLM whose image tokens stand bare in the prompt, and one that frames them as a global tile.
CAUSAL = ["qwen2-vl-tiny-random", "idefics3-tiny-random"]
QUESTION = "what is it?"


@pytest.fixture(scope="module", params=CAUSAL)
def causal(request):
    from vqabench.models.registry import variant

    return variant(request.param).build(0, [QUESTION, "red", "blue", "yes", "no"], None)


def causal_limits(data: DataSplits, loaded, text: TextEncoder):
    """The limits as a run resolves them for a causal model: prompts never cut, answers capped by the positions."""
    return resolve_token_limits(
        data,
        question_setting="auto",
        answer_setting="auto",
        question_length=text.question_length,
        answer_length=text.answer_length,
        question_cap=loaded.question_token_cap,
        answer_cap=loaded.answer_token_cap,
        prompts_can_be_cut=loaded.family.prompts_can_be_cut,
    )


def test_a_causal_prompt_longer_than_the_positions_fails_naming_split_row_and_image(causal):
    long_question = " ".join(["describe the zebra"] * 200)  # well past the tiny models' 256 or 512 positions
    pairs = [PreferencePair("img0", QUESTION, "red", "blue")] * 3
    image = Image.new("RGB", (8, 8))
    data = DataSplits(
        train=pairs,
        eval=pairs[:1],
        test=[pairs[0], PreferencePair("img2", long_question, "red", "blue")],
        images={"img0": image, "img2": image},
    )
    with pytest.raises(DataError) as caught:
        causal_limits(data, causal, TextEncoder(causal))
    message = str(caught.value)
    assert message.startswith("test row 1 (image 'img2'): its prompt is ")
    assert "prompts are never cut" in message and message.count(". ") == 0 and message.endswith(".")


def test_a_causal_prompt_over_the_limit_is_refused_by_encode_not_cut(causal):
    """The family refuses to cut a prompt (cut_prompt), and encoding names the row it met."""
    pairs = [PreferencePair("img0", QUESTION, "red", "blue"), PreferencePair("img1", "is it blue?", "no", "yes")]
    data = DataSplits(train=pairs, eval=[], test=[], images={f"img{i}": Image.new("RGB", (8, 8)) for i in range(2)})
    prompt = len(causal.family.prompt_ids(causal, "is it blue?"))
    with pytest.raises(DataError, match=r"^train row 1 \(image 'img1'\): a prompt of \d+ tokens .* never cut\.$"):
        encode(data, causal, prompt - 1, 8)


def test_a_long_causal_answer_is_cut_to_the_positions_and_counted_and_the_prompt_stays_whole(causal):
    family, tokenizer = causal.family, causal.tokenizer
    long_answer = " ".join(["blue"] * 600)  # 600 tokens or more, against the tiny models' 256 or 512 positions
    pairs = [
        PreferencePair("img0", QUESTION, long_answer, "red"),
        PreferencePair("img1", QUESTION, "red", long_answer),
        PreferencePair("img2", QUESTION, "yes", "no"),
        PreferencePair("img0", QUESTION, "no", "yes"),
    ]
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    data = DataSplits(train=pairs[:2], eval=pairs[2:3], test=pairs[3:], images={f"img{i}": image for i in range(3)})
    text = TextEncoder(causal)
    limits = causal_limits(data, causal, text)

    positions = causal.model.config.get_text_config().max_position_embeddings
    prompt = family.prompt_ids(causal, QUESTION)
    assert limits.question == len(prompt)
    assert limits.answer == positions - len(prompt) - 1  # room for the prompt and an end token, no more
    assert data.report.token_stats["truncated"] == 2  # the two long answers, counted in the Data table

    encoded = encode(data, causal, limits.question, limits.answer, text)
    assert encoded.answers_truncated == 2
    train, end = encoded.splits["train"], causal.facts["end_id"]
    cut = train.chosen_ids[0, : int(train.chosen_mask[0].sum())].tolist()
    assert cut == text.answer_tokens(long_answer)[: limits.answer] and end not in cut  # cut: no end token
    whole = train.rejected_ids[0, : int(train.rejected_mask[0].sum())].tolist()
    assert whole == [*tokenizer("red", add_special_tokens=False)["input_ids"], end]
    assert len(prompt) + len(cut) < positions

    # The prompt is the whole untruncated one: the question and every image token are there.
    for row in range(2):
        ids = train.question_ids[row, : int(train.question_mask[row].sum())].tolist()
        assert ids == prompt
        assert QUESTION in tokenizer.decode(ids)
    batch = encoded.batch("train", torch.arange(2), torch.device("cpu"))
    with torch.no_grad():
        features = family.features(causal.model, batch.pixel_values, *batch.prompt)
        image_embeddings = family.image_embeddings(causal.model, features, causal.savings)
        scores = family.answer_scores(causal.model, features, batch.prompt, batch.chosen)
    assert prompt.count(causal.facts["image_token_id"]) == image_embeddings.shape[1]
    assert scores.lengths.tolist() == [limits.answer, len(text.answer_tokens("red")) + 1]
    assert bool(torch.isfinite(scores.logps).all())
