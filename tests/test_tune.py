"""`vqabench tune`: trials are ordinary runs, selection is on eval, the test split is scored once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from fake_worker import worker_cmd
from optuna.trial import TrialState

from vqabench.presets import Overrides, load_presets
from vqabench.store import ResultsStore
from vqabench.tune.study import Tuner, TuneSettings, default_study_name, open_storage, shown_url
from vqabench.tune.summary import tuned_rows

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "vqabench.cli"]
#: The embedded tiny setup; lr is searched from the preset's 5e-5 upwards, where one epoch on 16 pairs
#: learns more (measured: eval loss 1.686 at 5e-5, 1.649 at 1e-3 after one epoch).
TINY_TUNE = [
    "--preset",
    "sft",
    "--set",
    "limit=16",
    "--set",
    "epochs=1",
    "--set",
    "base_samples=512",
    "--set",
    "judge.name=exact",
    "--set",
    "dataset.eval_size=8",
    "--set",
    "dataset.test_size=8",
    "--set",
    "tune={lr={low=5e-5,high=1.5e-3,log=true}}",
]


def test_two_processes_share_one_study_and_beat_the_presets_setting_without_reading_test(tmp_path, vqa_cache):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VQABENCH_CACHE": str(vqa_cache), "OMP_NUM_THREADS": "1"}
    env.pop("TOGETHER_API_KEY", None)
    procs = [
        subprocess.Popen(
            [
                *CLI,
                "tune",
                "--trials",
                "4",
                "--storage",
                storage,
                "--results",
                str(tmp_path / f"r{i}"),
                *TINY_TUNE,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs

    # one study with the budget of 4 trials, each run by exactly one of the two processes
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(storage=storage, study_name=summary.study_name)
    assert summary.study_name.endswith(".sft") and summary.study_name.startswith("vqabench-")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    ran: list[str] = []
    for i in range(2):
        with ResultsStore(tmp_path / f"r{i}", create=False) as store:
            (session,) = store.list_sessions()
            runs = store.runs(session.id)
            trials = [r for r in runs if ".trial" in r.name]
            ran += [r.name for r in trials]
            # the data access hook: a trial's worker reports the splits it holds, and it holds no test pair
            for run in trials:
                assert run.status == "done" and run.started is not None
                assert run.started.data["sizes"]["test"] == 0 and run.started.data["sizes"]["eval"] == 8
                assert store.evals(run.id) == []
            (tuned,) = [r for r in runs if r.name == "sft.tuned"]
            assert tuned.started is not None and tuned.started.data["sizes"]["test"] == 8
            # the test split is answered once, after selection (with the starting model's "base" row)
            assert [e.split for e in store.evals(tuned.id)] == ["base", "test"]
            (row,) = tuned_rows(store, session.id, open_storage(storage), [("sft", study.study_name)])
            assert (row.complete, row.pruned, row.failed, row.budget) == (4, 0, 0, 4)
            assert row.test is not None and row.test.n == 8
            # the retrain repeats the best trial: same seed, data and setting, so the same eval loss
            assert tuned.finished is not None and abs(tuned.finished.best_eval_loss - study.best_value) < 1e-6
    assert sorted(ran) == [f"sft.trial{n}" for n in range(4)]  # none duplicated, none missing

    best = [re.search(r"best of 4 trial\(s\): trial (\d+)", out) for out in outs]
    assert best[0] and best[1] and best[0].group(1) == best[1].group(1) == str(study.best_trial.number)
    # trial 0 ran the preset's own lr; tuning found a setting with a lower eval loss than it
    default = study.trials[0]
    assert default.params == {"lr": 5e-5} and default.user_attrs["preset_setting"]
    assert study.best_value < default.value - 0.005
    assert study.best_trial.params["lr"] > 5e-5


def test_a_failed_trial_is_recorded_failed_with_its_reason_and_the_others_go_on(tmp_path):
    specs = load_presets("sft", Overrides(epochs=2, settings=("tune={lr={low=1e-5,high=1e-3,log=true}}",)))
    plan = {"runs": {"sft.trial1": {"fail_in_epoch": 2}}}
    settings = TuneSettings(trials=3, prune=False)
    with ResultsStore(tmp_path / "results") as store:
        session = store.begin_session("sft", "test")
        tuner = Tuner(specs, settings, store, session, worker_cmd=worker_cmd(tmp_path, plan), say=lambda _: None)
        outcome = tuner.run()["sft"]
        study = optuna.load_study(storage=open_storage(tuner.url), study_name=tuner.study_name("sft"))
        states = {t.number: t.state for t in study.trials}
        assert states == {0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.COMPLETE}
        assert "epoch 2" in study.trials[1].user_attrs["reason"]
        assert outcome.final_state is not None and outcome.final_state.status == "done"
        assert tuner.url == f"sqlite:///{(tmp_path / 'results' / 'tune.db').resolve()}"
        (row,) = tuned_rows(store, session.id, open_storage(tuner.url), [("sft", tuner.study_name("sft"))])
        assert (row.complete, row.failed, row.trials) == (2, 1, 3)
        names = [r.name for r in store.runs(session.id)]
        assert names == ["sft.trial0", "sft.trial1", "sft.trial2", "sft.tuned"]


def test_a_trial_that_lags_the_median_is_pruned_and_its_run_stopped(tmp_path):
    specs = load_presets("sft", Overrides(epochs=2, settings=("tune={lr={low=1e-5,high=1e-3,log=true}}",)))
    plan = {"runs": {"sft.trial2": {"eval_loss_offset": 1.0, "epoch_sleep": 1.0}}}
    with ResultsStore(tmp_path / "results") as store:
        session = store.begin_session("sft", "test")
        tuner = Tuner(specs, TuneSettings(trials=3), store, session, worker_cmd=worker_cmd(tmp_path, plan), say=print)
        tuner.run()
        study = optuna.load_study(storage=open_storage(tuner.url), study_name=tuner.study_name("sft"))
        assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
        # the fake's eval loss after epoch 1 (1.1 / epoch + 0.1 for SFT) plus its offset; epoch 2 never came
        assert study.trials[2].intermediate_values == {1: pytest.approx(2.2)}
        runs = {r.name: r for r in store.runs(session.id)}
        assert runs["sft.trial2"].status == "cancelled"
        assert runs["sft.trial2"].reason == "pruned by the tuner (MedianPruner) after epoch 1 of 2"
        assert len(store.epochs(runs["sft.trial2"].id)) == 1


def test_the_default_study_name_follows_the_presets_and_a_password_is_never_shown():
    specs = load_presets("sft")
    settings = TuneSettings(trials=2)
    assert default_study_name(specs, settings) == default_study_name(load_presets("sft"), TuneSettings(trials=9))
    assert default_study_name(specs, settings) != default_study_name(load_presets("orpo"), settings)
    assert default_study_name(specs, settings) != default_study_name(specs, TuneSettings(trials=2, seed=1))
    shown = shown_url("postgresql://alice:s3cret@db.example:5432/tune")
    assert "s3cret" not in shown and "alice" in shown and "db.example:5432/tune" in shown


def test_a_two_stage_method_is_tuned_after_sft_and_its_trials_start_from_the_tuned_sft(tmp_path):
    specs = load_presets("dpo-beta0.1", Overrides(epochs=1))
    assert [s.name for s in specs] == ["sft", "dpo-beta0.1"]
    with ResultsStore(tmp_path / "results") as store:
        session = store.begin_session("dpo-beta0.1", "test")
        fake = worker_cmd(tmp_path, {})
        tuner = Tuner(specs, TuneSettings(trials=2), store, session, worker_cmd=fake, say=lambda _: None)
        outcomes = tuner.run()
        sft_checkpoint = outcomes["sft"].final_state.checkpoint  # type: ignore[union-attr]
        assert sft_checkpoint and "sft.tuned" in sft_checkpoint
        runs = {r.name: r for r in store.runs(session.id)}
        trials = [f"{preset}.trial{n}" for preset in ("sft", "dpo-beta0.1") for n in (0, 1)]
        assert list(runs) == [*trials[:2], "sft.tuned", *trials[2:], "dpo-beta0.1.tuned"]
        for name in ("dpo-beta0.1.trial0", "dpo-beta0.1.trial1", "dpo-beta0.1.tuned"):
            assert runs[name].spec["init_checkpoint"] == sft_checkpoint
        assert runs["dpo-beta0.1.trial1"].spec["beta"] != 0.1  # sampled; trial 0 keeps the preset's
        assert runs["dpo-beta0.1.trial0"].spec["beta"] == 0.1
        studies = [(name, tuner.study_name(name)) for name in ("sft", "dpo-beta0.1")]
        sft, dpo = tuned_rows(store, session.id, open_storage(tuner.url), studies)
        assert dpo.after == "sft" and dpo.objective == "chosen_nll" and sft.objective == "eval_loss"
        own = dpo.tuning_seconds + dpo.retrain_seconds
        assert dpo.to_tuned_seconds > own > 0
        assert abs(dpo.to_tuned_seconds - own - sft.to_tuned_seconds) < 1e-9


def test_a_storage_that_cannot_be_opened_is_one_sentence_and_exit_2(tmp_path):
    storage = f"sqlite:///{tmp_path / 'missing-folder' / 'tune.db'}"
    proc = subprocess.run(
        [*CLI, "tune", "--trials", "2", "--preset", "sft", "--storage", storage, "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"vqabench: the study storage {storage} cannot be opened (OperationalError)."
    with ResultsStore(tmp_path / "r", create=False) as store:
        assert store.list_sessions() == []  # refused before a session was recorded
