"""IPO, KTO, SimPO and DPO with both exact references, and bf16, as runs on a causal family.

Each run goes through the engine's own entry point (`vqabench.engine.run.execute`), in this
process (no worker to start), on qwen2-vl-tiny-random: 16 pairs, 1 epoch, from one start
checkpoint, as a DPO preset starts from its SFT's. Its events are recorded into a results store
as a session's are. A wrapper around the method step keeps each run's first training step (the
warm-up step, before any weight moves, so the policy is its reference) with its batch.

Step 0, with the policy equal to its reference, whatever the log-probs: DPO log 2; IPO
(0 − 1/(2β))²; KTO, whose rewards and KL point are then 0, (λ_D + λ_U) σ(0) = (λ_D + λ_U)/2.
SimPO depends on the log-probs: it is computed here by its formula, −log σ(β(c/|c| − r/|r|) − γ),
from the step's log-probs and the answer lengths counted from the batch's masks. Tolerances:
1e-6 where the value is O(1), 1e-5 for IPO's 25 (float32 losses).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from vqabench import events as ev
from vqabench.engine import prepare, trainer
from vqabench.engine.run import execute
from vqabench.models import checkpoints
from vqabench.runner import RunQueued, RunStatusChanged, WorkerEvent
from vqabench.spec import RunSpec, SpecError, spec_from_dict
from vqabench.store import ResultsStore, RunRecord

MODEL = "qwen2-vl-tiny-random"
PAIRS, TEST = 16, 8
BASE: dict[str, Any] = {
    "model": MODEL,
    "train": "lm",
    "epochs": 1,
    "limit": PAIRS,
    "batch_size": 8,
    "lr": 5e-4,
    "seed": 0,
    "dataset": {"source": "easyvqa", "eval_size": 8, "test_size": TEST},
    "judge": {"name": "exact"},
}


@dataclass
class StepZero:
    """A run's first training step: per-example losses and log-probs, its answer lengths, and the
    same step's losses and log-probs recomputed without autocast (fp32)."""

    losses: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    fp32_chosen: torch.Tensor


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs' start checkpoint: the tiny variant with its tokenizer trained on the runs' text."""
    folder = tmp_path_factory.mktemp("start")
    spec = spec_from_dict({**BASE, "name": "start", "method": "sft"})
    loaded = checkpoints.build_variant(MODEL, 0, texts=prepare.fitting_texts(prepare.load_data(spec, folder)))
    checkpoints.save_checkpoint(loaded, folder / "checkpoint")
    return folder / "checkpoint"


@pytest.fixture
def first_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, StepZero]:
    """Each run's first training step, by run name, kept by a wrapper around the engine's method step."""
    seen: dict[str, StepZero] = {}
    last_reference: dict[str, Any] = {}  # by run name: the reference log-probs of its latest step
    call, reference_logps = trainer.MethodStep.__call__, trainer.MethodStep._reference_logps

    def keep_reference(self: trainer.MethodStep, split: str, batch: Any, features: torch.Tensor) -> Any:
        last_reference[self.spec.name] = reference_logps(self, split, batch, features)
        return last_reference[self.spec.name]

    def step(self: trainer.MethodStep, split: str, batch: Any) -> trainer.StepOutput:
        out = call(self, split, batch)
        if split == "train" and self.spec.name not in seen:
            ref = last_reference.pop(self.spec.name, None)
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                fp32 = call(self, split, batch)
            assert out.rejected_logps is not None
            seen[self.spec.name] = StepZero(
                out.losses.detach().double(),
                out.chosen_logps.double(),
                out.rejected_logps.double(),
                None if ref is None else ref.chosen.double(),
                None if ref is None else ref.rejected.double(),
                batch.chosen[1].sum(1).double(),
                batch.rejected[1].sum(1).double(),
                fp32.chosen_logps.double(),
            )
        return out

    monkeypatch.setattr(trainer.MethodStep, "_reference_logps", keep_reference)
    monkeypatch.setattr(trainer.MethodStep, "__call__", step)
    return seen


def run_session(
    tmp_path: Path, start: Path, runs: dict[str, dict[str, Any]]
) -> tuple[ResultsStore, dict[str, RunRecord]]:
    """Run each spec in this process, recording its events as a session's; the store and its runs by name."""
    store = ResultsStore(tmp_path / "results")
    session = store.begin_session(",".join(runs), "in-process runs")
    record = store.recorder(session)
    for position, (name, changes) in enumerate(runs.items()):
        spec: RunSpec = spec_from_dict(
            {
                **BASE,
                "name": name,
                "init_checkpoint": str(start),
                "cache_dir": str(tmp_path / "cache"),
                "output_dir": str(tmp_path / "runs" / name),
                **changes,
            }
        )
        record(RunQueued(name, spec, position))
        record(RunStatusChanged(name, "running", spec=spec, pid=os.getpid()))
        execute(spec, lambda event, name=name: record(WorkerEvent(name, event, ev.encode_event(event))))
        record(RunStatusChanged(name, "done", exit_code=0))
    return store, {r.name: r for r in store.runs(session.id)}


