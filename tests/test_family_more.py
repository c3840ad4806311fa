"""PaliGemma, Gemma 3, Idefics3 (SmolVLM) and Mllama behind the causal-VLM seam, on their tiny random variants (fp32).

Each check states its tolerance: the adapter reference and the DPO start are exact; padding,
features passed back and a save/load round trip agree within 1e-5; greedy generation on the
key/value cache equals re-running the whole prefix, token for token.
"""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

from vqabench.models.family import LoadedModel
from vqabench.objectives import dpo_loss

TEXTS = [
    "what colour is the square?",
    "how many circles are in the picture?",
    "is there a triangle?",
    "red",
    "blue",
    "yes",
    "no",
    "two circles",
]
VARIANTS = {
    "gemma3": "gemma3-tiny-random",
    "idefics3": "idefics3-tiny-random",
    "mllama": "mllama-tiny-random",
    "paligemma": "paligemma-tiny-random",
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def loaded(request: pytest.FixtureRequest) -> LoadedModel:
    module = importlib.import_module(f"vqabench.models.{request.param}")
    variant = {v.name: v for v in module.VARIANTS}[VARIANTS[request.param]]
    return variant.build(0, TEXTS, None)


def batch(loaded: LoadedModel, questions: list[str], answers: list[str]) -> tuple:
    """Right-padded prompts and framed answers, and one random image per row."""
    family, pad = loaded.family, loaded.pad_token_id
    prompts = [family.prompt_ids(loaded, q) for q in questions]
    framed = [family.frame_answer(loaded, family.answer_ids(loaded, a), True) for a in answers]

    def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return ids, mask

    torch.manual_seed(1)
    pixels = torch.randn(len(questions), 3, loaded.image_size, loaded.image_size)
    return pixels, padded(prompts), padded(framed)


def pixel_inputs(loaded: LoadedModel, pixels: torch.Tensor, ids: torch.Tensor) -> dict:
    """What each model's own forward takes beside the token ids to read the image from pixels."""
    name = loaded.family.name
    if name == "idefics3":
        return {"pixel_values": pixels.unsqueeze(1)}
    if name == "gemma3":
        return {"pixel_values": pixels, "token_type_ids": (ids == loaded.facts["image_token_id"]).long()}
    if name == "paligemma":
        separator = ids == loaded.family.separator_id(loaded.tokenizer)
        return {"pixel_values": pixels, "token_type_ids": (separator.long().cumsum(-1) - separator.long()).clamp(max=1)}
    if name == "mllama":
        return mllama_pixel_inputs(loaded, pixels, ids)
    raise AssertionError(name)


def mllama_pixel_inputs(loaded: LoadedModel, pixels: torch.Tensor, ids: torch.Tensor) -> dict:
    """As MllamaProcessor makes them for one square image: tile 0 of max_num_tiles (the rest zeros), aspect
    ratio 1x1 (id 1), and each token from <|image|> to the end attending to tile 0."""
    tiles = loaded.model.config.vision_config.max_num_tiles
    batch = pixels.shape[0]
    tiled = torch.zeros(batch, 1, tiles, *pixels.shape[1:])
    tiled[:, 0, 0] = pixels
    ratio_mask = torch.zeros(batch, 1, tiles, dtype=torch.long)
    ratio_mask[:, 0, 0] = 1
    cross = torch.zeros(batch, ids.shape[1], 1, tiles, dtype=torch.long)
    for row in range(batch):
        at = ids[row].tolist().index(loaded.tokenizer.convert_tokens_to_ids("<|image|>"))
        cross[row, at:, 0, 0] = 1
    return {
        "pixel_values": tiled,
        "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long),
        "aspect_ratio_mask": ratio_mask,
        "cross_attention_mask": cross,
    }


def scores(loaded: LoadedModel, pixels: torch.Tensor, prompt: tuple, answer: tuple) -> torch.Tensor:
    family, model = loaded.family, loaded.model
    with torch.no_grad():
        features = family.features(model, pixels, *prompt)
        return family.answer_scores(model, features, prompt, answer).logps


def test_the_image_reaches_the_answer_scores(loaded: LoadedModel) -> None:
    pixels, prompt, answer = batch(loaded, TEXTS[:2], TEXTS[3:5])
    assert (scores(loaded, pixels, prompt, answer) - scores(loaded, -pixels, prompt, answer)).abs().max() > 1e-4


def test_features_passed_back_equal_the_models_own_pixel_forward(loaded: LoadedModel) -> None:
    """One row (no padding): the family's answer log-probs equal the transformers forward's with pixel_values, 1e-5."""
    pixels, prompt, answer = batch(loaded, TEXTS[:1], TEXTS[3:4])
    ids = torch.cat([prompt[0], answer[0]], dim=1)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, **pixel_inputs(loaded, pixels, ids)).logits
    width = prompt[0].shape[1]
    own = torch.log_softmax(logits[0, width - 1 : -1], -1).gather(-1, answer[0][0].unsqueeze(-1)).sum()
    assert scores(loaded, pixels, prompt, answer)[0] == pytest.approx(own.item(), abs=1e-5)


