"""Preference datasets from files, through the same `datasets` calls a hub dataset takes.

Every fixture is written here into a temp folder: real PNGs made with PIL, one corrupt image
and one missing, in each schema (TRL, RLAIF-V, mllm-dpo/LLaVA, VLFeedback) and each format
(JSON, JSONL, Parquet, Arrow, save_to_disk). All of them hold the same ten usable pairs, so
they must all load to the very same pairs, images and fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from PIL import Image

from vqabench.engine.data.hub import load_splits
from vqabench.engine.data.images import CORRUPT_IMAGE, MISSING_IMAGE, NO_IMAGE, ImageStore
from vqabench.engine.data.records import DataError, PreferencePair, nearest_rank
from vqabench.engine.data.splits import carve, limit_train
from vqabench.spec import DatasetSpec

N_GOOD = 10
N_IMAGES = 8
COLOURS = [
    (220, 20, 60),
    (30, 144, 255),
    (50, 205, 50),
    (255, 215, 0),
    (138, 43, 226),
    (255, 140, 0),
    (0, 206, 209),
    (128, 128, 128),
]
FORMATS = ("json", "jsonl", "parquet", "arrow", "disk")
SCHEMAS = ("trl", "rlaif", "llava", "vlfeedback")


def question(i: int) -> str:
    return f"What is drawn in picture {i}?"


def chosen(i: int) -> str:
    return f"a filled square number {i}"


def rejected(i: int) -> str:
    return f"an empty circle {i}"


def words(text: str) -> int:
    return len(text.split())


def make_images(folder: Path) -> list[bytes]:
    """Eight small PNGs (one palette, one greyscale, odd sizes), a corrupt file; no 'missing.png'."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, colour in enumerate(COLOURS):
        image = Image.new("RGB", (12 + k, 9), colour)
        image.putpixel((k, k), (k, 2 * k, 3 * k))
        if k == 6:
            image = image.convert("P")
        elif k == 7:
            image = image.convert("L")
        image.save(folder / f"img{k}.png")
        out.append((folder / f"img{k}.png").read_bytes())
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return out


def image_cell(k: int | str, fmt: str, root: Path, pngs: list[bytes]):
    """Image k (or 'corrupt'/'missing'): a path for JSON, else a {"bytes", "path"} dict.

    Parquet casts the dicts to an Image feature; Arrow and save_to_disk keep plain structs.
    """
    name = f"img{k}.png" if isinstance(k, int) else f"{k}.png"
    if fmt in ("json", "jsonl"):
        return f"images/{name}"
    if fmt in ("arrow", "disk"):
        return (
            {"bytes": None, "path": str(root / "images" / name)}
            if k == "missing"
            else {"bytes": pngs[k] if isinstance(k, int) else (root / "images" / name).read_bytes(), "path": None}
        )
    if k == "missing":
        return {"bytes": None, "path": str(root / "images" / name)}
    return {"bytes": pngs[k] if isinstance(k, int) else (root / "images" / name).read_bytes(), "path": None}


def rated(response: str, ratings: tuple[str, str, str]) -> dict:
    """A VLFeedback completion with its three aspect ratings, as strings like the dataset's."""
    return {
        "model": f"model-{len(response)}",
        "response": response,
        "annotations": {
            aspect: {"Rating": r, "Rationale": "seen"}
            for aspect, r in zip(("Helpfulness", "Visual Faithfulness", "Ethical Considerations"), ratings, strict=True)
        },
    }


def vlf_completions(i: int, rank_good: str = "5", rank_bad: str = "1") -> list[dict]:
    """Four completions: chosen(i) rated best, rejected(i) worst, two in between."""
    return [
        rated("a middling answer", ("3", "3", "4")),
        rated(chosen(i), (rank_good, "5", "5")),
        rated(rejected(i), (rank_bad, "2", "5")),
        rated("an answer of sorts", ("4", "3", "3")),
    ]


