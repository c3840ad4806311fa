"""`vqabench models`: every family and built-in variant listed, with parameter counts built on the meta device."""

from __future__ import annotations

import dataclasses
import re

import pytest

from vqabench import catalog
from vqabench.cli import main
from vqabench.models.registry import FAMILY_MODULES, variants


@pytest.fixture(scope="module")
def listing() -> str:
    return catalog.catalog_text()


def _variant_line(text: str, name: str) -> str:
    lines = [line for line in text.splitlines() if line.split(" ", 1)[0] == name]
    assert len(lines) == 1, (name, lines)
    return lines[0]


def test_the_command_lists_every_family_and_model_type(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for model_type in FAMILY_MODULES:
        assert re.search(rf"\b{re.escape(model_type)}\b", out), model_type
    for name, variant in variants().items():
        line = _variant_line(out, name)
        assert variant.family in line and ("real size" if variant.real_size else "tiny") in line


def test_every_variant_row_has_a_count_or_its_error(listing):
    for name in variants():
        line = _variant_line(listing, name)
        assert re.search(r"\d[\d,]* \(\d+(\.\d+)?[MB]?\)$", line) or re.search(r"n/a: .+\.$", line), line


def test_the_embedded_count_matches_a_real_build(listing):
    import torch

    from vqabench.models.parts import count_parameters

    torch.manual_seed(0)
    real = count_parameters(variants()["embedded-init"].build(0, None, None).model)[1]
    assert 1_000_000 < real < 3_000_000  # the embedded small BLIP
    assert f" {real:,} (" in _variant_line(listing, "embedded-init")


def test_a_real_size_count_is_the_architectures_size(listing):
    line = _variant_line(listing, "blip-vqa-base-random")
    count = int(re.search(r"([\d,]+) \(", line).group(1).replace(",", ""))
    assert 300e6 < count < 450e6  # ViT-B/16 and two BERT-base text towers, as Salesforce/blip-vqa-base


def test_a_variant_that_fails_to_build_shows_its_error_in_its_row(monkeypatch, capsys):
    def broken(seed, texts, tokenizer):
        raise ValueError("config says no\nsecond line")

    found = variants()
    found["embedded-init"] = dataclasses.replace(found["embedded-init"], build=broken)
    monkeypatch.setattr(catalog, "variants", lambda: found)
    assert main(["models"]) == 0
    line = _variant_line(capsys.readouterr().out, "embedded-init")
    assert line.endswith("n/a: ValueError: config says no.") and "second line" not in line
