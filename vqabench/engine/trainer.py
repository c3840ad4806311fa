"""The training loop: one method's loss, AdamW, exponential LR decay, eval, best checkpoint.

One obvious loop: every epoch trains on the shuffled train split, then scores the eval
split (eval loss = the method's own loss; preference metrics on plain log-probs, so they
compare across methods), steps the LR schedule, and keeps the checkpoint with the lowest
eval loss. The caller owns the events; the trainer reports through callbacks.

On several processes (engine/distributed.py) the train split is sharded by a
DistributedSampler, the step runs under DDP, and eval and generation score a slice per
rank and gather it, so every rank ends an epoch with the same figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from vqabench import objectives
from vqabench.engine import model as blip
from vqabench.engine.data.batching import Batch, EncodedData
from vqabench.engine.distributed import SINGLE, Ranks
from vqabench.engine.reference import ReferenceLogps, mismatched_answers
from vqabench.engine.timing import StepClock
from vqabench.spec import RunSpec


class NumericsError(RuntimeError):
    """A loss that is not finite; the message names the epoch and step."""


class Reference(Protocol):
    strategy: str

    @property
    def resident_bytes(self) -> int: ...

    def logps(
        self,
        encoded: EncodedData,
        split: str,
        batch: Batch,
        question_embeds: torch.Tensor,
        with_mismatched: bool = False,
    ) -> ReferenceLogps: ...


@dataclass
class StepOutput:
    losses: torch.Tensor  # [batch], per-example loss of the method
    chosen_logps: torch.Tensor  # detached
    rejected_logps: torch.Tensor | None
    question_embeds: torch.Tensor  # the batch's encoding, for scoring more answers without re-encoding


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


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MethodStep:
    """Computes one method's per-example losses for a batch: the step every run and benchmark shares."""

    def __init__(self, spec: RunSpec, loaded: blip.LoadedModel, encoded: EncodedData, reference: Reference | None):
        self.spec = spec
        self.loaded = loaded
        self.encoded = encoded
        self.reference = reference
        self.needs = objectives.OBJECTIVE_INPUTS[spec.method]
        if self.needs.needs_reference and reference is None:
            raise ValueError(f"method '{spec.method}' needs a reference model")

    def __call__(self, split: str, batch: Batch) -> StepOutput:
        spec, model = self.spec, self.loaded.model
        if spec.train == "decoder":
            with torch.no_grad():
                q = batch.encodings(model)
        elif batch.question_embeds is not None:
            raise ValueError("cached question encodings reached a run that trains the encoders")
        else:
            q = batch.encodings(model)
        decoder = model.text_decoder
        if not self.needs.needs_rejected:
            c, c_len = blip.answer_logps(decoder, q, batch.question_mask, *batch.chosen)
            return StepOutput(objectives.sft_loss(c, c_len), c.detach(), None, q)
        c, r, c_len, r_len = blip.pair_logps(
            decoder, q, batch.question_mask, batch.chosen, batch.rejected, self.loaded.pad_token_id
        )
        method, beta = spec.method, spec.resolved_beta
        if method == "orpo":
            losses = objectives.orpo_loss(c, r, c_len, r_len, spec.lam)
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
                mm, _ = blip.answer_logps(
                    decoder, q.detach(), batch.question_mask, *mismatched_answers(self.encoded, split, batch)
                )
            kl = objectives.kto_kl_estimate(mm, ref.mismatched)
            losses = objectives.kto_loss(
                c, r, ref.chosen, ref.rejected, kl, beta, spec.kto_desirable_weight, spec.kto_undesirable_weight
            )
        else:
            raise ValueError(f"unknown method '{method}'")
        return StepOutput(losses, c.detach(), r.detach(), q)

    def _reference_logps(self, split: str, batch: Batch, question_embeds: torch.Tensor) -> ReferenceLogps:
        if self.reference is None:  # __init__ refuses this for methods that need one
            raise ValueError(f"method '{self.spec.method}' needs a reference model")
        return self.reference.logps(self.encoded, split, batch, question_embeds, self.needs.needs_mismatched_kl)


