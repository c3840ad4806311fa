"""The run specification: one training run, validated, shared by host and worker.

A preset TOML file becomes a :class:`RunSpec` here; the runner writes it as JSON for the
worker, which reads it back with :func:`spec_from_dict`. Validation errors are one
sentence naming where, which key, which value and what is allowed (:class:`SpecError`).
Pure Python: no torch, no textual.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

METHODS = ("sft", "dpo", "orpo", "ipo", "kto", "simpo")
#: Methods that compare the policy with a frozen reference model (an SFT checkpoint).
REFERENCE_METHODS = frozenset({"dpo", "ipo", "kto"})
#: "auto": the cheapest exact one for the run (vqabench.engine.reference_choice), decided in the worker.
REFERENCE_STRATEGIES = ("auto", "copy", "precompute", "adapter")
#: Which weights train (each family says which it supports): an encoder-decoder's answer "decoder"; a model's
#: language model ("lm"), with its vision projector ("lm+projector"), LoRA adapters on the
#: language model ("lora"), or every weight ("all"). "auto" (what a preset without a train line
#: gets): the model family's default, "decoder" for an encoder-decoder and "lm" for a causal VLM, set by
#: ``presets.with_family_train`` where the host knows the family and by the worker on loading.
TRAIN_PARTS = ("auto", "decoder", "lm", "lm+projector", "lora", "all")
AUTO_TRAIN = "auto"
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
JUDGES = ("auto", "exact", "semantic", "together", "openai")
SCHEMAS = ("auto", "preference", "vlfeedback", "llava")
ENCODER_CACHE = ("auto", "on", "off")
#: Experiment trackers a run may report to (`report_to`), as TRL names them; vqabench.trackers logs to them.
TRACKERS = ("tensorboard", "trackio", "mlflow", "wandb")
#: The module each tracker imports; the pip extra that installs it has the tracker's name (vqabench[wandb]).
TRACKER_MODULES = {"tensorboard": "tensorboardX", "trackio": "trackio", "mlflow": "mlflow", "wandb": "wandb"}
ENCODER_CACHE_DTYPES = ("fp32", "bf16")
#: "mlp": each decoder layer's MLP block is recomputed in backward instead of keeping its activations.
ACTIVATION_CHECKPOINTING = ("off", "mlp")

#: Method-specific defaults from each method's paper (used when the preset leaves them out).
METHOD_DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0}


def default_cache_dir() -> Path:
    """Where base checkpoints, reference log-probs and judgments are kept between sessions.

    $VQABENCH_CACHE, else $XDG_CACHE_HOME/vqabench, else ~/.cache/vqabench.
    """
    env = os.environ.get("VQABENCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vqabench"


class SpecError(ValueError):
    """A preset or spec that cannot run; the message is one sentence for the user."""


@dataclass
class DatasetSpec:
    """Where the preference pairs come from and how they are split."""

    source: str = "easyvqa"  # "easyvqa" | "hf:NAME" | a local file or folder
    seed: int = 0  # pairs and splits; fixed while the run's own seed varies
    config: str | None = None  # hub dataset configuration name
    split: str | None = None  # hub/local split to read (default: "train")
    revision: str | None = None
    image_root: str | None = None  # folder that relative image paths are resolved against
    schema: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # our name -> dataset column
    eval_size: int = 256  # pairs held out for eval loss and checkpoint choice
    test_size: int = 1000  # questions for final EM/F1/judge; 0 = the whole test split
    max_skip_share: float = 0.2  # fail the run when more rows than this are unusable
    aspect_weights: dict[str, float] = field(default_factory=dict)  # VLFeedback rating aspects
    min_margin: float = 0.0  # VLFeedback: skip pairs whose rating gap is smaller


@dataclass
class JudgeSpec:
    """Which judge grades the final answers, and its knobs."""

    name: str = "auto"
    limit: int | None = None  # cap on judged test answers; None = all
    threshold: float = 0.8  # semantic judge: cosine similarity counted as correct
    model: str = "meta-llama/Llama-3-8b-chat-hf"  # the LLM judge's model (together, openai)
    base_url: str | None = None  # together: optional; openai: the server, e.g. http://localhost:8000/v1
    api_key_env: str | None = None  # openai: the variable holding the key (default OPENAI_API_KEY)
    concurrency: int = 4
    requests_per_minute: int = 60
    max_attempts: int = 6
    timeout_s: float = 60.0


@dataclass
class RunSpec:
    """One training run: method, model, data and every hyperparameter, fully resolved."""

    name: str
    method: str
    description: str = ""
    model: str = "embedded"
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    judge: JudgeSpec = field(default_factory=JudgeSpec)
    train: str = "decoder"  # the answer decoder; a preset without a train line gets its family's default
    lora_r: int = 16  # train = "lora": adapter rank
    lora_alpha: int = 32  # adapter scaling is lora_alpha / lora_r
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=list)  # module-name suffixes; [] = the family's defaults
    precision: str = "fp32"  # autocast dtype of the forward passes; log-probs and losses stay fp32
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 16
    lr_decay: float = 0.9  # ExponentialLR gamma, stepped once per epoch
    weight_decay: float = 0.01
    seed: int = 0
    seeds: list[int] = field(default_factory=list)  # repeat the run once per seed (name@sN)
    limit: int | None = None  # cap on training pairs
    beta: float | None = None  # None = the method's default (METHOD_DEFAULT_BETA)
    lam: float = 0.5  # ORPO's lambda
    simpo_gamma: float = 1.0  # SimPO's target reward margin
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    reference: str = "copy"
    after: str | None = None  # name of the preset whose best checkpoint this run starts from
    init_checkpoint: str | None = None  # resolved by the runner from `after`, or set by hand
    # "auto": the p99 of the data's token lengths, capped by the model's position limit
    max_question_tokens: int | str = "auto"
    max_answer_tokens: int | str = "auto"
    disable_dropout: bool = True  # policy dropout off, as TRL does for preference methods
    orpo_logps: str = "mean"  # ORPO's odds from token-mean ("mean", Hong et al.) or summed log-probs
    sft_label_smoothing: float = 0.0  # SFT NLL label smoothing (transformers' VQA loss uses 0.1)
    eval_every_epoch: int = 0  # generate and judge this many eval answers after each epoch
    base_samples: int = 2000  # embedded model: samples that make the base checkpoint (few: fine-tuning moves it)
    device: str = "auto"
    telemetry_interval: float = 0.2
    gpus: list[int] = field(default_factory=list)  # GPUs the runner may place this run on; [] = no placement
    nproc_per_node: int = 1  # processes per node (torchrun + DDP); batch_size stays the global batch
    nnodes: int = 1  # nodes of a multi-node run (torchrun --nnodes)
    node_rank: int = 0  # this node's rank; node 0 records the results
    rdzv_endpoint: str | None = None  # host:port of node 0, where the nodes meet (nnodes > 1)
    concurrent_runs: int = 1  # set by the runner: runs sharing the host while this one trained (--parallel)
    # Set by the runner on the first run of a session that starts from a given model, data and test
    # split: it also answers the test questions with the starting model, before training ("base" scores).
    score_base: bool = False
    output_dir: str | None = None  # where the worker writes checkpoints and predictions
    cache_dir: str | None = None  # base checkpoints, reference, image and encoder caches; None = user cache
    num_workers: int = 0  # DataLoader worker processes gathering batches (0: in the worker itself)
    encoder_cache: str = "auto"  # frozen-encoder outputs computed once; auto = on unless train = "all"
    encoder_cache_dtype: str = "fp32"  # fp32 is exact; bf16 halves the file
    # Exact savings of causal VLMs, each switchable so the probe can show what it saves
    # (a family where one means nothing ignores it).
    shared_prompt: bool = True  # one prompt pass for both answers of a pair, on its key/value cache
    answer_only_logits: bool = True  # the LM head runs only where an answer token is predicted
    # "mlp": each language-model decoder layer's MLP keeps only its input and runs again in backward
    # (exact; one extra MLP forward per step for about two thirds less activation memory in the MLPs)
    activation_checkpointing: str = "off"
    report_to: list[str] = field(default_factory=list)  # experiment trackers (TRACKERS); [] = none
    # False for a tuning trial (`vqabench tune`): the worker never sees the test split (emptied when the data
    # is loaded), answers no test or base questions, and ends after its epochs; selection is on eval only.
    score_test: bool = True
    # The preset's [tune] table: the search space of `vqabench tune` ({} = the method's defaults, see tune_space).
    tune: dict[str, Any] = field(default_factory=dict)

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return METHOD_DEFAULT_BETA.get(self.method, 0.1)

    @property
    def needs_reference(self) -> bool:
        return self.method in REFERENCE_METHODS

    @property
    def uses_encoder_cache(self) -> bool:
        """Whether the frozen encoders' outputs are computed once and read from the cache."""
        return self.encoder_cache == "on" or (self.encoder_cache == "auto" and self.train != "all")

    def starting_model_key(self) -> str | None:
        """What a "base" score depends on: the starting model, the data, the test split, the answer
        limits and the judge; None for a run that starts from another run's checkpoint."""
        if self.after is not None or self.init_checkpoint is not None:
            return None
        parts = {
            "model": self.model,
            "base_samples": self.base_samples if self.model == "embedded" else None,
            "dataset": dataclasses.asdict(self.dataset),
            "judge": dataclasses.asdict(self.judge),
            "tokens": [self.max_question_tokens, self.max_answer_tokens],
        }
        return json.dumps(parts, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def with_default_train(self, default: str) -> RunSpec:
        """This spec with train = "auto" replaced by `default`, its model family's (registry.default_train)."""
        return self.replace(train=default) if self.train == AUTO_TRAIN else self


_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "reference": REFERENCE_STRATEGIES,
    "train": TRAIN_PARTS,
    "precision": PRECISIONS,
    "device": DEVICES,
    "judge.name": JUDGES,
    "dataset.schema": SCHEMAS,
    "encoder_cache": ENCODER_CACHE,
    "encoder_cache_dtype": ENCODER_CACHE_DTYPES,
    "activation_checkpointing": ACTIVATION_CHECKPOINTING,
}
#: Keys that take a positive integer or the word "auto" (resolved from the data by the worker).
_AUTO_INTS = {"max_question_tokens", "max_answer_tokens"}
_POSITIVE = {
    "epochs",
    "batch_size",
    "dataset.eval_size",
    "base_samples",
    "nproc_per_node",
    "nnodes",
    "concurrent_runs",
    "judge.concurrency",
    "judge.requests_per_minute",
    "judge.max_attempts",
    "lora_r",
    "lora_alpha",
}
_NON_NEGATIVE = {
    "num_workers",
    "node_rank",
    "eval_every_epoch",
    "dataset.seed",
    "dataset.test_size",
    "seed",
    "dataset.min_margin",
    "weight_decay",
}


