"""Experiment trackers (report_to): what each wrote, read back with that library's own reader."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from pathlib import Path

import pytest
from fake_worker import canned_events, worker_cmd

from vqabench.events import EpochEnded, Evaluated, Progress, RunStarted, encode_event
from vqabench.presets import Overrides, check_trackers_installed
from vqabench.runner import RunnerFinished, RunQueued, RunStatusChanged, WorkerEvent
from vqabench.spec import SpecError, spec_from_dict
from vqabench.store import ResultsStore
from vqabench.trackers.session import SessionTrackers

LABEL = "20261207-101500-1"
STEPS = 4  # fake_worker's steps_per_epoch
EPOCHS = 2


def recorded_run(name: str = "sft", report_to: tuple[str, ...] = ()) -> tuple[object, list[object]]:
    """A spec and its canned events: 2 epochs of 4 steps, each epoch with every step's time."""
    spec = spec_from_dict({"name": name, "method": "sft", "epochs": EPOCHS, "lr": 5e-5, "report_to": list(report_to)})
    events = []
    for event in canned_events(spec.to_dict(), telemetry=True):
        if isinstance(event, EpochEnded):
            event = dataclasses.replace(event, step_ms=[10.0 * event.epoch + s for s in range(1, STEPS + 1)])
        events.append(event)
    return spec, events


def feed(subscribers: list, spec, events: list) -> None:
    """Deliver a run's notifications as the runner would: queued, running, events, done."""
    for note in [
        RunQueued(spec.name, spec, 0),
        RunStatusChanged(spec.name, "running", spec=spec, pid=100),
        *[WorkerEvent(spec.name, e, encode_event(e)) for e in events],
        RunStatusChanged(spec.name, "done", exit_code=0),
        RunnerFinished({spec.name: "done"}, cancelled=False),
    ]:
        for subscriber in subscribers:
            subscriber(note)


def expected(events: list) -> dict:
    """What every tracker must hold, worked out from the events by hand (global step = (epoch-1)*4 + step)."""
    epochs = [e for e in events if isinstance(e, EpochEnded)]
    test = next(e for e in events if isinstance(e, Evaluated))
    return {
        "eval_loss": {4 * e.epoch: e.eval_loss for e in epochs},  # at each epoch's last step
        "step_ms": {4 * (e.epoch - 1) + s: 10.0 * e.epoch + s for e in epochs for s in range(1, 5)},
        "running_loss": {
            4 * (p.epoch - 1) + p.step: p.running_loss for p in events if isinstance(p, Progress) and p.phase == "train"
        },
        "em": test.em,
        "train_seconds": sum(e.epoch_seconds for e in epochs),
    }


def run_trackers(tmp_path: Path, report_to: tuple[str, ...]) -> tuple[dict, list[str]]:
    spec, events = recorded_run(report_to=report_to)
    warnings: list[str] = []
    feed([SessionTrackers(LABEL, tmp_path, lambda run, text: warnings.append(f"{run}: {text}"))], spec, events)
    return expected(events), warnings


def test_tensorboard_event_files_hold_every_step_epoch_and_final_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    want, warnings = run_trackers(tmp_path, ("tensorboard",))
    assert warnings == []
    acc = EventAccumulator(str(tmp_path / "tensorboard" / LABEL / "sft"))
    acc.Reload()

    def scalars(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(tag)}

    for tag, values in (
        ("epoch/eval_loss", want["eval_loss"]),
        ("train/step_ms", want["step_ms"]),
        ("train/running_loss", want["running_loss"]),
    ):
        got = scalars(tag)
        assert got.keys() == values.keys(), tag
        assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in values.items()), tag
    assert scalars("train/lr")[1] == pytest.approx(5e-5, rel=1e-6)
    assert scalars("test/em") == {8: pytest.approx(want["em"], rel=1e-6)}
    assert scalars("final/train_seconds")[8] == pytest.approx(want["train_seconds"], rel=1e-6)
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 5e-05' in config and '"epochs": 2' in config


