"""A training step's peak memory, estimated from the model's sizes and the settings, without a GPU.

`vqabench probe --memory` prints it so that a user can pick a GPU before renting one. The model
is built on torch's meta device (shapes, no storage: a 11B variant takes seconds and no memory),
frozen and given its LoRA adapters as a run does, and every term below is counted from it.
UI-free: :func:`estimate_memory` returns a :class:`MemoryEstimate`, a breakdown in bytes.

Each term (``N(...)`` is a parameter count, ``b(...)`` its bytes at the stored dtype):

* ``weights``: ``b(every parameter and buffer)``, tied weights once, at the dtype the run stores
  them in: fp32, except that under bf16/fp16 the frozen Linears whose weights no checkpoint holds
  (with LoRA: all the frozen ones; see :func:`vqabench.engine.precision.low_frozen_weights`) are
  stored in the autocast dtype. There is no master-weights term: the weights that train are fp32.
* ``gradients``: ``b(trainable parameters)`` (a gradient has its parameter's dtype).
* ``optimizer``: AdamW's ``exp_avg`` and ``exp_avg_sq`` per trainable parameter at its dtype,
  ``2 * b(trainable)``, plus its 4-byte ``step`` per trainable tensor; exactly what
  :func:`vqabench.engine.telemetry.optimizer_state_bytes` measures after the first step.
* ``reference``: ``copy``: ``b(trainable part)``, its Linears in the autocast dtype under bf16/fp16,
  the part taken before LoRA's adapters
  (:class:`~vqabench.engine.reference.CopyReference` shares every frozen tensor); ``precompute``:
  its table, ``rows * 3 * 4`` (chosen, rejected, mismatched fp32 log-probs); ``adapter``: 0.
* ``autocast copies`` (bf16/fp16 only): ``2 * N(fp32 Linear weights on the backward path)``: autocast
  casts each weight once per forward and backward keeps the cast (to compute its input's gradient);
  a weight already stored in the autocast dtype is used as it is.
* ``activations``: ``ACTIVATION_FACTOR * act_bytes * sum(rows * tokens(l) * in_features(l))`` over
  the Linear layers ``l`` on the backward path (the trainable part; with LoRA, the part the adapters
  sit in): each Linear's input is saved for backward, and the factor covers what the layers
  between them save (norms, activation functions, attention inputs). ``act_bytes`` is 2 under
  bf16/fp16, else 4. ``tokens(l)``: the LM head's, the answer tokens (with ``answer_only_logits``
  off, a causal family's whole sequence); a cross-attention key/value reading the encoded question
  (an encoder-decoder's answer decoder), the question tokens; one reading the image, and a layer
  outside the language model (a projector), the image's feature tokens; any other, the sequence:
  image + question + answer tokens for a causal VLM, the answer tokens for an encoder-decoder's
  answer decoder. ``rows`` is the batch, doubled for methods that score chosen and rejected answers.
  With ``shared_prompt`` (a pair method on a causal family that shares prompts) those rows are two
  passes instead: the prompt (image + question tokens) once per pair, ``batch`` rows, then both
  answers on its key/value cache, ``2 * batch`` rows of answer tokens (the projector and vision
  layers run in the prompt pass only), plus the cache repeated per answer row that attention keeps,
  ``2 * batch * prompt * (k_proj + v_proj widths) * act_bytes``.
  With ``activation_checkpointing = "mlp"`` each decoder layer's MLP (the family's
  :meth:`~vqabench.models.family.ModelFamily.checkpointed_blocks`) keeps only its input, ``rows *
  tokens * its first Linear's in_features * act_bytes`` (no factor: one tensor), instead of its
  Linears' inputs and what lies between them; backward recomputes one MLP at a time, so one
  block's internals (its Linears' term, with the factor) are added back once, in the larger pass.
* ``logits``: ``rows * answer_tokens * vocab * 4 * 2``: fp32 logits at the answer positions, and the
  log-softmax kept for backward; with ``answer_only_logits`` off (a causal family) also the logits
  of every column the LM head read at the autocast dtype (the tensor, or its gradient, once).
* ``encoder cache``: ``cache_rows * prod(features_shape) * dtype bytes`` when the frozen encoders'
  outputs are held in memory (the probe's cache); 0 when no rows are given (a run's file is mapped).
  ``cache_rows`` counts pairs: a family whose features read the image only keeps one row per distinct
  image, so for it this term is an upper bound.

Left out: the framework's own overhead (CUDA context, cuBLAS workspace, allocator fragmentation),
the eval and generation passes, the frozen encoders' forward when no cache is used (transient,
no grad), and temporaries that live inside one operation (attention's score matrix under SDPA).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqabench.engine.precision import DTYPES, low_frozen_weights, store_frozen_linears_low
from vqabench.models import lora, parts, registry
from vqabench.models.family import LoadedModel, ModelError
from vqabench.spec import RunSpec, SpecError

#: Saved bytes per Linear input byte on the backward path; calibrated on CPU against the tensors
#: autograd saves in one forward of the embedded model and the tiny causal families (tests/test_memory_estimate.py).
ACTIVATION_FACTOR = 2.0
#: Tokens assumed where the spec says "auto" (the worker takes the data's p99, which needs the data).
AUTO_QUESTION_TOKENS = 32
AUTO_ANSWER_TOKENS = 8
#: Methods whose step scores chosen and rejected answers (two rows per pair, one pass).
PAIR_METHODS = frozenset({"dpo", "ipo", "kto", "orpo", "simpo"})
GIB = 2**30
#: Released checkpoints by hub id, and the built-in random variant built with the same architecture and
#: sizes: the estimate of a preset that names one (its weights are never downloaded here).
SAME_SIZE_VARIANTS: dict[str, str] = {
    k: v
    for k, v in json.loads((Path(__file__).parent.parent / "assets" / "same-size-variants.json").read_text()).items()
    if not k.startswith("_")
}


@dataclass
class MemoryEstimate:
    """One preset's estimated training-step memory: named terms in bytes, and what was assumed."""

    preset: str
    terms: dict[str, int]
    assumptions: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def gib(self, name: str | None = None) -> float:
        """A term (or, with no name, the total) in GiB."""
        return (self.total if name is None else self.terms[name]) / GIB


