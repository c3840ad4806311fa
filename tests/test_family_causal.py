"""The causal-VLM families on their tiny random variants, fp32: the seam's numerical promises, per family;
bad input, padding and train/eval modes on every family the registry lists."""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from vqabench.engine.data.batching import encode
from vqabench.engine.data.records import DataSplits, PreferencePair
from vqabench.engine.trainer import Trainer
from vqabench.models.causal import base_model, part
from vqabench.models.family import LoadedModel, ModelError, Savings, sequence_scores
from vqabench.models.registry import family_for, variants
from vqabench.models.tokenizers import train_byte_bpe
from vqabench.objectives import dpo_loss
from vqabench.spec import RunSpec

TEXTS = [
    "what color is the shape?",
    "is there a circle in the image?",
    "how many shapes are there?",
    "red",
    "blue",
    "yes",
    "no",
    "two",
    "a green triangle",
]
TINY = ["qwen2-vl-tiny-random", "qwen2.5-vl-tiny-random", "llava-tiny-random"]
#: Every causal family's tiny variant, from the registry (tests/test_family_more.py covers the
#: numerics of those outside TINY; the checks on bad input and modes below run on all of them).
EVERY_TINY = sorted(name for name, v in variants().items() if v.family != "blip" and not v.real_size)


@pytest.fixture(scope="module", params=TINY)
def loaded(request: pytest.FixtureRequest) -> LoadedModel:
    return built(request.param)


@pytest.fixture(scope="module", params=EVERY_TINY)
def any_family(request: pytest.FixtureRequest) -> LoadedModel:
    return built(request.param)


@functools.cache
def built(name: str) -> LoadedModel:
    """One build per variant for this module's fixtures (they share it)."""
    return variants()[name].build(0, TEXTS, None)


