"""Numerical tests of the alignment losses: hand-computed values, limits, stability, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqabench import spec
from vqabench.objectives import (
    OBJECTIVE_INPUTS,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    log1mexp,
    orpo_log_odds_ratio,
    orpo_loss,
    preference_accuracy,
    reward_margins,
    sft_loss,
    simpo_loss,
)

TOL = 1e-6


def t(*values: float, dtype: torch.dtype = torch.float64, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def softplus(z: float) -> float:
    """-log σ(-z) = log(1 + e^z), for writing the expected values by hand."""
    return math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --- hand-computed values -------------------------------------------------------------


def test_sft_loss_is_token_mean_nll():
    loss = sft_loss(t(-2.0, -0.3), torch.tensor([4, 1]))
    assert loss.tolist() == pytest.approx([2.0 / 4, 0.3 / 1], abs=TOL)


def test_dpo_loss_matches_hand_computation():
    loss = dpo_loss(t(-1.0, -4.0), t(-3.0, -1.0), t(-1.5, -2.0), t(-2.0, -2.0), beta=0.1)
    # h = (pc - pr) - (rc - rr): (2.0 - 0.5) = 1.5 and (-3.0 - 0.0) = -3.0; loss = log(1 + e^(-βh))
    assert loss.tolist() == pytest.approx([softplus(-0.1 * 1.5), softplus(-0.1 * -3.0)], abs=TOL)


def test_orpo_loss_matches_hand_computation():
    loss = orpo_loss(t(-1.2), t(-4.5), torch.tensor([2]), torch.tensor([3]), lam=0.5)
    a_c, a_r = -1.2 / 2, -4.5 / 3
    log_odds = (a_c - a_r) - (math.log(1 - math.exp(a_c)) - math.log(1 - math.exp(a_r)))
    expected = -a_c + 0.5 * softplus(-log_odds)
    assert loss.item() == pytest.approx(expected, abs=TOL)


def test_ipo_loss_matches_hand_computation():
    loss = ipo_loss(t(-2.0), t(-6.0), t(-3.0), t(-4.0), torch.tensor([2]), torch.tensor([3]), beta=0.1)
    h = (-2.0 / 2 - -6.0 / 3) - (-3.0 / 2 - -4.0 / 3)  # = 7/6
    assert loss.item() == pytest.approx((h - 1 / (2 * 0.1)) ** 2, abs=TOL)


def test_simpo_loss_matches_hand_computation():
    loss = simpo_loss(t(-1.0, -3.0), t(-3.0, -1.0), torch.tensor([2, 3]), torch.tensor([2, 1]), beta=2.0, gamma=1.0)
    z1 = 2.0 * (-1.0 / 2 - -3.0 / 2) - 1.0
    z2 = 2.0 * (-3.0 / 3 - -1.0 / 1) - 1.0
    assert loss.tolist() == pytest.approx([softplus(-z1), softplus(-z2)], abs=TOL)


def test_kto_loss_matches_hand_computation():
    loss = kto_loss(
        t(-1.0),
        t(-3.0),
        t(-1.5),
        t(-2.5),
        kl=torch.tensor(0.2, dtype=torch.float64),
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.33,
    )
    r_c, r_r = -1.0 - -1.5, -3.0 - -2.5
    expected = 1.0 * (1 - sigmoid(0.1 * (r_c - 0.2))) + 1.33 * (1 - sigmoid(0.1 * (0.2 - r_r)))
    assert loss.item() == pytest.approx(expected, abs=TOL)


def test_kto_kl_estimate_is_mean_policy_minus_reference():
    kl = kto_kl_estimate(t(-1.0, -2.0, -3.0), t(-1.5, -2.2, -2.9))
    assert kl.item() == pytest.approx((0.5 + 0.2 - 0.1) / 3, abs=TOL)
    assert kl.dim() == 0


def test_kto_kl_estimate_over_processes_is_the_mean_of_the_global_batch():
    # Two processes hold unequal shares of one batch; `total` stands in for the all-reduce.
    policy, reference = t(-1.0, -2.0, -3.0, -4.0, -0.5), t(-1.5, -2.2, -2.9, -4.4, -1.4)
    shares = [(policy[:3], reference[:3]), (policy[3:], reference[3:])]
    sent: list[torch.Tensor] = []
    for p, r in shares:
        kto_kl_estimate(p, r, total=lambda x: sent.append(x) or x)
    summed = sent[0] + sent[1]
    per_process = [kto_kl_estimate(p, r, total=lambda _: summed).item() for p, r in shares]
    whole = kto_kl_estimate(policy, reference).item()
    assert whole == pytest.approx((0.5 + 0.2 - 0.1 + 0.4 + 0.9) / 5, abs=TOL)
    assert per_process == pytest.approx([whole, whole], abs=TOL)
    assert kto_kl_estimate(*shares[0]).item() != pytest.approx(whole, abs=0.1)  # a share's own mean is not it


# --- limiting cases -------------------------------------------------------------------


def test_dpo_loss_is_log2_when_policy_equals_reference():
    generator = torch.Generator().manual_seed(0)
    policy_c, policy_r = (torch.randn(6, dtype=torch.float64, generator=generator) * 3 - 5 for _ in range(2))
    loss = dpo_loss(policy_c, policy_r, policy_c.clone(), policy_r.clone(), beta=0.1)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)), atol=TOL)


def test_ipo_loss_is_zero_at_target_margin():
    beta, two = 0.1, torch.tensor([2])
    # averages: policy -1 vs -10 (margin 9), reference -2 vs -6 (margin 4): h = 5 = 1/(2β)
    at_target = ipo_loss(t(-2.0), t(-20.0), t(-4.0), t(-12.0), two, two, beta=beta)
    assert at_target.item() == pytest.approx(0.0, abs=TOL)
    # policy rejected -8 instead: h = 3, two short of the target
    short = ipo_loss(t(-2.0), t(-16.0), t(-4.0), t(-12.0), two, two, beta=beta)
    assert short.item() == pytest.approx((3 - 5) ** 2, abs=TOL)


def test_simpo_loss_is_log2_at_equal_averages_and_zero_margin():
    loss = simpo_loss(t(-2.0, -0.5), t(-3.0, -1.5), torch.tensor([2, 1]), torch.tensor([3, 3]), beta=2.0, gamma=0.0)
    assert torch.allclose(loss, torch.full_like(loss, math.log(2)), atol=TOL)


def test_orpo_loss_adds_lam_log2_at_equal_averages():
    loss = orpo_loss(t(-1.0), t(-2.0), torch.tensor([1]), torch.tensor([2]), lam=0.3)
    assert loss.item() == pytest.approx(1.0 + 0.3 * math.log(2), abs=TOL)


def test_kto_kl_estimate_is_detached_and_clamped_at_zero():
    policy = t(-3.0, -4.0, grad=True)
    reference = t(-1.0, -1.0, grad=True)
    kl = kto_kl_estimate(policy, reference)
    assert kl.item() == 0.0
    assert not kl.requires_grad
    positive = kto_kl_estimate(reference, policy)
    assert positive.item() == pytest.approx(2.5, abs=TOL)
    assert not positive.requires_grad


# --- ORPO stability -------------------------------------------------------------------

# -1e-6 is a float16 subnormal: unclamped, its gradient (about 1/|a| = 1e6) overflows float16.
NEAR_CERTAIN = [0.0, -1e-30, -1e-9, -1e-6, -1e-4, -1e4]
LOW_PRECISION = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("extreme", NEAR_CERTAIN)
@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_orpo_loss_is_finite_with_finite_grads_when_model_is_certain(dtype, extreme, side):
    ordinary = -2.3 if side == "chosen" else -0.05
    first_chosen, first_rejected = (extreme, ordinary) if side == "chosen" else (ordinary, extreme)
    chosen = torch.tensor([first_chosen, -0.7], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([first_rejected, -1.9], dtype=dtype, requires_grad=True)
    ones = torch.ones(2, dtype=torch.long)
    loss = orpo_loss(chosen, rejected, ones, ones, lam=1.0)
    assert loss.shape == (2,)
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert chosen.grad.dtype == dtype
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def naive_orpo_loss(chosen, rejected, lam):
    """The formula as usually written, log(1 - exp(a)), which the stable version replaces."""
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    return -chosen - lam * F.logsigmoid(log_odds)


@pytest.mark.parametrize("dtype,extreme", [(torch.float32, 0.0), (torch.float32, -1e-9), (torch.float16, -1e-4)])
def test_naive_orpo_fails_where_the_stable_one_holds(dtype, extreme):
    def run(loss_fn):
        chosen = torch.tensor([extreme], dtype=dtype, requires_grad=True)
        rejected = torch.tensor([-2.3], dtype=dtype, requires_grad=True)
        loss = loss_fn(chosen, rejected)
        loss.sum().backward()
        return all(torch.isfinite(x).all() for x in (loss, chosen.grad, rejected.grad))

    one = torch.ones(1)
    assert not run(lambda c, r: naive_orpo_loss(c, r, lam=1.0))
    assert run(lambda c, r: orpo_loss(c, r, one, one, lam=1.0))


def test_orpo_log_odds_agree_with_the_naive_formula_where_it_is_accurate():
    chosen, rejected = t(-0.2, -1.0, -5.0), t(-3.0, -0.9, -0.01)
    ones = torch.ones(3)
    naive = (chosen - rejected) - (torch.log(1 - torch.exp(chosen)) - torch.log(1 - torch.exp(rejected)))
    assert torch.allclose(orpo_log_odds_ratio(chosen, rejected, ones, ones), naive, atol=1e-9)


def test_orpo_computes_in_float32_for_half_inputs():
    chosen = torch.tensor([-0.01, -0.5], dtype=torch.bfloat16)
    rejected = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16)
    assert orpo_loss(chosen, rejected, torch.ones(2), torch.ones(2), lam=0.5).dtype == torch.float32


# --- log1mexp -------------------------------------------------------------------------


def exact_log1mexp(x: float) -> float:
    return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))


def test_log1mexp_matches_exact_values_on_both_branches():
    xs = [-1e-12, -1e-6, -0.01, -0.5, -math.log(2) + 1e-9, -math.log(2) - 1e-9, -1.0, -5.0, -30.0, -700.0]
    got = log1mexp(t(*xs)).tolist()
    for x, value in zip(xs, got, strict=True):
        assert value == pytest.approx(exact_log1mexp(x), rel=1e-12, abs=0.0)


def test_log1mexp_is_finite_at_zero_and_equals_log_eps():
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(1, dtype=dtype, requires_grad=True)
        y = log1mexp(x)
        y.backward()
        assert y.item() == pytest.approx(math.log(torch.finfo(dtype).eps), rel=1e-6)
        assert torch.isfinite(x.grad).all()


def test_log1mexp_gradient_is_finite_near_zero_with_a_tiny_eps():
    # exp(-1e-9) rounds to 1 in float32: the unused far branch must not leak NaN into the gradient
    x = torch.full((3,), -1e-9, dtype=torch.float32, requires_grad=True)
    y = log1mexp(x, eps=1e-30)
    y.sum().backward()
    assert y.tolist() == pytest.approx([math.log(1e-9)] * 3, rel=1e-6)
    assert x.grad.tolist() == pytest.approx([-1e9] * 3, rel=1e-4)  # d/dx = -1/(exp(-x) - 1)


def test_log1mexp_gradient_matches_finite_differences():
    x = t(-1e-3, -0.3, -0.69, -0.7, -2.0, -40.0, grad=True)
    assert torch.autograd.gradcheck(log1mexp, (x,))


# --- gradients, shapes, detachment ----------------------------------------------------


def pairwise_losses(pc, pr, rc, rr, lengths):
    kl = torch.tensor(0.0, dtype=pc.dtype)
    return {
        "dpo": dpo_loss(pc, pr, rc, rr, beta=0.1),
        "ipo": ipo_loss(pc, pr, rc, rr, lengths, lengths, beta=0.1),
        "kto": kto_loss(pc, pr, rc, rr, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
        "orpo": orpo_loss(pc, pr, lengths, lengths, lam=0.5),
        "simpo": simpo_loss(pc, pr, lengths, lengths, beta=2.0, gamma=1.0),
    }


@pytest.mark.parametrize("method", ["dpo", "ipo", "kto", "orpo", "simpo"])
def test_gradient_pushes_chosen_up_and_rejected_down(method):
    pc, pr = t(-2.0, -1.0, -4.0, grad=True), t(-2.5, -1.0, -3.0, grad=True)
    rc, rr = t(-2.0, -1.0, -4.0), t(-2.5, -1.0, -3.0)  # reference = policy, so IPO's h = 0 < 1/(2β)
    pairwise_losses(pc, pr, rc, rr, torch.tensor([2, 1, 3]))[method].mean().backward()
    assert (pc.grad < 0).all(), pc.grad  # gradient descent raises the chosen log-prob
    assert (pr.grad > 0).all(), pr.grad  # and lowers the rejected one


def test_dpo_gradient_equals_the_analytic_form():
    beta = 0.5
    pc, pr = t(-1.0, grad=True), t(-2.0, grad=True)
    dpo_loss(pc, pr, t(-1.5), t(-1.7), beta=beta).sum().backward()
    h = (-1.0 - -2.0) - (-1.5 - -1.7)
    assert pc.grad.item() == pytest.approx(-beta * sigmoid(-beta * h), abs=TOL)
    assert pr.grad.item() == pytest.approx(beta * sigmoid(-beta * h), abs=TOL)


@pytest.mark.parametrize("method", ["dpo", "ipo", "kto"])
def test_reference_log_probs_receive_no_gradient(method):
    pc, pr = t(-2.0, -1.0, grad=True), t(-2.5, -3.0, grad=True)
    rc, rr = t(-2.1, -1.2, grad=True), t(-2.4, -2.0, grad=True)
    pairwise_losses(pc, pr, rc, rr, torch.tensor([1, 2]))[method].sum().backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad is not None


def test_every_loss_returns_one_value_per_example():
    batch = 5
    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(batch, generator=generator) - 3 for _ in range(4))
    lengths = torch.randint(1, 4, (batch,), generator=generator)
    for method, loss in pairwise_losses(pc, pr, rc, rr, lengths).items():
        assert loss.shape == (batch,), method
    assert sft_loss(pc, lengths).shape == (batch,)


def test_reward_margins_and_preference_accuracy():
    margins = reward_margins(t(-1.0, -2.0, -3.0, -1.0), t(-2.0, -1.0, -3.0, -4.0))
    assert margins.tolist() == pytest.approx([1.0, -1.0, 0.0, 3.0])
    assert preference_accuracy(margins) == pytest.approx(0.5)  # the tie counts as not preferred
    with_ref = reward_margins(t(-1.0), t(-2.0), t(-0.5), t(-2.5))
    assert with_ref.item() == pytest.approx(1.0 - 2.0)
    with pytest.raises(ValueError):
        reward_margins(t(-1.0), t(-2.0), t(-0.5), None)


def test_registry_covers_every_method_and_matches_the_spec():
    assert set(OBJECTIVE_INPUTS) == set(spec.METHODS)
    assert {m for m, needs in OBJECTIVE_INPUTS.items() if needs.needs_reference} == spec.REFERENCE_METHODS
    assert [m for m, needs in OBJECTIVE_INPUTS.items() if needs.needs_mismatched_kl] == ["kto"]