def _type_name(tp: Any) -> str:
    names = []
    for t in typing.get_args(tp) or (tp,):
        if t is type(None):
            continue
        origin = typing.get_origin(t)
        if origin is dict:
            names.append("table")
        elif origin is list:
            names.append("list of strings" if typing.get_args(t) == (str,) else "list of integers")
        else:
            names.append({int: "integer", float: "number", str: "string", bool: "true/false"}.get(t, str(t)))
    return " or ".join(names)


def _article(name: str) -> str:
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise SpecError(f"{where}: key '{key}' must be {_article(_type_name(tp))}, not empty.")
    base = next((a for a in args if a is not type(None)), tp) if optional else tp
    origin = typing.get_origin(base)
    ok = False
    if origin is list and typing.get_args(base) == (str,):
        if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
            return [v.strip() for v in value]
        raise SpecError(f"{where}: key '{key}' has value {value!r}, which must be a list of non-empty strings.")
    if origin is list:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            return list(value)
        raise SpecError(f"{where}: key '{key}' has value {value!r}, which must be a list of integers of at least 0.")
    if origin is dict:
        val_tp = typing.get_args(base)[1]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            out = {}
            for k, v in value.items():
                if val_tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = float(v)
                elif isinstance(v, val_tp) and not isinstance(v, bool):
                    out[k] = v
                else:
                    raise SpecError(
                        f"{where}: key '{key}.{k}' has value {v!r}, which must be {_article(_type_name(val_tp))}."
                    )
            return out
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise SpecError(f"{where}: key '{key}' has value {value!r}; it must be a finite number.")
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is bool:
        ok = isinstance(value, bool)
    elif base is str:
        ok = isinstance(value, str)
    if not ok:
        raise SpecError(f"{where}: key '{key}' has value {value!r}, which must be {_article(_type_name(tp))}.")
    return value


