"""The embedded easy-VQA preference pairs and splits."""

from __future__ import annotations

import random

from vqabench.engine.data import easyvqa
from vqabench.spec import DatasetSpec


def _load(**kw):
    return easyvqa.load_splits(
        DatasetSpec(eval_size=64, test_size=64),
        seed=0,
        limit=kw.get("limit", 300),
        with_base=kw.get("with_base", False),
    )


def test_rejected_answer_is_a_wrong_answer_of_the_same_kind():
    rng = random.Random(0)
    assert easyvqa.rejected_answer("yes", rng) == "no" and easyvqa.rejected_answer("no", rng) == "yes"
    for _ in range(50):
        c = easyvqa.rejected_answer("red", rng)
        assert c in easyvqa.COLORS and c != "red"
        s = easyvqa.rejected_answer("circle", rng)
        assert s in easyvqa.SHAPES and s != "circle"


def test_pairs_are_identical_for_every_load_with_the_same_seed():
    a, b = _load(), _load()
    assert a.train == b.train and a.eval == b.eval and a.test == b.test
    assert a.fingerprint == b.fingerprint
    for p in a.train:
        assert p.chosen != p.rejected


def test_splits_share_no_image():
    d = _load(limit=None, with_base=True)
    sets = [{p.image_id for p in getattr(d, s)} for s in ("base", "train", "eval", "test")]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not sets[i] & sets[j]
    assert len(d.train) > 10000 and len(d.base) > 10000


def test_limit_caps_training_pairs_only():
    d = _load(limit=50)
    assert len(d.train) == 50 and len(d.eval) == 64 and len(d.test) == 64


def test_a_run_loads_no_base_split_unless_asked():
    d = _load()
    assert d.base == [] and not any(i.startswith("train/") and int(i[6:]) < 2000 for i in d.images)
