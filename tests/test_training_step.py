"""GPU-readiness of the training step, checked without a GPU.

* The meta device stands in for a GPU: a tensor there has a shape but no values, so any host
  read of a device tensor (``.item()``, ``bool()``, ``int()``, ``float()``) raises, exactly where
  CUDA would block. A TorchFunctionMode counts the copies between the host and the device.
* The warm-up step must leave training bit-for-bit unchanged on the CPU.
* Out-of-memory failures become error_kind "memory" with one sentence, in a real worker.
* On a GPU (skipped here), every method's step runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from conftest import of_type, run_worker, tiny_spec
from packaging.version import Version
from torch.overrides import TorchFunctionMode

from vqabench import events as ev
from vqabench.engine.base_checkpoint import BaseCheckpointError, ensure_base_checkpoint
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.errors import classify
from vqabench.engine.out_of_memory import OutOfMemory, explain_out_of_memory, out_of_memory_sentence
from vqabench.engine.reference import CopyReference, PrecomputedReference
from vqabench.engine.trainer import NumericsError, Trainer, pick_device
from vqabench.models import blip
from vqabench.spec import DatasetSpec, RunSpec, SpecError, check_device, spec_from_dict

REPO = Path(__file__).resolve().parent.parent
TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.25 GiB. GPU 0 has a total capacity of 139.81 GiB of which "
    "1.06 GiB is free. Including non-PyTorch memory, this process has 138.74 GiB memory in use. Of the "
    "allocated memory 136.9 GiB is allocated by PyTorch. If reserved but unallocated memory is large try "
    "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)
METHODS = [("sft", None), ("orpo", None), ("simpo", None), ("dpo", "copy"), ("dpo", "precompute"), ("ipo", "copy")]
METHODS += [("kto", "copy"), ("kto", "precompute")]


@pytest.fixture(scope="module")
def small():
    data = easyvqa.load_splits(DatasetSpec(eval_size=8, test_size=8), seed=0, limit=40)
    loaded = blip.build_embedded(0)
    return data, loaded


def _spec(method: str, reference: str | None, **changes) -> RunSpec:
    return RunSpec(
        name=method,
        method=method,
        reference=reference or "copy",
        init_checkpoint="start" if reference else None,
        batch_size=8,
        **changes,
    )


def _fake_table(encoded) -> PrecomputedReference:
    table = {
        split: {name: torch.randn(len(encoded.splits[split])) for name in ("chosen", "rejected", "mismatched")}
        for split in ("train", "eval")
    }
    return PrecomputedReference(table, None, 0.0, True)


#: transformers 5.9-5.20 build each attention mask's 0.0 with torch.tensor(0.0, device=...), a
#: scalar copied from the host on every mask; 5.21 makes it on the device (torch.zeros). The
#: step's own copies are what these tests are about, so on those versions that scalar is not counted.
MASKS_COPY_A_ZERO = Version(transformers.__version__) < Version("5.21")


class TransferCounter(TorchFunctionMode):
    """Counts host<->device copies (by direction) made inside it; the device is whatever isn't the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: Counter[str] = Counter()
        self.where: list[str] = []

    def _record(self, direction: str) -> None:
        frame = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename][-1]
        if MASKS_COPY_A_ZERO and Path(frame.filename).name == "masking_utils.py":
            return  # transformers' own scalar, not the step's (see MASKS_COPY_A_ZERO)
        self.copies[direction] += 1
        self.where.append(f"{direction} {Path(frame.filename).name}:{frame.lineno}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in ("to", "cuda", "cpu") and source is not None and isinstance(out, torch.Tensor):
            if (source.device.type == "cpu") != (out.device.type == "cpu"):
                self._record("to device" if out.device.type != "cpu" else "to host")
        elif name == "copy_" and source is not None and isinstance(args[1], torch.Tensor):
            if (source.device.type == "cpu") != (args[1].device.type == "cpu"):
                self._record("to device" if source.device.type != "cpu" else "to host")
        elif (
            name in ("tensor", "as_tensor")
            and isinstance(out, torch.Tensor)
            and out.device.type != "cpu"
            and (source is None or source.device.type == "cpu")  # from Python numbers or a host tensor
        ):
            self._record("to device")
        return out


def _meta_trainer(small, method: str, reference: str | None) -> tuple[Trainer, object]:
    data, start = small
    loaded = copy.copy(start)
    loaded.model = copy.deepcopy(start.model)
    encoded = encode(data, loaded, 32, 16)
    meta = torch.device("meta")
    ref = None
    if reference == "precompute":
        ref = _fake_table(encoded)
    loaded.model.to(meta)
    if reference == "copy":
        ref = CopyReference(loaded, "decoder")
    return Trainer(_spec(method, reference), loaded, encoded, ref, meta), encoded


@pytest.mark.parametrize(("method", "reference"), METHODS)
def test_a_training_step_copies_only_images_and_row_indices_and_never_reads_the_device(small, method, reference):
    trainer, encoded = _meta_trainer(small, method, reference)
    meta = torch.device("meta")
    trainer.train_step(encoded.batch("train", torch.arange(8), meta))  # first step: one-off copies (tokens, tables)
    for rows in (torch.tensor([9, 3, 17, 1, 0, 12, 30, 22]), torch.arange(24, 32)):
        with TransferCounter() as counter:
            batch = encoded.batch("train", rows, meta)
            loss = trainer.train_step(batch)  # a host read of a meta tensor would raise here
        assert loss.device.type == "meta"
        assert counter.copies == Counter({"to device": 2}), counter.where  # the images and the row indices
        assert counter.copies["to host"] == 0


def test_token_tensors_and_reference_tables_go_to_the_device_once_per_run(small):
    trainer, encoded = _meta_trainer(small, "kto", "precompute")
    meta = torch.device("meta")
    with TransferCounter() as first:
        trainer.train_step(encoded.batch("train", torch.arange(8), meta))
    with TransferCounter() as later:
        for lo in range(8, 32, 8):
            trainer.train_step(encoded.batch("train", torch.arange(lo, lo + 8), meta))
    assert first.copies["to device"] > 2 + 6  # the split's token tensors and the reference table, once
    assert later.copies == Counter({"to device": 2 * 3}), later.where


def test_the_step_s_attention_masks_give_the_scores_of_transformers_own_masks(small):
    data, start = small
    encoded = encode(data, start, 32, 16)
    batch = encoded.batch("train", torch.arange(8), torch.device("cpu"))
    model = start.model.eval()
    with torch.no_grad():
        q = blip.encode_questions(model, batch.pixel_values, batch.question_ids, batch.question_mask)
        image = model.vision_model(pixel_values=batch.pixel_values).last_hidden_state
        reference_q = model.text_encoder(
            input_ids=batch.question_ids,
            attention_mask=batch.question_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        logps, _ = blip.answer_logps(model.text_decoder, q, batch.question_mask, *batch.chosen)
        logits = model.text_decoder(
            input_ids=batch.chosen[0],
            attention_mask=batch.chosen[1],
            encoder_hidden_states=q,
            encoder_attention_mask=batch.question_mask,
            return_logits=True,
            use_cache=False,
        )
    assert torch.equal(q, reference_q)
    targets, mask = batch.chosen[0][:, 1:], batch.chosen[1][:, 1:].float()
    expected = (torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    assert torch.equal(logps, expected)


def _train(small, warm_up: bool, method: str = "orpo") -> tuple[list[float], dict[str, torch.Tensor]]:
    data, start = small
    loaded = copy.copy(start)
    loaded.model = copy.deepcopy(start.model)
    encoded = encode(data, loaded, 32, 16)
    torch.manual_seed(7)
    trainer = Trainer(_spec(method, None, lr=1e-3), loaded, encoded, None, torch.device("cpu"))
    if warm_up:
        trainer.warm_up()
        assert all(p.grad is None for p in loaded.model.parameters())
        assert trainer.optimizer.state  # AdamW's state is allocated before epoch 1 ...
    losses = [trainer.train_epoch(epoch)[0] for epoch in (1, 2)]
    return losses, {k: v.clone() for k, v in loaded.model.state_dict().items()}


def test_the_warm_up_step_leaves_losses_and_weights_bit_for_bit_unchanged(small):
    plain_losses, plain_weights = _train(small, warm_up=False)
    warm_losses, warm_weights = _train(small, warm_up=True)  # ... but not advanced, and dropout draws are forked
    assert warm_losses == plain_losses
    assert all(torch.equal(plain_weights[k], warm_weights[k]) for k in plain_weights)


def test_a_non_finite_loss_is_named_by_the_step_where_it_began_not_where_it_was_seen(small):
    data, start = small
    loaded = copy.copy(start)
    loaded.model = copy.deepcopy(start.model)
    trainer = Trainer(_spec("sft", None), loaded, encode(data, loaded, 32, 16), None, torch.device("cpu"))
    real, calls = trainer.train_step, []

    def step(batch):
        calls.append(1)
        loss = real(batch)
        return loss * float("nan") if len(calls) == 2 else loss

    trainer.train_step = step
    trainer.check_interval = 3600.0  # one check, at the end of the epoch
    with pytest.raises(NumericsError, match=r"epoch 3, step 2 of 5;"):
        trainer.train_epoch(3)
    assert len(calls) == 5  # steps 2..5 ran without waiting: the check came at the next logging point (the end)


def test_pick_device_gives_an_index_and_cuda_without_a_gpu_is_refused_in_one_sentence():
    assert pick_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert pick_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    else:
        assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cuda:1").index == 1
    spec = spec_from_dict({"name": "x", "method": "sft", "device": "cuda"}, where="presets/x.toml")
    with pytest.raises(SpecError) as raised:
        check_device(spec, cuda_available=False, where="presets/x.toml")
    message = str(raised.value)
    assert message.count(". ") == 0 and message.endswith(".") and "'device'" in message and "presets/x.toml" in message
    check_device(spec, cuda_available=True)
    check_device(spec_from_dict({"name": "x", "method": "sft"}), cuda_available=False)


def test_out_of_memory_becomes_one_sentence_with_the_allocation_the_batch_and_the_key():
    with pytest.raises(OutOfMemory) as raised, explain_out_of_memory("training step 4 of 9 in epoch 2", 64):
        raise torch.OutOfMemoryError(TORCH_OOM)
    kind, message = classify(raised.value)
    assert kind == "memory"
    assert message == (
        "CUDA ran out of memory allocating 2.25 GiB while training step 4 of 9 in epoch 2 with batch_size 64; "
        "lower the preset key 'batch_size' (now 64) or free the GPU."
    )
    kind, message = classify(torch.OutOfMemoryError(TORCH_OOM))  # one that escaped every activity
    assert kind == "memory" and "\n" not in message and message.count(". ") == 0 and "2.25 GiB" in message
    assert out_of_memory_sentence(RuntimeError("out of memory"), "x", 2).startswith("the device ran out")
    assert classify(MemoryError())[0] == "memory"


def test_an_out_of_memory_step_in_a_real_worker_ends_as_error_kind_memory(vqa_cache, tmp_path):
    spec = tiny_spec("oom", "sft", output_dir=str(tmp_path / "out"), cache_dir=str(vqa_cache))
    path = tmp_path / "oom.json"
    path.write_text(json.dumps(spec))
    # The real worker, with the trainer's step patched to run out of memory on its third call
    # (the first is the warm-up step): torch's own exception class, raised where CUDA would raise it.
    code = (
        "import sys, torch\n"
        "from vqabench.engine import trainer\n"
        "real, calls = trainer.Trainer.train_step, []\n"
        "def step(self, batch):\n"
        "    calls.append(1)\n"
        f"    if len(calls) == 3: raise torch.OutOfMemoryError({TORCH_OOM!r})\n"
        "    return real(self, batch)\n"
        "trainer.Trainer.train_step = step\n"
        "from vqabench.engine.worker import main\n"
        f"sys.exit(main([{str(path)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO, env=_env(REPO)
    )
    events = [ev.parse_event(line) for line in proc.stdout.splitlines()]
    failed = of_type(events, ev.RunFailed)
    assert proc.returncode == 1 and len(failed) == 1, proc.stderr[-2000:]
    assert failed[0].error_kind == "memory"
    assert failed[0].message == (
        "CUDA ran out of memory allocating 2.25 GiB while training step 2 of 4 in epoch 1 with batch_size 16; "
        "lower the preset key 'batch_size' (now 16) or free the GPU."
    )
    assert "OutOfMemoryError" in failed[0].traceback


def _env(*paths: Path) -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}


def test_out_of_memory_while_building_the_base_checkpoint_is_memory_not_internal(tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    # sitecustomize runs in the builder child before anything else: its optimizer runs out of memory.
    (hook / "sitecustomize.py").write_text(
        "import torch\n"
        "def step(self, *args, **kwargs):\n"
        f"    raise torch.OutOfMemoryError({TORCH_OOM!r})\n"
        "torch.optim.AdamW.step = step\n"
    )
    monkeypatch.setenv("PYTHONPATH", _env(hook, REPO)["PYTHONPATH"])
    seen: list = []
    with pytest.raises(BaseCheckpointError) as raised:
        ensure_base_checkpoint(seed=0, samples=64, cache_dir=tmp_path / "cache", emit=seen.append)
    assert not of_type(seen, ev.RunFailed)  # reported once, by the worker, not forwarded from the child
    kind, message = classify(raised.value)
    assert kind == "memory"
    assert message == (
        "building the embedded base checkpoint failed: the host ran out of memory (batch 64 on the CPU); "
        "free memory and retry."
    )


def test_the_base_checkpoint_is_built_on_the_cpu_even_for_a_cuda_run():
    import inspect

    from vqabench.engine import base_checkpoint

    assert "device" not in inspect.signature(base_checkpoint.ensure_base_checkpoint).parameters
    assert "device" not in inspect.signature(base_checkpoint.build_base_checkpoint).parameters


def test_a_cuda_run_without_a_gpu_fails_as_config_in_the_worker(vqa_cache, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    events, rc, _ = run_worker(tiny_spec("gpu", "sft", device="cuda"), tmp_path, vqa_cache)
    failed = of_type(events, ev.RunFailed)
    assert rc == 1 and failed[0].error_kind == "config" and "'device'" in failed[0].message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("method", "reference"), METHODS)
def test_a_training_step_of_each_method_makes_no_host_sync_on_a_gpu(small, method, reference):
    data, start = small
    loaded = copy.copy(start)
    loaded.model = copy.deepcopy(start.model)
    device = pick_device("cuda")
    encoded = encode(data, loaded, 32, 16)
    ref = None
    if reference == "precompute":
        ref = PrecomputedReference.build(
            loaded,
            encoded,
            batch_size=8,
            device=device,
            cache_dir=None,
            checkpoint_key="t",
            data_key="t",
            precision="fp32",
        )
    loaded.model.to(device)
    if reference == "copy":
        ref = CopyReference(loaded, "decoder")
        ref.part.to(device)
    trainer = Trainer(_spec(method, reference), loaded, encoded, ref, device)
    trainer.warm_up()
    batches = [encoded.batch("train", torch.arange(lo, lo + 8), device) for lo in (8, 16)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
