"""The worker on local preference datasets (the path a hub dataset takes), end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import of_type, run_worker, tiny_spec
from PIL import Image

from vqabench import events as ev

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "blue", "green", "yellow")


def write_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3))).save(folder / f"{i}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


def trl_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        color = COLORS[i % 4]
        rows.append(
            {
                "question": f"what color is the shape in image {i}?",
                "image": f"images/{i}.png",
                "chosen": color,
                "rejected": COLORS[(i + 1) % 4],
            }
        )
    rows.append(
        {"question": "what shape is it?", "image": "images/missing.png", "chosen": "circle", "rejected": "triangle"}
    )
    rows.append(
        {"question": "what shape is it?", "image": "images/corrupt.png", "chosen": "circle", "rejected": "triangle"}
    )
    return rows


def vlfeedback_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):

        def completion(text: str, rating: str) -> dict:
            aspect = {"Rating": rating, "Rationale": "hand-made"}
            return {
                "model": "m",
                "response": text,
                "annotations": {"Helpfulness": aspect, "Visual Faithfulness": aspect, "Ethical Considerations": aspect},
            }

        rows.append(
            {
                "prompt": f"<image>\nwhat shape is in image {i}?",
                "img_path": f"images/{i}.png",
                "completions": [
                    completion(SHAPES[i % 3], "5"),
                    completion(SHAPES[(i + 1) % 3], "2"),
                    completion("not sure", "3"),
                ],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset_spec(name: str, method: str, source: Path, **dataset) -> dict:
    return tiny_spec(name, method, dataset={"source": str(source), "eval_size": 8, "test_size": 8, **dataset})


def test_trl_style_jsonl_trains_end_to_end_and_reports_skipped_rows(vqa_cache, tmp_path):
    write_images(tmp_path / "images", 60)
    source = write_jsonl(tmp_path / "prefs.jsonl", trl_rows(60))
    events, rc, err = run_worker(dataset_spec("trl", "orpo", source), tmp_path, vqa_cache)
    assert rc == 0, err[-3000:]
    started = of_type(events, ev.RunStarted)[0]
    quality = started.data["quality"]
    assert quality["rows_read"] == 62 and quality["pairs_built"] == 60
    assert quality["skipped"] == {"missing_image": 1, "corrupt_image": 1}
    assert started.data["sizes"]["eval"] == 8 and started.data["sizes"]["test"] == 8
    assert len(of_type(events, ev.EpochEnded)) == 1 and isinstance(events[-1], ev.RunFinished)


def test_vlfeedback_ratings_become_pairs_and_train(vqa_cache, tmp_path):
    write_images(tmp_path / "images", 40)
    source = write_jsonl(tmp_path / "vlf.jsonl", vlfeedback_rows(40))
    events, rc, err = run_worker(dataset_spec("vlf", "sft", source), tmp_path, vqa_cache)
    assert rc == 0, err[-3000:]
    assert of_type(events, ev.RunStarted)[0].data["quality"]["pairs_built"] == 40


def test_dataset_without_chosen_and_rejected_fails_with_one_sentence(vqa_cache, tmp_path):
    write_images(tmp_path / "images", 4)
    source = write_jsonl(
        tmp_path / "plain.jsonl", [{"question": "q?", "image": f"images/{i}.png", "answer": "red"} for i in range(4)]
    )
    events, rc, _ = run_worker(dataset_spec("plain", "sft", source), tmp_path, vqa_cache)
    failed = of_type(events, ev.RunFailed)
    assert rc != 0 and len(failed) == 1 and failed[0].error_kind == "data"
    assert "columns" in failed[0].message and "\n" not in failed[0].message


def test_empty_dataset_fails_with_one_sentence(vqa_cache, tmp_path):
    source = tmp_path / "empty.jsonl"
    source.write_text("")
    events, rc, _ = run_worker(dataset_spec("empty", "sft", source), tmp_path, vqa_cache)
    failed = of_type(events, ev.RunFailed)
    assert rc != 0 and len(failed) == 1 and failed[0].error_kind == "data"
    assert "\n" not in failed[0].message


def test_mostly_broken_images_fail_the_run_naming_the_main_reason(vqa_cache, tmp_path):
    write_images(tmp_path / "images", 10)
    rows = trl_rows(10)
    for r in rows[:6]:
        r["image"] = "images/corrupt.png"
    source = write_jsonl(tmp_path / "broken.jsonl", rows)
    events, rc, _ = run_worker(dataset_spec("broken", "sft", source), tmp_path, vqa_cache)
    failed = of_type(events, ev.RunFailed)
    assert rc != 0 and failed and failed[0].error_kind == "data"
    assert "corrupt" in failed[0].message