def test_mlflow_local_store_holds_the_config_as_params_and_the_metric_histories(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    want, warnings = run_trackers(tmp_path, ("mlflow",))
    assert warnings == []
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("vqabench")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"{LABEL}-sft" and run.data.tags["session"] == LABEL
    assert run.info.status == "FINISHED"
    assert float(run.data.params["lr"]) == 5e-5 and run.data.params["dataset.source"] == "easyvqa"
    assert run.data.params["run.steps_per_epoch"] == "4"

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    assert history("epoch/eval_loss") == pytest.approx(want["eval_loss"])
    assert history("train/step_ms") == pytest.approx(want["step_ms"])
    assert history("train/running_loss") == pytest.approx(want["running_loss"])
    assert run.data.metrics["test/em"] == pytest.approx(want["em"])
    assert run.data.metrics["final/train_seconds"] == pytest.approx(want["train_seconds"])


def test_trackio_database_holds_the_run_its_config_and_logs(tmp_path, monkeypatch):
    import trackio.sqlite_storage as storage

    monkeypatch.setattr(storage, "TRACKIO_DIR", tmp_path / "trackio")  # read at import; the library's own knob
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    want, warnings = run_trackers(tmp_path, ("trackio",))
    assert warnings == []
    assert storage.SQLiteStorage.get_runs("vqabench") == [f"{LABEL}-sft"]
    config = storage.SQLiteStorage.get_run_config("vqabench", f"{LABEL}-sft")
    assert config["lr"] == 5e-5 and config["run"]["steps_per_epoch"] == 4
    logs = storage.SQLiteStorage.get_logs("vqabench", f"{LABEL}-sft")

    def series(key: str) -> dict[int, float]:
        return {row["step"]: row[key] for row in logs if key in row}

    assert series("epoch/eval_loss") == pytest.approx(want["eval_loss"])
    assert series("train/step_ms") == pytest.approx(want["step_ms"])
    assert series("test/em") == {8: pytest.approx(want["em"])}


def wandb_records(path: Path) -> list:
    """W&B's offline .wandb file: a 7-byte header, then LevelDB-log style 32 KiB blocks whose
    chunks (7-byte header: crc, length, kind 1 full / 2 first / 3 middle / 4 last) carry Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def wandb_key(item) -> str:
    """A history or summary item's name: `key`, or the parts of `nested_key` (W&B writes names with '/' there)."""
    return item.key or ".".join(item.nested_key)


def test_wandb_offline_run_folder_holds_config_history_and_summary(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    import wandb

    want, warnings = run_trackers(tmp_path, ("wandb",))
    assert warnings == []
    wandb.teardown()  # the wandb-core service writes the run file on its own time; this waits for it
    (path,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == f"{LABEL}-sft" and run.run_group == LABEL and run.project == "vqabench"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lr"] == 5e-5 and config["dataset"]["source"] == "easyvqa"
    rows = [
        {wandb_key(item): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    step_ms = {row["global_step"]: row["train/step_ms"] for row in rows if "train/step_ms" in row}
    eval_loss = {row["global_step"]: row["epoch/eval_loss"] for row in rows if "epoch/eval_loss" in row}
    assert step_ms == pytest.approx(want["step_ms"]) and eval_loss == pytest.approx(want["eval_loss"])
    summary = {
        wandb_key(item): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    assert summary["test/em"] == pytest.approx(want["em"])
    assert summary["final/train_seconds"] == pytest.approx(want["train_seconds"])


def test_a_failing_tracker_warns_once_and_the_others_and_the_store_carry_on(tmp_path, monkeypatch):
    (tmp_path / "tensorboard").write_text("a file where the event folder should go")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    spec, events = recorded_run(report_to=("tensorboard", "mlflow"))
    warnings: list[str] = []
    with ResultsStore(tmp_path / "store") as store:
        session = store.begin_session("sft", "test")
        trackers = SessionTrackers(LABEL, tmp_path, lambda run, text: warnings.append(f"{run}: {text}"))
        feed([store.recorder(session), trackers], spec, events)
        (run,) = store.runs(session.id)
        assert run.status == "done" and len(store.epochs(run.id)) == EPOCHS
    assert len(warnings) == 2, warnings
    assert all(w.startswith("sft: the ") and "carry on without it" in w for w in warnings)
    assert any("tensorboard tracker could not start" in w for w in warnings)
    assert any("mlflow tracker could not start" in w and "nosuchscheme" in w for w in warnings)


def test_a_tracker_that_raises_while_logging_is_dropped_with_one_warning(tmp_path, monkeypatch):
    calls: list[str] = []

    class Flaky:
        def start(self, name, group, config):
            calls.append("start")

        def log(self, metrics, step):
            raise OSError(28, "No space left on device")

        def finish(self, summary, status):
            calls.append("finish")

    monkeypatch.setattr("vqabench.trackers.session.make_tracker", lambda name, results_dir: Flaky())
    _, warnings = run_trackers(tmp_path, ("tensorboard",))
    assert calls == ["start"]  # dropped at its first failure: never logged to or finished again
    assert len(warnings) == 1 and "stopped logging (OSError: [Errno 28] No space left on device)" in warnings[0]


def test_report_to_names_are_checked_with_one_sentence(monkeypatch):
    with pytest.raises(SpecError, match=r"key 'report_to' names 'neptune'; allowed trackers are tensorboard, "):
        spec_from_dict({"name": "a", "method": "sft", "report_to": ["neptune"]})
    with pytest.raises(SpecError, match=r"--report-to names 'tb'; allowed trackers are"):
        Overrides(report_to=("tb",)).validate()
    spec = Overrides(report_to=("wandb",)).apply(spec_from_dict({"name": "a", "method": "sft"}))
    assert spec.report_to == ["wandb"]
    assert Overrides(report_to=()).apply(spec).report_to == []  # --report-to none
    monkeypatch.setattr("importlib.util.find_spec", lambda module: None)
    with pytest.raises(SpecError) as error:
        check_trackers_installed(spec)
    assert str(error.value) == (
        "run a: report_to names 'wandb', but wandb is not installed; install it with pip install 'vqabench[wandb]'."
    )


def test_a_run_without_report_to_starts_no_tracker(tmp_path, monkeypatch):
    monkeypatch.setattr("vqabench.trackers.session.make_tracker", lambda *a: pytest.fail("a tracker was made"))
    spec, events = recorded_run()
    feed([SessionTrackers(LABEL, tmp_path, lambda run, text: pytest.fail(text))], spec, events)
    assert not any(isinstance(e, RunStarted) and e.config.get("report_to") for e in events)


def test_a_real_tiny_run_reports_to_tensorboard_what_the_store_holds(tmp_path, vqa_cache):
    """End to end: the real worker, one epoch on 16 pairs, --report-to tensorboard; the event files
    agree with the results store."""
    from rich.console import Console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vqabench.headless import run_headless

    (vqa_cache / "base").mkdir(exist_ok=True)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "base").symlink_to(vqa_cache / "base")  # the session's shared base checkpoint
    preset = tmp_path / "tiny.toml"
    preset.write_text(
        'name = "tiny"\nmethod = "sft"\nepochs = 1\nlimit = 16\nbatch_size = 8\nbase_samples = 512\n'
        '[dataset]\neval_size = 16\ntest_size = 16\n[judge]\nname = "exact"\n'
    )
    out = io.StringIO()
    console = Console(file=out, width=200)
    code = run_headless(
        str(preset), Overrides(report_to=("tensorboard",)), tmp_path / "results", cache_dir=cache, console=console
    )
    assert code == 0, out.getvalue()[-3000:]
    assert "warning" not in out.getvalue()
    with ResultsStore(tmp_path / "results") as store:
        session = store.last_session()
        (run,) = store.runs(session.id)
        (epoch,) = store.epochs(run.id)
        test = next(e for e in store.evals(run.id) if e.split == "test")
        steps = run.started.steps_per_epoch
    (folder,) = (tmp_path / "results" / "tensorboard").iterdir()
    assert folder.name == session.label
    acc = EventAccumulator(str(folder / "tiny"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("epoch/eval_loss")] == [(steps, pytest.approx(epoch.eval_loss))]
    assert [e.step for e in acc.Scalars("train/step_ms")] == list(range(1, steps + 1))
    assert acc.Scalars("test/em")[0].value == pytest.approx(test.em)


def test_headless_report_to_warns_on_the_console_for_a_failing_tracker_and_exits_0(tmp_path):
    from rich.console import Console

    from vqabench.headless import run_headless

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tensorboard").write_text("a file where the event folder should go")
    out = io.StringIO()
    code = run_headless(
        "sft",
        Overrides(report_to=("tensorboard",)),
        tmp_path / "results",
        worker_cmd=worker_cmd(tmp_path, {}),
        console=Console(file=out, width=300),
    )
    assert code == 0, out.getvalue()[-2000:]
    warnings = [line for line in out.getvalue().splitlines() if "warning:" in line]
    assert len(warnings) == 1 and warnings[0].startswith("[sft] warning: the tensorboard tracker could not start (")
    assert "1 of 1 run(s) done." in out.getvalue()


def test_report_to_on_the_command_line():
    from vqabench.cli import _overrides, build_parser

    def overrides(*args: str) -> Overrides:
        return _overrides(build_parser().parse_args(["--headless", *args]))

    assert overrides("--report-to", "tensorboard, wandb").report_to == ("tensorboard", "wandb")
    assert overrides("--report-to", "none").report_to == ()
    assert overrides().report_to is None  # the presets' own lists
    with pytest.raises(SpecError, match=r"^--report-to names 'neptune'; allowed trackers are .* or none\.$"):
        overrides("--report-to", "neptune").validate()
