"""The peak-memory estimate against what one real training step holds, on the CPU.

Weights, gradients, AdamW state and a copy reference are counted exactly, so the estimate must
equal what the trained model, its gradients after backward and the optimizer after its first
step hold. The activation terms are an estimate: they must lie within 2x of the bytes autograd
actually saves during one training forward (every saved tensor's storage once, parameters
excluded), measured with ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import encode
from vqabench.engine.memory_estimate import SAME_SIZE_VARIANTS, estimate_memory, meta_model
from vqabench.engine.prepare import fitting_texts
from vqabench.engine.reference import CopyReference
from vqabench.engine.telemetry import module_bytes, optimizer_state_bytes
from vqabench.engine.trainer import Trainer
from vqabench.models import lora, parts, registry
from vqabench.spec import DatasetSpec, RunSpec, SpecError

CASES = [
    ("embedded", "decoder", "sft", "fp32"),
    ("embedded", "decoder", "dpo", "fp32"),
    ("embedded", "lora", "dpo", "bf16"),
    ("qwen2-vl-tiny-random", "lm", "dpo", "fp32"),  # the shared prompt: one prompt pass, both answers on its cache
    ("qwen2-vl-tiny-random", "lm", "dpo-full-rows", "fp32"),  # shared_prompt off: 2 x batch full rows
    ("qwen2-vl-tiny-random", "lora", "sft", "bf16"),
    ("idefics3-tiny-random", "lm+projector", "orpo", "fp32"),
]


@pytest.fixture(scope="module")
def data():
    return easyvqa.load_splits(DatasetSpec(eval_size=8, test_size=8), seed=0, limit=16)


def _build(name: str, texts: list[str], device: str = "cpu"):
    variant = registry.variant("embedded-init" if name == "embedded" else name)
    assert variant is not None
    with torch.device(device):
        return variant.build(0, texts if variant.needs_texts else None, None)


def _saved_bytes(run, params: list[torch.Tensor]) -> int:
    """Bytes of every distinct storage autograd saves while `run` runs, parameters' own storages excluded."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


@pytest.mark.parametrize(("model", "train", "method", "precision"), CASES)
def test_estimate_matches_one_real_training_step(data, model, train, method, precision) -> None:
    torch.manual_seed(0)
    texts = fitting_texts(data)
    shared = not method.endswith("-full-rows")
    method = method.removesuffix("-full-rows")
    spec = RunSpec(name="p", method=method, model=model, train=train, precision=precision, batch_size=4)
    spec = spec.replace(shared_prompt=shared)
    spec = spec.replace(reference="copy", encoder_cache="off", lora_dropout=0.0)
    loaded = _build(model, texts)
    loaded.savings = dataclasses.replace(loaded.savings, shared_prompt=shared)
    question_limit = 16 if loaded.family.prompts_can_be_cut else loaded.question_token_cap
    encoded = encode(data, loaded, question_limit, 4)
    batch = encoded.batch("train", torch.arange(4), torch.device("cpu"))
    prompt_width = batch.question_ids.shape[1]
    answer_width = max(batch.chosen[0].shape[1], batch.rejected[0].shape[1])
    family = loaded.family
    frame = 0 if family.features_read_question else len(family.prompt_ids(loaded, ""))
    # The estimate gets the batch's own token counts (the worker measures them from the data too).
    spec = spec.replace(max_question_tokens=prompt_width - frame, max_answer_tokens=answer_width - 1)
    predicted = estimate_memory(spec, _build(model, texts, "meta"))

    parts.freeze_for_training(loaded, train)
    reference = CopyReference(loaded, train) if spec.needs_reference else None
    if train == "lora":
        lora.attach(loaded, spec)
    trainer = Trainer(spec, loaded, encoded, reference, torch.device("cpu"))
    parts.set_train_mode(loaded, train)
    params = list({id(p): p for p in loaded.model.parameters()}.values())
    with trainer.precision.autocast():
        saved, out = _saved_bytes(lambda: trainer.step_fn("train", batch), params)
    out.losses.mean().backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    trainer.optimizer.step()

    terms = predicted.terms
    assert terms["weights"] == module_bytes(loaded.model)
    assert terms["gradients"] == grads
    assert terms["optimizer"] == optimizer_state_bytes(trainer.optimizer)
    assert terms["reference"] == (reference.resident_bytes if reference is not None else 0)
    activations = terms["activations"] + terms["logits"] + terms["autocast copies"]
    ratio = activations / saved
    print(f"{model} {train} {method} {precision}: estimated {activations} B, saved {saved} B, ratio {ratio:.2f}")
    assert 0.5 <= ratio <= 2.0


def test_real_size_lora_bf16_estimate_takes_seconds_and_no_memory() -> None:
    spec = RunSpec(name="big", method="dpo", model="qwen2-vl-2b-random", train="lora", precision="bf16", batch_size=8)
    started = time.perf_counter()
    predicted = estimate_memory(spec, meta_model(spec))
    seconds = time.perf_counter() - started
    assert seconds < 60
    # Qwen2-VL-2B holds 2.21B parameters (its released count, tied embeddings once). Under LoRA and
    # bf16 its frozen Linears are stored at 2 bytes; the tied 151936 x 1536 embedding (0.23B), norms
    # and the patch convolution at 4: about 2 * 1.98B + 4 * 0.23B bytes.
    assert 4.4e9 < predicted.terms["weights"] < 5.5e9
    assert 0 < predicted.terms["gradients"] < 0.02 * predicted.terms["weights"]  # adapters only
    assert predicted.terms["optimizer"] == 2 * predicted.terms["gradients"] + 4 * _lora_tensor_count(spec)
    assert predicted.terms["autocast copies"] > 0
    assert 10 < predicted.gib() < 200


