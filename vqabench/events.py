"""The event protocol between a worker and its host: one JSON object per stdout line.

This module is the single contract: the worker emits these dataclasses with
:func:`encode_event`, the runner reads them back with :func:`parse_event`. Every line
carries ``"type"`` and the schema version ``"v"``. Documented in ``docs/events.md``.
Fields that cannot be measured on this machine (GPU memory without a GPU) are ``None``,
never a fake zero.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: Raised whenever a field or an event type is added. A host reads every version from
#: OLDEST_VERSION up to its own (a field an older worker did not send gets its default) and
#: refuses a newer one. Version 2: step-time spread and load average on epoch_end; probe events.
SCHEMA_VERSION = 2
OLDEST_VERSION = 1


class EventError(ValueError):
    """A line that is not a valid event of this schema version."""


@dataclass
class Event:
    type: ClassVar[str] = ""


@dataclass
class RunStarted(Event):
    """The run's resolved configuration and what it runs on."""

    type: ClassVar[str] = "run_started"
    run: str
    method: str
    config: dict[str, Any]
    device: str
    torch_version: str
    trainable_params: int
    total_params: int
    reference_strategy: str | None  # None for reference-free methods
    reference_bytes: int  # reference parameters+buffers resident while training
    epochs: int
    steps_per_epoch: int
    telemetry: str  # "nvml" or "n/a: <reason>"
    data: dict[str, Any] = field(default_factory=dict)  # split sizes and the quality report
    pid: int = 0
    world_size: int = 1  # processes training this run (torchrun + DDP); 1 = one process
    backend: str | None = None  # torch.distributed backend: "nccl" (CUDA) or "gloo" (CPU); None for one process
    global_batch: int = 0  # batch_size: rows per optimizer step over all processes (0 = not reported)
    per_device_batch: int = 0  # rows per step on each process: global_batch / world_size
    train: str = "decoder"  # what trained, as the family resolved it: "decoder", "lm", "lm+projector", "lora" or "all"
    precision: str = "fp32"  # autocast dtype of the forward passes: "fp32", "bf16" or "fp16"


@dataclass
class Progress(Event):
    """Throttled progress inside a phase (a few per second at most)."""

    type: ClassVar[str] = "progress"
    phase: str  # "base", "images", "encode", "reference", "train", "eval", "generate", "judge"
    epoch: int  # 1-based; 0 outside the training epochs
    step: int
    steps: int
    running_loss: float | None = None
    message: str = ""
    # Live telemetry at the time of the report (optional: None where not measured or not sampled yet)
    rss_mib: float | None = None  # the worker's resident set size now
    gpu_process_mib: float | None = None  # NVML, this worker's pid
    gpu_device_mib: float | None = None  # NVML, the whole device
    gpu_util: float | None = None  # NVML, percent


@dataclass
class EncoderCached(Event):
    """The frozen-encoder cache is ready: built by this run (its one-off cost) or reused.

    Added within schema version 1: a new event type that older hosts would reject, so host
    and worker must come from the same vqabench (they do: the runner starts its own worker).
    """

    type: ClassVar[str] = "encoder_cache"
    built: bool  # this run ran the encoding pass (and is charged `seconds`); False: reused
    seconds: float  # wall clock of the one-off encoding pass; 0 when reused
    path: str | None  # the cache entry's folder; None when kept in memory
    bytes: int  # size of the cached encodings
    dtype: str  # "fp32" | "bf16"
    pairs: int  # (image, question) pairs encoded, all splits
    warning: str | None = None  # one sentence when the cache folder could not be written
    # Images encoded, once each, where the features read the image only (a causal VLM's); None:
    # one row per pair (features that read the question). Optional: added within schema version 1.
    images: int | None = None


@dataclass
class EpochEnded(Event):
    """One finished training epoch with its losses, cost and preference metrics."""

    type: ClassVar[str] = "epoch_end"
    epoch: int
    epochs: int
    train_loss: float
    eval_loss: float
    epoch_seconds: float  # wall clock of the training steps of this epoch (eval excluded)
    eval_seconds: float
    samples_per_s: float
    lr: float
    peak_rss_mib: float  # peak resident set size during this epoch (lifetime peak where not resettable)
    reference_bytes: int
    chosen_logp: float  # eval split, mean summed log-prob of chosen answers
    rejected_logp: float
    reward_margin: float  # mean (chosen - rejected) summed log-prob on the eval split (comparable across methods)
    pref_accuracy: float  # share of eval pairs whose chosen answer scores higher
    is_best: bool
    cuda_max_allocated_mib: float | None = None
    cuda_max_reserved_mib: float | None = None
    gpu_process_peak_mib: float | None = None  # NVML, this worker's pid
    gpu_device_peak_mib: float | None = None
    gpu_util_mean: float | None = None  # percent
    gpu_power_mean_w: float | None = None
    em: float | None = None  # with eval_every_epoch: scores on N eval answers
    f1: float | None = None
    judge_score: float | None = None
    scored_n: int | None = None
    rank_peak_mib: list[float | None] | None = None  # per rank: CUDA max allocated on GPU, else peak RSS
    rank_peak_max_mib: float | None = None
    rank_peak_sum_mib: float | None = None
    step_ms_median: float | None = None  # wall clock per training step of this epoch
    step_ms_p10: float | None = None
    step_ms_p90: float | None = None
    step_ms: list[float] | None = None  # every step's time in ms (evenly thinned to at most 2,048)
    load_avg_max: float | None = None  # highest 1-minute load average seen during the steps
    cores: int | None = None  # CPU threads the run used (torch's intra-op threads)
    optimizer_state_bytes: int | None = None  # the optimizer's state tensors (AdamW moments) after its first step


