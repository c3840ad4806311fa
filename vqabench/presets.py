"""Presets: TOML files that become validated RunSpecs, in the order their `after` links need.

A preset is one training run in one TOML file. Its name is the file's stem unless the file
sets `name`. The packaged presets live in the `vqabench/presets/` folder (package data, so
they are found from an installed wheel as well as from a checkout): the top-level files are
`--preset all`; `paper/` holds the paper's GPU setup and is selected as `--preset paper` or
by name (`--preset mllm-dpo-sft,mllm-dpo-dpo-beta0.1`); `lora/`, `families/` (SFT, DPO and
ORPO on each family's tiny variant) and `scale/` (the study's runs on Qwen2-VL-2B and
SmolVLM-256M by hub id) are groups the same way. A selection may also name a TOML file
or a folder of them.

A run whose `after` names a preset that the selection lacks gets that preset added
(:class:`PresetSelection` says which); a missing target or a cycle is a :class:`SpecError`.
Runs come out in dependency order, ties broken by name. Relative local paths in a preset
(a model folder, a dataset file) are read relative to the current directory.

Room for seeds (issue 8): a later `--seeds` may copy each spec per seed with a suffix in the
run name ("sft@s1") and point `after` at the same seed's target; nothing here assumes a run
name is a file stem.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqabench.models.registry import default_train, family_module_of, supported_model_types, variant_names
from vqabench.spec import AUTO_TRAIN, TRACKER_MODULES, TRACKERS, RunSpec, SpecError, spec_from_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same reader, from PyPI
    import tomli as tomllib

#: The packaged presets (a plain folder inside the package, shipped as package data).
PRESETS_DIR = Path(__file__).with_name("presets")
#: A group of packaged presets selectable by its folder name.
PRESET_GROUPS = ("paper", "lora", "families", "scale")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: A hub dataset, optionally with a file (or glob) inside its repository: owner/name[/path].
_HUB_SOURCE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./*{}@-]+)?$")


@dataclass(frozen=True)
class Overrides:
    """Command-line changes applied to every selected preset (None = keep the preset's value).

    `settings` are ``KEY=VALUE`` strings from ``--set`` (a dotted key such as
    ``dataset.test_size`` reaches into a table; VALUE is read as TOML, else as a string);
    `seeds` repeats every run once per seed (``--seeds 0,1,2``); `report_to` replaces every
    run's experiment trackers (``--report-to tensorboard,wandb``; ``()`` = none).
    """

    epochs: int | None = None
    limit: int | None = None
    seed: int | None = None
    settings: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None
    report_to: tuple[str, ...] | None = None

    def validate(self) -> None:
        """Raise SpecError for a value no run could use."""
        for flag, value, least in (("--epochs", self.epochs, 1), ("--limit", self.limit, 1), ("--seed", self.seed, 0)):
            if value is not None and value < least:
                raise SpecError(f"{flag} has value {value}; it must be at least {least}.")
        if self.seeds is not None and (not self.seeds or min(self.seeds) < 0):
            raise SpecError(
                f"--seeds has value {','.join(map(str, self.seeds))}; give seeds of at least 0, like 0,1,2."
            )
        unknown = [name for name in self.report_to or () if name not in TRACKERS]
        if unknown:
            raise SpecError(f"--report-to names {unknown[0]!r}; allowed trackers are {', '.join(TRACKERS)} or none.")
        self.parsed_settings()

    def parsed_settings(self) -> list[tuple[list[str], Any]]:
        out = []
        for item in self.settings:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise SpecError(f"--set has value {item!r}; write KEY=VALUE, like dataset.test_size=200.")
            try:
                value = tomllib.loads(f"v = {raw.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                value = raw.strip()
            out.append((key.strip().split("."), value))
        return out

    def apply(self, spec: RunSpec) -> RunSpec:
        changes: dict[str, Any] = {
            k: v for k, v in (("epochs", self.epochs), ("limit", self.limit), ("seed", self.seed)) if v is not None
        }
        if self.report_to is not None:
            changes["report_to"] = list(self.report_to)
        spec = spec.replace(**changes) if changes else spec
        settings = self.parsed_settings()
        if not settings:
            return spec
        data = spec.to_dict()
        for path, value in settings:
            table = data
            for part in path[:-1]:
                if not isinstance(table.get(part), dict):
                    raise SpecError(f"--set names '{'.'.join(path)}', but '{part}' is not a table of the run spec.")
                table = table[part]
            table[path[-1]] = value
        # A new model whose train was the old model's default (the preset had no train line) gets its own default.
        keys = [path for path, _ in settings]
        if ["model"] in keys and ["train"] not in keys and spec.train == _default_train_of_model(spec):
            data["train"] = AUTO_TRAIN
        spec = spec_from_dict(data, where="--set")
        _check_sources(spec, Path("--set"))
        return with_family_train(spec)


def expand_seeds(specs: list[RunSpec], seeds: Sequence[int] | None = None) -> list[RunSpec]:
    """Repeat runs once per seed as ``name@sN``: `seeds` for every run, else each run's own `seeds`.

    Pairs and splits stay fixed (they follow dataset.seed); a run repeated per seed starts
    from the `after` run of the same seed when that one is repeated too.
    """
    per_run = {s.name: list(seeds) if seeds else list(s.seeds) for s in specs}
    if not any(per_run.values()):
        return specs
    out: list[RunSpec] = []
    for seed in sorted({x for v in per_run.values() for x in v}):
        for spec in specs:
            if seed not in per_run[spec.name]:
                continue
            after = spec.after
            if after is not None and seed in per_run.get(after, []):
                after = f"{after}@s{seed}"
            out.append(spec.replace(name=f"{spec.name}@s{seed}", seed=seed, seeds=[], after=after))
    for spec in specs:  # runs without seeds run once, before the repeated ones
        if not per_run[spec.name]:
            out.insert(0, spec)
    return order_runs(out)


@dataclass
class Preset:
    """A validated preset and the file it came from."""

    spec: RunSpec
    path: Path


@dataclass
class PresetSelection:
    """What a selection resolved to: specs in run order, and the presets added for `after`."""

    specs: list[RunSpec]
    added: list[str] = field(default_factory=list)  # names pulled in as `after` targets


def packaged_presets() -> dict[str, Path]:
    """Every packaged preset by name: top-level files and those of the groups (paper/)."""
    found: dict[str, Path] = {}
    for folder in (PRESETS_DIR, *(PRESETS_DIR / g for g in PRESET_GROUPS)):
        for path in sorted(folder.glob("*.toml")):
            found[path.stem] = path
    return found


def top_level_presets() -> list[str]:
    """The names `--preset all` selects."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_preset(path: Path) -> Preset:
    """Parse and validate one preset file; every error names the file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SpecError(f"preset file {path} does not exist.") from None
    except IsADirectoryError:
        raise SpecError(f"preset file {path} is a folder; name a .toml file inside it.") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML ({exc}).") from None
    except OSError as exc:
        raise SpecError(f"preset file {path} cannot be read ({exc.strerror}).") from None
    data.setdefault("name", path.stem)
    data.setdefault("train", AUTO_TRAIN)  # no train line: the model family's default (with_family_train)
    spec = spec_from_dict(data, where=str(path))
    _check_sources(spec, path)
    return Preset(with_family_train(spec), path)


def _default_train_of_model(spec: RunSpec) -> str:
    """The train value a preset for `spec`'s model gets without a train line ("auto" when not known here)."""
    return with_family_train(spec.replace(train=AUTO_TRAIN)).train


def with_family_train(spec: RunSpec) -> RunSpec:
    """A spec without a train line (train = "auto") gets its model family's default
    ("decoder" for an encoder-decoder, "lm" for a causal VLM).

    Set here for every model whose family is known before anything loads (the embedded model, a
    built-in variant, a local folder, a hub id whose config is in the local hub cache), so the
    runs' recorded specs, setups and study names name it; the worker sets it for the rest on loading.
    """
    if spec.train != AUTO_TRAIN:
        return spec
    model_type = None
    if spec.model != "embedded" and spec.model not in variant_names():
        config = _model_config(spec.model)
        try:
            found = json.loads(config.read_text()) if config is not None else None
        except (OSError, ValueError):
            found = None  # a LoRA checkpoint's folder, or an unreadable config: the worker decides
        model_type = found.get("model_type") if isinstance(found, dict) else None
    module = family_module_of(spec.model, model_type)
    return spec if module is None else spec.with_default_train(default_train(module))


def _check_sources(spec: RunSpec, path: Path) -> None:
    """Reject a model or dataset that no loader could find, before anything starts."""
    model = spec.model
    builtin = ["embedded", *variant_names()]
    if model not in builtin and not Path(model).expanduser().exists() and not _HUB_ID.match(model):
        raise SpecError(
            f"{path}: key 'model' has value {model!r}; allowed are {', '.join(builtin)}, "
            f"a hub id like 'Qwen/Qwen2-VL-2B-Instruct' or an existing local folder."
        )
    if model not in builtin:
        _check_model_type(model, path)
    source = spec.dataset.source
    if source == "easyvqa":
        return
    if source.startswith("hf:"):
        if not _HUB_SOURCE.match(source[3:]) and not re.match(r"^[\w.-]+$", source[3:]):
            raise SpecError(
                f"{path}: key 'dataset.source' has value {source!r}; after 'hf:' comes a "
                f"hub dataset id like 'hf:MMInstruction/VLFeedback'."
            )
        return
    if not Path(source).expanduser().exists():
        raise SpecError(
            f"{path}: key 'dataset.source' has value {source!r}; allowed are 'easyvqa', "
            f"'hf:<hub dataset id>' or an existing local file or folder."
        )


def _model_config(model: str) -> Path | None:
    """The config.json a local folder holds, or the hub id's config already in the local hub cache."""
    folder = Path(model).expanduser()
    if folder.exists():
        return folder / "config.json"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None
    cached = try_to_load_from_cache(model, "config.json")
    return Path(cached) if isinstance(cached, str) else None


def _check_model_type(model: str, path: Path) -> None:
    """Refuse, before anything starts, a model whose config names no family vqabench serves.

    A local folder is read; a hub id only when its config is already in the hub cache (nothing
    is downloaded here), otherwise the worker checks it when it loads the model.
    """
    folder = Path(model).expanduser()
    if folder.is_dir() and (folder / "adapter_config.json").exists():
        return  # a LoRA checkpoint: its base model is checked when it is loaded
    config_path = _model_config(model)
    if config_path is None:
        return
    supported = ", ".join(supported_model_types())
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise SpecError(
            f"{path}: model folder {model!r} has no config.json, so it is not a saved model; "
            f"vqabench trains vision-language models of the types {supported}."
        ) from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path}: the config of model {model!r} cannot be read ({exc}).") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in supported_model_types():
        raise SpecError(
            f"{path}: model {model!r} has model_type {model_type!r}, which is not a vision-language "
            f"model vqabench can train; supported model types are {supported}."
        )


