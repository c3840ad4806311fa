"""KTO's mismatched pairing and the precomputed reference's cache key."""

from __future__ import annotations

import pytest
import torch

from vqabench.engine import reference as ref_mod
from vqabench.engine.cache import ArrayStore
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.encoder_cache import attach_encoder_cache
from vqabench.engine.reference import (
    CopyReference,
    PrecomputedReference,
    assign_mismatched,
    mismatched_answers,
    mismatched_rows,
)
from vqabench.engine.trainer import MethodStep
from vqabench.models import blip
from vqabench.spec import DatasetSpec, RunSpec


@pytest.fixture(scope="module")
def tiny():
    data = easyvqa.load_splits(DatasetSpec(eval_size=12, test_size=4), seed=0, limit=40)
    loaded = blip.build_embedded(seed=0)
    loaded.model.eval()
    return loaded, encode(data, loaded, 32, 16), data


def test_mismatched_rows_never_pair_a_question_with_its_own_image_and_stay_in_the_block():
    # easy-VQA-like: several questions per image, unshuffled, so row i+1 is often the same image
    images = torch.tensor([i // 3 for i in range(60)])
    partners = mismatched_rows(images, block=8, seed=5)
    assert bool((images[partners] != images).all())
    assert sorted(partners.tolist()) == list(range(60))  # a permutation of the split's rows
    order = torch.randperm(60, generator=torch.Generator().manual_seed(5))
    block_of = torch.empty(60, dtype=torch.long)
    block_of[order] = torch.arange(60) // 8
    assert bool((block_of[partners] == block_of).all())
    assert torch.equal(partners, mismatched_rows(images, block=8, seed=5))  # seeded
    assert not torch.equal(partners, mismatched_rows(images, block=8, seed=6))


def test_a_block_of_one_image_borrows_a_partner_of_another_image():
    images = torch.tensor([0] * 7 + [1])  # the first block of 4 may hold image 0 only
    partners = mismatched_rows(images, block=4, seed=0)
    assert bool((images[partners] != images).all())


def test_kto_precomputed_and_copy_references_agree_on_the_mismatched_pairs(tiny):
    loaded, encoded, _ = tiny
    assign_mismatched(encoded, block=8, seed=0)
    s = encoded.splits["train"]
    assert bool((s.image_index[encoded.mismatched["train"]] != s.image_index).all())
    spec = RunSpec(name="kto", method="kto", init_checkpoint="x", batch_size=8)
    copy_ref = CopyReference(loaded, "decoder")
    pre = PrecomputedReference.build(
        loaded,
        encoded,
        batch_size=8,
        device=torch.device("cpu"),
        cache_dir=None,
        checkpoint_key="k",
        data_key="d",
        precision="fp32",
    )
    batch = encoded.batch("train", torch.tensor([9, 2, 30, 17, 4]), torch.device("cpu"))
    with torch.no_grad():
        q = blip.encode_questions(loaded.model, batch.pixel_values, batch.question_ids, batch.question_mask)
        live = copy_ref.logps(encoded, "train", batch, q, with_mismatched=True).mismatched
        table = pre.logps(encoded, "train", batch, q, with_mismatched=True).mismatched
        a = MethodStep(spec, loaded, encoded, copy_ref)("train", batch).losses
        b = MethodStep(spec, loaded, encoded, pre)("train", batch).losses
    torch.testing.assert_close(live, table, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ids, _ = mismatched_answers(encoded, "train", batch)
    assert ids.shape[0] == len(batch)


def test_precompute_cache_misses_when_transformers_tokenizer_or_scoring_code_changes(tiny, tmp_path, monkeypatch):
    import transformers

    loaded, encoded, data = tiny

    def build():
        return PrecomputedReference.build(
            loaded,
            encoded,
            batch_size=16,
            device=torch.device("cpu"),
            cache_dir=tmp_path,
            checkpoint_key="k",
            data_key=data.fingerprint,
            precision="fp32",
        )

    assert not build().from_cache
    assert build().from_cache  # same everything: a hit
    with monkeypatch.context() as m:
        m.setattr(transformers, "__version__", transformers.__version__ + ".post1")
        assert not build().from_cache
    with monkeypatch.context() as m:
        m.setattr(ref_mod, "SCORING_VERSION", ref_mod.SCORING_VERSION + 1)
        assert not build().from_cache
    original = loaded.tokenizer
    try:
        changed = blip.embedded_tokenizer()
        changed.add_tokens(["zebra"])
        loaded.tokenizer = changed
        assert not build().from_cache
    finally:
        loaded.tokenizer = original
    assert build().from_cache  # back to the first key


@pytest.fixture(scope="module")
def cached_encodings(tiny):
    """The tiny data's encoder cache entries (in memory), fp32 and bf16."""
    loaded, encoded, data = tiny
    entries = {}
    try:
        for dtype in ("fp32", "bf16"):
            attach_encoder_cache(
                loaded,
                encoded,
                data_fingerprint=data.fingerprint,
                dtype=dtype,
                batch_size=16,
                device=torch.device("cpu"),
                store=ArrayStore(None),
            )
            entries[dtype] = encoded.encodings
    finally:
        encoded.encodings = None
    return entries


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({}, {"encodings": "fp32"}),
        ({"encodings": "fp32"}, {"encodings": "bf16"}),
        ({}, {"precision": "bf16"}),
        ({}, {"device": "cuda"}),
        ({}, {"torch": torch.__version__ + ".post1"}),
    ],
    ids=["encoder cache on", "encoder cache dtype", "precision", "device type", "torch version"],
)
def test_precompute_key_changes_with_everything_that_changes_the_numbers(
    tiny, cached_encodings, monkeypatch, before, after
):
    loaded, encoded, data = tiny

    def key(settings: dict) -> str:
        s = {"encodings": None, "precision": "fp32", "device": "cpu", "torch": torch.__version__, **settings}
        encoded.encodings = cached_encodings[s["encodings"]] if s["encodings"] else None
        try:
            with monkeypatch.context() as m:
                m.setattr(torch, "__version__", s["torch"])
                return ref_mod.reference_cache_key(
                    loaded, encoded, "k", data.fingerprint, precision=s["precision"], device=torch.device(s["device"])
                )
        finally:
            encoded.encodings = None

    assert key(before) == key(before)
    assert key(before) != key(after)


def test_a_table_scored_from_bf16_encodings_is_not_reused_by_an_fp32_run(tiny, cached_encodings, tmp_path):
    loaded, encoded, data = tiny

    def build(dtype: str) -> PrecomputedReference:
        encoded.encodings = cached_encodings[dtype]
        try:
            return PrecomputedReference.build(
                loaded,
                encoded,
                batch_size=16,
                device=torch.device("cpu"),
                cache_dir=tmp_path,
                checkpoint_key="k",
                data_key=data.fingerprint,
                precision="fp32",
            )
        finally:
            encoded.encodings = None

    bf16 = build("bf16")
    fp32 = build("fp32")
    assert not bf16.from_cache and not fp32.from_cache
    assert not torch.equal(fp32.table["train"]["chosen"], bf16.table["train"]["chosen"])  # the numbers differ
    assert build("fp32").from_cache
