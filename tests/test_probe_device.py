"""The probe's start model goes back to the CPU once the shared encoding pass is done.

No GPU here: the device is faked. The start model's ``to`` records where it is sent instead of
moving it, and the encoding pass records where the model was when it ran; the real model and data
load, so everything prepare() does besides the move runs for real.
"""

from __future__ import annotations

import torch

from vqabench.engine import probe as probe_module
from vqabench.spec import DatasetSpec, ProbePlan, RunSpec


def test_prepare_leaves_the_start_model_on_the_cpu_after_the_encoding_pass(tmp_path, monkeypatch) -> None:
    fake_gpu = torch.device("cuda", 0)
    moves: list[str] = []
    during_pass: list[str] = []
    real_load = probe_module.load_model_and_data

    def load(spec, cache_dir, emit):
        resolved, start, data = real_load(spec, cache_dir, emit)

        def to(device, *args, **kwargs):
            moves.append(str(torch.device(device)))
            return start.model

        start.model.to = to  # type: ignore[method-assign]
        return resolved, start, data

    def encode_pass(loaded, encoded, **kwargs):
        during_pass.append(moves[-1] if moves else "cpu")
        assert kwargs["device"] == fake_gpu
        encoded.encodings = "the encodings"

    monkeypatch.setattr(probe_module, "pick_device", lambda name: fake_gpu)
    monkeypatch.setattr(probe_module, "load_model_and_data", load)
    monkeypatch.setattr(probe_module, "attach_encoder_cache", encode_pass)
    spec = RunSpec(
        name="p",
        method="sft",
        model="qwen2-vl-tiny-random",
        train="lora",
        batch_size=2,
        encoder_cache="on",
        dataset=DatasetSpec(eval_size=2, test_size=2),
    )
    probe = probe_module.prepare(ProbePlan([spec], steps=1, rounds=1, warmup=0, cache_dir=str(tmp_path)), print)
    assert during_pass == ["cuda:0"]  # the one encoding pass ran on the device
    assert moves[-1] == "cpu"  # and the start model left it: each preset copies it there itself
    assert probe.encodings == "the encodings" and probe.device == fake_gpu