def _build(cls: type, data: dict[str, Any], where: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise SpecError(f"{where}: unknown key '{full}'; allowed keys are {allowed}.")
        tp = hints[key]
        if key == "tune":
            if not isinstance(value, dict):
                raise SpecError(f"{where}: key 'tune' must be a table (a [tune] section), not {value!r}.")
            kwargs[key] = dict(value)
            continue
        if tp in (DatasetSpec, JudgeSpec):
            if isinstance(value, str) and tp is DatasetSpec:
                value = {"source": value}
            elif isinstance(value, str) and tp is JudgeSpec:
                value = {"name": value}
            if not isinstance(value, dict):
                raise SpecError(f"{where}: key '{full}' must be a table or a string, not {value!r}.")
            kwargs[key] = _build(tp, value, where, f"{full}.")
            continue
        if full in _AUTO_INTS:
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise SpecError(f"{where}: key '{full}' has value {value!r}; it must be \"auto\" or at least 1.")
            kwargs[key] = value
            continue
        value = _coerce(value, tp, where, full)
        if full in _CHOICES and value not in _CHOICES[full]:
            raise SpecError(
                f"{where}: key '{full}' has value {value!r}; allowed values are {', '.join(_CHOICES[full])}."
            )
        if full in _POSITIVE and value is not None and value <= 0:
            raise SpecError(f"{where}: key '{full}' has value {value!r}; it must be at least 1.")
        if full in _NON_NEGATIVE and value is not None and value < 0:
            raise SpecError(f"{where}: key '{full}' has value {value!r}; it must not be negative.")
        kwargs[key] = value
    return cls(**kwargs)


def spec_from_dict(data: dict[str, Any], where: str = "spec") -> RunSpec:
    """Validate a plain dict (parsed TOML or JSON) into a RunSpec; raise SpecError."""
    for required in ("name", "method"):
        if required not in data:
            raise SpecError(f"{where}: key '{required}' is missing; every run needs a {required}.")
    spec = _build(RunSpec, data, where, "")
    if spec.lr <= 0:
        raise SpecError(f"{where}: key 'lr' has value {spec.lr!r}; it must be greater than 0.")
    if not 0 < spec.lr_decay <= 1:
        raise SpecError(f"{where}: key 'lr_decay' has value {spec.lr_decay!r}; it must be in (0, 1].")
    if spec.limit is not None and spec.limit <= 0:
        raise SpecError(f"{where}: key 'limit' has value {spec.limit!r}; it must be at least 1.")
    if not 0 <= spec.sft_label_smoothing < 1:
        raise SpecError(
            f"{where}: key 'sft_label_smoothing' has value {spec.sft_label_smoothing!r}; it must be in [0, 1)."
        )
    if spec.beta is not None and spec.beta <= 0:
        raise SpecError(f"{where}: key 'beta' has value {spec.beta!r}; it must be greater than 0.")
    _check_judge(spec.judge, where)
    if not 0 <= spec.dataset.max_skip_share <= 1:
        raise SpecError(
            f"{where}: key 'dataset.max_skip_share' has value {spec.dataset.max_skip_share!r}; "
            f"it must be between 0 and 1."
        )
    if spec.encoder_cache == "on" and spec.train == "all":
        raise SpecError(
            f"{where}: key 'encoder_cache' is 'on' but train is {spec.train!r}: the encoders change during "
            f"training, so their outputs cannot be cached; use 'auto' or 'off', or a train value that "
            f"freezes the vision part ('decoder', 'lm', 'lm+projector' or 'lora')."
        )
    unknown = [name for name in spec.report_to if name not in TRACKERS]
    if unknown:
        raise SpecError(f"{where}: key 'report_to' names {unknown[0]!r}; allowed trackers are {', '.join(TRACKERS)}.")
    _check_processes(spec, where)
    if spec.tune:
        tune_space(spec, where)
    if spec.needs_reference and spec.after is None and spec.init_checkpoint is None:
        raise SpecError(
            f"{where}: method '{spec.method}' needs an SFT checkpoint as its start and reference; "
            f"set 'after' to an SFT preset's name or 'init_checkpoint' to a checkpoint folder."
        )
    return spec


def _check_judge(judge: JudgeSpec, where: str) -> None:
    """The LLM judges' server address and key variable, where a preset gives them."""
    if judge.base_url is not None and urlsplit(judge.base_url).scheme not in ("http", "https"):
        raise SpecError(
            f"{where}: key 'judge.base_url' has value {judge.base_url!r}; it must be an http:// or https:// URL, "
            f"such as http://localhost:8000/v1."
        )
    if judge.name == "openai" and not judge.base_url and not os.environ.get("VQABENCH_JUDGE_URL"):
        raise SpecError(
            f"{where}: judge 'openai' needs its server: set key 'judge.base_url' (e.g. http://localhost:8000/v1) "
            f"or the environment variable VQABENCH_JUDGE_URL."
        )
    if judge.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", judge.api_key_env):
        raise SpecError(
            f"{where}: key 'judge.api_key_env' has value {judge.api_key_env!r}; it must be the name of an "
            f"environment variable, such as OPENAI_API_KEY."
        )
    if judge.api_key_env is not None and judge.name not in ("openai", "auto"):
        raise SpecError(
            f"{where}: key 'judge.api_key_env' is set but judge.name is {judge.name!r}; only the openai judge "
            f"reads its key from it (the together judge reads TOGETHER_API_KEY)."
        )


def _check_processes(spec: RunSpec, where: str) -> None:
    """A multi-process run: the global batch must split evenly, the nodes must know where to meet."""
    world = spec.nproc_per_node * spec.nnodes
    if spec.batch_size % world:
        raise SpecError(
            f"{where}: key 'batch_size' has value {spec.batch_size}, which {world} processes "
            f"(nproc_per_node {spec.nproc_per_node} × nnodes {spec.nnodes}) cannot split evenly; "
            f"use a multiple of {world} (batch_size is the global batch)."
        )
    if spec.node_rank >= spec.nnodes:
        raise SpecError(
            f"{where}: key 'node_rank' has value {spec.node_rank}; with nnodes {spec.nnodes} it must be "
            f"between 0 and {spec.nnodes - 1}."
        )
    if spec.nnodes > 1 and not spec.rdzv_endpoint:
        raise SpecError(
            f"{where}: key 'nnodes' has value {spec.nnodes}, which needs 'rdzv_endpoint' (host:port of node 0, "
            f"the same on every node)."
        )


#: What `vqabench tune` minimises: the run's own eval loss, or the eval NLL of the chosen answers (minus their
#: mean summed log-prob), which, unlike a preference loss, does not change scale with beta, lambda or gamma.
TUNE_OBJECTIVES = ("eval_loss", "chosen_nll")
#: Keys whose value changes what the eval loss measures, so settings cannot be compared by it.
LOSS_SCALE_KEYS = frozenset({"beta", "lam", "simpo_gamma", "kto_desirable_weight", "kto_undesirable_weight"})
#: Keys a [tune] table may search, as a range (numbers) or as choices (any of them).
TUNABLE_RANGES = (
    "lr",
    "epochs",
    "batch_size",
    "lr_decay",
    "weight_decay",
    "beta",
    "lam",
    "simpo_gamma",
    "kto_desirable_weight",
    "kto_undesirable_weight",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "sft_label_smoothing",
)
TUNABLE_CHOICES = (*TUNABLE_RANGES, "reference", "train", "precision", "orpo_logps", "disable_dropout")
_RANGE_KEYS = {"low", "high", "log"}


@dataclass(frozen=True)
class TuneParam:
    """One searched run setting: a number range (`log` for a log scale) or a list of `choices`."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int)


@dataclass(frozen=True)
class TuneSpace:
    """A preset's search space for `vqabench tune` and the objective its trials minimise."""

    params: tuple[TuneParam, ...]
    objective: str

    def keys(self) -> list[str]:
        return [p.key for p in self.params]


def default_tune_table(spec: RunSpec) -> dict[str, Any]:
    """The search space of a preset without a [tune] table: lr on a log scale around the preset's
    (a tenth to ten times), the method's own knobs, and epochs from 1 up to the preset's."""
    table: dict[str, Any] = {"lr": {"low": spec.lr / 10, "high": spec.lr * 10, "log": True}}
    per_method: dict[str, dict[str, Any]] = {
        "dpo": {"beta": {"low": 0.01, "high": 1.0, "log": True}},
        "ipo": {"beta": {"low": 0.01, "high": 1.0, "log": True}},  # IPO's tau
        "orpo": {"lam": {"low": 0.05, "high": 2.0, "log": True}},
        "simpo": {"beta": {"low": 1.0, "high": 10.0, "log": True}, "simpo_gamma": {"low": 0.0, "high": 2.0}},
        "kto": {
            "beta": {"low": 0.01, "high": 1.0, "log": True},
            "kto_desirable_weight": {"low": 0.5, "high": 2.0},
            "kto_undesirable_weight": {"low": 0.5, "high": 2.0},
        },
    }
    table.update(per_method.get(spec.method, {}))
    if spec.epochs > 1:
        table["epochs"] = {"low": 1, "high": spec.epochs}
    return table


def tune_space(spec: RunSpec, where: str = "spec") -> TuneSpace:
    """The validated search space of `spec` (its [tune] table's keys, else :func:`default_tune_table`), and the
    objective (the table's, else chosen_nll where a searched key changes the loss's scale); SpecError."""
    table = dict(spec.tune)
    place = f"{where}: [tune]"
    objective = table.pop("objective", None)
    table = table or default_tune_table(spec)  # a table that names only the objective keeps the defaults
    params = tuple(_tune_param(spec, key, entry, place) for key, entry in table.items())
    if objective is None:
        objective = "chosen_nll" if LOSS_SCALE_KEYS & {p.key for p in params} else "eval_loss"
    if objective not in TUNE_OBJECTIVES:
        raise SpecError(
            f"{place} key 'objective' has value {objective!r}; allowed values are {', '.join(TUNE_OBJECTIVES)}."
        )
    return TuneSpace(params, objective)


def _tune_param(spec: RunSpec, key: str, entry: Any, place: str) -> TuneParam:
    if key not in TUNABLE_CHOICES:
        raise SpecError(
            f"{place} key '{key}' is not a setting tuning may search; allowed keys are "
            f"objective, {', '.join(TUNABLE_CHOICES)}."
        )
    shape = "a table like {low = 1e-6, high = 1e-3, log = true} or {choices = [...]}"
    if not isinstance(entry, dict):
        raise SpecError(f"{place} key '{key}' has value {entry!r}, which must be {shape}.")
    if "choices" in entry:
        choices = entry["choices"]
        if set(entry) != {"choices"} or not isinstance(choices, list) or not choices:
            raise SpecError(f"{place} key '{key}' must hold only a non-empty list 'choices', not {entry!r}.")
        for choice in choices:
            _check_value(spec, key, choice, place)
        return TuneParam(key, choices=tuple(choices))
    if key not in TUNABLE_RANGES:
        raise SpecError(f"{place} key '{key}' is not a number; search it as {{choices = [...]}}, not {entry!r}.")
    if not set(entry) <= _RANGE_KEYS or not {"low", "high"} <= set(entry):
        raise SpecError(f"{place} key '{key}' has value {entry!r}, which must be {shape}.")
    low, high, log = entry["low"], entry["high"], entry.get("log", False)
    wants_int = _is_int_setting(key)
    for bound in (low, high):
        number = isinstance(bound, (int, float)) and not isinstance(bound, bool)
        if not number or (wants_int and not isinstance(bound, int)):
            kind = "an integer" if wants_int else "a number"
            raise SpecError(f"{place} key '{key}' has bound {bound!r}, which must be {kind}.")
    if not isinstance(log, bool):
        raise SpecError(f"{place} key '{key}.log' has value {log!r}, which must be true or false.")
    if not low < high:
        raise SpecError(f"{place} key '{key}' has low {low!r} and high {high!r}; low must be below high.")
    if log and low <= 0:
        raise SpecError(f"{place} key '{key}' is on a log scale, so low must be greater than 0, not {low!r}.")
    for bound in (low, high):
        _check_value(spec, key, bound, place)
    return TuneParam(key, low if wants_int else float(low), high if wants_int else float(high), log)


def _is_int_setting(key: str) -> bool:
    hint = typing.get_type_hints(RunSpec)[key]
    return hint is int


def _check_value(spec: RunSpec, key: str, value: Any, place: str) -> None:
    """A searched value must make a valid run on its own (the run's own checks, named by the [tune] key)."""
    data = {**spec.to_dict(), key: value, "tune": {}}
    spec_from_dict(data, where=place)


@dataclass
class ProbePlan:
    """`vqabench probe`: the presets (the first one's model, data and batch size for all) and how long."""

    specs: list[RunSpec]
    steps: int = 20  # timed steps per preset per round
    rounds: int = 3
    warmup: int = 3  # untimed steps per preset per round (allocator and caches settle)
    bf16: bool = False  # bfloat16 autocast around the step (GPU)
    cache_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The worker's plan file: ``{"probe": {...}}`` (a run's spec file has no "probe" key)."""
        return {"probe": {**dataclasses.asdict(self), "specs": [s.to_dict() for s in self.specs]}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "probe plan") -> ProbePlan:
        body = dict(data["probe"])
        specs = [spec_from_dict(s, where) for s in body.pop("specs")]
        plan = cls(specs=specs, **body)
        plan.validate(where)
        return plan

    def validate(self, where: str = "probe") -> None:
        if not self.specs:
            raise SpecError(f"{where}: no preset selected; choose at least one with --preset.")
        for key in ("steps", "rounds"):
            if getattr(self, key) < 1:
                raise SpecError(f"{where}: '{key}' is {getattr(self, key)}; it must be at least 1.")
        if self.warmup < 0:
            raise SpecError(f"{where}: 'warmup' is {self.warmup}; it must be 0 or more.")


def check_device(spec: RunSpec, cuda_available: bool, where: str = "spec") -> None:
    """Refuse a run that asks for CUDA where there is none (the worker calls this; spec.py stays torch-free)."""
    if spec.device == "cuda" and not cuda_available:
        raise SpecError(
            f"{where}: key 'device' has value 'cuda', but torch sees no CUDA GPU here; "
            f"use 'auto' or 'cpu', or run on a machine with a GPU."
        )