def meta_model(spec: RunSpec) -> LoadedModel:
    """The spec's model built on the meta device (no storage), frozen and with adapters as a run has them.

    A released checkpoint of :data:`SAME_SIZE_VARIANTS` is built as its same-sized random variant
    (at that variant's image size). SpecError for any other model: its config would have to be
    downloaded, which this estimate never does.
    """
    name = "embedded-init" if spec.model == "embedded" else SAME_SIZE_VARIANTS.get(spec.model, spec.model)
    variant = registry.variant(name)
    if variant is None:
        raise SpecError(
            f"preset '{spec.name}': key 'model' has value {spec.model!r}; the memory estimate builds only the "
            f"embedded model, the built-in variants ({', '.join(registry.variant_names())}) and the released "
            f"checkpoints they are sized like ({', '.join(SAME_SIZE_VARIANTS)})."
        )
    with torch.device("meta"):
        loaded = variant.build(spec.seed, None, None)
    loaded.family.check_train(spec.with_default_train(registry.default_train_of(loaded.family)).train)
    return loaded


def _unique(tensors: Any) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _unique(tensors))


def _token_counts(spec: RunSpec, loaded: LoadedModel) -> tuple[int, int, int, list[str]]:
    """(question tokens, answer tokens as scored, prompt tokens), and what was assumed."""
    notes = []
    if isinstance(spec.max_question_tokens, int):
        question = spec.max_question_tokens
    else:
        question = AUTO_QUESTION_TOKENS
        notes.append(f"max_question_tokens = auto: {question} assumed")
    if isinstance(spec.max_answer_tokens, int):
        answer = spec.max_answer_tokens
    else:
        answer = AUTO_ANSWER_TOKENS
        notes.append(f"max_answer_tokens = auto: {answer} assumed")
    answer += 1  # the end marker (a [SEP] or an end-of-turn)
    family = loaded.family
    # A causal VLM's prompt holds the image's tokens and its chat frame around the question.
    frame = 0 if family.features_read_question else len(family.prompt_ids(loaded, ""))
    return question, answer, frame + question, notes


def _backward_linears(loaded: LoadedModel, train: str) -> list[tuple[str, nn.Linear]]:
    part = parts.trainable_part(loaded, train)
    return [(n, m) for n, m in part.named_modules() if isinstance(m, nn.Linear)]


