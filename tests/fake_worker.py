"""A canned-event worker for tests: speaks the events.py protocol without training anything.

Run as ``python tests/fake_worker.py SCRIPT.json SPEC.json`` (the runner appends SPEC.json).
SCRIPT.json says how each run behaves: ``{"default": {...}, "runs": {"<run name>": {...}}}``
with these keys (all optional):

    epochs          epochs to run (default: the spec's)
    epoch_sleep     seconds of sleep per epoch (default 0)
    crash_in_epoch  die in this epoch after its first progress event ...
    crash_signal    ... by this signal (default 9) ...
    crash_code      ... or with this exit code instead, both without a run_failed event
    fail_in_epoch   emit run_failed (error_kind "numerics") in this epoch and exit 1
    eval_loss_offset  add this to every epoch_end's eval loss (a worse setting, for the tuner's pruner)
    hang_in_epoch   start a grandchild in the same process group, write both pids to
                    <output_dir>/pids.json (pids-rank<RANK>.json when torchrun started it),
                    and sleep until killed
    ignore_sigterm  ignore SIGTERM (the host must escalate to SIGKILL)
    garbage_lines   print this many lines that are not events before run_started
    stderr          lines to write to stderr before run_started
    eval_extra      the `extra` of the final eval event (intervals, kappa)
    cuda            report CUDA memory fields (default false)
    telemetry       progress events carry live telemetry: 4 per epoch with RSS, and with
                    `cuda` also NVML GPU memory and utilisation (default false)
    record_env      write <output_dir>/env.json: the CUDA_VISIBLE_DEVICES it got and its
                    start and end times (time.time())
    base_event      emit the starting model's "base" eval before the test eval when the spec's
                    score_base asks for it, as the real worker does
    probe_fail      for a probe plan ({"probe": ...}): emit run_failed after the first round

Given a probe plan instead of a spec, it answers as the probe worker does: probe_started,
then one probe_measured per preset and round, with step times scaled by METHOD_COST.

:func:`canned_events` is also used directly by tests that need a fixed event sequence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vqabench.engine.reference_choice import choose_reference
from vqabench.events import (
    EpochEnded,
    Evaluated,
    Event,
    ProbeMeasured,
    ProbeStarted,
    Progress,
    RunFailed,
    RunFinished,
    RunStarted,
    encode_event,
)

#: Per-method numbers that make the tables differ in a readable way.
METHOD_COST = {"sft": 1.0, "dpo": 1.6, "orpo": 1.1, "ipo": 1.6, "kto": 1.7, "simpo": 1.05}
METHOD_QUALITY = {"sft": 0.60, "dpo": 0.64, "orpo": 0.66, "ipo": 0.63, "kto": 0.62, "simpo": 0.65}


def trained_part(spec: dict[str, Any]) -> str:
    """The spec's train value as the real worker resolves it for BLIP (the fake runs' family): "auto" is "decoder"."""
    train = spec.get("train", "auto")
    return "decoder" if train == "auto" else str(train)


def run_started(spec: dict[str, Any], epochs: int, cuda: bool = False) -> RunStarted:
    method = spec["method"]
    reference = spec.get("reference", "copy") if method in ("dpo", "ipo", "kto") else None
    data: dict[str, Any] = {"train": 64, "eval": 16, "test": 32, "model_family": "blip"}
    if reference is not None:  # as the real worker decides, on a roomy disk
        train = trained_part(spec)
        choice = choose_reference(reference, train=train, epochs=epochs, table_bytes=1, free=2**40)
        reference = choice.chosen
        data["reference_choice"] = choice.to_dict()
    return RunStarted(
        run=spec["name"],
        method=method,
        config=spec,
        device="cuda:0" if cuda else "cpu",
        torch_version="2.13.0+cpu",
        trainable_params=1_000_000,
        total_params=1_500_000,
        reference_strategy=reference,
        reference_bytes=6_291_456 if reference and reference != "adapter" else 0,
        epochs=epochs,
        steps_per_epoch=4,
        telemetry="n/a: device is CPU",
        data=data,
        pid=os.getpid(),
        train=trained_part(spec),
        precision=spec.get("precision", "fp32"),
    )


def epoch_ended(spec: dict[str, Any], epoch: int, epochs: int, cuda: bool = False) -> EpochEnded:
    method = spec["method"]
    cost = METHOD_COST.get(method, 1.0)
    reference = method in ("dpo", "ipo", "kto")
    reference_bytes = 6_291_456 if reference and spec.get("reference") != "adapter" else 0
    return EpochEnded(
        epoch=epoch,
        epochs=epochs,
        train_loss=round(1.0 / epoch + 0.1 * cost, 4),
        eval_loss=round(1.1 / epoch + 0.1 * cost, 4),
        epoch_seconds=round(2.0 * cost, 3),
        eval_seconds=0.25,
        samples_per_s=round(32.0 / cost, 2),
        lr=5e-5 * 0.9 ** (epoch - 1),
        peak_rss_mib=500.0 + 10 * epoch + (24.0 if reference else 0.0),
        reference_bytes=reference_bytes,
        chosen_logp=round(-1.0 / epoch, 4),
        rejected_logp=round(-2.0 - epoch * cost, 4),
        reward_margin=round(0.5 * epoch * cost, 4),
        pref_accuracy=round(0.5 + 0.1 * epoch, 4),
        is_best=epoch == epochs,
        cuda_max_allocated_mib=(100.0 * cost + epoch) if cuda else None,
        cuda_max_reserved_mib=(128.0 * cost + epoch) if cuda else None,
        optimizer_state_bytes=8_000_000,
    )


def evaluated(spec: dict[str, Any], extra: dict[str, Any] | None = None) -> Evaluated:
    quality = METHOD_QUALITY.get(spec["method"], 0.5)
    return Evaluated(
        split="test",
        n=32,
        em=quality,
        f1=round(quality + 0.05, 4),
        judge="semantic",
        judge_score=round(quality + 0.1, 4),
        judge_n=32,
        unparseable=0,
        predictions=None,
        extra=dict(extra or {}),
    )


def canned_events(
    spec: dict[str, Any],
    epochs: int | None = None,
    cuda: bool = False,
    eval_extra: dict[str, Any] | None = None,
    checkpoint: str = "best",
    telemetry: bool = False,
) -> Iterator[Event]:
    """The events of a normal run: started, progress and epoch_end per epoch, eval, finished."""
    epochs = epochs or spec.get("epochs", 3)
    yield run_started(spec, epochs, cuda)
    for epoch in range(1, epochs + 1):
        if not telemetry:
            yield Progress(phase="train", epoch=epoch, step=1, steps=4, running_loss=1.0 / epoch)
        for step in range(1, 5) if telemetry else ():
            yield Progress(
                phase="train",
                epoch=epoch,
                step=step,
                steps=4,
                running_loss=round(1.0 / epoch - 0.02 * step, 4),
                rss_mib=500.0 + 10 * step + epoch,
                gpu_process_mib=(900.0 + 50 * step) if cuda else None,
                gpu_device_mib=(1200.0 + 50 * step) if cuda else None,
                gpu_util=(40.0 + 10 * step) if cuda else None,
            )
        yield epoch_ended(spec, epoch, epochs, cuda)
    yield evaluated(spec, eval_extra)
    train_seconds = sum(epoch_ended(spec, e, epochs, cuda).epoch_seconds for e in range(1, epochs + 1))
    yield RunFinished(
        best_epoch=epochs,
        best_eval_loss=epoch_ended(spec, epochs, epochs).eval_loss,
        checkpoint=checkpoint,
        total_seconds=round(train_seconds + 1.0, 3),
        train_seconds=round(train_seconds, 3),
    )


def worker_cmd(tmp_path: Path, plan: dict[str, Any]) -> list[str]:
    """The runner's worker_cmd for a script: {"default": {...}, "runs": {...}}."""
    script = tmp_path / "fake-worker-script.json"
    script.write_text(json.dumps(plan))
    return [sys.executable, str(Path(__file__).resolve()), str(script)]


