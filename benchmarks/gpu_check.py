"""The checks that need a GPU, as one asserting script: exits non-zero on any violation.

    python benchmarks/gpu_check.py [--out DIR]        # what benchmarks/gpu_check.sh runs

On one CUDA GPU (an H100/H200: a few minutes), through the real worker:

1. an embedded SFT run: NVML status "nvml", every memory figure of every epoch non-null and
   ordered allocated <= reserved <= process <= device <= total;
2. the same with CUDA_VISIBLE_DEVICES=<the GPU's UUID>;
3. model "blip-vqa-base-random": SFT, then DPO with reference "precompute" from its checkpoint,
   with the same memory checks;
4. a forced out-of-memory run (the real-size model, whole model trained, batch 2048), which
   must end as error_kind "memory" with a one-sentence message naming batch_size;
5. each method's training step timed under torch.cuda.set_sync_debug_mode("error") (no host
   sync allowed), and the batch building counted under "warn".

It prints one summary table. The checking functions are plain functions over events, unit
tested on the CPU (tests/test_gpu_check.py) with recorded streams, so the assertions are
known to fire.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqabench import events as ev

MEMORY_ORDER = ("cuda_max_allocated_mib", "cuda_max_reserved_mib", "gpu_process_peak_mib", "gpu_device_peak_mib")
#: Every field a GPU epoch must carry (memory, utilisation and power).
GPU_FIELDS = (*MEMORY_ORDER, "gpu_util_mean", "gpu_power_mean_w")
OOM_BATCH = 2048


@dataclass
class Check:
    """One line of the summary: a name, its violations (empty = pass) and figures worth printing."""

    name: str
    violations: list[str] = field(default_factory=list)
    figures: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations


def memory_violations(epoch: ev.EpochEnded, total_mib: float | None) -> list[str]:
    """Null figures and broken order among allocated <= reserved <= process <= device <= total."""
    found = [f"epoch {epoch.epoch}: {name} is null" for name in GPU_FIELDS if getattr(epoch, name) is None]
    chain: list[tuple[str, float | None]] = [(name, getattr(epoch, name)) for name in MEMORY_ORDER]
    chain.append(("device total", total_mib))
    known = [(name, value) for name, value in chain if value is not None]
    for (low_name, low), (high_name, high) in itertools.pairwise(known):
        if low > high:
            found.append(f"epoch {epoch.epoch}: {low_name} {low:.1f} MiB > {high_name} {high:.1f} MiB")
    if total_mib is None:
        found.append(f"epoch {epoch.epoch}: the device total is unknown")
    return found


def run_violations(events: list[ev.Event], total_mib: float | None, epochs: int | None = None) -> list[str]:
    """A training run that must succeed with NVML telemetry and sound memory figures in every epoch."""
    found: list[str] = []
    started = [e for e in events if isinstance(e, ev.RunStarted)]
    failed = [e for e in events if isinstance(e, ev.RunFailed)]
    if failed:
        found.append(f"the run failed ({failed[0].error_kind}): {failed[0].message}")
    if not started:
        return [*found, "no run_started event"]
    if started[0].telemetry != "nvml":
        found.append(f"telemetry status is {started[0].telemetry!r}, not 'nvml'")
    if not started[0].device.startswith("cuda"):
        found.append(f"the run used {started[0].device}, not CUDA")
    epoch_events = [e for e in events if isinstance(e, ev.EpochEnded)]
    if not epoch_events:
        found.append("no epoch_end event")
    if epochs is not None and epoch_events and len(epoch_events) != epochs:
        found.append(f"{len(epoch_events)} epoch_end events, expected {epochs}")
    for epoch in epoch_events:
        found += memory_violations(epoch, total_mib)
    if not failed and not any(isinstance(e, ev.RunFinished) for e in events):
        found.append("no run_finished event")
    return found


def oom_violations(events: list[ev.Event]) -> list[str]:
    """A run forced out of memory must fail as error_kind "memory" with one sentence naming batch_size."""
    failed = [e for e in events if isinstance(e, ev.RunFailed)]
    if not failed:
        return ["the run did not fail: nothing ran out of memory"]
    failure = failed[0]
    found = []
    if failure.error_kind != "memory":
        found.append(f"error_kind is {failure.error_kind!r}, not 'memory': {failure.message}")
    if "\n" in failure.message or ". " in failure.message.rstrip("."):
        found.append(f"the message is not one sentence: {failure.message!r}")
    if "batch_size" not in failure.message:
        found.append(f"the message does not name the key to lower (batch_size): {failure.message!r}")
    return found


def summary(checks: Iterable[Check]) -> str:
    """One Markdown table: check, result, figures or the violations."""
    lines = ["| Check | Result | Figures / violations |", "|:--|:--|:--|"]
    for check in checks:
        detail = "; ".join(check.violations) if check.violations else check.figures
        lines.append(f"| {check.name} | {'pass' if check.ok else 'FAIL'} | {detail.replace('|', '/')} |")
    return "\n".join(lines)


def exit_code(checks: Iterable[Check]) -> int:
    return 0 if all(check.ok for check in checks) else 1


def epoch_figures(events: list[ev.Event]) -> str:
    parts = []
    for e in events:
        if isinstance(e, ev.EpochEnded):
            parts.append(
                f"e{e.epoch}: {e.epoch_seconds:.2f} s, alloc {e.cuda_max_allocated_mib} / reserved "
                f"{e.cuda_max_reserved_mib} / process {e.gpu_process_peak_mib} / device {e.gpu_device_peak_mib} MiB"
            )
    return "; ".join(parts)


def run_worker(spec: dict[str, Any], folder: Path, env: dict[str, str] | None = None, timeout: float = 300) -> list:
    """The real worker on one spec; its parsed events (a line that is not an event is a violation upstream)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec['name']}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "vqabench.engine.worker", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    (folder / f"{spec['name']}.stderr.txt").write_text(proc.stderr)
    return [ev.parse_event(line) for line in proc.stdout.splitlines()]