def test_padding_leaves_each_rows_scores_unchanged(loaded: LoadedModel) -> None:
    """A row scored alone and beside a longer row (padding after its prompt and its answer) agree within 1e-5."""
    pixels, prompt, answer = batch(loaded, [TEXTS[2], TEXTS[1]], [TEXTS[5], TEXTS[7]])
    together = scores(loaded, pixels, prompt, answer)
    for row in range(2):
        alone_prompt = _unpad(prompt, row)
        alone = scores(loaded, pixels[row : row + 1], alone_prompt, _unpad(answer, row))
        assert together[row].item() == pytest.approx(alone.item(), abs=1e-5)


def _unpad(pair: tuple, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = int(pair[1][row].sum())
    return pair[0][row : row + 1, :keep], pair[1][row : row + 1, :keep]


def test_adapter_reference_equals_base_log_probs_exactly(loaded: LoadedModel) -> None:
    from peft import LoraConfig, get_peft_model

    family = loaded.family
    pixels, prompt, answer = batch(loaded, TEXTS[:2], TEXTS[3:5])
    base = scores(loaded, pixels, prompt, answer)
    scope = family.lora_scope(loaded.model)
    names = [n for n, _ in loaded.model.named_modules() if n.startswith(scope) and n.endswith(family.lora_targets)]
    torch.manual_seed(2)
    config = LoraConfig(r=4, target_modules=names, init_lora_weights=False)
    wrapped = get_peft_model(copy.deepcopy(loaded.model), config)
    adapted = copy.copy(loaded)
    adapted.model = wrapped
    assert not torch.equal(scores(adapted, pixels, prompt, answer), base)
    with wrapped.disable_adapter():
        assert torch.equal(scores(adapted, pixels, prompt, answer), base)


def test_dpo_loss_at_step_zero_is_log_2(loaded: LoadedModel) -> None:
    family, model = loaded.family, loaded.model
    pixels, prompt, chosen = batch(loaded, TEXTS[:2], TEXTS[3:5])
    _, _, rejected = batch(loaded, TEXTS[:2], TEXTS[5:7])
    reference = copy.deepcopy(model)
    features = family.features(model, pixels, *prompt)
    policy = family.pair_scores(model, features, prompt, chosen, rejected, loaded.pad_token_id)
    with torch.no_grad():
        ref = family.pair_scores(reference, features, prompt, chosen, rejected, loaded.pad_token_id)
    loss = dpo_loss(policy[0].logps, policy[1].logps, ref[0].logps, ref[1].logps, beta=0.1)
    assert torch.equal(loss, torch.full_like(loss, math.log(2)))
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_cached_generation_equals_uncached_token_for_token(loaded: LoadedModel) -> None:
    pixels, prompt, _ = batch(loaded, [TEXTS[0], TEXTS[2]], TEXTS[3:5])
    family = loaded.family
    with torch.no_grad():
        features = family.features(loaded.model, pixels, *prompt)
    cached = family.generate(loaded, features, prompt, 6, use_cache=True)
    uncached = family.generate(loaded, features, prompt, 6, use_cache=False)
    assert cached == uncached
    assert sum(len(row) for row in cached) > 0


def test_saved_model_loads_back_with_the_same_scores(loaded: LoadedModel, tmp_path) -> None:
    pixels, prompt, answer = batch(loaded, TEXTS[:2], TEXTS[3:5])
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    loaded.family.save_extra(loaded, tmp_path)
    again = loaded.family.from_pretrained(str(tmp_path))
    assert again.family is loaded.family
    assert again.image == loaded.image
    assert again.family.prompt_ids(again, TEXTS[0]) == loaded.family.prompt_ids(loaded, TEXTS[0])
    before = scores(loaded, pixels, prompt, answer)
    assert torch.allclose(scores(again, pixels, prompt, answer), before, atol=1e-5, rtol=0)


def test_each_train_value_trains_its_parts_and_lora_stays_in_the_language_model(loaded: LoadedModel) -> None:
    """lm: not the vision tower nor the projector; lm+projector: adds the projector; all: every weight; LoRA's
    target modules all lie inside the language model, away from the vision tower."""
    family, model = loaded.family, loaded.model

    def ids(modules) -> set[int]:
        return {id(p) for m in modules for p in m.parameters()}

    vision = ids(m for _, m in family.frozen_modules(model, "lm"))
    projector = ids(family.projector_parts(model))
    lm, lm_projector = ids(family.trainable_modules(model, "lm")), ids(family.trainable_modules(model, "lm+projector"))
    assert vision and projector and lm
    assert not lm & (vision | projector)
    assert lm_projector == lm | projector
    assert ids(family.trainable_modules(model, "all")) == ids([model])
    assert family.frozen_modules(model, "all") == []
    scope = family.lora_scope(model)
    targets = [m for n, m in model.named_modules() if n.startswith(scope) and n.endswith(family.lora_targets)]
    assert targets and ids(targets) <= ids(family.trainable_modules(model, "lora")) and not ids(targets) & vision
