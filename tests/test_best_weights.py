"""The best epoch's weights: only the trainable parameters are kept, and restoring them is exact."""

from __future__ import annotations

import torch
from torch import nn

from vqabench.engine.best_weights import BestWeights
from vqabench.models import blip, lora, parts
from vqabench.spec import RunSpec


def test_only_trainable_parameters_are_kept_and_restored_exactly():
    part = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    part[0].requires_grad_(False)
    best = BestWeights(part)
    assert not best.restore()  # nothing kept yet: the weights stay as they are
    best.keep()
    assert set(best.state or {}) == {"1.weight", "1.bias"}
    assert best.nbytes == (3 * 2 + 2) * 4
    kept = {n: p.detach().clone() for n, p in part.named_parameters()}
    with torch.no_grad():
        for p in part[1].parameters():
            p.add_(1.0)  # a later, worse epoch
    assert best.restore()
    assert all(torch.equal(p, kept[n]) for n, p in part.named_parameters())
    assert best.state is not None and best.state["1.weight"].device.type == "cpu"


def test_with_lora_only_the_adapters_are_kept():
    loaded = blip.build_embedded(seed=0)
    spec = RunSpec(name="sft", method="sft", train="lora")
    lora.attach(loaded, spec)
    decoder = parts.trainable_part(loaded, "lora")
    best = BestWeights(decoder)
    best.keep()
    adapters = {n: p for n, p in decoder.named_parameters() if "lora_" in n}
    assert adapters and set(best.state or {}) == set(adapters)
    assert best.nbytes == sum(p.numel() * p.element_size() for p in adapters.values())
    assert best.nbytes < sum(p.numel() * p.element_size() for p in decoder.parameters()) // 5
    kept = {n: p.detach().clone() for n, p in decoder.named_parameters()}
    with torch.no_grad():
        for p in adapters.values():
            p.add_(0.5)
    best.restore()
    assert all(torch.equal(p, kept[n]) for n, p in decoder.named_parameters())
