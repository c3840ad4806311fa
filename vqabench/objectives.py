"""Preference-alignment losses on per-sequence log-probabilities, one value per example.

Every loss takes summed answer log-probs (and answer token counts where it length-averages)
as tensors of shape ``[batch]`` and returns per-example losses of shape ``[batch]``; the
trainer takes the mean. Losses are computed in float32 (float64 when given float64), so
bf16/fp16 log-probs do not lose the small differences the objectives depend on.
Reference log-probs and the KTO KL estimate are detached: no gradient reaches the reference.
Formulas, papers and defaults: docs/objectives.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_LN_HALF = -math.log(2.0)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision the losses run in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _resolution_eps(*tensors: Tensor) -> float:
    """Largest machine epsilon among the floating inputs (float32's for non-float inputs)."""
    return max(torch.finfo(t.dtype if t.is_floating_point() else torch.float32).eps for t in tensors)


def log1mexp(x: Tensor, eps: float | None = None) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x (Mächler 2012).

    x is first clamped to at most ``-eps`` (default: machine epsilon of x's dtype) so that
    x = 0 (a model certain of its answer) gives the large finite log(eps) instead of -inf,
    and the gradient, -1/(exp(-x) - 1), stays bounded by about 1/eps.
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    x = x.clamp(max=-eps)
    near_zero = x > _LN_HALF
    near = torch.log(-torch.expm1(x))  # finite for every x <= -eps
    # The far branch would give -inf (and a NaN gradient through torch.where) near 0, so it
    # is fed a harmless value wherever the near branch is the one selected.
    far = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, _LN_HALF - 1.0), x)))
    return torch.where(near_zero, near, far)


def sft_loss(
    chosen_logps: Tensor,
    chosen_lengths: Tensor,
    label_smoothing: float = 0.0,
    chosen_vocab_logps: Tensor | None = None,
) -> Tensor:
    """Token-mean negative log-likelihood of the chosen answer, per example.

    With ``label_smoothing`` ε > 0 (transformers' VQA loss uses 0.1) each token's target puts ε on the
    uniform distribution, as ``CrossEntropyLoss(label_smoothing=ε)`` does:
    (1 − ε)·(−log p(y)) + ε·(−mean over the vocabulary of log p); ``chosen_vocab_logps`` is that
    vocabulary mean summed over the answer's tokens (:func:`vqabench.engine.model.answer_logps`).
    """
    dtype = _compute_dtype(chosen_logps)
    nll = -chosen_logps.to(dtype)
    if label_smoothing:
        if chosen_vocab_logps is None:
            raise ValueError("sft_loss with label smoothing needs chosen_vocab_logps.")
        nll = (1.0 - label_smoothing) * nll - label_smoothing * chosen_vocab_logps.to(dtype)
    return nll / chosen_lengths.to(dtype)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Sigmoid DPO (Rafailov et al. 2023): -log σ(β·((πc − πr) − (refc − refr)))."""
    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps)
    policy_ratio = policy_chosen_logps.to(dtype) - policy_rejected_logps.to(dtype)
    ref_ratio = ref_chosen_logps.detach().to(dtype) - ref_rejected_logps.detach().to(dtype)
    return -F.logsigmoid(beta * (policy_ratio - ref_ratio))


def orpo_log_odds_ratio(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    average: bool = True,
) -> Tensor:
    """log(odds(chosen) / odds(rejected)) from length-averaged log-probs, numerically stable.

    With a = logp / len, log odds = a − log(1 − exp(a)). Computed in float32/float64 and
    with :func:`log1mexp` clamped at the input dtype's epsilon: a log-prob closer to 0 than
    that is below the resolution of a log-softmax in that dtype. ``average=False`` takes
    a = the summed log-prob instead, as the study's appendix code does.
    """
    eps = _resolution_eps(chosen_logps, rejected_logps)
    dtype = _compute_dtype(chosen_logps, rejected_logps)
    avg_chosen = chosen_logps.to(dtype)
    avg_rejected = rejected_logps.to(dtype)
    if average:
        avg_chosen = avg_chosen / chosen_lengths.to(dtype)
        avg_rejected = avg_rejected / rejected_lengths.to(dtype)
    return (avg_chosen - avg_rejected) - (log1mexp(avg_chosen, eps) - log1mexp(avg_rejected, eps))


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    lam: float,
    average: bool = True,
) -> Tensor:
    """ORPO (Hong et al. 2024): chosen token-mean NLL − λ·log σ(log odds ratio).

    ``average=False``: odds from summed log-probs (the study's code; spec ``orpo_logps = "sum"``).
    """
    log_odds = orpo_log_odds_ratio(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, average)
    nll = -chosen_logps.to(log_odds.dtype) / chosen_lengths.to(log_odds.dtype)
    return nll - lam * F.logsigmoid(log_odds)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
) -> Tensor:
    """IPO (Azar et al. 2023) on length-averaged log-probs: (h − 1/(2β))²."""
    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps)
    len_c = chosen_lengths.to(dtype)
    len_r = rejected_lengths.to(dtype)
    policy_ratio = policy_chosen_logps.to(dtype) / len_c - policy_rejected_logps.to(dtype) / len_r
    ref_ratio = ref_chosen_logps.detach().to(dtype) / len_c - ref_rejected_logps.detach().to(dtype) / len_r
    return (policy_ratio - ref_ratio - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    gamma: float,
) -> Tensor:
    """SimPO (Meng et al. 2024), reference-free: −log σ(β·(avg chosen − avg rejected) − γ)."""
    dtype = _compute_dtype(chosen_logps, rejected_logps)
    avg_chosen = chosen_logps.to(dtype) / chosen_lengths.to(dtype)
    avg_rejected = rejected_logps.to(dtype) / rejected_lengths.to(dtype)
    return -F.logsigmoid(beta * (avg_chosen - avg_rejected) - gamma)


def kto_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024), chosen desirable and rejected undesirable, per pair.

    λD·(1 − σ(β·(r_c − kl))) + λU·(1 − σ(β·(kl − r_r))), r = policy − reference log-prob;
    ``kl`` is the scalar tensor from :func:`kto_kl_estimate` (detached here as well).
    """
    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps)
    reward_chosen = policy_chosen_logps.to(dtype) - ref_chosen_logps.detach().to(dtype)
    reward_rejected = policy_rejected_logps.to(dtype) - ref_rejected_logps.detach().to(dtype)
    kl = torch.as_tensor(kl, dtype=dtype, device=reward_chosen.device).detach()
    return desirable_weight * (1.0 - torch.sigmoid(beta * (reward_chosen - kl))) + undesirable_weight * (
        1.0 - torch.sigmoid(beta * (kl - reward_rejected))
    )


