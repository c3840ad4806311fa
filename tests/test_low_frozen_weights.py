"""Frozen Linears stored in the autocast dtype change nothing a bf16 run computes or saves.

Under autocast every ``nn.Linear`` casts its weight and bias to bf16 at each forward, so a frozen
Linear stored in bf16 must give bit-identical results (CPU autocast casts Linear to bf16 too). The
run with the cast is compared with the same run where the trainer leaves every weight fp32.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vqabench.engine import trainer as trainer_module
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.prepare import fitting_texts
from vqabench.engine.reference import AdapterReference, CopyReference
from vqabench.engine.trainer import Trainer
from vqabench.models import checkpoints, lora, parts, registry
from vqabench.spec import DatasetSpec, RunSpec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return easyvqa.load_splits(DatasetSpec(eval_size=4, test_size=4), seed=0, limit=8)


def _run(data, reference: str, folder):
    spec = RunSpec(name="p", method="dpo", model="qwen2-vl-tiny-random", train="lora", precision="bf16")
    spec = spec.replace(batch_size=4, lr=1e-2, lora_dropout=0.0, reference=reference, max_answer_tokens=4)
    variant = registry.variant(spec.model)
    assert variant is not None
    loaded = variant.build(0, fitting_texts(data), None)
    encoded = encode(data, loaded, loaded.question_token_cap, 4)
    parts.freeze_for_training(loaded, spec.train)
    ref: CopyReference | AdapterReference | None = CopyReference(loaded, spec.train) if reference == "copy" else None
    torch.manual_seed(1)
    lora.attach(loaded, spec)
    if reference == "adapter":
        ref = AdapterReference(loaded)
    trainer = Trainer(spec, loaded, encoded, ref, CPU)
    parts.set_train_mode(loaded, spec.train)
    losses = [trainer.train_step(encoded.batch("train", rows, CPU)) for rows in (torch.arange(4), torch.arange(4, 8))]
    loaded.model.eval()
    with torch.no_grad(), trainer.precision.autocast():
        out = trainer.step_fn("eval", encoded.batch("eval", torch.arange(4), CPU))
    answers = trainer.answers("test", limit=4)
    checkpoints.save_checkpoint(loaded, folder)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    return loaded, ref, torch.stack(losses), torch.cat([out.chosen_logps, out.rejected_logps]), answers, saved


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if type(m) is nn.Linear}


@pytest.mark.parametrize("reference", ["adapter", "copy"])
def test_bf16_lora_dpo_with_frozen_linears_in_bf16_is_bit_identical(data, reference, tmp_path, monkeypatch) -> None:
    low = _run(data, reference, tmp_path / "low")
    monkeypatch.setattr(trainer_module, "low_frozen_weights", lambda *args, **kwargs: 0)  # every weight fp32
    full = _run(data, reference, tmp_path / "full")
    loaded, ref, losses, logps, answers, saved = low
    _, _, full_losses, full_logps, full_answers, full_saved = full
    assert torch.isfinite(losses).all() and not torch.equal(losses[0], losses[1])
    assert (losses - full_losses).abs().max() <= 1e-6  # expected exactly equal
    assert (logps - full_logps).abs().max() <= 1e-6
    assert answers == full_answers
    # The checkpoint (the adapters alone) is what it was: fp32, the same values.
    assert saved.keys() == full_saved.keys() and saved
    assert all(t.dtype == torch.float32 and torch.equal(t, full_saved[k]) for k, t in saved.items())

    linears = _linears(loaded.model)
    base = [m for n, m in linears.items() if n.endswith("base_layer")]
    adapters = [m for n, m in linears.items() if ".lora_A." in n or ".lora_B." in n]
    assert base and adapters
    assert all(m.weight.dtype == torch.bfloat16 for m in base)
    assert all(m.weight.dtype == torch.float32 and m.weight.requires_grad for m in adapters)
    vision = [m for n, m in linears.items() if "visual" in n]
    assert vision and all(m.weight.dtype == torch.bfloat16 for m in vision)  # the frozen tower too
    others = [p for m in loaded.model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)]
    assert others and all(p.dtype == torch.float32 for p in others)  # norms, embeddings, convolutions
    if reference == "copy":
        assert isinstance(ref, CopyReference)
        assert all(m.weight.dtype == torch.bfloat16 for m in _linears(ref.part).values())
    assert all(m.weight.dtype == torch.float32 for m in _linears(full[0].model).values())