@dataclass
class Evaluated(Event):
    """Answer quality on the test split: split "test" from the best checkpoint; split "base" from the
    starting model before training (sent, before the "test" one, by the one run per session that the
    runner asked to score it, `score_base`). A new value of an existing field, so no version change:
    hosts that read only "test" ignore it."""

    type: ClassVar[str] = "eval"
    split: str  # "test" or "base"
    n: int
    em: float
    f1: float
    judge: str | None = None
    judge_score: float | None = None
    judge_n: int = 0
    unparseable: int = 0
    predictions: str | None = None  # path of the predictions JSONL
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunFinished(Event):
    type: ClassVar[str] = "run_finished"
    best_epoch: int
    best_eval_loss: float
    checkpoint: str
    total_seconds: float
    train_seconds: float  # sum of epoch_seconds


@dataclass
class RunFailed(Event):
    type: ClassVar[str] = "run_failed"
    error_kind: str  # "config", "data", "model", "numerics", "judge", "internal", "killed", ...
    message: str  # one sentence for the user
    traceback: str = ""


@dataclass
class ProbeStarted(Event):
    """`vqabench probe`: what the interleaved step-cost probe runs on (one worker, all presets)."""

    type: ClassVar[str] = "probe_started"
    presets: list[str]
    device: str
    torch_version: str
    model_source: str  # every preset starts from this same model, dependants included
    batch_size: int
    steps: int  # timed steps per preset per round
    warmup: int  # untimed steps per preset per round
    rounds: int
    cores: int  # the CPU threads the probe ran (torch.get_num_threads())
    pid: int = 0
    machine_cores: int | None = None  # the CPU cores the probe's process may use (None: not recorded)


@dataclass
class ProbeMeasured(Event):
    """One preset's timed steps in one round of the probe."""

    type: ClassVar[str] = "probe_measured"
    preset: str
    method: str
    round: int  # 1-based
    step_ms: list[float]
    peak_memory_mib: float | None  # CUDA max allocated, or the process's peak RSS, during the steps
    memory_source: str  # "CUDA" or "RSS"
    reference_strategy: str | None
    reference_bytes: int
    setup_seconds: float  # building the reference copy, or the precompute pass
    load_avg_max: float | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        RunStarted,
        Progress,
        EncoderCached,
        EpochEnded,
        Evaluated,
        RunFinished,
        RunFailed,
        ProbeStarted,
        ProbeMeasured,
    )
}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def event_to_dict(event: Event) -> dict[str, Any]:
    data = {"type": event.type, "v": SCHEMA_VERSION}
    data.update(_clean(dataclasses.asdict(event)))
    return data


def encode_event(event: Event) -> str:
    """One JSON line, no trailing newline; NaN becomes null so the line stays strict JSON."""
    return json.dumps(event_to_dict(event), allow_nan=False, separators=(",", ":"))


def event_from_dict(data: dict[str, Any]) -> Event:
    if not isinstance(data, dict):
        raise EventError("an event must be a JSON object")
    kind = data.get("type")
    if kind not in EVENT_TYPES:
        raise EventError(f"unknown event type {kind!r}")
    version = data.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or not OLDEST_VERSION <= version <= SCHEMA_VERSION:
        raise EventError(f"event schema version {version!r}, expected {OLDEST_VERSION} to {SCHEMA_VERSION}")
    cls = EVENT_TYPES[kind]
    names = {f.name: f for f in dataclasses.fields(cls)}
    required = {
        n for n, f in names.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    payload = {k: v for k, v in data.items() if k in names}
    for k, v in payload.items():  # encode_event writes infinities as strings; undo that
        if v in ("inf", "-inf") and "float" in str(names[k].type):
            payload[k] = float(v)
    missing = required - payload.keys()
    if missing:
        raise EventError(f"{kind} event lacks {', '.join(sorted(missing))}")
    return cls(**payload)


def parse_event(line: str) -> Event:
    """Parse one stdout line of a worker; raise EventError if it is not an event."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EventError(f"not JSON: {exc.msg}") from None
    return event_from_dict(data)
