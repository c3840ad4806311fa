"""LoRA through peft, the adapter reference, and mixed precision: numbers, checkpoints, refusals."""

from __future__ import annotations

import re

import pytest
import torch

from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.precision import Precision, check_precision
from vqabench.engine.reference import AdapterReference, CopyReference, PrecomputedReference
from vqabench.engine.trainer import MethodStep, Trainer
from vqabench.models import blip, checkpoints, lora, parts
from vqabench.models.family import LoadedModel
from vqabench.spec import DatasetSpec, RunSpec, SpecError

CPU = torch.device("cpu")
#: Seconds a tiny worker run may take: seconds on an idle machine, minutes on a shared, loaded one.
LOADED = 900


@pytest.fixture(scope="module")
def data():
    splits = easyvqa.load_splits(DatasetSpec(eval_size=16, test_size=8), seed=0, limit=24)
    return splits, encode(splits, blip.build_embedded(seed=0), 32, 16)


def fresh() -> LoadedModel:
    loaded = blip.build_embedded(seed=0)
    loaded.model.eval()
    return loaded


def perturb_adapters(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move the adapters off zero (peft starts lora_B at 0), so the policy differs from its start."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def chosen_logps(loaded: LoadedModel, batch) -> torch.Tensor:
    with torch.no_grad():
        q = blip.encode_questions(loaded.model, batch.pixel_values, batch.question_ids, batch.question_mask)
        return blip.answer_logps(loaded.model.text_decoder, q, batch.question_mask, *batch.chosen)[0]


def lora_spec(method: str = "dpo", **changes) -> RunSpec:
    return RunSpec(name=method, method=method, init_checkpoint="x", train="lora", batch_size=8, **changes)


def test_adapter_reference_gives_the_starting_models_logps(data):
    _, encoded = data
    loaded = fresh()
    batch = encoded.batch("train", torch.arange(8), CPU)
    start = chosen_logps(loaded, batch)
    lora.attach(loaded, lora_spec())
    perturb_adapters(loaded.model)
    parts.set_train_mode(loaded, "lora")  # training: LoRA's and the decoder's dropout are live
    with torch.no_grad():
        q = blip.encode_questions(loaded.model, batch.pixel_values, batch.question_ids, batch.question_mask)
        ref = AdapterReference(loaded).logps(encoded, "train", batch, q, with_mismatched=True)
    torch.testing.assert_close(ref.chosen, start, atol=1e-5, rtol=0)
    assert loaded.model.text_decoder.training  # the policy's mode is restored
    loaded.model.eval()
    policy = chosen_logps(loaded, batch)
    assert (policy - start).abs().max() > 1e-3  # the adapters do change the policy
    assert AdapterReference(loaded).resident_bytes == 0 and ref.mismatched is not None


def test_copy_precompute_and_adapter_references_give_the_same_dpo_loss_with_lora(data, tmp_path):
    splits, encoded = data
    loaded = fresh()
    copy_ref = CopyReference(loaded, "lora")
    pre_ref = PrecomputedReference.build(
        loaded,
        encoded,
        batch_size=8,
        device=CPU,
        cache_dir=tmp_path,
        checkpoint_key="k",
        data_key=splits.fingerprint,
        precision="fp32",
    )
    spec = lora_spec()
    lora.attach(loaded, spec)
    perturb_adapters(loaded.model)
    loaded.model.eval()
    batch = encoded.batch("train", torch.tensor([3, 0, 7, 11, 5]), CPU)
    with torch.no_grad():
        losses = [
            MethodStep(spec, loaded, encoded, ref)("train", batch).losses
            for ref in (copy_ref, pre_ref, AdapterReference(loaded))
        ]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[0], losses[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(losses[0], torch.full_like(losses[0], 0.6931), atol=1e-4)


def test_only_the_adapters_train_and_the_optimizer_state_is_measured(data):
    _, encoded = data
    loaded = fresh()
    spec = lora_spec("sft", lr=1e-2)
    lora.attach(loaded, spec)
    trainer = Trainer(spec, loaded, encoded, None, CPU)
    trainable = [(n, p) for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert {n.split(".text_decoder.")[0] for n, _ in trainable} == {"base_model.model"}  # decoder only
    frozen = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable}
    parts.set_train_mode(loaded, "lora")
    trainer.train_step(encoded.batch("train", torch.arange(8), CPU))
    assert all(torch.equal(p, frozen[n]) for n, p in loaded.model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in trainable)
    n_trainable = sum(p.numel() for _, p in trainable)
    # AdamW keeps two fp32 moments per trained value, plus a scalar step per tensor.
    assert trainer.optimizer_state_bytes == 2 * 4 * n_trainable + 4 * len(trainable)
    assert n_trainable < sum(p.numel() for p in loaded.model.text_decoder.parameters()) // 5


def test_lora_dropout_follows_the_spec_while_the_models_own_dropout_is_off(data):
    _, encoded = data
    loaded = fresh()
    spec = lora_spec("dpo", lora_dropout=0.05)
    assert spec.disable_dropout  # the default
    lora.attach(loaded, spec)  # the run's order: adapters first, then the trainer disables dropout
    Trainer(spec, loaded, encoded, AdapterReference(loaded), CPU)
    dropouts = {n: m.p for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Dropout)}
    adapters = {n: p for n, p in dropouts.items() if ".lora_dropout." in n}
    own = {n: p for n, p in dropouts.items() if n not in adapters}
    assert adapters and set(adapters.values()) == {spec.lora_dropout}
    assert own and set(own.values()) == {0.0}


def test_lora_checkpoint_holds_the_adapter_and_loads_back_the_same_logps(data, tmp_path):
    _, encoded = data
    loaded = fresh()
    lora.attach(loaded, lora_spec())
    perturb_adapters(loaded.model)
    loaded.model.eval()
    checkpoints.save_checkpoint(loaded, tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    again = checkpoints.load_pretrained(str(tmp_path / "ckpt"))
    again.model.eval()
    assert "LoRA adapter merged" in again.source
    assert not any("lora_" in n for n, _ in again.model.named_parameters())  # merged into plain weights
    batch = encoded.batch("eval", torch.arange(8), CPU)
    torch.testing.assert_close(chosen_logps(again, batch), chosen_logps(loaded, batch), atol=1e-5, rtol=0)
    assert len(checkpoints.checkpoint_fingerprint(tmp_path / "ckpt")) == 16


def test_lora_targets_matching_no_module_list_the_candidates():
    loaded = fresh()
    with pytest.raises(SpecError, match=r"'lora_targets' has value 'qkv'.*candidates.*attention\.self\.query"):
        lora.attach(loaded, lora_spec(lora_targets=["query", "qkv"]))


def test_default_targets_are_the_decoders_attention_and_feed_forward_projections():
    names = lora.target_modules(fresh().model.text_decoder, list(blip.FAMILY.lora_targets))
    per_layer = {n.split(".", 4)[-1] for n in names}
    assert per_layer == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "crossattention.self.query",
        "crossattention.self.key",
        "crossattention.self.value",
        "crossattention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    assert all(n.startswith("bert.encoder.layer.") for n in names)  # not the LM head


def test_fp16_on_the_cpu_is_refused_in_one_sentence():
    with pytest.raises(SpecError, match=r"^key 'precision' has value 'fp16', which needs a CUDA GPU; [^.]*\.$"):
        check_precision("fp16", CPU)
    check_precision("bf16", CPU)


def test_bf16_on_a_gpu_without_bf16_is_refused_in_one_sentence(monkeypatch):
    # No GPU here: stand in for an old one (a V100 cannot run bfloat16).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(SpecError, match=r"'bf16', but this GPU \(Tesla V100\) does not support bfloat16"):
        check_precision("bf16", torch.device("cuda"))


def test_bf16_keeps_log_probs_and_losses_in_fp32_and_close_to_fp32(data):
    _, encoded = data
    loaded = fresh()
    spec = RunSpec(name="orpo", method="orpo", batch_size=8)
    batch = encoded.batch("train", torch.arange(8), CPU)
    step = MethodStep(spec, loaded, encoded, None)
    with torch.no_grad():
        full = step("train", batch)
        with Precision("bf16", CPU).autocast():
            half = step("train", batch)
    assert half.losses.dtype == torch.float32 and half.chosen_logps.dtype == torch.float32
    torch.testing.assert_close(half.losses, full.losses, atol=0.1, rtol=0.05)
    assert not torch.equal(half.chosen_logps, full.chosen_logps)  # bf16 really ran


def test_orpo_stays_finite_under_bf16_when_the_model_is_certain(data):
    _, encoded = data
    loaded = fresh()
    spec = RunSpec(name="orpo", method="orpo", batch_size=8)
    batch = encoded.batch("train", torch.arange(8), CPU)
    decoder = loaded.model.text_decoder
    seen: dict[str, torch.Tensor] = {}

    def remember_ids(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"]

    def certain(module, args, logits):  # +200 on every next token: log p rounds to exactly 0
        ids = seen["ids"]
        bonus = torch.zeros_like(logits)
        bonus[:, :-1].scatter_(-1, ids[:, 1:].unsqueeze(-1), 200.0)
        return logits + bonus

    hooks = [
        decoder.register_forward_pre_hook(remember_ids, with_kwargs=True),
        decoder.cls.register_forward_hook(certain),
    ]
    try:
        with Precision("bf16", CPU).autocast():
            out = MethodStep(spec, loaded, encoded, None)("train", batch)
        loss = out.losses.mean()
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert bool((out.chosen_logps == 0).all()) and bool((out.rejected_logps == 0).all())
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)


def preset_spec(name: str, **changes) -> dict:
    """A packaged LoRA preset shrunk to the tests' tiny size (the keys the tests share)."""
    from conftest import TINY

    from vqabench.presets import load_presets

    spec = next(s for s in load_presets(name) if s.name == name).to_dict()
    spec = {k: v for k, v in spec.items() if v is not None}  # run_worker fills in cache and output folders
    for key, value in {**TINY, **changes}.items():
        if isinstance(value, dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return spec


def test_lora_presets_sft_then_dpo_with_adapter_reference_run_end_to_end(vqa_cache, tmp_path):
    from conftest import of_type, run_worker

    from vqabench import events as ev

    events, rc, err = run_worker(preset_spec("lora-sft", after=None), tmp_path, vqa_cache, timeout=LOADED)
    assert rc == 0, err[-2000:]
    started = of_type(events, ev.RunStarted)[0]
    assert (started.train, started.precision, started.reference_strategy) == ("lora", "fp32", None)
    assert 0 < started.trainable_params < started.total_params // 10
    assert started.data["trainable_bytes"] == 4 * started.trainable_params
    ends = of_type(events, ev.EpochEnded)
    assert ends and all(
        e.optimizer_state_bytes and e.optimizer_state_bytes > 8 * started.trainable_params for e in ends
    )
    checkpoint = events[-1].checkpoint
    assert (tmp_path / "out" / "lora-sft" / "best" / "adapter_model.safetensors").is_file()

    dpo = preset_spec("lora-dpo", after=None, init_checkpoint=checkpoint)
    events, rc, err = run_worker(dpo, tmp_path, vqa_cache, timeout=LOADED)
    assert rc == 0, err[-2000:]
    started = of_type(events, ev.RunStarted)[0]
    assert (started.train, started.reference_strategy, started.reference_bytes) == ("lora", "adapter", 0)
    # the preset asks for auto; one epoch would not repay a precompute pass, so LoRA keeps the adapter
    assert started.data["reference_choice"] == {"asked": "auto", "chosen": "adapter", "why": "LoRA, 1 epoch"}
    assert "LoRA adapter merged" in started.data["model_source"]  # SFT's adapter is in the start weights
    ends = of_type(events, ev.EpochEnded)
    assert all(e.reference_bytes == 0 for e in ends) and isinstance(events[-1], ev.RunFinished)
    # At the start the policy is its reference: DPO's first-step loss is log 2, so the run's eval loss is near it.
    assert abs(ends[0].eval_loss - 0.6931) < 0.05


def test_lora_orpo_in_bf16_runs_end_to_end(vqa_cache, tmp_path):
    from conftest import of_type, run_worker

    from vqabench import events as ev

    events, rc, err = run_worker(preset_spec("lora-orpo", precision="bf16"), tmp_path, vqa_cache, timeout=LOADED)
    assert rc == 0, err[-2000:]
    started = of_type(events, ev.RunStarted)[0]
    assert (started.train, started.precision, started.config["precision"]) == ("lora", "bf16", "bf16")
    assert isinstance(events[-1], ev.RunFinished) and of_type(events, ev.Evaluated)[0].n == 32
    # The frozen Linears were stored in bf16 (exact under autocast): named with the bytes it saved,
    # at most half the frozen weights (the run trains adapters only, so nearly all are frozen).
    low = started.data["low_frozen_weights"]
    assert low["dtype"] == "bf16" and 0 < low["bytes_saved"] < 4 * started.total_params / 2


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"lora_targets": ["qkv"]}, r"^key 'lora_targets' has value 'qkv', which matches no module .*candidates"),
        ({"precision": "fp16"}, r"^key 'precision' has value 'fp16', which needs a CUDA GPU"),
    ],
)
def test_lora_runs_the_device_or_model_refuses_fail_in_one_sentence(changes, message, vqa_cache, tmp_path):
    from conftest import of_type, run_worker

    from vqabench import events as ev

    events, rc, _ = run_worker(preset_spec("lora-orpo", **changes), tmp_path, vqa_cache, timeout=LOADED)
    failed = of_type(events, ev.RunFailed)
    assert rc == 1 and len(failed) == 1 and failed[0].error_kind == "config"
    assert "\n" not in failed[0].message and failed[0].message.endswith(".")
    assert re.search(message, failed[0].message)