def kto_kl_estimate(
    policy_mismatched_logps: Tensor,
    ref_mismatched_logps: Tensor,
    total: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """KTO's batch KL reference point: mean(policy − ref) on mismatched pairs, ≥ 0, detached.

    The mean is over the global batch: when one step's batch is split over processes, ``total``
    sums a tensor over them (an all-reduce), and the mean is the summed differences over the
    summed row counts, as TRL gathers it. None: this process holds the whole batch.
    """
    dtype = _compute_dtype(policy_mismatched_logps, ref_mismatched_logps)
    diff = policy_mismatched_logps.detach().to(dtype) - ref_mismatched_logps.detach().to(dtype)
    if total is None:
        return diff.mean().clamp(min=0.0)
    rows = torch.tensor(float(diff.numel()), dtype=torch.float64, device=diff.device)
    summed = total(torch.stack([diff.sum().to(torch.float64), rows]))
    return (summed[0] / summed[1]).to(dtype).clamp(min=0.0)


def reward_margins(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
) -> Tensor:
    """Per-pair margin, detached: (πc − refc) − (πr − refr), or πc − πr without a reference."""
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("reward_margins needs both reference log-probs or neither.")
    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps)
    margin = policy_chosen_logps.detach().to(dtype) - policy_rejected_logps.detach().to(dtype)
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        margin = margin - (ref_chosen_logps.detach().to(dtype) - ref_rejected_logps.detach().to(dtype))
    return margin


def preference_accuracy(margins: Tensor) -> float:
    """Share of pairs whose chosen answer scores strictly higher (margin > 0); ties count as wrong."""
    if margins.numel() == 0:
        raise ValueError("preference_accuracy needs at least one pair; got an empty tensor.")
    return float((margins > 0).to(torch.float64).mean().item())


@dataclass(frozen=True)
class ObjectiveInputs:
    """What a method's loss needs from the trainer, so the trainer can skip what it does not."""

    needs_rejected: bool  # score rejected answers in the decoder pass
    needs_reference: bool  # a frozen reference model (SFT checkpoint) and its log-probs
    needs_lengths: bool  # answer token counts (length-averaged log-probs)
    needs_mismatched_kl: bool  # KTO: policy/reference log-probs on mismatched question/answer pairs
    paper: str


OBJECTIVE_INPUTS: dict[str, ObjectiveInputs] = {
    "sft": ObjectiveInputs(
        needs_rejected=False,
        needs_reference=False,
        needs_lengths=True,
        needs_mismatched_kl=False,
        paper="supervised fine-tuning (token-mean NLL)",
    ),
    "dpo": ObjectiveInputs(
        needs_rejected=True,
        needs_reference=True,
        needs_lengths=False,
        needs_mismatched_kl=False,
        paper="Rafailov et al. 2023, arXiv:2305.18290",
    ),
    "orpo": ObjectiveInputs(
        needs_rejected=True,
        needs_reference=False,
        needs_lengths=True,
        needs_mismatched_kl=False,
        paper="Hong et al. 2024, arXiv:2403.07691",
    ),
    "ipo": ObjectiveInputs(
        needs_rejected=True,
        needs_reference=True,
        needs_lengths=True,
        needs_mismatched_kl=False,
        paper="Azar et al. 2023, arXiv:2310.12036",
    ),
    "kto": ObjectiveInputs(
        needs_rejected=True,
        needs_reference=True,
        needs_lengths=False,
        needs_mismatched_kl=True,
        paper="Ethayarajh et al. 2024, arXiv:2402.01306",
    ),
    "simpo": ObjectiveInputs(
        needs_rejected=True,
        needs_reference=False,
        needs_lengths=True,
        needs_mismatched_kl=False,
        paper="Meng et al. 2024, arXiv:2405.14734",
    ),
}
