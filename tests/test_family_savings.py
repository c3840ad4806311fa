"""The exact savings of the causal-VLM families, per family, on their tiny random variants in fp32.

Shared prompt (one prompt pass, both answers on its key/value cache) against the full pass:
log-probs within 1e-5 and every trainable parameter's gradient within 1e-5 (max abs diff).
Answer-only logits against logits over every column: log-probs within 1e-6. The reference
for each comparison is the other path, run on the same weights, features and rows.
Cache on vs off (features read from the encoder cache vs computed in the step, cut above a
frozen projector or before a trained one): log-probs within 1e-6; the cache key changes with
the cut, the image settings and, above it, the projector's weights.
"""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

from vqabench.engine.cache import ArrayStore
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.data.records import DataSplits
from vqabench.engine.encoder_cache import attach_encoder_cache, encoder_cache_key
from vqabench.engine.reference import AdapterReference
from vqabench.engine.trainer import MethodStep
from vqabench.models import lora, parts
from vqabench.models.causal import base_model
from vqabench.models.family import ImageFormat, LoadedModel, Savings
from vqabench.spec import DatasetSpec, SpecError, spec_from_dict

TEXTS = [
    "what colour is the square in the middle?",
    "is there a triangle?",
    "how many circles?",
    "red",
    "a blue one",
    "yes",
    "no",
    "two circles and a square",
]
VARIANTS = {
    "gemma3": "gemma3-tiny-random",
    "idefics3": "idefics3-tiny-random",
    "llava": "llava-tiny-random",
    "mllama": "mllama-tiny-random",
    "paligemma": "paligemma-tiny-random",
    "qwen2_5_vl": "qwen2.5-vl-tiny-random",
    "qwen2_vl": "qwen2-vl-tiny-random",
}
FULL = Savings(shared_prompt=False, answer_only_logits=True)
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def loaded(request: pytest.FixtureRequest) -> LoadedModel:
    module = importlib.import_module(f"vqabench.models.{request.param}")
    variant = {v.name: v for v in module.VARIANTS}[VARIANTS[request.param]]
    built = variant.build(0, TEXTS, None)
    built.model.eval()  # dropout off: both paths must see the same function
    return built