def _selection_paths(selection: str) -> tuple[list[Path], dict[str, Path]]:
    """The files a selection names, and the presets its `after` targets may come from."""
    packaged = packaged_presets()
    chosen: list[Path] = []
    extra_pool: dict[str, Path] = {}
    items = [s.strip() for s in selection.split(",") if s.strip()]
    if not items:
        raise SpecError("--preset is empty; name presets (e.g. 'all' or 'sft,orpo') or a .toml file.")
    for item in items:
        path = Path(item).expanduser()
        if item == "all":
            chosen += [PRESETS_DIR / f"{n}.toml" for n in top_level_presets()]
        elif item in PRESET_GROUPS:
            chosen += sorted((PRESETS_DIR / item).glob("*.toml"))
        elif item in packaged:
            chosen.append(packaged[item])
        elif item.endswith(".toml") or path.is_file():
            if not path.is_file():
                raise SpecError(f"preset file {item} does not exist.")
            chosen.append(path)
            extra_pool.update({p.stem: p for p in sorted(path.parent.glob("*.toml"))})
        elif path.is_dir():
            files = sorted(path.glob("*.toml"))
            if not files:
                raise SpecError(f"preset folder {item} holds no .toml file.")
            chosen += files
        else:
            names = ", ".join(["all", *PRESET_GROUPS, *sorted(packaged)])
            raise SpecError(f"--preset names '{item}', which is not a preset or a file; available presets are {names}.")
    # Presets beside a user's file are found before packaged ones of the same name.
    pool = {**packaged, **extra_pool}
    return chosen, pool