def row_for(schema: str, i: int, image, fmt: str) -> dict:
    mixed = fmt in ("json", "jsonl") and i % 2 == 1  # JSON rows may mix forms; columnar files cannot
    if schema == "trl":
        return {
            "prompt": [
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question(i)}]}
            ],
            "images": [image],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen(i)}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected(i)}]}],
        }
    if schema == "rlaif":
        return {
            "ds_name": "fixture",
            "image": image,
            "question": question(i),
            "chosen": chosen(i),
            "rejected": rejected(i),
            "origin_dataset": "pil",
            "idx": str(i),
        }
    if schema == "llava":
        q = {"from": "human", "value": f"<image>\n{question(i)}"}
        if mixed:  # mllm-dpo's train.py accepts the question as a Python repr and answers as conversations
            return {
                "image": image,
                "question": repr(q),
                "chosen": [q, {"from": "gpt", "value": chosen(i)}],
                "rejected": [q, {"from": "gpt", "value": rejected(i)}],
                "ref_win_logp": -1.5,
            }
        return {
            "image": image,
            "question": q,
            "chosen": {"from": "gpt", "value": chosen(i)},
            "rejected": {"from": "gpt", "value": rejected(i)},
            "ref_win_logp": -1.5,
        }
    if schema == "vlfeedback":
        key = "img_path" if fmt in ("json", "jsonl") else "image"
        return {
            "id": f"vlf-{i}",
            "prompt": question(i),
            "models": ["a", "b", "c", "d"],
            "completions": vlf_completions(i),
            key: image,
        }
    raise AssertionError(schema)


def write_dataset(rows: list[dict], fmt: str, folder: Path, image_column: str) -> Path:
    """Write rows as one file (or a save_to_disk folder) the way a user would have it."""
    if fmt == "json":
        path = folder / "data.json"
        path.write_text(json.dumps(rows))
        return path
    if fmt == "jsonl":
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    ds = datasets.Dataset.from_list(rows)
    if fmt == "disk":  # plain {"bytes", "path"} structs: save_to_disk would embed an Image feature's files
        path = folder / "saved"
        ds.save_to_disk(str(path))
        return path
    if fmt == "arrow":
        path = folder / "data.arrow"
        table = ds.data.table
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return path
    if image_column == "images":
        ds = ds.cast_column("images", datasets.List(datasets.Image()))
    else:
        ds = ds.cast_column(image_column, datasets.Image())
    path = folder / "data.parquet"
    ds.to_parquet(str(path))
    return path


def make_fixture(schema: str, fmt: str, root: Path) -> Path:
    pngs = make_images(root / "images")
    cells = [image_cell(i % N_IMAGES, fmt, root, pngs) for i in range(N_GOOD)]
    cells += [image_cell("corrupt", fmt, root, pngs), image_cell("missing", fmt, root, pngs)]
    rows = [row_for(schema, i, cell, fmt) for i, cell in enumerate(cells)]
    json_like = fmt in ("json", "jsonl")
    image_column = {"trl": "images", "vlfeedback": "img_path" if json_like else "image"}.get(schema, "image")
    missing = root / "images" / "missing.png"
    missing.write_bytes(pngs[0])  # `datasets` stats image paths while writing; the file goes away afterwards
    try:
        return write_dataset(rows, fmt, root, image_column)
    finally:
        missing.unlink()


