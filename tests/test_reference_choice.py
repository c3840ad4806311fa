"""reference = "auto": the cheapest exact reference, chosen from plain numbers."""

from __future__ import annotations

import shutil

from vqabench.engine.reference_choice import choose_reference, free_bytes, precomputed_table_bytes

GIB = 2**30


def test_auto_precomputes_a_run_of_two_or_more_epochs_whose_table_fits():
    for train in ("decoder", "lora", "all"):
        choice = choose_reference("auto", train=train, epochs=3, table_bytes=10_000, free=GIB)
        assert (choice.asked, choice.chosen, choice.why) == ("auto", "precompute", "3 epochs, table fits")
    assert choose_reference("auto", train="decoder", epochs=2, table_bytes=GIB, free=GIB).chosen == "precompute"


def test_auto_keeps_the_adapter_under_lora_when_precompute_does_not_pay_or_fit():
    one_epoch = choose_reference("auto", train="lora", epochs=1, table_bytes=10_000, free=GIB)
    assert (one_epoch.chosen, one_epoch.why) == ("adapter", "LoRA, 1 epoch")
    full_disk = choose_reference("auto", train="lora", epochs=3, table_bytes=GIB + 1, free=GIB)
    assert (full_disk.chosen, full_disk.why) == ("adapter", "LoRA, table does not fit")


def test_auto_falls_back_to_the_copy_otherwise():
    one_epoch = choose_reference("auto", train="decoder", epochs=1, table_bytes=10_000, free=GIB)
    assert (one_epoch.chosen, one_epoch.why) == ("copy", "1 epoch")
    full_disk = choose_reference("auto", train="all", epochs=4, table_bytes=10_000, free=9_999)
    assert (full_disk.chosen, full_disk.why) == ("copy", "table does not fit")


def test_a_named_strategy_is_kept_as_asked():
    for asked in ("copy", "precompute", "adapter"):
        choice = choose_reference(asked, train="lora", epochs=5, table_bytes=10_000, free=GIB)
        assert (choice.asked, choice.chosen) == (asked, asked)
        assert choice.label() == asked
    auto = choose_reference("auto", train="decoder", epochs=3, table_bytes=1, free=GIB)
    assert auto.label() == "precompute (auto: 3 epochs, table fits)"
    assert auto.to_dict() == {"asked": "auto", "chosen": "precompute", "why": "3 epochs, table fits"}


def test_the_table_estimate_is_three_float32_columns_per_pair_plus_framing():
    # chosen, rejected and KTO's mismatched log-probs, float32 each: 12 bytes a pair
    assert precomputed_table_bytes(1_000_000) - precomputed_table_bytes(0) == 12_000_000
    assert 0 < precomputed_table_bytes(0) <= 2**20


def test_the_estimate_covers_the_table_precompute_writes(tmp_path):
    import torch

    for train, evals in ((10, 4), (50_000, 2_000)):
        table = {
            split: {name: torch.randn(n) for name in ("chosen", "rejected", "mismatched")}
            for split, n in (("train", train), ("eval", evals))
        }
        torch.save(table, tmp_path / "table.pt")
        written = (tmp_path / "table.pt").stat().st_size
        assert 12 * (train + evals) <= written <= precomputed_table_bytes(train + evals)


def test_free_bytes_reads_the_nearest_existing_folder(tmp_path):
    not_yet = tmp_path / "cache" / "vqabench"
    # other processes write to the same disk meanwhile
    assert abs(free_bytes(not_yet) - shutil.disk_usage(tmp_path).free) < 64 * 2**20
    assert not not_yet.exists()  # looking does not create it
