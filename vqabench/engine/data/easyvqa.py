"""The embedded dataset: easy-VQA (the `easy-vqa` package) as preference pairs.

chosen = the dataset's answer; rejected = a plausible wrong answer of the same kind
(another colour, another shape, the opposite yes/no), drawn from the data seed so every
method and every run seed sees identical pairs. Splits are by image, so no image is in two:

* base  — train images 0-1999: only used to make the embedded base checkpoint;
* train — train images 2000-3599: fine-tuning pairs;
* eval  — train images 3600-3999: eval loss, checkpoint choice, preference metrics;
* test  — the package's own test split: final EM / F1 / judge.
"""

from __future__ import annotations

import hashlib
import random

from PIL import Image

from vqabench.engine.data.records import DataError, DataSplits, PreferencePair, QualityReport
from vqabench.spec import DatasetSpec

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
BASE_IMAGES = range(0, 2000)
TRAIN_IMAGES = range(2000, 3600)
EVAL_IMAGES = range(3600, 4000)


def rejected_answer(answer: str, rng: random.Random) -> str:
    """A wrong answer of the same kind as `answer`."""
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    for group in (COLORS, SHAPES):
        if answer in group:
            return rng.choice([a for a in group if a != answer])
    raise DataError(f"easy-VQA answer {answer!r} is not a colour, a shape or yes/no.")


def _pairs(
    questions: list[str], answers: list[str], image_ids: list[int], prefix: str, seed: int
) -> list[PreferencePair]:
    out = []
    for i, (q, a, img) in enumerate(zip(questions, answers, image_ids, strict=True)):
        rng = random.Random(seed * 1_000_003 + i)
        out.append(PreferencePair(f"{prefix}{img}", q, a, rejected_answer(a, rng)))
    return out


def _sample(pairs: list[PreferencePair], n: int, seed: int) -> list[PreferencePair]:
    """`n` pairs drawn with the seed, in their original order; n = 0 keeps them all."""
    if n <= 0 or n >= len(pairs):
        return pairs
    return [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), n))]


def load_splits(spec: DatasetSpec, *, seed: int, limit: int | None, with_base: bool = False) -> DataSplits:
    """Load easy-VQA as train/eval/test preference pairs with their images (and base, if asked).

    Only the embedded base checkpoint's builder needs the base split; a run leaves it out,
    so its 2,000 images are neither decoded nor kept in memory.
    """
    import easy_vqa

    tq, ta, ti = easy_vqa.get_train_questions()
    sq, sa, si = easy_vqa.get_test_questions()
    train_all = _pairs(tq, ta, ti, "train/", seed)
    test_all = _pairs(sq, sa, si, "test/", seed + 1)
    by_image = lambda rng_: [p for p, img in zip(train_all, ti, strict=True) if img in rng_]  # noqa: E731
    base = by_image(BASE_IMAGES) if with_base else []
    train = by_image(TRAIN_IMAGES)
    random.Random(seed).shuffle(train)
    if limit is not None:
        train = train[:limit]
    eval_ = _sample(by_image(EVAL_IMAGES), spec.eval_size, seed + 2)
    test = _sample(test_all, spec.test_size, seed + 3)
    if not train or not eval_ or not test:
        raise DataError("easy-VQA produced an empty split; check dataset.eval_size, dataset.test_size and limit.")

    paths = {f"train/{k}": v for k, v in easy_vqa.get_train_image_paths().items()}
    paths.update({f"test/{k}": v for k, v in easy_vqa.get_test_image_paths().items()})
    images: dict[str, Image.Image] = {}
    for pair in (*base, *train, *eval_, *test):
        if pair.image_id not in images:
            with Image.open(paths[pair.image_id]) as im:
                images[pair.image_id] = im.convert("RGB")

    report = QualityReport(rows_read=len(tq) + len(sq), pairs_built=len(train_all) + len(test_all))
    h = hashlib.sha256(f"easyvqa:{seed}".encode())
    for p in (*train, *eval_):
        h.update(f"{p.image_id}|{p.question}|{p.chosen}|{p.rejected}\n".encode())
    return DataSplits(
        train=train,
        eval=eval_,
        test=test,
        images=images,
        base=base,
        report=report,
        name="easy-VQA",
        fingerprint=h.hexdigest()[:16],
    )
