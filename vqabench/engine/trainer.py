"""The training loop: one method's loss, AdamW, exponential LR decay, eval, best checkpoint.

One obvious loop: every epoch trains on the shuffled train split, then scores the eval
split (eval loss = the method's own loss; preference metrics on plain log-probs, so they
compare across methods), steps the LR schedule, and keeps the checkpoint with the lowest
eval loss. The caller owns the events; the trainer reports through callbacks.

On several processes (engine/distributed.py) the train split is sharded by a
DistributedSampler, the step runs under DDP, eval scores a slice of every global batch per
rank and generation a slice of the split, and both gather them, so every rank ends an epoch
with the same figures.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vqabench import objectives
from vqabench.engine.data.batching import Batch, EncodedData
from vqabench.engine.distributed import SINGLE, Ranks
from vqabench.engine.errors import NumericsError
from vqabench.engine.generation import greedy_answers
from vqabench.engine.out_of_memory import OutOfMemory, explain_out_of_memory, out_of_memory_sentence
from vqabench.engine.precision import Precision, low_frozen_weights
from vqabench.engine.reference import CopyReference, ReferenceLogps, mismatched_answers
from vqabench.engine.telemetry import optimizer_state_bytes
from vqabench.engine.timing import StepClock
from vqabench.models import parts
from vqabench.models.family import LoadedModel
from vqabench.spec import RunSpec


class EpochWindow(Protocol):
    """What measures an epoch (engine.telemetry.Telemetry): opened right before the timed steps, closed right after."""

    def begin_epoch(self) -> None: ...

    def end_epoch(self) -> Any: ...


class Reference(Protocol):
    strategy: str

    @property
    def resident_bytes(self) -> int: ...

    def logps(
        self,
        encoded: EncodedData,
        split: str,
        batch: Batch,
        features: torch.Tensor,
        with_mismatched: bool = False,
    ) -> ReferenceLogps: ...


@dataclass
class StepOutput:
    losses: torch.Tensor  # [batch], per-example loss of the method
    chosen_logps: torch.Tensor  # detached
    rejected_logps: torch.Tensor | None
    features: torch.Tensor  # the batch's frozen-part output, for scoring more answers without recomputing it


@dataclass
class EvalResult:
    loss: float
    chosen_logp: float
    rejected_logp: float
    reward_margin: float
    pref_accuracy: float
    seconds: float


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    epoch_seconds: float
    samples: int
    lr: float
    eval: EvalResult
    is_best: bool
    telemetry: Any = None  # what the EpochWindow returned for the timed training steps


def pick_device(name: str) -> torch.device:
    """The torch device for a spec's `device`, with an explicit index: "cuda" is cuda:N, N the current device.

    torch.device("cuda") != torch.device("cuda:0"), so an unindexed device would defeat every
    "already on this device" check.
    """
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        _, _, index = name.partition(":")
        if index:
            return torch.device("cuda", int(index))
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MethodStep:
    """Computes one method's per-example losses for a batch: the step every run and benchmark shares."""

    def __init__(
        self,
        spec: RunSpec,
        loaded: LoadedModel,
        encoded: EncodedData,
        reference: Reference | None,
        ranks: Ranks = SINGLE,
    ):
        self.spec = spec
        self.loaded = loaded
        self.encoded = encoded
        self.reference = reference
        # Each rank holds a share of the global batch; batch-level statistics (KTO's KL point) sum over ranks.
        self.total = ranks.total if ranks.distributed else None
        self.needs = objectives.OBJECTIVE_INPUTS[spec.method]
        if self.needs.needs_reference and reference is None:
            raise ValueError(f"method '{spec.method}' needs a reference model")

    def __call__(self, split: str, batch: Batch) -> StepOutput:
        spec, model, family = self.spec, self.loaded.model, self.loaded.family
        if spec.train != "all":  # a frozen part (everything outside the language model or its adapters)
            with torch.no_grad():
                q = batch.features_of(family, model, self.loaded.savings)
        elif batch.features is not None:
            raise ValueError("cached features reached a run that trains every weight")
        else:
            q = batch.features_of(family, model, self.loaded.savings)
        if not self.needs.needs_rejected:
            smoothing = spec.sft_label_smoothing
            scores = family.answer_scores(
                model, q, batch.prompt, batch.chosen, vocab_mean=smoothing > 0, savings=self.loaded.savings
            )
            c = scores.logps
            return StepOutput(
                objectives.sft_loss(c, scores.lengths, smoothing, scores.vocab_means), c.detach(), None, q
            )
        chosen, rejected = family.pair_scores(
            model, q, batch.prompt, batch.chosen, batch.rejected, self.loaded.pad_token_id, self.loaded.savings
        )
        c, r, c_len, r_len = chosen.logps, rejected.logps, chosen.lengths, rejected.lengths
        method, beta = spec.method, spec.resolved_beta
        if method == "orpo":
            losses = objectives.orpo_loss(c, r, c_len, r_len, spec.lam, average=spec.orpo_logps == "mean")
        elif method == "simpo":
            losses = objectives.simpo_loss(c, r, c_len, r_len, beta, spec.simpo_gamma)
        elif method == "dpo":
            ref = self._reference_logps(split, batch, q)
            losses = objectives.dpo_loss(c, r, ref.chosen, ref.rejected, beta)
        elif method == "ipo":
            ref = self._reference_logps(split, batch, q)
            losses = objectives.ipo_loss(c, r, ref.chosen, ref.rejected, c_len, r_len, beta)
        elif method == "kto":
            ref = self._reference_logps(split, batch, q)
            if ref.mismatched is None:
                raise ValueError("KTO needs the reference's log-probs of mismatched answers for its KL estimate")
            with torch.no_grad():
                mismatched = mismatched_answers(self.encoded, split, batch)
                mm = family.answer_scores(
                    model, q.detach(), batch.prompt, mismatched, savings=self.loaded.savings
                ).logps
            kl = objectives.kto_kl_estimate(mm, ref.mismatched, self.total)
            losses = objectives.kto_loss(
                c, r, ref.chosen, ref.rejected, kl, beta, spec.kto_desirable_weight, spec.kto_undesirable_weight
            )
        else:
            raise ValueError(f"unknown method '{method}'")
        return StepOutput(losses, c.detach(), r.detach(), q)

    def join_without_rows(self) -> None:
        """Take part in a step's sums over ranks when every row of its global batch sits on other ranks.

        Only the last eval batch can leave a rank empty; the others still wait for this rank's share.
        """
        if self.total is not None and self.needs.needs_mismatched_kl:
            device = next(self.loaded.model.parameters()).device
            self.total(torch.zeros(2, dtype=torch.float64, device=device))  # no rows: a sum and a count of 0

    def _reference_logps(self, split: str, batch: Batch, features: torch.Tensor) -> ReferenceLogps:
        if self.reference is None:  # __init__ refuses this for methods that need one
            raise ValueError(f"method '{self.spec.method}' needs a reference model")
        return self.reference.logps(self.encoded, split, batch, features, self.needs.needs_mismatched_kl)