def select_presets(selection: str, overrides: Overrides | None = None) -> PresetSelection:
    """Resolve "all", "a,b", a group, a .toml file or a folder into ordered, validated specs."""
    overrides = overrides or Overrides()
    overrides.validate()
    chosen, pool = _selection_paths(selection)
    presets: dict[str, Preset] = {}
    for path in chosen:
        preset = read_preset(path)
        other = presets.get(preset.spec.name)
        if other is not None and other.path.resolve() != preset.path.resolve():
            raise SpecError(
                f"{path}: key 'name' has value {preset.spec.name!r}, which {other.path} "
                f"already uses; every run in a selection needs its own name."
            )
        presets[preset.spec.name] = preset
    added: list[str] = []
    pending = list(presets.values())
    while pending:
        preset = pending.pop()
        target = preset.spec.after
        if target is None or target in presets:
            continue
        if target not in pool:
            known = ", ".join(sorted(set(presets) | set(pool)))
            raise SpecError(
                f"{preset.path}: key 'after' has value {target!r}, but no preset has that name; allowed are {known}."
            )
        dependency = read_preset(pool[target])
        presets[dependency.spec.name] = dependency
        added.append(dependency.spec.name)
        pending.append(dependency)
    ordered = order_runs([p.spec for p in presets.values()], where={name: str(p.path) for name, p in presets.items()})
    specs = expand_seeds([overrides.apply(s) for s in ordered], overrides.seeds)
    for spec in specs:
        check_trackers_installed(spec)
    return PresetSelection(specs, sorted(added))


