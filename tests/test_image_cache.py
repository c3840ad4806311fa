"""Preprocessed images live in the on-disk cache, read by rows; batches come through a DataLoader."""

from __future__ import annotations

import torch
from conftest import of_type, run_worker, tiny_spec

from vqabench import events as ev
from vqabench.engine.cache import ArrayStore
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode, image_cache_key, image_to_uint8
from vqabench.models import blip, checkpoints
from vqabench.spec import DatasetSpec

CPU = torch.device("cpu")


def test_every_image_is_written_once_and_batches_match_direct_preprocessing(tmp_path):
    data = easyvqa.load_splits(DatasetSpec(eval_size=8, test_size=8), seed=0, limit=24)
    loaded = blip.build_embedded(seed=0)
    store = ArrayStore(tmp_path)
    encoded = encode(data, loaded, 32, 16, store=store)
    entry = encoded.images
    assert entry.path is not None and entry.path.parent == tmp_path / "images"
    used = sorted({p.image_id for split in (data.train, data.eval, data.test) for p in split})
    assert entry.specs["pixels"].shape == (len(used), 3, loaded.image_size, loaded.image_size)
    again = encode(data, loaded, 32, 16, store=store)  # a second run reads the same entry
    assert again.images.path == entry.path and len(list((tmp_path / "images").iterdir())) == 1

    rows = torch.tensor([5, 0, 17, 3])
    batch = encoded.batch("train", rows, CPU)
    expected = torch.stack([image_to_uint8(data.images[data.train[i].image_id], loaded.image_size) for i in rows])
    mean, std = torch.tensor(loaded.image_mean).view(1, 3, 1, 1), torch.tensor(loaded.image_std).view(1, 3, 1, 1)
    assert batch.pixel_values is not None
    torch.testing.assert_close(batch.pixel_values, (expected.float() / 255.0 - mean) / std, atol=0, rtol=0)


def test_the_image_key_changes_with_pillows_version(monkeypatch):
    import PIL

    data = easyvqa.load_splits(DatasetSpec(eval_size=2, test_size=2), seed=0, limit=4)
    used = sorted({p.image_id for p in data.train})
    before = image_cache_key(data, used, 64).digest
    assert image_cache_key(data, used, 64).digest == before
    monkeypatch.setattr(PIL, "__version__", PIL.__version__ + ".post1")
    assert image_cache_key(data, used, 64).digest != before  # resampling may differ: decode again


def test_dataloader_workers_give_the_same_batches_in_the_same_order(tmp_path):
    data = easyvqa.load_splits(DatasetSpec(eval_size=8, test_size=8), seed=0, limit=24)
    loaded = blip.build_embedded(seed=0)
    encoded = encode(data, loaded, 32, 16, store=ArrayStore(tmp_path))
    blocks = [torch.tensor([3, 1]), torch.tensor([0, 7, 9]), torch.tensor([2])]
    here = list(encoded.batches("train", blocks, CPU))
    encoded.num_workers = 2
    there = list(encoded.batches("train", blocks, CPU))
    assert [b.rows.tolist() for b in there] == [b.tolist() for b in blocks]
    for a, b in zip(here, there, strict=True):
        assert a.pixel_values is not None and b.pixel_values is not None
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.question_ids, b.question_ids)


def test_a_cache_folder_that_cannot_be_written_fails_the_run_in_one_sentence(tmp_path):
    start = tmp_path / "start"
    checkpoints.save_checkpoint(blip.build_embedded(seed=0), start)  # no base checkpoint to build first
    blocked = tmp_path / "blocked-cache"
    blocked.mkdir()
    (blocked / "arrays").write_text("not a folder")
    spec = tiny_spec("blocked", "sft", limit=16, init_checkpoint=str(start))
    events, rc, _ = run_worker(spec, tmp_path, blocked)
    failed = of_type(events, ev.RunFailed)
    assert rc == 1 and len(failed) == 1 and failed[0].error_kind == "disk"
    message = failed[0].message
    assert f"'{blocked / 'arrays'}'" in message and message.count(". ") == 0, message
