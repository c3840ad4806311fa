"""Training learns: every method's optimizer moves the embedded model the way its loss says.

The worker and headless tests check the event stream and the ranges of its numbers; a run
whose optimizer did nothing would pass them. Here every method trains in-process for 12
steps from the embedded base checkpoint (the tests' small one, built once per test session)
and the pairs it trained on are scored in eval mode before and after: the method's own loss
must fall, the preference methods' reward margin must rise, the decoder's weights must change
and the frozen encoders' must not. SFT's loss must fall on the held-out eval split as well.

The trained pairs, not held-out ones, for the preference methods: a base model made from 512
samples barely tells the images apart (preference accuracy ~0.5), so 64 pairs teach it nothing
that carries to unseen images; what these tests guard is that the optimizer moves the model
along each method's loss. Removing the optimizer step makes every one of them fail.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch

from vqabench.engine.base_checkpoint import ensure_base_checkpoint
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import EncodedData, encode
from vqabench.engine.reference import CopyReference, assign_mismatched
from vqabench.engine.trainer import EvalResult, Trainer
from vqabench.models import checkpoints
from vqabench.models.family import LoadedModel
from vqabench.spec import DatasetSpec, RunSpec

BASE_SAMPLES = 512  # the size tests/conftest.py's TINY uses: one base checkpoint for the whole test session
EPOCHS = 3
LR = 5e-3  # far above the presets' so that 12 steps on 64 pairs move the scores clearly
#: How far the loss on the trained pairs must fall, as a share of its value at step 0 (smallest seen: KTO's 2.6%).
LOSS_DROP = 0.01
#: How far the reward margin (mean chosen − rejected summed log-prob, nats) on the trained pairs must rise for
#: the preference methods (smallest seen: ORPO's 0.34).
MARGIN_RISE = 0.2
#: How far SFT's loss on the held-out eval split must fall (seen: 1.64 to 1.03).
SFT_EVAL_DROP = 0.2


@pytest.fixture(scope="module")
def start(vqa_cache) -> tuple[LoadedModel, EncodedData]:
    """The embedded base checkpoint and 64 train / 32 eval easy-VQA pairs, encoded once for every test here."""
    folder = ensure_base_checkpoint(seed=0, samples=BASE_SAMPLES, cache_dir=vqa_cache, emit=lambda _: None)
    loaded = checkpoints.load_pretrained(str(folder))
    data = easyvqa.load_splits(DatasetSpec(eval_size=32, test_size=8), seed=0, limit=64)
    encoded = encode(data, loaded, 32, 16)
    assign_mismatched(encoded, 16, 0)
    return loaded, encoded


@dataclass
class ShortRun:
    """Scores of one method's short run at step 0 and after training, and its weights then."""

    before: dict[str, EvalResult]  # split -> scores
    after: dict[str, EvalResult]
    old: dict[str, torch.Tensor]
    new: dict[str, torch.Tensor]


def _train(start, method: str) -> ShortRun:
    base, encoded = start
    loaded = copy.copy(base)
    loaded.model = copy.deepcopy(base.model)
    spec = RunSpec(name=method, method=method, lr=LR, batch_size=16, epochs=EPOCHS, seed=0)
    reference = CopyReference(loaded, spec.train) if spec.needs_reference else None
    torch.manual_seed(0)
    trainer = Trainer(spec, loaded, encoded, reference, torch.device("cpu"))
    before_weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    before = {split: trainer.evaluate(split) for split in ("train", "eval")}
    for epoch in range(1, EPOCHS + 1):
        trainer.train_epoch(epoch)
    after = {split: trainer.evaluate(split) for split in ("train", "eval")}
    return ShortRun(before, after, before_weights, loaded.model.state_dict())


@pytest.mark.parametrize("method", ["sft", "dpo", "ipo", "kto", "orpo", "simpo"])
def test_every_method_lowers_its_loss_and_trains_only_the_decoder(start, method):
    run = _train(start, method)
    before, after = run.before["train"], run.after["train"]
    assert math.isfinite(before.loss) and math.isfinite(after.loss)
    assert after.loss < before.loss - LOSS_DROP * abs(before.loss), (method, before.loss, after.loss)
    if method == "sft":
        eval_before, eval_after = run.before["eval"].loss, run.after["eval"].loss
        assert eval_after < eval_before - SFT_EVAL_DROP, (eval_before, eval_after)
    else:  # a preference method separates chosen from rejected
        assert after.reward_margin > before.reward_margin + MARGIN_RISE, (before.reward_margin, after.reward_margin)
    old, new = run.old, run.new
    decoder = [k for k in old if k.startswith("text_decoder.")]
    encoders = [k for k in old if not k.startswith("text_decoder.")]
    assert decoder and encoders
    changed = [k for k in decoder if not torch.equal(old[k], new[k])]
    assert len(changed) > len(decoder) // 2, f"{method}: only {len(changed)} of {len(decoder)} decoder tensors moved"
    assert all(torch.equal(old[k], new[k]) for k in encoders), f"{method} changed a frozen encoder weight"