def test_ipo_kto_simpo_and_dpo_with_both_references_start_where_their_objectives_say_and_store_their_figures(
    tmp_path: Path, start: Path, first_steps: dict[str, StepZero]
) -> None:
    kto_weights = (1.0, 1.5)  # unequal, so the start value tells the two weights apart
    store, runs = run_session(
        tmp_path,
        start,
        {
            "dpo-copy": {"method": "dpo", "beta": 0.1, "reference": "copy"},
            "dpo-precompute": {"method": "dpo", "beta": 0.1, "reference": "precompute"},
            "ipo": {"method": "ipo", "beta": 0.1, "reference": "copy"},
            "kto": {
                "method": "kto",
                "beta": 0.1,
                "reference": "copy",
                "kto_desirable_weight": kto_weights[0],
                "kto_undesirable_weight": kto_weights[1],
            },
            "simpo": {"method": "simpo", "beta": 2.0, "simpo_gamma": 1.0},
        },
    )
    steps = first_steps
    assert set(steps) == set(runs) == {"dpo-copy", "dpo-precompute", "ipo", "kto", "simpo"}

    # Step 0, where the policy is its reference (see the module docstring for each value).
    for name in ("dpo-copy", "dpo-precompute"):
        assert float((steps[name].losses - math.log(2)).abs().max()) < 1e-6, (name, steps[name].losses)
    assert float((steps["ipo"].losses - (1 / (2 * 0.1)) ** 2).abs().max()) < 1e-5, steps["ipo"].losses
    assert float((steps["kto"].losses - sum(kto_weights) / 2).abs().max()) < 1e-6, steps["kto"].losses
    s = steps["simpo"]
    margin = s.chosen / s.chosen_lengths - s.rejected / s.rejected_lengths
    simpo = -torch.nn.functional.logsigmoid(2.0 * margin - 1.0)
    assert float((s.losses - simpo).abs().max()) < 1e-6, (s.losses, simpo)
    assert float(simpo.std()) > 1e-3  # the rows differ: the value really depends on the log-probs

    # Every run starts from the same weights and the first step reads the same rows: one set of
    # policy log-probs; a copy's and the precomputed table's reference log-probs equal them.
    copy = steps["dpo-copy"]
    assert copy.ref_chosen is not None and copy.ref_rejected is not None
    for name, step in steps.items():
        assert torch.allclose(step.chosen, copy.chosen, rtol=0, atol=1e-6), name
        if step.ref_chosen is not None:
            assert step.ref_rejected is not None
            assert torch.allclose(step.ref_chosen, copy.ref_chosen, rtol=0, atol=1e-6), name
            assert torch.allclose(step.ref_rejected, copy.ref_rejected, rtol=0, atol=1e-6), name
    assert bool((copy.chosen < 0).all()) and not torch.equal(copy.chosen, copy.rejected)

    # What the store keeps of each run.
    for name, run in runs.items():
        assert run.status == "done" and run.started is not None and run.finished is not None, name
        assert run.started.data["model_family"] == "qwen2-vl" and run.started.precision == "fp32"
        [epoch] = store.epochs(run.id)
        figures = (epoch.train_loss, epoch.eval_loss, epoch.chosen_logp, epoch.rejected_logp, epoch.reward_margin)
        assert all(math.isfinite(x) for x in figures) and 0 <= epoch.pref_accuracy <= 1, (name, epoch)
        assert epoch.train_loss != pytest.approx(float(steps[name].losses.mean()), abs=1e-4), name  # it trained
        assert run.finished.best_epoch == 1 and math.isfinite(run.finished.best_eval_loss)
        [test] = [e for e in store.evals(run.id) if e.split == "test"]
        assert test.n == TEST and 0 <= test.em <= 1
    strategies = {n: (r.started.reference_strategy, r.started.data["reference_choice"]) for n, r in runs.items()}
    assert strategies["dpo-precompute"] == (
        "precompute",
        {"asked": "precompute", "chosen": "precompute", "why": "asked for"},
    )
    assert strategies["simpo"] == (None, None)
    assert all(strategies[n][0] == "copy" for n in ("dpo-copy", "ipo", "kto"))
    precompute, copied = runs["dpo-precompute"].started, runs["dpo-copy"].started
    assert precompute.reference_bytes == 0 < copied.reference_bytes
    assert precompute.data["reference_seconds"] > 0
    # The same training either way: the two DPO runs' figures agree.
    a, b = store.epochs(runs["dpo-copy"].id)[0], store.epochs(runs["dpo-precompute"].id)[0]
    for field in ("train_loss", "eval_loss", "chosen_logp", "rejected_logp", "reward_margin", "pref_accuracy"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), abs=1e-5), field


def test_a_bf16_run_on_the_cpu_starts_dpo_at_log_2_and_fp16_is_refused_in_one_sentence(
    tmp_path: Path, start: Path, first_steps: dict[str, StepZero]
) -> None:
    store, runs = run_session(
        tmp_path, start, {"dpo-bf16": {"method": "dpo", "beta": 0.1, "reference": "precompute", "precision": "bf16"}}
    )
    run, step = runs["dpo-bf16"], first_steps["dpo-bf16"]
    assert run.status == "done" and run.started is not None and run.started.precision == "bf16"
    # The precomputed table is scored under the same autocast as the policy: log 2 as exactly as in fp32.
    assert float((step.losses - math.log(2)).abs().max()) < 1e-6, step.losses
    # bf16 really ran: its log-probs are near the fp32 ones of the same step, not equal to them.
    assert not torch.equal(step.chosen, step.fp32_chosen)
    assert torch.allclose(step.chosen, step.fp32_chosen, rtol=0.05, atol=0.5)
    [epoch] = store.epochs(run.id)
    assert math.isfinite(epoch.train_loss) and math.isfinite(epoch.eval_loss)
    # fp16 needs a CUDA GPU: refused before anything runs, as for every family.
    spec = spec_from_dict({**BASE, "name": "fp16", "method": "sft", "precision": "fp16"})
    with pytest.raises(SpecError, match=r"^key 'precision' has value 'fp16', which needs a CUDA GPU; [^.]*\.$"):
        execute(spec, lambda event: pytest.fail(f"fp16 emitted {event}"))