def sync_free_step_check(methods: list[tuple[str, str | None]], steps: int = 20) -> Check:
    """Each method's training step under set_sync_debug_mode("error"), timed; batch building counted under "warn"."""
    import copy

    import torch

    from vqabench.engine.data import easyvqa
    from vqabench.engine.data.batching import encode
    from vqabench.engine.reference import CopyReference, PrecomputedReference
    from vqabench.engine.trainer import Trainer, pick_device
    from vqabench.models import blip
    from vqabench.spec import DatasetSpec, RunSpec

    check = Check("training step under sync debug mode 'error'")
    device = pick_device("cuda")
    bs = 32
    data = easyvqa.load_splits(DatasetSpec(eval_size=bs, test_size=1), seed=0, limit=bs * (steps + 1))
    start = blip.build_embedded(0)
    encoded = encode(data, start, 32, 16)
    figures = []
    for method, reference in methods:
        label = method + (f" ({reference})" if reference else "")
        loaded = copy.copy(start)
        loaded.model = copy.deepcopy(start.model).to(device)
        ref: Any = None
        if reference == "precompute":
            ref = PrecomputedReference.build(
                loaded,
                encoded,
                batch_size=bs,
                device=device,
                cache_dir=None,
                checkpoint_key="gpu",
                data_key="gpu",
                precision="fp32",
            )
        if reference == "copy":
            ref = CopyReference(loaded, "decoder")
        spec = RunSpec(
            name=label,
            method=method,
            reference=reference or "copy",
            init_checkpoint="x" if reference else None,
            batch_size=bs,
        )
        trainer = Trainer(spec, loaded, encoded, ref, device)
        trainer.warm_up()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                batches = [encoded.batch("train", torch.arange(i * bs, (i + 1) * bs), device) for i in range(steps)]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        batch_syncs = sum("synchroniz" in str(w.message) for w in caught)
        if batch_syncs:
            check.violations.append(f"{label}: building {steps} batches made {batch_syncs} host syncs")
        torch.cuda.synchronize()
        begin = time.perf_counter()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in batches:
                trainer.train_step(batch)
        except RuntimeError as exc:
            check.violations.append(f"{label}: a host sync inside the step: {str(exc).splitlines()[0]}")
            continue
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        figures.append(f"{label} {(time.perf_counter() - begin) * 1000 / steps:.1f} ms/step")
        del trainer, ref, loaded, batches
        torch.cuda.empty_cache()
    check.figures = ", ".join(figures)
    return check