class Trainer:
    """Trains `loaded.model` on `encoded` with the spec's method; reports through callbacks."""

    def __init__(
        self,
        spec: RunSpec,
        loaded: blip.LoadedModel,
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
        blip.freeze_for_training(loaded.model, spec.train)
        self.step_fn = MethodStep(spec, loaded, encoded, reference)
        self.ddp = ranks.wrap(blip.trainable_part(loaded.model, spec.train), device)
        self.sampler = ranks.train_sampler(len(encoded.splits["train"]), spec.seed)
        params = [p for p in loaded.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=spec.lr_decay)
        self.best_loss = math.inf
        self.best_epoch = 0
        self.clock = StepClock(cores=torch.get_num_threads())  # every step's wall clock, machine load

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def train_step(self, batch: Batch) -> float:
        out = self.step_fn("train", batch) if self.ddp is None else self.ddp(self.step_fn, "train", batch)
        loss = out.losses.mean()
        value = float(loss.detach())  # the step's one host sync: the value and the finiteness check
        if not math.isfinite(value):
            raise NumericsError("non-finite")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return value

    def train_epoch(self, epoch: int) -> tuple[float, float, int]:
        """One pass over the shuffled train split: (mean loss, seconds, samples)."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        bs = self.batch_size
        blip.set_train_mode(self.loaded.model, self.spec.train)
        total, count, last = 0.0, 0, 0.0
        steps = self.steps_per_epoch
        synchronize(self.device)
        start = time.perf_counter()
        self.clock.begin()
        blocks = [order[step * bs : (step + 1) * bs] for step in range(steps)]
        for step, batch in enumerate(self.encoded.batches("train", blocks, self.device)):
            try:
                loss = self.train_step(batch)
            except NumericsError:
                raise NumericsError(
                    f"the {self.spec.method} loss became non-finite at epoch {epoch}, step {step + 1} of {steps}; "
                    f"lower lr (now {self.spec.lr:g}) or check the data."
                ) from None
            self.clock.step_done()  # train_step ends in a host sync (the loss value), so this is the step's time
            total += loss * len(batch)
            count += len(batch)
            now = time.perf_counter()
            if now - last >= 0.25 or step + 1 == steps:
                last = now
                self.on_progress("train", epoch, step + 1, steps, total / count)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        loss_sum, samples = self.ranks.sum([total, float(count)], self.device)  # over every rank's samples
        return loss_sum / max(samples, 1.0), seconds, int(samples)

    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> EvalResult:
        start = time.perf_counter()
        self.loaded.model.eval()
        shard = self.ranks.shard(len(self.encoded.splits[split]))
        losses, chosen, rejected = [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)]
        bs = self.batch_size
        blocks = [torch.arange(lo, min(lo + bs, shard.stop)) for lo in range(shard.start, shard.stop, bs)]
        for batch in self.encoded.batches(split, blocks, self.device):
            out = self.step_fn(split, batch)
            losses.append(out.losses.float().cpu())
            chosen.append(out.chosen_logps.float().cpu())
            if out.rejected_logps is None:  # SFT trains on chosen only; score rejected for the metrics
                r, _ = blip.answer_logps(
                    self.loaded.model.text_decoder, out.question_embeds, batch.question_mask, *batch.rejected
                )
                rejected.append(r.float().cpu())
            else:
                rejected.append(out.rejected_logps.float().cpu())
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

    def run_epoch(self, epoch: int) -> EpochResult:
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss, seconds, samples = self.train_epoch(epoch)
        ev = self.evaluate("eval")
        if not math.isfinite(ev.loss):
            raise NumericsError(f"the {self.spec.method} eval loss became non-finite after epoch {epoch}.")
        self.scheduler.step()
        is_best = ev.loss < self.best_loss
        if is_best:
            self.best_loss, self.best_epoch = ev.loss, epoch
        return EpochResult(epoch, train_loss, seconds, samples, lr, ev, is_best)

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
            out += blip.greedy_answers(
                self.loaded,
                batch.pixel_values,
                batch.question_ids,
                batch.question_mask,
                self.spec.max_answer_tokens,
                question_embeds=batch.question_embeds,
            )
            self.on_progress("generate", 0, i + 1, steps, None)
        return [answer for part in self.ranks.gather(out) for answer in part]
