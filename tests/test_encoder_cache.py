"""The frozen-encoder cache: same losses as running the encoders, keyed by the encoders only, safe fallbacks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import of_type, run_worker, tiny_spec

from vqabench import events as ev
from vqabench.engine.cache import ArrayStore
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.encoder_cache import attach_encoder_cache, encoder_cache_key
from vqabench.engine.generation import greedy_answers
from vqabench.engine.reference import CopyReference, PrecomputedReference
from vqabench.engine.trainer import MethodStep
from vqabench.models import blip, parts
from vqabench.spec import DatasetSpec, RunSpec, SpecError, spec_from_dict

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data = easyvqa.load_splits(DatasetSpec(eval_size=8, test_size=8), seed=0, limit=16)
    loaded = blip.build_embedded(seed=0)
    store = ArrayStore(tmp_path_factory.mktemp("cache") / "arrays")
    encoded = encode(data, loaded, 32, 16, store=store)
    return data, loaded, encoded, store


def attach(tiny, store=None, dtype="fp32"):
    data, loaded, encoded, own_store = tiny
    return attach_encoder_cache(
        loaded,
        encoded,
        data_fingerprint=data.fingerprint,
        dtype=dtype,
        batch_size=8,
        device=CPU,
        store=store or own_store,
    )


def step_losses(tiny, method: str, strategy: str | None, cached: bool) -> dict[str, torch.Tensor]:
    """Per-example losses of one training step's forward on train rows 0..7, and the reference's log-probs."""
    _, start, encoded, _ = tiny
    if cached:
        attach(tiny)
        assert encoded.encodings is not None
    else:
        encoded.encodings = None
    loaded = copy.copy(start)
    loaded.model = copy.deepcopy(start.model)
    spec = RunSpec(name=method, method=method, init_checkpoint="x" if strategy else None, reference=strategy or "copy")
    parts.freeze_for_training(loaded, spec.train)
    reference = None
    if strategy == "copy":
        reference = CopyReference(loaded, spec.train)
    elif strategy == "precompute":
        reference = PrecomputedReference.build(
            loaded,
            encoded,
            batch_size=8,
            device=CPU,
            cache_dir=None,
            checkpoint_key="k",
            data_key="d",
            precision="fp32",
        )
    step = MethodStep(spec, loaded, encoded, reference)
    parts.set_train_mode(loaded, spec.train)  # decoder dropout on, as in training
    batch = next(encoded.batches("train", [torch.arange(8)], CPU))
    assert (batch.features is not None) == cached and (batch.pixel_values is None) == cached
    torch.manual_seed(7)  # the same dropout masks on both paths
    out = step("train", batch)
    result = {"losses": out.losses.detach(), "chosen": out.chosen_logps}
    if strategy == "precompute":
        result.update({f"ref_{k}": v for k, v in reference.table["train"].items()})
    encoded.encodings = None
    return result


@pytest.mark.parametrize(
    ("method", "strategy"),
    [
        ("sft", None),
        ("orpo", None),
        ("dpo", "copy"),
        ("dpo", "precompute"),
        ("ipo", "copy"),
        ("kto", "copy"),
        ("kto", "precompute"),
        ("simpo", None),
    ],
)
def test_cached_encodings_give_the_same_per_example_losses(tiny, method, strategy):
    plain = step_losses(tiny, method, strategy, cached=False)
    cached = step_losses(tiny, method, strategy, cached=True)
    assert plain.keys() == cached.keys()
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=0, msg=f"{method} {strategy} {name}")
    assert bool(torch.isfinite(plain["losses"]).all())


def test_eval_and_generation_read_the_same_encodings(tiny):
    _, loaded, encoded, _ = tiny
    loaded.model.eval()
    rows = [torch.arange(8)]
    encoded.encodings = None
    plain = next(encoded.batches("test", rows, CPU))
    attach(tiny)
    cached = next(encoded.batches("test", rows, CPU))
    encoded.encodings = None
    with torch.no_grad():
        torch.testing.assert_close(
            cached.features_of(loaded.family, loaded.model),
            plain.features_of(loaded.family, loaded.model),
            atol=1e-5,
            rtol=0,
        )
    answers = greedy_answers(loaded, plain.pixel_values, plain.question_ids, plain.question_mask, 4)
    again = greedy_answers(loaded, None, cached.question_ids, cached.question_mask, 4, features=cached.features)
    assert answers == again


def test_the_key_names_the_encoders_only(tiny):
    data, loaded, encoded, _ = tiny
    key = encoder_cache_key(loaded, encoded, data.fingerprint, "fp32", CPU)
    trained_decoder = copy.copy(loaded)
    trained_decoder.model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        next(trained_decoder.model.text_decoder.parameters()).add_(1.0)
    assert encoder_cache_key(trained_decoder, encoded, data.fingerprint, "fp32", CPU) == key  # SFT's children share
    other_base = blip.build_embedded(seed=1)
    assert encoder_cache_key(other_base, encoded, data.fingerprint, "fp32", CPU).digest != key.digest
    assert encoder_cache_key(loaded, encoded, data.fingerprint, "bf16", CPU).digest != key.digest
    assert encoder_cache_key(loaded, encoded, "other-data", "fp32", CPU).digest != key.digest


def test_a_different_base_model_misses_the_cache_and_builds_its_own(tiny):
    data, _, encoded, store = tiny
    first = attach(tiny)
    reused = attach(tiny)
    assert not reused.built and reused.path == first.path and reused.seconds == 0.0
    other = attach_encoder_cache(
        blip.build_embedded(seed=1),
        encoded,
        data_fingerprint=data.fingerprint,
        dtype="fp32",
        batch_size=8,
        device=CPU,
        store=store,
    )
    encoded.encodings = None
    assert other.built and other.path != first.path


def test_bf16_halves_the_file(tiny):
    fp32, bf16 = attach(tiny), attach(tiny, dtype="bf16")
    _, _, encoded, _ = tiny
    assert encoded.encodings is not None and encoded.encodings.rows("train", torch.arange(2)).dtype == torch.bfloat16
    encoded.encodings = None
    assert bf16.bytes * 2 == fp32.bytes and fp32.bytes == sum(
        len(encoded.splits[s]) * encoded.splits[s].question_ids.shape[1] * 128 * 4 for s in ("train", "eval", "test")
    )


def test_an_unwritable_folder_falls_back_to_memory_with_one_warning(tiny, tmp_path, caplog):
    (tmp_path / "encoder").write_text("a file where the encoder cache folder should be")
    info = attach(tiny, store=ArrayStore(tmp_path))
    _, loaded, encoded, _ = tiny
    loaded.model.eval()  # the frozen encoders run in eval mode (no dropout)
    assert info.built and info.path is None and info.warning is not None
    assert f"'{tmp_path}'" in info.warning and info.warning.count(". ") == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [info.warning]
    cached = next(encoded.batches("train", [torch.arange(4)], CPU))
    encoded.encodings = None
    plain = next(encoded.batches("train", [torch.arange(4)], CPU))
    with torch.no_grad():
        torch.testing.assert_close(
            cached.features_of(loaded.family, loaded.model),
            plain.features_of(loaded.family, loaded.model),
            atol=1e-5,
            rtol=0,
        )


def test_training_the_encoders_never_uses_the_cache():
    base = {"name": "x", "method": "sft"}
    assert RunSpec(name="x", method="sft").uses_encoder_cache
    assert not spec_from_dict({**base, "train": "all"}).uses_encoder_cache
    assert not spec_from_dict({**base, "encoder_cache": "off"}).uses_encoder_cache
    with pytest.raises(SpecError, match="encoder_cache") as info:
        spec_from_dict({**base, "train": "all", "encoder_cache": "on"})
    assert str(info.value).count(". ") == 0


def test_a_run_that_trains_all_reads_no_cache_and_says_so(tmp_path, vqa_cache):
    events, rc, err = run_worker(tiny_spec("all-parts", "sft", train="all", limit=16), tmp_path, vqa_cache)
    assert rc == 0, err[-2000:]
    assert of_type(events, ev.EncoderCached) == []
    started = of_type(events, ev.RunStarted)[0]
    assert started.data["encoder_cache"] == {"on": False}
    assert not any(p.phase == "encode" for p in of_type(events, ev.Progress))


@pytest.mark.parametrize(
    ("model", "train"),
    [("qwen2-vl-tiny-random", "lm"), ("llava-tiny-random", "lm+projector")],  # cut above / before the projector
)
def test_a_causal_familys_epoch_is_the_same_with_the_feature_cache_on_and_off(tmp_path, vqa_cache, model, train):
    epochs, answers = {}, {}
    for cache in ("auto", "off"):
        spec = tiny_spec(f"{cache}", "sft", model=model, train=train, limit=32, lr=1e-3, encoder_cache=cache)
        events, rc, err = run_worker(spec, tmp_path, vqa_cache)
        assert rc == 0, err[-2000:]
        assert bool(of_type(events, ev.EncoderCached)) == (cache == "auto")
        [epochs[cache]] = of_type(events, ev.EpochEnded)
        [test] = [e for e in of_type(events, ev.Evaluated) if e.split == "test"]
        answers[cache] = Path(test.predictions).read_text()
    on, off = epochs["auto"], epochs["off"]
    assert on.train_loss == pytest.approx(off.train_loss, abs=1e-6)
    assert on.eval_loss == pytest.approx(off.eval_loss, abs=1e-6)
    assert answers["auto"] == answers["off"]


def test_a_causal_familys_entry_holds_each_image_once_and_serves_each_pair_its_images_features():
    """Features that read the image only are encoded once per image, yet every pair reads its own image's."""
    from vqabench.engine.data.records import DataSplits, PreferencePair
    from vqabench.models import qwen2_vl
    from vqabench.models.family import Savings

    variant = {v.name: v for v in qwen2_vl.VARIANTS}["qwen2-vl-tiny-random"]
    loaded = variant.build(0, ["what colour is it?", "is there a circle?", "red", "yes", "no"], None)
    loaded.model.eval()
    loaded.savings = Savings(projected_features=True)  # cut above the frozen projector, as for train = "lm"
    source = easyvqa.load_splits(DatasetSpec(eval_size=2, test_size=2), seed=0, limit=3)
    ids = [p.image_id for p in source.train[:3]]
    questions = ["what colour is it?", "is there a circle?", "what shape?"]

    def pairs(images):  # three questions about each image, images interleaved
        return [PreferencePair(i, q, "red", "no") for q in questions for i in images]

    data = DataSplits(pairs(ids[:2]), pairs(ids[1:]), pairs(ids[2:]), source.images, fingerprint="per-image")
    encoded = encode(data, loaded, loaded.question_token_cap, 8, store=ArrayStore(None))
    info = attach_encoder_cache(
        loaded,
        encoded,
        data_fingerprint="per-image",
        dtype="fp32",
        batch_size=2,
        device=CPU,
        store=ArrayStore(None),
        train="lm",
    )
    assert (info.pairs, info.images) == (6 + 6 + 3, 3)
    entry = encoded.encodings
    assert entry is not None and entry.specs["images"].shape[0] == 3  # one row per distinct image, not 15
    assert "train" not in entry.specs  # no per-pair feature array
    rows = torch.tensor([5, 0, 3, 2])  # images 1, 0, 1, 0 of train, out of order
    cached = encoded.batch("train", rows, CPU)
    encoded.num_workers = 1  # a DataLoader worker process reads the entry and the row map itself
    [loader] = list(encoded.batches("train", [rows], CPU))
    encoded.encodings = None
    plain = encoded.batch("train", rows, CPU)
    assert cached.features is not None and plain.pixel_values is not None
    with torch.no_grad():
        direct = loaded.family.features(loaded.model, plain.pixel_values, *plain.prompt, loaded.savings)
    assert torch.allclose(cached.features, direct, rtol=0, atol=1e-6), (cached.features - direct).abs().max()
    assert torch.equal(loader.features, cached.features)
    assert not torch.allclose(direct[0], direct[1], atol=1e-3)  # two different images: the check can tell them apart