def timed(name: str, function: Callable[[], Check]) -> Check:
    begin = time.perf_counter()
    try:
        check = function()
    except Exception as exc:  # a crash is a violation of its own check, not the end of the script
        check = Check(name, [f"crashed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"])
    check.figures = f"{check.figures} ({time.perf_counter() - begin:.0f} s)".strip()
    print(f"{'pass' if check.ok else 'FAIL'}: {check.name} {check.figures}", file=sys.stderr, flush=True)
    return check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; nothing to check.", file=sys.stderr)
        return 2
    out: Path = args.out
    cache = out / "cache"
    props = torch.cuda.get_device_properties(0)
    # NVML's total, the same counter as the device figure it bounds (CUDA's total_memory is a little lower)
    total_mib = _nvml_total() or props.total_memory / 2**20
    uuid = str(props.uuid)
    uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    print(f"Device: {torch.cuda.get_device_name(0)} ({uuid}), {total_mib:.0f} MiB; torch {torch.__version__}\n")
    small = {
        "epochs": 2,
        "limit": 512,
        "batch_size": 32,
        "base_samples": 1024,
        "device": "cuda",
        "judge": {"name": "exact"},
        "dataset": {"eval_size": 64, "test_size": 64},
        "cache_dir": str(cache),
    }

    def embedded(name: str, env: dict[str, str] | None = None) -> Callable[[], Check]:
        def check() -> Check:
            spec = {**small, "name": name, "method": "sft", "output_dir": str(out / "runs" / name)}
            events = run_worker(spec, out / "specs", env)
            # NVML reads the device total too; props.total_memory is what CUDA can use, which is lower
            return Check(name, run_violations(events, total_mib, 2), epoch_figures(events))

        return check

    def real_size() -> Check:
        base = {**small, "model": "blip-vqa-base-random", "limit": 64, "batch_size": 8, "epochs": 1}
        base["dataset"] = {"eval_size": 16, "test_size": 16}
        sft = {**base, "name": "base-sft", "method": "sft", "output_dir": str(out / "runs" / "base-sft")}
        first = run_worker(sft, out / "specs", timeout=420)
        found = [f"sft: {v}" for v in run_violations(first, total_mib, 1)]
        dpo = {
            **base,
            "name": "base-dpo-precompute",
            "method": "dpo",
            "reference": "precompute",
            "init_checkpoint": str(out / "runs" / "base-sft" / "best"),
            "output_dir": str(out / "runs" / "base-dpo"),
        }
        second = run_worker(dpo, out / "specs", timeout=420)
        found += [f"dpo precompute: {v}" for v in run_violations(second, total_mib, 1)]
        return Check("blip-vqa-base-random: SFT, then DPO precompute", found, epoch_figures(second))

    def out_of_memory() -> Check:
        spec = {
            **small,
            "name": "oom",
            "method": "sft",
            "model": "blip-vqa-base-random",
            "train": "all",
            "batch_size": OOM_BATCH,
            "limit": OOM_BATCH,
            "epochs": 1,
            "output_dir": str(out / "runs" / "oom"),
        }
        events = run_worker(spec, out / "specs", timeout=420)
        failed = [e for e in events if isinstance(e, ev.RunFailed)]
        return Check(f"forced OOM (batch {OOM_BATCH})", oom_violations(events), failed[0].message if failed else "")

    methods = [("sft", None), ("orpo", None), ("simpo", None), ("dpo", "copy"), ("dpo", "precompute")]
    methods += [("ipo", "copy"), ("kto", "copy")]
    checks = [
        timed("embedded SFT on cuda", embedded("embedded-sft")),
        timed(f"same with CUDA_VISIBLE_DEVICES={uuid}", embedded("embedded-sft-uuid", {"CUDA_VISIBLE_DEVICES": uuid})),
        timed("blip-vqa-base-random", real_size),
        timed("forced OOM", out_of_memory),
        timed("sync-free step", lambda: sync_free_step_check(methods)),
    ]
    print(summary(checks))
    return exit_code(checks)


def _nvml_total() -> float | None:
    """The total memory NVML reports for GPU 0 (events do not carry it); None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return float(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total) / 2**20
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