class Trainer:
    """Trains `loaded.model` on `encoded` with the spec's method; reports through callbacks."""

    check_interval = 0.25  # seconds between progress reports, each one host sync (loss and finiteness)

    def __init__(
        self,
        spec: RunSpec,
        loaded: LoadedModel,
        encoded: EncodedData,
        reference: Reference | None,
        device: torch.device,
        on_progress: Callable[[str, int, int, int, float | None], None] | None = None,
        ranks: Ranks = SINGLE,
    ):
        self.spec = spec
        self.ranks = ranks
        self.batch_size = ranks.per_device_batch(spec.batch_size)  # this process's share of the global batch
        self.loaded = loaded
        self.encoded = encoded
        self.device = device
        self.on_progress = on_progress or (lambda *a: None)
        parts.freeze_for_training(loaded, spec.train)
        # Under bf16/fp16 the frozen Linears whose weights no checkpoint holds are stored in that
        # dtype: exact (autocast casts them at every forward anyway), and half their bytes. Here,
        # before DDP and the optimizer see the model, for the run and the probe alike.
        copy_part = (reference.part, reference.model) if isinstance(reference, CopyReference) else None
        self.low_frozen_bytes = low_frozen_weights(spec.precision, spec.train, loaded.model, copy_part)
        if spec.disable_dropout:
            parts.disable_dropout(loaded.model)
        if spec.activation_checkpointing == "mlp":  # before DDP wraps the part; a no-grad pass is untouched
            parts.checkpoint_mlp_blocks(loaded)
        self.step_fn = MethodStep(spec, loaded, encoded, reference, ranks)
        self.ddp = ranks.wrap(parts.trainable_part(loaded, spec.train), device)
        self.sampler = ranks.train_sampler(len(encoded.splits["train"]), spec.seed)
        params = [p for p in loaded.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=spec.lr_decay)
        self.precision = Precision(spec.precision, device)
        self.optimizer_state_bytes: int | None = None  # AdamW's moments, measured after the first step
        self.best_loss = math.inf
        self.best_epoch = 0
        self.clock = StepClock(cores=torch.get_num_threads())  # every step's wall clock, machine load

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step; returns the detached mean loss, still on the device (no host sync)."""
        with self.precision.autocast():
            out = self.step_fn("train", batch) if self.ddp is None else self.ddp(self.step_fn, "train", batch)
        loss = out.losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward_and_step(loss, self.optimizer)
        if self.optimizer_state_bytes is None and self.optimizer.state:
            self.optimizer_state_bytes = optimizer_state_bytes(self.optimizer)
        return loss.detach()

    def warm_up(self) -> None:
        """One untimed forward, backward and optimizer step before epoch 1, leaving training unchanged.

        It pays CUDA's cold start (lazy kernel loading, cuBLAS set-up, allocator growth) and
        allocates AdamW's state outside the timed epochs. The RNG is forked, so dropout draws
        and shuffling are those of a run without it; the optimizer step runs at lr 0 (an exact
        no-op on the weights) and its state is zeroed afterwards, which is what a fresh AdamW
        starts from, so the first real step is unchanged too.
        """
        rows = torch.arange(min(self.batch_size, len(self.encoded.splits["train"])))
        parts.set_train_mode(self.loaded, self.spec.train)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        with (
            torch.random.fork_rng(devices=cuda),
            explain_out_of_memory("running the warm-up step", self.batch_size),
        ):
            batch = self.encoded.batch("train", rows, self.device)
            try:
                for group in self.optimizer.param_groups:
                    group["lr"] = 0.0
                self.train_step(batch)
            finally:
                for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                    group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
        synchronize(self.device)

    def _check_finite(self, step_losses: torch.Tensor, done: int, epoch: int, steps: int) -> torch.Tensor:
        """Copy the first `done` step losses to the host (the one sync of a logging point) and check them."""
        values = step_losses[:done].cpu().double()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            raise NumericsError(
                f"the {self.spec.method} loss became non-finite at epoch {epoch}, step {int(bad[0]) + 1} of {steps}; "
                f"lower lr (now {self.spec.lr:g}) or check the data."
            )
        return values

    def train_epoch(self, epoch: int, window: EpochWindow | None = None) -> tuple[float, float, int, Any]:
        """One pass over the shuffled train split: (mean loss, seconds, samples, the window's figures).

        Step losses stay on the device; they are copied to the host and checked for finiteness
        at the throttled progress points and at the end, so no step waits for the GPU before its
        backward pass, and a non-finite loss is still reported with the step where it began.
        """
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        bs = self.batch_size
        parts.set_train_mode(self.loaded, self.spec.train)
        last = 0.0
        steps = self.steps_per_epoch
        sizes = [min(bs, len(order) - step * bs) for step in range(steps)]
        step_losses = torch.zeros(steps, device=self.device)  # loss x batch size, per step
        done = torch.zeros(0, dtype=torch.float64)  # the step losses checked so far, on the host
        if window is not None:
            window.begin_epoch()
        synchronize(self.device)
        start = time.perf_counter()
        self.clock.begin()
        # The step does not wait for the GPU, so on CUDA a step's time is read from events recorded
        # between steps (no sync), after the epoch's one synchronize.
        marks = [torch.cuda.Event(enable_timing=True)] if self.device.type == "cuda" else None
        if marks is not None:
            marks[0].record()
        blocks = [order[step * bs : (step + 1) * bs] for step in range(steps)]
        for step, batch in enumerate(self.encoded.batches("train", blocks, self.device)):
            try:
                step_losses[step] = self.train_step(batch) * len(batch)
            except torch.OutOfMemoryError as exc:
                activity = f"training step {step + 1} of {steps} in epoch {epoch}"
                raise OutOfMemory(out_of_memory_sentence(exc, activity, bs)) from exc
            self.clock.step_done()  # host wall clock; on CUDA replaced by the steps' event times below
            if marks is not None:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
            now = time.perf_counter()
            if now - last >= self.check_interval or step + 1 == steps:
                last = now
                done = self._check_finite(step_losses, step + 1, epoch, steps)
                self.on_progress("train", epoch, step + 1, steps, float(done.sum()) / sum(sizes[: step + 1]))
        synchronize(self.device)
        seconds = time.perf_counter() - start
        if marks is not None:
            self.clock.step_seconds = [a.elapsed_time(b) / 1000.0 for a, b in itertools.pairwise(marks)]
        figures = window.end_epoch() if window is not None else None
        # `done` holds every step (the last step always checks); summed over every rank's samples
        loss_sum, samples = self.ranks.sum([float(done.sum()), float(sum(sizes))], self.device)
        return loss_sum / max(samples, 1.0), seconds, int(samples), figures

    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> EvalResult:
        start = time.perf_counter()
        self.loaded.model.eval()
        losses, chosen, rejected = [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)]
        # The split in global batches, as one process takes it, each sliced over the ranks: a
        # batch-level statistic (KTO's KL point) then covers the rows it covers on one process.
        n, step = len(self.encoded.splits[split]), self.spec.batch_size
        blocks = []
        for lo in range(0, n, step):
            part = self.ranks.shard(min(step, n - lo))
            blocks.append(torch.arange(lo + part.start, lo + part.stop))
        empty = sum(1 for block in blocks if not len(block))  # at most the last batch, when it has < N rows
        blocks = [block for block in blocks if len(block)]
        for batch in self.encoded.batches(split, blocks, self.device):
            with self.precision.autocast():
                out = self.step_fn(split, batch)
            losses.append(out.losses.float().cpu())
            chosen.append(out.chosen_logps.float().cpu())
            if out.rejected_logps is None:  # SFT trains on chosen only; score rejected for the metrics
                with self.precision.autocast():
                    scored = self.loaded.family.answer_scores(
                        self.loaded.model, out.features, batch.prompt, batch.rejected, savings=self.loaded.savings
                    )
                rejected.append(scored.logps.float().cpu())
            else:
                rejected.append(out.rejected_logps.float().cpu())
        for _ in range(empty):
            self.step_fn.join_without_rows()
        gather = self.ranks.gather_cat
        c, r, loss = gather(torch.cat(chosen)), gather(torch.cat(rejected)), gather(torch.cat(losses))
        margins = objectives.reward_margins(c, r)
        return EvalResult(
            float(loss.mean()),
            float(c.mean()),
            float(r.mean()),
            float(margins.mean()),
            objectives.preference_accuracy(margins),
            time.perf_counter() - start,
        )

    def run_epoch(self, epoch: int, window: EpochWindow | None = None) -> EpochResult:
        """Train (measured by `window`, which covers exactly the timed steps), then evaluate."""
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss, seconds, samples, figures = self.train_epoch(epoch, window)
        with explain_out_of_memory(f"evaluating epoch {epoch}", self.batch_size):
            ev = self.evaluate("eval")
        if not math.isfinite(ev.loss):
            raise NumericsError(f"the {self.spec.method} eval loss became non-finite after epoch {epoch}.")
        self.scheduler.step()
        is_best = ev.loss < self.best_loss
        if is_best:
            self.best_loss, self.best_epoch = ev.loss, epoch
        return EpochResult(epoch, train_loss, seconds, samples, lr, ev, is_best, figures)

    @property
    def answer_tokens(self) -> int:
        """Most answer tokens to generate: the run's answer limit (resolved from the data when "auto")."""
        limit = self.spec.max_answer_tokens
        return limit if isinstance(limit, int) else self.loaded.answer_token_cap

    @torch.no_grad()
    def answers(self, split: str, limit: int | None = None) -> list[str]:
        """Greedy answers for the first `limit` items of a split."""
        self.loaded.model.eval()
        s = self.encoded.splits[split]
        n = len(s) if limit is None else min(limit, len(s))
        shard = self.ranks.shard(n)
        out: list[str] = []
        bs = max(self.batch_size, 32)
        steps = -(-len(shard) // bs)
        blocks = [torch.arange(lo, min(lo + bs, shard.stop)) for lo in range(shard.start, shard.stop, bs)]
        for i, batch in enumerate(self.encoded.batches(split, blocks, self.device)):
            with self.precision.autocast():
                out += greedy_answers(
                    self.loaded,
                    batch.pixel_values,
                    batch.question_ids,
                    batch.question_mask,
                    self.answer_tokens,
                    features=batch.features,
                )
            self.on_progress("generate", 0, i + 1, steps, None)
        return [answer for part in self.ranks.gather(out) for answer in part]