def process_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _emit(event: Event) -> None:
    sys.stdout.write(encode_event(event) + "\n")
    sys.stdout.flush()


def _hang(output_dir: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    name = f"pids-rank{os.environ['RANK']}.json" if "RANK" in os.environ else "pids.json"
    (output_dir / name).write_text(json.dumps({"worker": os.getpid(), "grandchild": child.pid}))
    while True:
        time.sleep(1)


def canned_probe(plan: dict[str, Any], fail_after_round: int | None = None) -> Iterator[Event]:
    """The events of a probe: same base step times per round, scaled by method, a little jitter."""
    specs = plan["specs"]
    yield ProbeStarted(
        presets=[s["name"] for s in specs],
        device="cpu",
        torch_version="2.13.0+cpu",
        model_source="embedded base checkpoint",
        batch_size=specs[0]["batch_size"],
        steps=plan["steps"],
        warmup=plan["warmup"],
        rounds=plan["rounds"],
        cores=2,
        pid=os.getpid(),
    )
    for r in range(1, plan["rounds"] + 1):
        for spec in specs if r % 2 else reversed(specs):
            cost = METHOD_COST.get(spec["method"], 1.0)
            reference = spec.get("reference") if spec["method"] in ("dpo", "ipo", "kto") else None
            if reference is not None:  # as the real probe resolves "auto", on a roomy disk
                train, epochs = trained_part(spec), spec.get("epochs", 3)
                reference = choose_reference(reference, train=train, epochs=epochs, table_bytes=1, free=2**40).chosen
            yield ProbeMeasured(
                preset=spec["name"],
                method=spec["method"],
                round=r,
                step_ms=[round(40.0 * cost * (1 + 0.01 * ((i * 7) % 5 - 2)), 3) for i in range(plan["steps"])],
                peak_memory_mib=500.0 + (24.0 if reference else 0.0),
                memory_source="RSS",
                reference_strategy=reference,
                reference_bytes=6_291_456 if reference == "copy" else 0,
                setup_seconds=0.05 if reference else 0.0,
                load_avg_max=1.0,
            )
        if fail_after_round == r:
            yield RunFailed(error_kind="internal", message="internal error RuntimeError: the probe broke.")
            return


def main(script_path: str, spec_path: str) -> int:
    script = json.loads(Path(script_path).read_text())
    spec = json.loads(Path(spec_path).read_text())
    if "probe" in spec:
        failing = script.get("default", {}).get("probe_fail")
        for event in canned_probe(spec["probe"], 1 if failing else None):
            _emit(event)
        return 1 if failing else 0
    plan = {**script.get("default", {}), **script.get("runs", {}).get(spec["name"], {})}
    output_dir = Path(spec["output_dir"])
    if plan.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for line in plan.get("stderr", []):
        print(line, file=sys.stderr, flush=True)
    for n in range(plan.get("garbage_lines", 0)):
        print(f"not an event {n}", flush=True)
    checkpoint = output_dir / "best"
    checkpoint.mkdir(parents=True, exist_ok=True)
    started = time.time()
    epochs = plan.get("epochs") or spec["epochs"]
    events = canned_events(
        spec, epochs, plan.get("cuda", False), plan.get("eval_extra"), str(checkpoint), plan.get("telemetry", False)
    )
    for event in events:
        if isinstance(event, Progress):
            epoch = event.epoch
            time.sleep(plan.get("epoch_sleep", 0))
            _emit(event)
            if plan.get("hang_in_epoch") == epoch:
                _hang(output_dir)
            if plan.get("crash_in_epoch") == epoch:
                print(f"fake worker: crashing in epoch {epoch}", file=sys.stderr, flush=True)
                if "crash_code" in plan:
                    os._exit(plan["crash_code"])
                os.kill(os.getpid(), plan.get("crash_signal", signal.SIGKILL))
            if plan.get("fail_in_epoch") == epoch:
                _emit(RunFailed(error_kind="numerics", message=f"the loss became NaN in epoch {epoch}."))
                return 1
            continue
        if isinstance(event, EpochEnded) and plan.get("eval_loss_offset"):
            event = dataclasses.replace(event, eval_loss=event.eval_loss + plan["eval_loss_offset"])
        if isinstance(event, Evaluated) and plan.get("base_event") and spec.get("score_base"):
            _emit(dataclasses.replace(event, split="base", em=0.3, f1=0.35, judge_score=0.3))
        _emit(event)
    if plan.get("record_env"):
        record = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": started, "end": time.time()}
        (output_dir / "env.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