def _linear_kind(name: str, layer: nn.Linear, vocab: int) -> str:
    """What a Linear's tokens are: "head" (answer positions), "question", "image" (once per prompt:
    a projector or vision layer), "cross" (a language model's key/value reading the image) or "seq"."""
    if layer.out_features == vocab:
        return "head"
    last = name.rsplit(".", 1)[-1]
    if "crossattention" in name and last in ("key", "value"):  # a decoder reading the encoded question
        return "question"
    if "cross_attn" in name and last in ("k_proj", "v_proj"):  # a language model reading the image
        return "cross"
    if any(key in name for key in ("projector", "connector", "vision", "visual")):
        return "image"
    return "seq"


def _weighted(linears: list[tuple[str, nn.Linear]], vocab: int, tokens: dict[str, int]) -> int:
    """``sum(tokens(l) * in_features(l))`` over `linears`, each Linear's tokens looked up by its kind."""
    return sum(tokens[_linear_kind(n, m, vocab)] * m.in_features for n, m in linears)


def estimate_memory(spec: RunSpec, loaded: LoadedModel | None = None, *, cache_rows: int = 0) -> MemoryEstimate:
    """The breakdown of one training step's peak for `spec` (see the module docstring for each term).

    `loaded` is the spec's model before freezing and LoRA (built on the meta device when None); it
    is frozen and given adapters here, as a run does. `cache_rows`: rows of an in-memory encoder cache
    and precomputed-reference table (the probe's pairs); 0 leaves both out.
    """
    loaded = loaded if loaded is not None else meta_model(spec)
    family = loaded.family
    spec = spec.with_default_train(registry.default_train_of(family))  # a preset without a train line
    question, answer, prompt, notes = _token_counts(spec, loaded)
    parts.freeze_for_training(loaded, spec.train)
    reference = 0
    if spec.needs_reference and spec.reference == "copy":  # taken before the adapters, as a run does
        part = copy.deepcopy(parts.trainable_part(loaded, spec.train)).requires_grad_(False)
        if spec.precision != "fp32":  # a copy's Linears are stored in the autocast dtype (never saved)
            store_frozen_linears_low(part, part, DTYPES[spec.precision])
        reference = _bytes([*part.parameters(), *part.buffers()])
    elif spec.needs_reference and spec.reference == "precompute":
        reference = cache_rows * 3 * 4
    if spec.train == "lora":
        with torch.device(next(loaded.model.parameters()).device):
            lora.attach(loaded, spec)
        parts.freeze_for_training(loaded, spec.train)
    model = loaded.model
    low_frozen_weights(spec.precision, spec.train, model)  # as the trainer stores them
    params = _unique(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = _bytes([*params, *model.buffers()])
    gradients = _bytes(trainable)
    optimizer = 2 * gradients + 4 * len(trainable)

    low = spec.precision != "fp32"
    act_bytes = 2 if low else 4
    pairs = spec.method in PAIR_METHODS
    rows = spec.batch_size * (2 if pairs else 1)
    vocab = _vocab_size(model)
    prompt_width = question if family.features_read_question else prompt
    features_shape = family.features_shape(loaded, prompt_width)
    image = int(features_shape[0]) if len(features_shape) > 1 else 1
    seq = answer if family.features_read_question else prompt + answer
    causal = not family.features_read_question
    # Only a causal family's LM head can run on the answer positions alone (an answer decoder's are all answers).
    answer_only = spec.answer_only_logits or not causal
    shared = pairs and causal and spec.shared_prompt and bool(getattr(family, "shares_prompt", False))
    linears = _backward_linears(loaded, spec.train)
    blocks = _checkpointed(spec, loaded, linears)
    inside = {id(m) for block in blocks for _, m in block}
    kept = [(n, m) for n, m in linears if id(m) not in inside]
    # A checkpointed block keeps its input (its first Linear's), once, without the factor.
    boundaries = [(_linear_kind(*block[0], vocab), block[0][1].in_features) for block in blocks if block]

    def saved(tokens: dict[str, int]) -> float:
        """Bytes per row and act byte that one pass keeps for backward."""
        kept_inputs = ACTIVATION_FACTOR * _weighted(kept, vocab, tokens)
        return kept_inputs + sum(tokens[kind] * width for kind, width in boundaries)

    def recomputed(tokens: dict[str, int]) -> float:
        """One checkpointed block's internals, recomputed in backward (per row and act byte)."""
        return max((ACTIVATION_FACTOR * _weighted(block, vocab, tokens) for block in blocks), default=0.0)

    if blocks:
        notes.append(
            f"activation checkpointing: {len(blocks)} MLP blocks keep only their input, recomputed in backward"
        )
    head_tokens = answer if answer_only else seq
    if shared:
        # One pass over each prompt (batch rows), then both answers (2 x batch rows) on its key/value
        # cache, repeated per answer row; the LM head reads the prompt's last column and the answers'.
        batch = spec.batch_size
        prompt_tokens = {
            "head": 0 if answer_only else prompt,
            "question": question,
            "image": image,
            "cross": image,
            "seq": prompt,
        }
        answer_tokens = {"head": answer, "question": question, "image": 0, "cross": image, "seq": answer}
        kv_width = sum(m.out_features for n, m in linears if _is_self_kv(n, m, vocab))
        kv_cache = rows * prompt * kv_width * act_bytes  # the cache repeated per answer row, read by attention
        kept_passes = batch * saved(prompt_tokens) + rows * saved(answer_tokens)
        recompute = max(batch * recomputed(prompt_tokens), rows * recomputed(answer_tokens))
        activations = int(act_bytes * (kept_passes + recompute)) + kv_cache
        head_rows_tokens = rows * answer if answer_only else batch * prompt + rows * answer
        notes.append(
            f"shared prompt: {prompt} tokens x {batch} rows, then answers {answer} tokens x {rows} rows on its cache"
        )
    else:
        tokens = {"head": head_tokens, "question": question, "image": image, "cross": image, "seq": seq}
        activations = int(rows * act_bytes * (saved(tokens) + recomputed(tokens)))
        head_rows_tokens = rows * head_tokens
        notes.append(f"sequence {seq} tokens x {rows} rows")
    # A Linear stored in the autocast dtype is used as it is: no cast copy.
    copies = 2 * sum(m.weight.numel() for _, m in linears if m.weight.dtype == torch.float32) if low else 0
    # fp32 log-softmax over the answer positions, kept for backward; with every column's logits
    # made (answer_only_logits off) also the full logits tensor (or its gradient) at the autocast dtype.
    logits = rows * answer * vocab * 4 * 2 + (0 if answer_only else head_rows_tokens * vocab * act_bytes)
    notes.append(f"vocabulary {vocab}; logits {'at answer positions only' if answer_only else 'at every position'}")
    cache = 0
    if spec.uses_encoder_cache and cache_rows:
        item = 2 if spec.encoder_cache_dtype == "bf16" else 4
        cache = cache_rows * math.prod(features_shape) * item
    if spec.model in SAME_SIZE_VARIANTS:
        notes.append(f"sized as {SAME_SIZE_VARIANTS[spec.model]}")
    terms = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "reference": reference,
        "autocast copies": copies,
        "activations": activations,
        "logits": logits,
        "encoder cache": cache,
    }
    return MemoryEstimate(spec.name, terms, notes)


def _checkpointed(
    spec: RunSpec, loaded: LoadedModel, linears: list[tuple[str, nn.Linear]]
) -> list[list[tuple[str, nn.Linear]]]:
    """The Linears on the backward path of each block ``activation_checkpointing`` recomputes, in order."""
    if spec.activation_checkpointing != "mlp":
        return []
    try:
        blocks = loaded.family.checkpointed_blocks(loaded.model)
    except ModelError as exc:
        raise SpecError(f"preset '{spec.name}': {exc}") from exc
    members = [{id(x) for x in block.modules()} for block in blocks]
    return [[(n, m) for n, m in linears if id(m) in ids] for ids in members]


def _is_self_kv(name: str, layer: nn.Linear, vocab: int) -> bool:
    """A language model's own key or value projection (what a key/value cache holds)."""
    return name.rsplit(".", 1)[-1] in ("k_proj", "v_proj") and _linear_kind(name, layer, vocab) == "seq"


def _vocab_size(model: Any) -> int:
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "out_features"):
        return int(embeddings.out_features)
    config = model.config
    text = getattr(config, "text_config", None) or config
    return int(text.vocab_size)
