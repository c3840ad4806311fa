"""``activation_checkpointing = "mlp"`` recomputes each decoder layer's MLP in backward and changes nothing else.

The same DPO steps run with and without it on the tiny Qwen2-VL (fp32, dropout off): the losses
and every trainable gradient must agree, and the MLPs' insides must really run twice per forward.
"""

from __future__ import annotations

import pytest
import torch

from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.prepare import fitting_texts
from vqabench.engine.reference import AdapterReference, CopyReference
from vqabench.engine.trainer import Trainer
from vqabench.models import lora, parts, registry
from vqabench.models.family import ModelError
from vqabench.spec import DatasetSpec, RunSpec, SpecError, spec_from_dict

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return easyvqa.load_splits(DatasetSpec(eval_size=4, test_size=4), seed=0, limit=8)


def _steps(data, train: str, checkpointing: str):
    spec = RunSpec(name="p", method="dpo", model="qwen2-vl-tiny-random", train=train, batch_size=4, lr=1e-2)
    spec = spec.replace(lora_dropout=0.0, max_answer_tokens=4, activation_checkpointing=checkpointing)
    spec = spec.replace(reference="adapter" if train == "lora" else "copy")
    variant = registry.variant(spec.model)
    assert variant is not None
    loaded = variant.build(0, fitting_texts(data), None)
    encoded = encode(data, loaded, loaded.question_token_cap, 4)
    parts.freeze_for_training(loaded, train)
    ref: CopyReference | AdapterReference | None = CopyReference(loaded, train) if train != "lora" else None
    if train == "lora":
        torch.manual_seed(1)
        lora.attach(loaded, spec)
        ref = AdapterReference(loaded)
    trainer = Trainer(spec, loaded, encoded, ref, CPU)
    parts.set_train_mode(loaded, train)
    blocks = loaded.family.checkpointed_blocks(loaded.model)
    calls = {"mlp": 0, "inside": 0}
    for block in blocks:
        block.register_forward_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
        # A pre-hook: the recomputation stops as soon as it has what backward needs, inside down_proj.
        block.down_proj.register_forward_pre_hook(lambda *_: calls.__setitem__("inside", calls["inside"] + 1))
    # The adapters start at zero (their A gets no gradient), so the second step's gradients are compared.
    losses = [trainer.train_step(encoded.batch("train", rows, CPU)) for rows in (torch.arange(4), torch.arange(4, 8))]
    grads = {n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
    return torch.stack(losses), grads, calls, len(blocks)


@pytest.mark.parametrize("train", ["lora", "lm"])
def test_mlp_checkpointing_gives_the_same_loss_and_gradients_and_recomputes(data, train) -> None:
    losses, grads, calls, layers = _steps(data, train, "mlp")
    plain_losses, plain_grads, plain_calls, _ = _steps(data, train, "off")
    assert layers == 2  # the tiny model's two decoder layers
    assert torch.isfinite(losses).all() and not torch.equal(losses[0], losses[1])
    assert (losses - plain_losses).abs().max() <= 1e-6
    assert grads.keys() == plain_grads.keys() and any(g.abs().max() > 0 for g in grads.values())
    assert all((grads[n] - plain_grads[n]).abs().max() <= 1e-6 for n in grads)
    # Each MLP is called as often either way; its insides run again in backward only when checkpointed.
    assert calls["mlp"] == plain_calls["mlp"] > 0
    assert plain_calls["inside"] == plain_calls["mlp"]
    # 2 steps x 2 passes (the shared prompt, then both answers) x 2 layers recompute; the rest ran without grad.
    assert calls["inside"] == calls["mlp"] + 2 * 2 * layers


def test_activation_checkpointing_accepts_only_off_and_mlp() -> None:
    with pytest.raises(SpecError, match=r"activation_checkpointing.*'full'.*off, mlp"):
        spec_from_dict({"name": "p", "method": "dpo", "activation_checkpointing": "full"}, "x.toml")


def test_blip_refuses_mlp_checkpointing_in_one_sentence() -> None:
    variant = registry.variant("embedded-init")  # BLIP, built without storage
    assert variant is not None
    with torch.device("meta"):
        loaded = variant.build(0, None, None)
    with pytest.raises(ModelError, match="activation_checkpointing = 'mlp' is not available for blip"):
        loaded.family.checkpointed_blocks(loaded.model)