def _lora_tensor_count(spec: RunSpec) -> int:
    loaded = meta_model(spec)
    parts.freeze_for_training(loaded, spec.train)
    with torch.device("meta"):
        lora.attach(loaded, spec)
    return sum(1 for n, p in loaded.model.named_parameters() if "lora_" in n)


def test_a_hub_model_without_a_same_sized_variant_is_refused_in_one_sentence() -> None:
    with pytest.raises(SpecError, match="built-in variants"):
        meta_model(RunSpec(name="hub", method="sft", model="Qwen/Qwen2-VL-72B-Instruct"))


def test_each_released_checkpoint_maps_to_the_variant_that_states_its_architecture() -> None:
    for hub_id, name in SAME_SIZE_VARIANTS.items():
        variant = registry.variant(name)
        assert variant is not None and variant.real_size
        stated = variant.description.split("'s architecture")[0]
        assert stated.removesuffix("-Instruct") == hub_id.removesuffix("-Instruct"), hub_id  # Instruct: same sizes


def test_the_shared_prompt_saves_the_second_prompt_pass_in_the_dpo_estimate(data) -> None:
    # One prompt pass per pair instead of two full rows: the estimate drops by the batch's prompt
    # rows through every language-model Linear (q, k, v, o, gate, up: hidden wide; down: intermediate),
    # less the key/value cache repeated for both answers. Answer rows and the LM head are unchanged.
    texts = fitting_texts(data)
    spec = RunSpec(name="p", method="dpo", model="qwen2-vl-tiny-random", train="lm", precision="bf16", batch_size=8)
    spec = spec.replace(reference="precompute", max_question_tokens=32, max_answer_tokens=8)
    on = estimate_memory(spec, _build(spec.model, texts, "meta"))
    off = estimate_memory(spec.replace(shared_prompt=False), _build(spec.model, texts, "meta"))
    loaded = _build(spec.model, texts, "meta")
    text = loaded.model.config.text_config
    hidden, layers, head_dim = text.hidden_size, text.num_hidden_layers, text.hidden_size // text.num_attention_heads
    prompt = len(loaded.family.prompt_ids(loaded, "")) + 32  # the image's tokens and chat frame, and the question
    linear_inputs = layers * (6 * hidden + text.intermediate_size)
    kv_width = layers * 2 * text.num_key_value_heads * head_dim
    batch, bf16 = 8, 2
    second_prompt_pass = 2.0 * batch * prompt * linear_inputs * bf16  # ACTIVATION_FACTOR 2 of the saved inputs
    repeated_cache = 2 * batch * prompt * kv_width * bf16
    assert off.total - on.total == pytest.approx(second_prompt_pass - repeated_cache, abs=1)
    assert {k: v for k, v in on.terms.items() if k != "activations"} == {
        k: v for k, v in off.terms.items() if k != "activations"
    }
    assert any(note.startswith(f"shared prompt: {prompt} tokens x 8 rows") for note in on.assumptions)
    assert any(note.startswith(f"sequence {prompt + 9} tokens x 16 rows") for note in off.assumptions)
    # Every column's logits (answer_only_logits off): the prompt pass's and both answers', at bf16.
    full = estimate_memory(spec.replace(answer_only_logits=False), _build(spec.model, texts, "meta"))
    vocab = text.vocab_size
    assert full.terms["logits"] - on.terms["logits"] == (batch * prompt + 2 * batch * 9) * vocab * bf16
    assert full.terms["activations"] - on.terms["activations"] == 2 * batch * prompt * hidden * bf16


def test_mlp_checkpointing_keeps_each_mlp_input_instead_of_its_internals(data) -> None:
    # Each layer's MLP (gate and up read the hidden state, down the intermediate one) keeps only its
    # hidden-wide input; one MLP's internals are recomputed at a time in backward, so they count once.
    texts = fitting_texts(data)
    spec = RunSpec(name="p", method="sft", model="qwen2-vl-tiny-random", train="lm", batch_size=8)
    spec = spec.replace(max_question_tokens=32, max_answer_tokens=8)
    off = estimate_memory(spec, _build(spec.model, texts, "meta"))
    on = estimate_memory(spec.replace(activation_checkpointing="mlp"), _build(spec.model, texts, "meta"))
    loaded = _build(spec.model, texts, "meta")
    text = loaded.model.config.text_config
    hidden, layers, inner = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    sequence = len(loaded.family.prompt_ids(loaded, "")) + 32 + 9  # frame and image, question, answer and end
    rows, fp32 = 8, 4
    internals = 2.0 * (2 * hidden + inner)  # ACTIVATION_FACTOR 2 of the saved Linear inputs
    dropped = rows * sequence * fp32 * ((layers - 1) * internals - layers * hidden)
    assert off.total - on.total == pytest.approx(dropped, abs=1)
    assert {k: v for k, v in on.terms.items() if k != "activations"} == {
        k: v for k, v in off.terms.items() if k != "activations"
    }
    assert f"activation checkpointing: {layers} MLP blocks keep only their input, recomputed in backward" in (
        on.assumptions
    )