def batch(loaded: LoadedModel, questions: list[str], answers: list[str]) -> tuple[Any, Any, torch.Tensor]:
    """Right-padded prompts and framed answers for the rows, and one random image each."""
    family, pad = loaded.family, loaded.pad_token_id

    def tensors(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return ids, mask

    prompts = [family.prompt_ids(loaded, q) for q in questions]
    framed = [family.frame_answer(loaded, family.answer_ids(loaded, a), True) for a in answers]
    generator = torch.Generator().manual_seed(len(questions))
    side = loaded.image.size
    pixels = torch.randn(len(questions), 3, side, side, generator=generator)
    return tensors(prompts), tensors(framed), pixels


def scores(loaded: LoadedModel, questions: list[str], answers: list[str], model: Any = None) -> torch.Tensor:
    prompt, answer, pixels = batch(loaded, questions, answers)
    model = loaded.model if model is None else model
    with torch.no_grad():
        features = loaded.family.features(model, pixels, *prompt)
        return loaded.family.answer_scores(model, features, prompt, answer).logps


def own_forward_logits(loaded: LoadedModel, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The model's own forward with pixel_values (one unpadded row), as its processor would feed it."""
    model, config = loaded.model, loaded.model.config
    if loaded.family.name.startswith("qwen"):
        from vqabench.models.qwen2_vl import patchify

        vision = config.vision_config
        flat, grid = patchify(pixels, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        image = (ids == config.image_token_id).int()
        out = model(input_ids=ids, pixel_values=flat, image_grid_thw=grid, mm_token_type_ids=image)
    else:
        out = model(input_ids=ids, pixel_values=pixels)
    logits: torch.Tensor = out.logits
    return logits


def test_features_passed_back_give_the_logits_of_the_models_own_forward(loaded: LoadedModel) -> None:
    family = loaded.family
    for question, answer in [("what color is the shape?", "red"), ("how many shapes are there?", "a green triangle")]:
        prompt, framed, pixels = batch(loaded, [question], [answer])
        with torch.no_grad():
            features = family.features(loaded.model, pixels, *prompt)
            mine = family.answer_logits(loaded.model, features, prompt, framed)
            ids = torch.cat([prompt[0], framed[0]], dim=1)
            own = own_forward_logits(loaded, ids, pixels)
        width = prompt[0].shape[1]
        reference = own[:, width - 1 : width - 1 + framed[0].shape[1]]
        assert features.shape[1:] == family.features_shape(loaded, width)
        assert torch.allclose(mine, reference, atol=1e-5, rtol=0), (mine - reference).abs().max()
        # Only the answer positions reach the LM head, with the same log-probs as the full logits.
        full = sequence_scores(reference, framed[0], framed[1]).logps
        only = family.answer_scores(loaded.model, features, prompt, framed).logps
        assert torch.allclose(only, full, atol=1e-6, rtol=0), (only - full).abs().max()


def test_a_row_scores_the_same_alone_and_padded_in_a_batch(loaded: LoadedModel) -> None:
    question, answer = "what color is the shape?", "red"
    alone = scores(loaded, [question], [answer])
    for other_q, other_a in [("is there a circle in the image?", "a green triangle"), ("red?", "no")]:
        # Same seed per batch size → the row's image differs between calls; pass it explicitly instead.
        prompt1, answer1, pixels1 = batch(loaded, [question], [answer])
        prompt2, answer2, _ = batch(loaded, [question, other_q], [answer, other_a])
        pixels2 = torch.cat([pixels1, torch.randn_like(pixels1)])
        with torch.no_grad():
            f1 = loaded.family.features(loaded.model, pixels1, *prompt1)
            f2 = loaded.family.features(loaded.model, pixels2, *prompt2)
            one = loaded.family.answer_scores(loaded.model, f1, prompt1, answer1).logps
            two = loaded.family.answer_scores(loaded.model, f2, prompt2, answer2).logps
        assert torch.allclose(one, alone)
        assert torch.allclose(two[:1], one, atol=1e-5, rtol=0), (two[0] - one[0]).abs()
        assert not torch.equal(prompt2[1][0], prompt2[1][1]) or not torch.equal(answer2[1][0], answer2[1][1])


def test_adapter_disabled_gives_exactly_the_base_log_probs(loaded: LoadedModel) -> None:
    from peft import LoraConfig, get_peft_model

    family = loaded.family
    base = scores(loaded, TEXTS[:3], TEXTS[3:6])
    scope = family.lora_scope(loaded.model)
    targets = re.escape(scope) + r"\..*\.(" + "|".join(family.lora_targets) + ")"
    peft_model = get_peft_model(copy.deepcopy(loaded.model), LoraConfig(r=4, target_modules=targets))
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("lora_B.default")]
    assert adapted and all(".language_model." in n for n in adapted)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained adapter: non-zero, so "disabled" has something to remove
    with_adapter = scores(loaded, TEXTS[:3], TEXTS[3:6], peft_model)
    with peft_model.disable_adapter():
        without = scores(loaded, TEXTS[:3], TEXTS[3:6], peft_model)
    assert not torch.allclose(with_adapter, base)
    assert torch.equal(without, base)


def test_dpo_loss_against_a_copy_is_log_2_at_step_0(loaded: LoadedModel) -> None:
    family = loaded.family
    prompt, chosen, pixels = batch(loaded, TEXTS[:3], ["red", "yes", "two"])
    _, rejected, _ = batch(loaded, TEXTS[:3], ["a green triangle", "no", "blue"])
    reference = copy.deepcopy(loaded.model)
    with torch.no_grad():
        features = family.features(loaded.model, pixels, *prompt)
    pc, pr = family.pair_scores(loaded.model, features, prompt, chosen, rejected, loaded.pad_token_id)
    with torch.no_grad():
        rc, rr = family.pair_scores(reference, features, prompt, chosen, rejected, loaded.pad_token_id)
    loss = dpo_loss(pc.logps, pr.logps, rc.logps, rr.logps, beta=0.1).mean()
    assert abs(loss.item() - math.log(2)) < 1e-6
    loss.backward()  # gradients reach the language model through the features' scatter
    assert part(loaded.model, family.language_model_path).embed_tokens.weight.grad is not None
    loaded.model.zero_grad(set_to_none=True)


def test_cached_generation_equals_uncached_token_for_token(loaded: LoadedModel) -> None:
    family = loaded.family
    prompt, _, pixels = batch(loaded, ["what color is the shape?", "red?", TEXTS[1]], ["x"] * 3)
    with torch.no_grad():
        features = family.features(loaded.model, pixels, *prompt)
    cached = family.generate(loaded, features, prompt, 12)
    uncached = family.generate(loaded, features, prompt, 12, use_cache=False)
    assert cached == uncached
    assert all(len(row) <= 12 and loaded.facts["end_id"] not in row for row in cached)


def test_train_values_split_the_model_without_overlap(loaded: LoadedModel) -> None:
    family, model = loaded.family, loaded.model
    projector = {id(p) for m in family.projector_parts(model) for p in m.parameters()}
    for train in family.train_parts:
        trainable = {id(p) for m in family.trainable_modules(model, train) for p in m.parameters()}
        frozen = {id(p) for _, m in family.frozen_modules(model, train) for p in m.parameters()}
        assert not trainable & frozen, train
        assert (projector <= trainable) == (train in ("lm+projector", "all")), train
    with pytest.raises(ModelError, match="not available"):
        family.check_train("decoder")


def test_save_then_load_by_folder_round_trips(loaded: LoadedModel, tmp_path: Path) -> None:
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    loaded.family.save_extra(loaded, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    again = family_for(config["model_type"]).from_pretrained(str(tmp_path))
    assert again.family is loaded.family and again.image == loaded.image
    assert again.facts == loaded.facts
    question = "how many shapes are there?"
    assert again.family.prompt_ids(again, question) == loaded.family.prompt_ids(loaded, question)
    assert torch.equal(scores(again, TEXTS[:2], TEXTS[3:5]), scores(loaded, TEXTS[:2], TEXTS[3:5]))


def test_a_tokenizer_without_chat_template_is_refused_unless_the_family_supplies_its_own(
    any_family: LoadedModel,
) -> None:
    loaded = any_family
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.chat_template = None
    if loaded.family.name == "paligemma":  # its checkpoints ship none: its processor's prompt format serves
        from vqabench.models.paligemma import PALIGEMMA_PROMPT_TEMPLATE

        again = loaded.family.make_loaded(loaded.model, tokenizer, loaded.image, "tiny", None)
        assert again.tokenizer.chat_template == PALIGEMMA_PROMPT_TEMPLATE
        assert again.family.prompt_ids(again, TEXTS[0]) == loaded.family.prompt_ids(loaded, TEXTS[0])
        return
    with pytest.raises(ModelError, match=r"has no chat template") as caught:
        loaded.family.make_loaded(loaded.model, tokenizer, loaded.image, "tiny", None)
    assert str(caught.value).count(". ") == 0


def test_a_stated_image_token_count_that_disagrees_is_refused(any_family: LoadedModel, tmp_path: Path) -> None:
    loaded = any_family
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    loaded.family.save_extra(loaded, tmp_path)
    right = loaded.facts["image_tokens"]
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_length": right + 3}))
    with pytest.raises(ModelError, match=rf"states {right + 3} image tokens .* make {right}\.$"):
        loaded.family.from_pretrained(str(tmp_path))
    # A count the folder does not write (LlavaConfig's class default of 576) is not checked.
    (tmp_path / "processor_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("image_seq_length", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert loaded.family.from_pretrained(str(tmp_path)).facts["image_tokens"] == right


def test_features_whose_token_count_disagrees_with_the_prompt_are_refused(any_family: LoadedModel) -> None:
    """Projected features (what the encoder cache holds for lm and lora) one image position short: one sentence.

    Mllama reads the image by cross-attention, so its features are checked against the tiles and
    positions per tile its cross-attention mask is built for.
    """
    loaded = any_family
    projected = Savings(projected_features=True)
    prompt, answer, pixels = batch(loaded, TEXTS[:1], TEXTS[3:4])
    with torch.no_grad():
        features = loaded.family.features(loaded.model, pixels, *prompt, projected)
        whole = loaded.family.answer_scores(loaded.model, features, prompt, answer, savings=projected)
        assert bool(torch.isfinite(whole.logps).all())
        with pytest.raises(ModelError, match=r"image features make \d+") as caught:
            loaded.family.answer_scores(loaded.model, features[..., :-1, :], prompt, answer, savings=projected)
    assert str(caught.value).count(". ") == 0 and str(caught.value).endswith(".")


def test_a_random_model_does_not_favour_repeating_its_last_prompt_token(any_family: LoadedModel) -> None:
    """Random weights predict the first answer token about uniformly: no head favours the prompt's last token.

    A head tied to the word embeddings of a narrow Gemma did (the last hidden state is nearly that
    token's own embedding row): the tiny PaliGemma's greedy answers all began with its separator,
    a newline that decodes to nothing, so one short fine-tune left every answer empty.
    """
    loaded, family = any_family, any_family.family
    prompt, answer, pixels = batch(loaded, TEXTS[:3], ["red", "yes", "two"])
    with torch.no_grad():
        features = family.features(loaded.model, pixels, *prompt)
        first = family.answer_logits(loaded.model, features, prompt, answer)[:, 0].log_softmax(-1)
    last = prompt[0].gather(1, prompt[1].sum(1, keepdim=True) - 1)
    uniform = -math.log(first.shape[-1])
    # Untied random heads give it uniform ± 0.2; the tied tiny PaliGemma gave it uniform + 0.6, always the argmax.
    assert (first.gather(1, last) < uniform + 0.3).all(), first.gather(1, last) - uniform
    assert not (first.argmax(-1, keepdim=True) == last).any()


def test_greedy_generation_returns_the_answers_training_fitted(any_family: LoadedModel) -> None:
    """After fitting two pairs, greedy tokens equal the trained answers and the teacher-forced argmax.

    Cached and uncached generation agreeing cannot catch a prompt or decoding that differs from
    training's: this reads generation against the scores the loss uses.
    """
    loaded, family, model = any_family, any_family.family, any_family.model
    prompt, answer, pixels = batch(loaded, TEXTS[:2], ["red", "yes"])
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    params = [p for m in family.trainable_modules(model, "lm") for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    try:
        with torch.no_grad():
            features = family.features(model, pixels, *prompt)
        for _ in range(40):
            logits = family.answer_logits(model, features, prompt, answer)
            if torch.equal(logits.argmax(-1) * answer[1], answer[0] * answer[1]):
                break
            loss = -sequence_scores(logits, *answer).logps.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        fitted = family.answer_logits(model, features, prompt, answer).argmax(-1)
        assert torch.equal(fitted * answer[1], answer[0] * answer[1]), "the two pairs were not fitted"
        generated = family.generate(loaded, features, prompt, 4)
        assert generated == [[int(t)] for t in answer[0][:, 0]]  # one answer token each, then the end
        assert [loaded.tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated] == ["red", "yes"]
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_a_config_that_is_not_a_vlm_names_the_supported_types(model_type: str, tmp_path: Path) -> None:
    from transformers import BertConfig, LlamaConfig

    config = (
        LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
        if model_type == "llama"
        else BertConfig(hidden_size=16)
    )
    config.save_pretrained(tmp_path)
    family = family_for("qwen2_vl")
    with pytest.raises(
        ModelError,
        match=rf"'{model_type}' is not a vision-language model.*types are blip, gemma3, idefics3, llava, mllama, "
        r"paligemma, qwen2_5_vl, qwen2_vl, smolvlm\.",
    ):
        family.from_pretrained(str(tmp_path))


def test_the_trained_tokenizer_is_deterministic_and_keeps_special_tokens_whole() -> None:
    from vqabench.models.qwen2_vl import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS

    make = lambda texts: train_byte_bpe(texts, special_tokens=QWEN_SPECIAL_TOKENS, chat_template=QWEN_CHAT_TEMPLATE)  # noqa: E731
    a, b = make(TEXTS), make(list(reversed(TEXTS)))
    assert a.get_vocab() == b.get_vocab()
    ids = a("<|im_start|>red<|image_pad|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == a.convert_tokens_to_ids("<|im_start|>") and ids[-1] == a.convert_tokens_to_ids("<|image_pad|>")
    assert a.decode(a("zebra ünïcode", add_special_tokens=False)["input_ids"]) == "zebra ünïcode"


def test_real_size_variants_have_the_released_parameter_counts() -> None:
    from vqabench.models import llava, qwen2_vl
    from vqabench.models.causal import asset_config

    tokenizer = qwen2_vl.qwen_tokenizer(TEXTS)
    with torch.device("meta"):
        qwen = qwen2_vl.FAMILY.transformers_class()(
            qwen2_vl.asset_qwen_config(qwen2_vl.FAMILY, "qwen2-vl-2b-instruct.json", tokenizer)
        )
        llava_tokenizer = llava.llava_tokenizer(TEXTS)
        big = llava.FAMILY.transformers_class()(
            llava.llava_config(asset_config("llava-1.5-7b-hf.json"), llava_tokenizer)
        )
    for model, published in ((qwen, 2.21e9), (big, 7.06e9)):
        count = sum(p.numel() for p in {id(p): p for p in base_model(model).parameters()}.values())
        assert round(count / 1e7) == round(published / 1e7), count


def tiny_splits(questions: list[str], answers: list[tuple[str, str]]) -> DataSplits:
    """Train pairs only, one 8x8 image each (encode resizes them to the model's square)."""
    pairs = [PreferencePair(f"img{i}", q, c, r) for i, (q, (c, r)) in enumerate(zip(questions, answers, strict=True))]
    images = {p.image_id: Image.new("RGB", (8, 8), (40 * i, 90, 200)) for i, p in enumerate(pairs)}
    return DataSplits(train=pairs, eval=[], test=[], images=images)


def test_the_seam_only_ever_reads_right_padded_prompts_and_answers(any_family: LoadedModel) -> None:
    """Why no test left-pads: encoding pads every prompt and answer on the right, and the batches that
    training, scoring and generation read keep that (each mask row is ones then zeros, pad ids after)."""
    loaded = any_family
    questions = [TEXTS[1], "red?", TEXTS[0]]
    data = tiny_splits(questions, [("red", "a green triangle"), ("a green triangle", "no"), ("two", "yes")])
    encoded = encode(data, loaded, loaded.question_token_cap, 16)
    split = encoded.splits["train"]
    prompt_lengths = [len(loaded.family.prompt_ids(loaded, q)) for q in questions]
    assert split.question_mask.sum(1).tolist() == prompt_lengths and len(set(prompt_lengths)) == 3
    batch = encoded.batch("train", torch.tensor([1, 0]), torch.device("cpu"))
    padded = [
        (split.question_ids, split.question_mask),
        (split.chosen_ids, split.chosen_mask),
        (split.rejected_ids, split.rejected_mask),
        batch.prompt,
        batch.chosen,
        batch.rejected,
    ]
    for ids, mask in padded:
        lengths = mask.sum(1, keepdim=True)
        assert torch.equal(mask, (torch.arange(mask.shape[1]) < lengths).long())
        assert bool((ids[mask == 0] == loaded.pad_token_id).all())
    assert all(bool((mask == 0).any()) for _, mask in padded)  # every one of them has padding to place


@pytest.mark.parametrize("train", ["lm", "lm+projector"])
def test_the_vision_tower_stays_in_eval_mode_while_the_rest_trains(any_family: LoadedModel, train: str) -> None:
    """The vision tower stays frozen and in eval mode unless train = "all": each part's mode as it runs
    in an SFT epoch's step (encoder cache off, so the tower runs), from a model left wholly in train mode."""
    loaded = copy.copy(any_family)
    loaded.model = copy.deepcopy(any_family.model)
    loaded.savings = Savings(projected_features=loaded.family.projected_features(train))
    family, model = loaded.family, loaded.model
    encoded = encode(tiny_splits(TEXTS[:2], [("red", "blue"), ("yes", "no")]), loaded, loaded.question_token_cap, 8)
    watched = {
        "vision": [m for _, m in family.vision_parts(model)],
        "projector": family.projector_parts(model),
        "language model": [part(model, family.language_model_path)],
    }
    seen: dict[str, set[bool]] = {key: set() for key in watched}
    for key, tops in watched.items():
        for module in (m for top in tops for m in top.modules()):
            module.register_forward_pre_hook(lambda m, _, key=key: seen[key].add(m.training))
    spec = RunSpec(name="sft", method="sft", train=train, batch_size=2, epochs=1)
    trainer = Trainer(spec, loaded, encoded, None, torch.device("cpu"))
    model.train()
    trainer.train_epoch(1)
    assert seen == {"vision": {False}, "projector": {train == "lm+projector"}, "language model": {True}}
    assert not any(p.requires_grad for _, m in family.vision_parts(model) for p in m.parameters())


def test_the_worker_gives_a_spec_without_a_train_line_its_familys_default(tmp_path: Path) -> None:
    """What a preset by hub id, not yet downloaded, leaves to the worker: "lm" for a causal VLM, "decoder" for BLIP."""
    from vqabench.engine.prepare import load_model_and_data
    from vqabench.models import blip
    from vqabench.models.registry import default_train_of
    from vqabench.spec import DatasetSpec

    dataset = DatasetSpec(eval_size=4, test_size=4)
    spec = RunSpec(name="sft", method="sft", model=TINY[0], train="auto", limit=8, dataset=dataset)
    resolved, loaded, _ = load_model_and_data(spec, tmp_path, lambda event: None)
    assert resolved.train == "lm" and loaded.savings.projected_features  # cut above the frozen projector
    assert {default_train_of(built(name).family) for name in EVERY_TINY} == {"lm"}
    assert default_train_of(blip.FAMILY) == "decoder"