def padded(loaded: LoadedModel, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    pad = loaded.pad_token_id
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def pair_batch(loaded: LoadedModel) -> tuple[torch.Tensor, tuple, tuple, tuple]:
    """Three rows whose prompts and answers differ in length, so padding sits between prompt and answer."""
    family = loaded.family
    questions, chosen, rejected = TEXTS[:3], TEXTS[3:6], [TEXTS[7], TEXTS[6], TEXTS[4]]
    framed = [
        [family.frame_answer(loaded, family.answer_ids(loaded, a), True) for a in answers]
        for answers in (chosen, rejected)
    ]
    prompts = padded(loaded, [family.prompt_ids(loaded, q) for q in questions])
    assert len(set(prompts[1].sum(-1).tolist())) > 1  # the rows' prompts really differ in length
    torch.manual_seed(1)
    pixels = torch.randn(len(questions), 3, loaded.image_size, loaded.image_size)
    return pixels, prompts, padded(loaded, framed[0]), padded(loaded, framed[1])


def scored_with_grads(loaded: LoadedModel, savings: Savings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Chosen and rejected log-probs ``[2, B]`` and each trainable parameter's gradient of a fixed mix of them."""
    family, model = loaded.family, loaded.model
    pixels, prompt, chosen, rejected = pair_batch(loaded)
    with torch.no_grad():
        features = family.features(model, pixels, *prompt)
    model.zero_grad(set_to_none=True)
    c, r = family.pair_scores(model, features, prompt, chosen, rejected, loaded.pad_token_id, savings)
    logps = torch.stack([c.logps, r.logps])
    weights = torch.tensor([[1.0, -0.5, 0.25], [-1.0, 0.75, 0.5]])
    (logps * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logps.detach(), grads


def test_shared_prompt_equals_the_full_pass_in_log_probs_and_gradients(loaded: LoadedModel) -> None:
    full, full_grads = scored_with_grads(loaded, FULL)
    shared, shared_grads = scored_with_grads(loaded, Savings())
    assert torch.allclose(shared, full, rtol=0, atol=1e-5), (shared - full).abs().max()
    assert set(shared_grads) == set(full_grads)
    assert len(full_grads) > 10  # the language model's weights, at least, receive gradients
    worst = max((shared_grads[n] - g).abs().max().item() for n, g in full_grads.items())
    assert worst <= 1e-5, worst
    assert any(g.abs().sum() > 0 for g in full_grads.values())


@pytest.mark.parametrize("shared", [False, True])
def test_answer_only_logits_equal_logits_over_every_column(loaded: LoadedModel, shared: bool) -> None:
    family, model = loaded.family, loaded.model
    pixels, prompt, chosen, rejected = pair_batch(loaded)
    pad = loaded.pad_token_id
    with torch.no_grad():
        features = family.features(model, pixels, *prompt)
        on = family.pair_scores(model, features, prompt, chosen, rejected, pad, Savings(shared, True))
        off = family.pair_scores(model, features, prompt, chosen, rejected, pad, Savings(shared, False))
        single_on = family.answer_scores(model, features, prompt, chosen, savings=Savings(shared, True))
        single_off = family.answer_scores(model, features, prompt, chosen, savings=Savings(shared, False))
    for a, b in ((on[0].logps, off[0].logps), (on[1].logps, off[1].logps), (single_on.logps, single_off.logps)):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
    assert torch.equal(on[0].lengths, chosen[1].sum(-1).float())


@pytest.fixture(scope="module")
def easy() -> DataSplits:
    return easyvqa.load_splits(DatasetSpec(eval_size=4, test_size=4), seed=0, limit=4)


def with_cut(loaded: LoadedModel, train: str) -> LoadedModel:
    """The loaded model as prepare leaves it for `train`: its features cut where the family says."""
    run = copy.copy(loaded)
    run.savings = Savings(projected_features=loaded.family.projected_features(train))
    return run


@pytest.mark.parametrize("train", ["lm", "lm+projector"])
def test_cached_features_score_as_features_computed_in_the_step(
    loaded: LoadedModel, easy: DataSplits, train: str
) -> None:
    run = with_cut(loaded, train)
    assert run.savings.projected_features == (train == "lm")
    family, model, pad = run.family, run.model, run.pad_token_id
    encoded = encode(easy, run, run.question_token_cap, 16, store=ArrayStore(None))
    info = attach_encoder_cache(
        run,
        encoded,
        data_fingerprint=easy.fingerprint,
        dtype="fp32",
        batch_size=2,
        device=CPU,
        store=ArrayStore(None),
        train=train,
    )
    assert info.built and info.bytes > 0
    rows = [torch.arange(4)]
    cached = next(encoded.batches("train", rows, CPU))
    encoded.encodings = None
    plain = next(encoded.batches("train", rows, CPU))
    assert cached.features is not None and plain.features is None
    below = Savings()  # the cut before the projector: the features every train value could read
    with torch.no_grad():
        scored = {
            name: family.pair_scores(
                model,
                batch.features_of(family, model, savings),
                batch.prompt,
                batch.chosen,
                batch.rejected,
                pad,
                savings,
            )
            for name, batch, savings in (
                ("cached", cached, run.savings),
                ("step", plain, run.savings),
                ("below", plain, below),
            )
        }
    for name in ("cached", "below"):
        for side in (0, 1):
            a, b = scored[name][side].logps, scored["step"][side].logps
            assert torch.allclose(a, b, rtol=0, atol=1e-6), (name, (a - b).abs().max())
    if run.savings.projected_features:  # the entry holds image-token embeddings: the language model's width
        hidden = base_model(model).config.get_text_config().hidden_size
        assert cached.features.shape[-1] == hidden


def test_the_cache_key_names_the_cut_the_image_settings_and_the_projector_when_cut_above_it(
    loaded: LoadedModel, easy: DataSplits
) -> None:
    def key(run: LoadedModel, train: str) -> str:
        encoded = encode(easy, run, run.question_token_cap, 16, store=ArrayStore(None))
        return encoder_cache_key(run, encoded, easy.fingerprint, "fp32", CPU, train).digest

    above, below = with_cut(loaded, "lm"), with_cut(loaded, "lm+projector")
    assert key(above, "lm") != key(below, "lm+projector")
    assert key(above, "lm") == key(with_cut(loaded, "lora"), "lora")  # the same features: one entry
    other_std = copy.copy(above)
    other_std.image = ImageFormat(loaded.image.size, loaded.image.mean, (0.125, 0.25, 0.375))
    assert key(other_std, "lm") != key(above, "lm")
    # A grid setting that no weight records (the tiny models' patch size) changes the key too.
    other_grid = copy.copy(above)
    other_grid.model = copy.deepcopy(loaded.model)
    vision = base_model(other_grid.model).config.vision_config
    vision.patch_size = int(vision.patch_size) * 2
    assert key(other_grid, "lm") != key(above, "lm")
    # Above the projector its weights are in the key; below it they are not (the projector trains).
    other_projector = copy.copy(above)
    other_projector.model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for module in other_projector.family.projector_parts(other_projector.model):
            next(module.parameters()).add_(1.0)
    assert key(other_projector, "lm") != key(above, "lm")
    moved_below = copy.copy(other_projector)
    moved_below.savings = below.savings
    assert key(moved_below, "lm+projector") == key(below, "lm+projector")


@pytest.mark.parametrize("family_name", ["qwen2_vl", "mllama"])
def test_a_lora_dpo_step_with_the_adapter_reference_follows_the_runs_switches(
    family_name: str, easy: DataSplits
) -> None:
    """Every saving off vs every saving on, through the trainer's step and the adapter reference: the
    same per-pair losses and LoRA gradients within 1e-5, features cut above the frozen projector."""
    module = importlib.import_module(f"vqabench.models.{family_name}")
    variant = {v.name: v for v in module.VARIANTS}[VARIANTS[family_name]]
    start = variant.build(0, TEXTS, None)
    spec = spec_from_dict(
        {"name": "x", "method": "dpo", "train": "lora", "reference": "adapter", "init_checkpoint": "x", "lora_r": 4}
    )
    lora.attach(start, spec)
    torch.manual_seed(3)
    with torch.no_grad():  # adapters that move the policy away from the reference (B starts at zero)
        for name, p in start.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    parts.freeze_for_training(start, spec.train)

    def step(shared_prompt: bool, answer_only_logits: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        start.savings = Savings(shared_prompt, answer_only_logits, projected_features=True)
        encoded = encode(easy, start, start.question_token_cap, 16, store=ArrayStore(None))
        attach_encoder_cache(
            start,
            encoded,
            data_fingerprint=easy.fingerprint,
            dtype="fp32",
            batch_size=4,
            device=CPU,
            store=ArrayStore(None),
            train="lora",
        )
        batch = next(encoded.batches("train", [torch.arange(4)], CPU))
        start.model.eval()
        out = MethodStep(spec, start, encoded, AdapterReference(start))("train", batch)
        out.losses.sum().backward()
        grads = {n: p.grad.clone() for n, p in start.model.named_parameters() if p.grad is not None}
        start.model.zero_grad(set_to_none=True)
        return out.losses.detach(), grads

    on, on_grads = step(True, True)
    off, off_grads = step(False, False)
    assert not torch.allclose(on, torch.full_like(on, math.log(2)), atol=1e-4)  # the adapters matter
    assert torch.allclose(on, off, rtol=0, atol=1e-5), (on - off).abs().max()
    assert set(on_grads) == set(off_grads) and all("lora_" in n for n in on_grads)
    assert max((on_grads[n] - g).abs().max().item() for n, g in off_grads.items()) <= 1e-5


def test_the_switches_are_run_keys_on_by_default() -> None:
    spec = spec_from_dict({"name": "x", "method": "dpo", "init_checkpoint": "x"})
    assert spec.shared_prompt and spec.answer_only_logits
    off = spec_from_dict({"name": "x", "method": "dpo", "init_checkpoint": "x", "shared_prompt": False})
    assert not off.shared_prompt and off.answer_only_logits
    with pytest.raises(SpecError, match="shared_prompt"):
        spec_from_dict({"name": "x", "method": "dpo", "init_checkpoint": "x", "shared_prompt": "yes"})


def test_each_family_learns_under_lm_and_its_vision_tower_stays_put(loaded: LoadedModel) -> None:
    """Twenty SFT steps on one batch (lr 1e-2): the chosen answers' NLL falls by more than half,
    the language model's weights move, the vision tower's do not (train = "lm")."""
    run = copy.deepcopy(loaded)
    family, model = run.family, run.model
    parts.freeze_for_training(run, "lm")
    trainable = [p for p in model.parameters() if p.requires_grad]
    tower = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and tower
    before = [p.detach().clone() for p in trainable]
    pixels, prompt, chosen, _ = pair_batch(run)
    with torch.no_grad():
        features = family.features(model, pixels, *prompt)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(20):
        scores = family.answer_scores(model, features, prompt, chosen)
        loss = -(scores.logps / scores.lengths).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0], losses
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before, strict=True) if p.grad is not None)
    assert all(torch.equal(p, tower[n]) for n, p in model.named_parameters() if n in tower)