def expected_image_ids(root: Path) -> list[str]:
    return [hashlib.sha256((root / "images" / f"img{k}.png").read_bytes()).hexdigest()[:20] for k in range(N_IMAGES)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-cache"))


def load(
    source: Path | str,
    cache_dir: str,
    seed: int = 0,
    limit: int | None = None,
    max_answer_tokens: int = 5,
    **spec_fields,
):
    spec = DatasetSpec(source=str(source), **{"eval_size": 2, "test_size": 2, **spec_fields})
    return load_splits(
        spec, seed=seed, limit=limit, count_tokens=words, max_answer_tokens=max_answer_tokens, cache_dir=cache_dir
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The RLAIF-V JSON fixture, loaded once: what every other schema and format must equal."""
    root = tmp_path_factory.mktemp("reference")
    return load(make_fixture("rlaif", "json", root), cache_dir), root


# ------------------------------------------------------------------- schema x format


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("schema", SCHEMAS)
def test_every_schema_and_format_loads_the_same_pairs(schema, fmt, tmp_path, cache_dir, reference):
    data = load(make_fixture(schema, fmt, tmp_path), cache_dir)
    ref, _ = reference

    assert data.report.rows_read == N_GOOD + 2
    assert data.report.pairs_built == N_GOOD
    assert data.report.skipped == {CORRUPT_IMAGE: 1, MISSING_IMAGE: 1}
    every = data.train + data.eval + data.test
    assert sorted((p.question, p.chosen, p.rejected) for p in every) == sorted(
        (question(i), chosen(i), rejected(i)) for i in range(N_GOOD)
    )
    ids = expected_image_ids(tmp_path)
    assert {p.question: p.image_id for p in every} == {question(i): ids[i % N_IMAGES] for i in range(N_GOOD)}
    assert set(data.images) == set(ids)
    assert all(im.mode == "RGB" for im in data.images.values())
    assert data.images[ids[3]].size == (15, 9) and data.images[ids[3]].getpixel((0, 0)) == COLOURS[3]
    # identical pairs and image bytes, so identical splits and fingerprint, whatever the file
    assert (data.train, data.eval, data.test) == (ref.train, ref.eval, ref.test)
    assert data.fingerprint == ref.fingerprint


# -------------------------------------------------------------------------- quality


def test_quality_report_counts_every_reason_and_token_lengths(tmp_path, cache_dir):
    make_images(tmp_path / "images")
    good = [
        {"id": f"img{i % N_IMAGES}", "prompt": question(i), "completions": vlf_completions(i)} for i in range(N_GOOD)
    ]
    bad = [
        {
            "id": "img0",
            "prompt": "top tie?",
            "completions": [
                rated("one", ("5", "4", "5")),
                rated("two", ("4", "5", "5")),
                rated("three", ("1", "2", "3")),
            ],
        },
        {
            "id": "img1",
            "prompt": "bottom tie?",
            "completions": [
                rated("one", ("5", "5", "5")),
                rated("two", ("1", "2", "3")),
                rated("three", ("3", "2", "1")),
            ],
        },
        {"id": "img2", "prompt": "not a number?", "completions": vlf_completions(93, rank_bad="N/A")},
        {
            "id": "img3",
            "prompt": "empty answer?",
            "completions": [{**vlf_completions(94)[1], "response": "<image> "}, vlf_completions(94)[2]],
        },
        {
            "id": "img4",
            "prompt": "same answers?",
            "completions": [vlf_completions(95)[1], {**vlf_completions(95)[2], "response": chosen(95).upper()}],
        },
        {"id": "corrupt", "prompt": "corrupt?", "completions": vlf_completions(96)},
        {"id": "missing", "prompt": "missing?", "completions": vlf_completions(97)},
        {"id": "missing", "prompt": "missing again?", "completions": vlf_completions(98)},
    ]
    path = tmp_path / "vlfeedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))

    data = load(
        path,
        cache_dir,
        max_skip_share=0.5,
        columns={"image": "images/{id}.png"},
        schema="vlfeedback",
        max_answer_tokens=4,
    )
    report = data.report
    assert report.rows_read == N_GOOD + len(bad)
    assert report.pairs_built == N_GOOD
    assert report.skipped == {
        "rating_tie": 2,
        "missing_rating": 1,
        "empty_answer": 1,
        "identical_answers": 1,
        CORRUPT_IMAGE: 1,
        MISSING_IMAGE: 2,
    }
    assert report.to_dict()["skipped_total"] == len(bad)
    # answers: chosen "a filled square number i" = 5 words, rejected "an empty circle i" = 4 words
    stats = report.token_stats
    assert stats == {
        "answers": 2 * N_GOOD,
        "max_answer_tokens": 4,
        "truncated": N_GOOD,
        "p50": 4,
        "p90": 5,
        "p99": 5,
        "max": 5,
    }


def test_nearest_rank_percentiles():
    values = list(range(1, 101))
    assert [nearest_rank(values, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert nearest_rank([7], 50) == 7


def test_margin_threshold_skips_close_ratings(tmp_path, cache_dir):
    make_images(tmp_path / "images")
    rows = [
        {
            "prompt": question(i),
            "img_path": f"images/img{i % N_IMAGES}.png",
            "completions": vlf_completions(i, rank_good="5" if i < 8 else "2", rank_bad="1"),
        }
        for i in range(N_GOOD)
    ]
    path = tmp_path / "vlf.json"
    path.write_text(json.dumps(rows))
    # ratings: chosen (5,5,5)=5.0 or (2,5,5)=4.0; worst (1,2,5)=2.67 -> margins 2.33 and 1.33
    data = load(
        path,
        cache_dir,
        min_margin=2.0,
        max_skip_share=0.5,
        aspect_weights={"Helpfulness": 1.0, "Visual Faithfulness": 1.0, "Ethical Considerations": 1.0},
    )
    assert data.report.skipped == {"small_margin": 2}
    assert data.report.pairs_built == 8


def test_too_many_skipped_rows_fail_with_the_main_reason(tmp_path, cache_dir):
    make_images(tmp_path / "images")
    rows = [
        {
            "question": question(i),
            "image": f"images/img{i % N_IMAGES}.png",
            "chosen": chosen(i),
            "rejected": rejected(i),
        }
        for i in range(9)
    ]
    rows += [
        {"question": "where?", "image": f"images/gone{i}.png", "chosen": "here", "rejected": "there"} for i in range(3)
    ]  # 3 of 12 = 25%
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load(path, cache_dir)
    message = str(err.value)
    assert "3 of 12 rows" in message and "25%" in message and "dataset.max_skip_share = 20%" in message
    assert "missing_image (3 rows)" in message and "dataset.image_root" in message
    assert load(path, cache_dir, max_skip_share=0.3).report.skipped == {MISSING_IMAGE: 3}


def test_text_only_rows_are_counted_but_do_not_count_against_the_share(tmp_path, cache_dir):
    make_images(tmp_path / "images")
    rows = [
        {
            "image": f"images/img{i % N_IMAGES}.png",
            "question": question(i),
            "chosen": chosen(i),
            "rejected": rejected(i),
        }
        for i in range(N_GOOD)
    ]
    rows += [{"image": None, "question": "Write a poem.", "chosen": "roses", "rejected": "no"} for _ in range(6)]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    data = load(path, cache_dir)
    assert data.report.skipped == {NO_IMAGE: 6} and data.report.pairs_built == N_GOOD


def test_no_usable_pairs_is_an_error(tmp_path, cache_dir):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "image": "nowhere.png", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"no usable pairs from 1 rows; the main reason is missing_image"):
        load(path, cache_dir)


def test_dataset_without_preference_columns_says_which_mapping_to_set(tmp_path, cache_dir):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "image": "a.png", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"columns are question, image, answer.*dataset.columns.chosen"):
        load(path, cache_dir)


def test_column_mapping_reads_a_dataset_with_its_own_names(tmp_path, cache_dir):
    make_images(tmp_path / "pics")
    rows = [
        {"q": question(i), "pic": f"img{i % N_IMAGES}.png", "good": chosen(i), "bad": rejected(i)}
        for i in range(N_GOOD)
    ]
    path = tmp_path / "data" / "own.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    data = load(
        path,
        cache_dir,
        image_root=str(tmp_path / "pics"),
        columns={"question": "q", "image": "pic", "chosen": "good", "rejected": "bad"},
    )
    assert data.report.pairs_built == N_GOOD and len(data.images) == N_IMAGES


def test_unknown_source_and_file_type_are_one_sentence_errors(tmp_path, cache_dir):
    with pytest.raises(DataError, match=r"dataset.source = '.*nowhere.json': no such file or folder"):
        load(tmp_path / "nowhere.json", cache_dir)
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError, match=r"allowed files are .parquet, .json, .jsonl and .arrow"):
        load(csv, cache_dir)


# --------------------------------------------------------------------------- hub path


def test_hub_path_uses_the_datasets_own_test_split_and_carves_eval(tmp_path, cache_dir):
    """`hf:NAME` calls load_dataset(NAME); a local folder of split files takes that same call."""
    make_images(tmp_path / "images")
    train = [
        {
            "question": question(i),
            "image": f"images/img{i % N_IMAGES}.png",
            "chosen": chosen(i),
            "rejected": rejected(i),
        }
        for i in range(N_GOOD)
    ]
    test = [
        {
            "question": f"test question {i}?",
            "image": f"images/img{i}.png",
            "chosen": f"reference {i}",
            "rejected": f"wrong {i}",
        }
        for i in range(3)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))

    data = load(f"hf:{tmp_path}", cache_dir, test_size=0, eval_size=3)
    assert [p.chosen for p in data.test] == [f"reference {i}" for i in range(3)]
    assert len(data.eval) >= 3 and len(data.train) + len(data.eval) == N_GOOD
    assert data.report.rows_read == N_GOOD + 3
    assert {p.image_id for p in data.train}.isdisjoint(p.image_id for p in data.eval)

    with pytest.raises(DataError, match=r"dataset.split = 'dev'.*it has train, test"):
        load(f"hf:{tmp_path}", cache_dir, split="dev")


def test_save_to_disk_dataset_dict_uses_its_splits(tmp_path, cache_dir):
    pngs = make_images(tmp_path / "images")

    def rows(n, tag):
        return [
            {
                "question": f"{tag} {i}?",
                "image": {"bytes": pngs[i % N_IMAGES], "path": None},
                "chosen": f"{tag} yes {i}",
                "rejected": f"{tag} no {i}",
            }
            for i in range(n)
        ]

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows(N_GOOD, "tr")),
            "validation": datasets.Dataset.from_list(rows(4, "va")),
            "test": datasets.Dataset.from_list(rows(5, "te")),
        }
    )
    dd = dd.cast_column("image", datasets.Image())
    dd.save_to_disk(str(tmp_path / "dd"))
    data = load(tmp_path / "dd", cache_dir, eval_size=100, test_size=3)
    assert len(data.train) == N_GOOD and len(data.eval) == 4
    assert all(p.question.startswith("te ") for p in data.test) and 3 <= len(data.test) <= 5


# ---------------------------------------------------------------------------- splits


def pairs_on_images(n_images: int, per_image: int = 2) -> list[PreferencePair]:
    return [
        PreferencePair(f"image-{k:03d}", f"q{k}-{j}", "yes", "no") for k in range(n_images) for j in range(per_image)
    ]


def test_carved_splits_are_disjoint_by_image_deterministic_and_seeded():
    pairs = pairs_on_images(100)
    parts = carve(pairs, {"test": 20, "eval": 10}, seed=0)
    images = {name: {p.image_id for p in part} for name, part in parts.items()}
    assert images["train"].isdisjoint(images["eval"]) and images["train"].isdisjoint(images["test"])
    assert images["eval"].isdisjoint(images["test"])
    assert (len(parts["test"]), len(parts["eval"]), len(parts["train"])) == (20, 10, 170)
    assert sorted(parts["train"] + parts["eval"] + parts["test"], key=pairs.index) == pairs
    assert carve(pairs, {"test": 20, "eval": 10}, seed=0) == parts
    reordered = carve(list(reversed(pairs)), {"test": 20, "eval": 10}, seed=0)
    assert {p.image_id for p in reordered["test"]} == images["test"]  # row order does not matter
    assert {p.image_id for p in carve(pairs, {"test": 20, "eval": 10}, seed=1)["test"]} != images["test"]


def test_a_split_takes_whole_images_even_past_its_size():
    parts = carve(pairs_on_images(10, per_image=3), {"test": 4}, seed=0)
    assert len(parts["test"]) == 6 and len({p.image_id for p in parts["test"]}) == 2


def test_limit_takes_a_seeded_subset_of_train():
    train = pairs_on_images(50, per_image=1)
    assert limit_train(train, 10, seed=0) == limit_train(train, 10, seed=0)
    assert limit_train(train, 10, seed=0) != train[:10]
    assert limit_train(train, 10, seed=0) != limit_train(train, 10, seed=1)
    assert len(limit_train(train, None, seed=0)) == 50


def test_loading_twice_gives_the_same_splits_and_fingerprint_and_limit_caps_train(tmp_path, cache_dir):
    path = make_fixture("rlaif", "jsonl", tmp_path)
    first = load(path, cache_dir, limit=3)
    second = load(path, cache_dir, limit=3)
    assert (first.train, first.eval, first.test, first.fingerprint) == (
        second.train,
        second.eval,
        second.test,
        second.fingerprint,
    )
    assert len(first.train) == 3
    assert load(path, cache_dir, limit=4).fingerprint != first.fingerprint
    every = first.train + first.eval + first.test
    assert set(first.images) == {p.image_id for p in every}


def test_fingerprint_changes_when_an_image_changes(tmp_path, cache_dir):
    path = make_fixture("rlaif", "jsonl", tmp_path)
    before = load(path, cache_dir).fingerprint
    image = Image.open(tmp_path / "images" / "img2.png").convert("RGB")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(tmp_path / "images" / "img2.png")
    assert load(path, cache_dir).fingerprint != before


# ---------------------------------------------------------------------------- images


def test_every_image_form_resolves_to_one_content_id(tmp_path):
    folder = tmp_path / "images"
    pngs = make_images(folder)
    store = ImageStore(folder)
    expected = hashlib.sha256(pngs[2]).hexdigest()[:20]
    pil = Image.open(io.BytesIO(pngs[2]))
    forms = [
        "img2.png",
        str(folder / "img2.png"),
        pngs[2],
        {"bytes": pngs[2], "path": None},
        {"bytes": None, "path": "img2.png"},
        ["img2.png", "img3.png"],
    ]
    assert [store.lookup(f).image_id for f in forms] == [expected] * len(forms)
    assert store.lookup(pil).image_id is not None  # re-encoded, so its own id, but usable
    assert store.lookup("corrupt.png").skip_reason == CORRUPT_IMAGE
    assert store.lookup(b"\xff\xd8\xff truncated jpeg").skip_reason == CORRUPT_IMAGE
    assert store.lookup("nope.png").skip_reason == MISSING_IMAGE
    assert store.lookup("https://example.com/a.png").skip_reason == MISSING_IMAGE
    assert [store.lookup(v).skip_reason for v in (None, "", [], {"bytes": None, "path": None})] == [NO_IMAGE] * 4
    rgb = store.load_rgb(expected)
    assert rgb.mode == "RGB" and rgb.size == (14, 9)


def test_truncated_jpeg_is_corrupt(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    whole = buffer.getvalue()
    store = ImageStore(tmp_path)
    assert store.lookup(whole).image_id is not None
    assert store.lookup(whole[: len(whole) // 2]).skip_reason == CORRUPT_IMAGE


def test_vlfeedback_with_its_published_sequence_features_loads(tmp_path, cache_dir):
    """The card declares `completions` a Sequence of structs, which datasets returns as a dict of lists."""
    make_images(tmp_path / "images")
    rating = {"Rating": datasets.Value("string"), "Rationale": datasets.Value("string")}
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "completions": datasets.Sequence(
                {
                    "annotations": {
                        "Helpfulness": rating,
                        "Ethical Considerations": rating,
                        "Visual Faithfulness": rating,
                    },
                    "model": datasets.Value("string"),
                    "response": datasets.Value("string"),
                }
            ),
            "img_path": datasets.Value("string"),
        }
    )

    def as_columns(completions: list[dict]) -> dict[str, list]:
        return {key: [c[key] for c in completions] for key in ("annotations", "model", "response")}

    rows = [
        {
            "id": str(i),
            "prompt": question(i),
            "completions": as_columns(vlf_completions(i)),
            "img_path": f"images/img{i % N_IMAGES}.png",
        }
        for i in range(N_GOOD)
    ]
    path = tmp_path / "vlfeedback.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    data = load(path, cache_dir)
    assert data.report.skipped == {} and data.report.pairs_built == N_GOOD
    assert sorted(p.chosen for p in data.train + data.eval + data.test) == sorted(chosen(i) for i in range(N_GOOD))


def test_chunked_image_resolution_keeps_row_order_and_counts(tmp_path):
    from vqabench.engine.data.hub import build_pairs
    from vqabench.engine.data.records import QualityReport
    from vqabench.engine.data.schemas import resolve_schema

    make_images(tmp_path / "images")
    rows = [
        {
            "question": question(i),
            "image": f"img{i % 9}.png" if i % 9 < N_IMAGES else "corrupt.png",
            "chosen": chosen(i),
            "rejected": rejected(i),
        }
        for i in range(25)
    ]
    ds = datasets.Dataset.from_list(rows)
    schema = resolve_schema(DatasetSpec(source="x"), ds.column_names, rows[0], "chunks")
    results = []
    for chunk_rows in (1, 4, 1000):
        report = QualityReport()
        results.append((build_pairs(ds, schema, ImageStore(tmp_path / "images"), report, chunk_rows), report.skipped))
    assert results[0] == results[1] == results[2]
    assert [p.question for p in results[0][0]] == [question(i) for i in range(25) if i % 9 < N_IMAGES]
    assert results[0][1] == {CORRUPT_IMAGE: 2}