def check_trackers_installed(spec: RunSpec) -> None:
    """Raise SpecError (naming the extra to install) when a tracker in `report_to` lacks its package."""
    for name in spec.report_to:
        module = TRACKER_MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise SpecError(
                f"run {spec.name}: report_to names {name!r}, but {module} is not installed; "
                f"install it with pip install 'vqabench[{name}]'."
            )


def load_presets(selection: str, overrides: Overrides | None = None) -> list[RunSpec]:
    """The specs a `--preset` value selects, validated, with `after` targets, in run order."""
    return select_presets(selection, overrides).specs


def order_runs(specs: Iterable[RunSpec], where: dict[str, str] | None = None) -> list[RunSpec]:
    """Topological order by `after` (a target runs before its dependants), stable by name.

    Raises SpecError for a target outside `specs` (unless the run has an init_checkpoint)
    or a cycle; `where` maps run names to the file named in the message.
    """
    by_name = {s.name: s for s in specs}
    where = where or {}
    for spec in by_name.values():
        if spec.after is not None and spec.after not in by_name and spec.init_checkpoint is None:
            raise SpecError(
                f"{where.get(spec.name, spec.name)}: key 'after' has value {spec.after!r}, "
                f"which is not among the runs ({', '.join(sorted(by_name))})."
            )
    ordered: list[RunSpec] = []
    placed: set[str] = set()
    remaining = sorted(by_name)
    while remaining:
        ready = [
            n
            for n in remaining
            if by_name[n].after is None or by_name[n].after in placed or by_name[n].after not in by_name
        ]
        if not ready:
            cycle = _find_cycle(by_name, remaining[0])
            start = cycle[0]
            raise SpecError(
                f"{where.get(start, start)}: key 'after' has value {by_name[start].after!r}, "
                f"which makes a cycle ({' -> '.join([*cycle, start])}); "
                f"a run cannot start from itself."
            )
        name = ready[0]
        ordered.append(by_name[name])
        placed.add(name)
        remaining.remove(name)
    return ordered


def _find_cycle(by_name: dict[str, Any], start: str) -> list[str]:
    """The cycle reached from `start` by following `after` links."""
    path: list[str] = []
    node = start
    while node not in path:
        path.append(node)
        node = by_name[node].after
    return path[path.index(node) :]
