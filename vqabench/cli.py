"""Command line: argument parsing only; the work happens in headless, report and the dashboard.

    vqabench                                        the dashboard (vqabench.tui.app)
    vqabench --headless --preset all [--epochs N] [--limit N] [--seed N]
             [--gpus 0,1,2,3] [--parallel N] [--results DIR] [--export FILE.md] [--json FILE.json]
             [--cache DIR] [--report-to tensorboard,trackio,mlflow,wandb]
             [--baseline FILE.json|store:ID] [--fail-on "em:-0.02, epoch_time:+10%"]
    vqabench compare --baseline FILE.json|store:ID [--session ID | --last] [--fail-on LIMITS] [--results DIR]
    vqabench export [--session ID | --last] [--format markdown|json] [-o FILE] [--results DIR]
    vqabench probe [--preset SELECTION] [--set KEY=VALUE] [--steps N] [--rounds N] [--memory] [--results DIR]
    vqabench tune --trials N [--preset SELECTION] [--storage URL] [--study NAME] [--gpus 0,1] [--no-pruning]
                  [--results DIR]
    vqabench models                                 the model families and built-in variants

A user error (bad preset, missing file, unusable store) is one sentence on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import vqabench
from vqabench.gate import GateError
from vqabench.judges import JudgeError, JudgeInputError
from vqabench.presets import Overrides
from vqabench.spec import JudgeSpec, SpecError
from vqabench.store import DEFAULT_RESULTS_DIR, ResultsStore, StoreError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqabench",
        description="Benchmark preference alignment (SFT, DPO, ORPO, ...) of vision-language (VQA) models. "
        "Without a command: the dashboard, or with --headless the console runner.",
    )
    parser.add_argument("--version", action="version", version=f"vqabench {vqabench.__version__}")
    parser.add_argument(
        "--headless", action="store_true", help="run the presets in the console (CI) instead of the dashboard"
    )
    parser.add_argument(
        "--preset",
        metavar="SELECTION",
        help="'all' (the top-level presets, the default), names like 'sft,orpo', 'paper', or a .toml file",
    )
    parser.add_argument("--epochs", type=int, metavar="N", help="override every run's epochs")
    parser.add_argument("--limit", type=int, metavar="N", help="cap the training pairs of every run")
    parser.add_argument("--seed", type=int, metavar="N", help="override every run's seed")
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="0,1,2",
        help="repeat every run once per seed (runs are named NAME@sN); the report "
        "shows mean ± 95%% interval across seeds",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any preset key for every run, e.g. --set dataset.test_size=200 "
        "--set judge.name=exact (repeatable)",
    )
    parser.add_argument(
        "--gpus",
        type=_gpu_list,
        metavar="0,1,2,3",
        help="run independent runs at the same time, one per GPU (each sees only its own through "
        "CUDA_VISIBLE_DEVICES); the same as --set gpus=[0,1,2,3]",
    )
    parser.add_argument(
        "--parallel",
        type=_positive_int,
        default=1,
        metavar="N",
        help="let N runs without GPUs train at the same time (on a CPU they slow each other down; "
        "the report then says their epoch times were measured concurrently)",
    )
    parser.add_argument(
        "--report-to",
        type=_tracker_list,
        metavar="tensorboard,wandb",
        help="log every run to these experiment trackers (tensorboard, trackio, mlflow, wandb; each an extra: "
        "pip install 'vqabench[wandb]'), or none; replaces the presets' report_to",
    )
    _add_results_option(parser, top_level=True)
    parser.add_argument(
        "--export",
        type=Path,
        metavar="FILE.md",
        help="write the Markdown report when the runs end, with SVG figures in FILE_files/",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="FILE.json",
        help="write the JSON report (every figure with its interval, unit and note) when the runs end",
    )
    _add_figures_option(parser)
    _add_gate_options(parser)
    parser.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="base checkpoints and reference caches (default: $VQABENCH_CACHE or ~/.cache/vqabench)",
    )
    # A stand-in worker command for tests (e.g. "python tests/fake_worker.py script.json").
    parser.add_argument("--worker-cmd", help=argparse.SUPPRESS)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_export_command(commands)
    _add_judge_command(commands)
    _add_compare_command(commands)
    _add_probe_command(commands)
    _add_tune_command(commands)
    commands.add_parser(
        "models",
        help="list the model families and the built-in variants with their parameter counts",
        description="The model families a preset's model may name by hub id or folder, and the built-in "
        "random variants it may name directly, each with its parameter count (built on the meta device: "
        "no memory, no download).",
    )
    return parser


def _add_results_option(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    # Only the top level has a default, so `vqabench --results X export` keeps X.
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS_DIR if top_level else argparse.SUPPRESS,
        metavar="DIR",
        help=f"results folder with results.db (default: ./{DEFAULT_RESULTS_DIR})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return value


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write the Markdown or JSON report of a stored session",
        description="Write the quality, efficiency and per-epoch tables of a stored session as Markdown or JSON.",
    )
    which = export.add_mutually_exclusive_group()
    which.add_argument("--session", type=int, metavar="ID", help="the session's id")
    which.add_argument("--last", action="store_true", help="the latest session (the default)")
    export.add_argument(
        "--per-seed", action="store_true", help="with runs repeated per seed (--seeds), add every seed's own rows"
    )
    export.add_argument(
        "--format",
        choices=("markdown", "json"),
        default="markdown",
        help="markdown (the default) or json: every figure with its interval, unit and the note that defines it",
    )
    export.add_argument(
        "-o",
        "--output",
        default="-",
        metavar="FILE",
        help="where to write the report ('-' = standard output, the default; figures need a Markdown file)",
    )
    _add_figures_option(export)
    _add_results_option(export)


def _add_gate_options(parser: argparse.ArgumentParser) -> None:
    from vqabench.report import DEFAULT_FAIL_ON

    parser.add_argument(
        "--baseline",
        metavar="FILE.json|store:ID",
        help="compare the session with a baseline: a JSON report (vqabench export --format json) or store:ID, "
        "a session of the results store; exit 1 on a statistically real regression (docs/ci.md)",
    )
    parser.add_argument(
        "--fail-on",
        metavar="LIMITS",
        help=f'with --baseline: the regressions that fail, e.g. "{DEFAULT_FAIL_ON}" (the default)'.replace("%", "%%"),
    )


def _add_figures_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-figures",
        dest="figures",
        action="store_false",
        help="write the Markdown alone, without the SVG figures in FILE_files/ next to it",
    )


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of integers like 0,1,2") from None


def _tracker_list(text: str) -> tuple[str, ...]:
    """``--report-to a,b``; ``none`` (or an empty value) turns the presets' trackers off."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    return () if names in ((), ("none",)) else names


def _gpu_list(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        ids = ()
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of GPU ids like 0,1,2,3")
    return ids


def _add_judge_command(commands: argparse._SubParsersAction) -> None:
    judge = commands.add_parser(
        "judge",
        help="judge answers again: a JSONL file, or a stored run's test predictions",
        description='Judge a file of {"question","reference","prediction"} lines, or re-judge a '
        "stored run's test answers without retraining (the new score becomes the run's "
        "latest). Judgments are cached: nothing already judged is paid for twice.",
    )
    which = judge.add_mutually_exclusive_group(required=True)
    which.add_argument("file", nargs="?", type=Path, help="a JSONL file of answers")
    which.add_argument("--run", type=int, metavar="ID", help="a stored run's id")
    judge.add_argument("--judge", default="auto", choices=("auto", "exact", "semantic", "together", "openai"))
    judge.add_argument(
        "--base-url", help="the LLM judge's server: Together-compatible, or for openai e.g. http://localhost:8000/v1"
    )
    judge.add_argument("--model", help="the judge model (together, openai)")
    judge.add_argument(
        "--api-key-env", metavar="VAR", help="openai judge: the variable holding the key (OPENAI_API_KEY)"
    )
    judge.add_argument("--threshold", type=float, help="semantic judge: cosine counted as correct")
    judge.add_argument("--limit", type=_positive_int, metavar="N", help="judge only the first N answers")
    _add_rate_option(judge)
    judge.add_argument(
        "-o", "--output", type=Path, metavar="OUT.jsonl", help="verdicts file for FILE (default: FILE.verdicts.jsonl)"
    )
    judge.add_argument("--cache", type=Path, metavar="DIR", help="judgment cache folder")
    _add_results_option(judge)


def _add_rate_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests-per-minute",
        type=_positive_int,
        metavar="N",
        help="LLM judges: most request starts per minute (default 60; raise it to your account's limit)",
    )


def _judge_spec(args: argparse.Namespace) -> JudgeSpec:
    spec = JudgeSpec(name=args.judge, limit=args.limit, base_url=args.base_url)
    if args.model:
        spec.model = args.model
    if getattr(args, "api_key_env", None):
        spec.api_key_env = args.api_key_env
    if args.requests_per_minute is not None:
        spec.requests_per_minute = args.requests_per_minute
    return spec


def _add_compare_command(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="win rate of one stored run's test answers against another's",
        description="Ask the judge which of two runs' answers to each test question is better, in "
        "both orders (a tie when the orders disagree, which cancels position bias).",
    )
    compare.add_argument("run_a", type=int, nargs="?", metavar="RUN_A")
    compare.add_argument("run_b", type=int, nargs="?", metavar="RUN_B")
    which = compare.add_mutually_exclusive_group()
    which.add_argument("--session", type=int, metavar="ID", help="with --baseline: the session to gate")
    which.add_argument("--last", action="store_true", help="with --baseline: the latest session (the default)")
    _add_gate_options(compare)
    compare.add_argument("--judge", default="auto", choices=("auto", "exact", "semantic", "together", "openai"))
    compare.add_argument(
        "--base-url", help="the LLM judge's server: Together-compatible, or for openai e.g. http://localhost:8000/v1"
    )
    compare.add_argument("--model", help="the judge model (together, openai)")
    compare.add_argument("--limit", type=_positive_int, metavar="N", help="compare only the first N questions")
    _add_rate_option(compare)
    compare.add_argument("--cache", type=Path, metavar="DIR", help="judgment cache folder")
    _add_results_option(compare)


def _add_selection_options(command: argparse.ArgumentParser) -> None:
    """--preset and --set on a command, as for --headless; defaults suppressed, so that
    `vqabench --preset X probe` keeps X, as --results does."""
    command.add_argument("--preset", metavar="SELECTION", default=argparse.SUPPRESS, help="as for --headless")
    command.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=VALUE",
        help="as for --headless",
    )


def _add_probe_command(commands: argparse._SubParsersAction) -> None:
    probe = commands.add_parser(
        "probe",
        help="time every selected preset's training step on the same batches, interleaved (seconds, no training)",
        description="The interleaved cost probe: one worker process runs each selected preset's training "
        "step on the same batches, in rounds, and prints ms/step with its spread, the ratio to SFT with "
        "a 95%% interval, peak memory, reference memory and setup cost. Every preset starts from the same "
        "base model; nothing is trained to the end. The result is stored as a session of its own.",
    )
    _add_selection_options(probe)
    probe.add_argument("--steps", type=_positive_int, default=20, metavar="N", help="timed steps per preset per round")
    probe.add_argument("--rounds", type=_positive_int, default=3, metavar="N", help="interleaved rounds")
    probe.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps per preset per round")
    probe.add_argument("--cache", type=Path, metavar="DIR", default=argparse.SUPPRESS, help="as for --headless")
    probe.add_argument(
        "--memory",
        action="store_true",
        help="print each preset's estimated peak memory by term (meta device: seconds, no GPU, no step run), "
        "beside the newest stored CUDA peak of the same preset and settings",
    )
    probe.add_argument(
        "--savings",
        action="store_true",
        help="time each preset also with each exact saving off (shared prompt, answer-only logits, feature "
        "cache), as NAME-no-shared-prompt, NAME-full-logits and NAME-no-feature-cache",
    )
    _add_results_option(probe)


def _add_tune_command(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser(
        "tune",
        help="tune every selected preset with Optuna on an equal budget of trials, then score each best on test once",
        description="Each selected preset gets its own Optuna study (TPE, seeded; MedianPruner on the per-epoch "
        "eval objective) with the same number of trials over its [tune] search space. Trials are ordinary runs "
        "scored on the eval split only; each preset's best setting is retrained once and only that run answers "
        "the test split. A preset that starts from another (DPO after SFT) starts from its tuned run.",
    )
    _add_selection_options(tune)
    tune.add_argument(
        "--gpus",
        type=_gpu_list,
        default=argparse.SUPPRESS,
        metavar="0,1",
        help="run trials on these GPUs at once, one trial per GPU (each sees only its own)",
    )
    tune.add_argument("--trials", type=_positive_int, required=True, metavar="N", help="trials per preset")
    tune.add_argument(
        "--storage",
        metavar="URL",
        help="the Optuna storage (e.g. postgresql://user@host/db); default: sqlite:///RESULTS/tune.db",
    )
    tune.add_argument(
        "--study",
        metavar="NAME",
        help="the studies' name (one per preset: NAME.<preset>); default: derived from the presets and settings, "
        "so the same command elsewhere joins the same studies",
    )
    tune.add_argument("--tune-seed", type=int, default=0, metavar="N", help="the samplers' seed (default 0)")
    tune.add_argument("--no-pruning", action="store_true", help="let every trial run all its epochs")
    tune.add_argument("--cache", type=Path, metavar="DIR", default=argparse.SUPPRESS, help="as for --headless")
    _add_results_option(tune)


def _run_tune(args: argparse.Namespace) -> int:
    from vqabench.tune.console import run_tune
    from vqabench.tune.study import TuneSettings

    settings = TuneSettings(
        trials=args.trials, storage=args.storage, study=args.study, seed=args.tune_seed, prune=not args.no_pruning
    )
    command = shlex.join(["vqabench", *sys.argv[1:]])
    if args.storage:  # never store a password: the session's command names the storage without it
        from vqabench.tune.study import shown_url

        command = command.replace(args.storage, shown_url(args.storage))
    return run_tune(
        args.preset or "all",
        _overrides(args),
        args.results,
        settings,
        worker_cmd=shlex.split(args.worker_cmd) if args.worker_cmd else None,
        cache_dir=args.cache,
        command=command,
    )


def _run_probe(args: argparse.Namespace) -> int:
    from vqabench.probe import measured_cuda_peaks, memory_estimate_text, probe_memory, run_probe
    from vqabench.report import markdown_table

    if args.memory:
        sys.stdout.write(
            probe_memory(args.preset or "all", _overrides(args), args.results, steps=args.steps, warmup=args.warmup)
        )
        return 0
    outcome = run_probe(
        args.preset or "all",
        _overrides(args),
        args.results,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        cache_dir=args.cache,
        worker_cmd=shlex.split(args.worker_cmd) if args.worker_cmd else None,
        command=shlex.join(["vqabench", *sys.argv[1:]]),
        say=lambda line: print(line, file=sys.stderr, flush=True),
        savings=args.savings,
    )
    if outcome.table is not None:
        print()
        print("\n".join(markdown_table(outcome.table)))
        print()
        print("\n".join(outcome.table.notes))
    peaks = measured_cuda_peaks(outcome)
    if peaks:  # the estimate beside the measured peak, so that the next GPU can be picked from the estimate
        print("\nPeak memory, estimated from the model's sizes (vqabench probe --memory) and measured:\n")
        cache_rows = outcome.specs[0].batch_size * (args.steps + args.warmup)
        sys.stdout.write(memory_estimate_text(outcome.specs, cache_rows=cache_rows, measured=peaks))
    if outcome.error:
        print(f"vqabench: the probe failed: {outcome.error}", file=sys.stderr)
        return 1
    print(
        f"\nStored as session {outcome.session_id}; print it again with: vqabench export --session {outcome.session_id}"
    )
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from vqabench.catalog import catalog_text

    sys.stdout.write(catalog_text())
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from vqabench.rejudge import compare_runs

    if args.baseline is not None:
        return _run_gate(args)
    if args.run_a is None or args.run_b is None:
        raise StoreError("compare needs two run ids (RUN_A RUN_B), or --baseline to gate a session.")
    spec = _judge_spec(args)
    with ResultsStore(args.results, create=False) as store:
        print(compare_runs(store, args.run_a, args.run_b, spec, args.cache))
    return 0


def _run_gate(args: argparse.Namespace) -> int:
    """vqabench compare --baseline: a stored session against a baseline; exit 1 on a real regression."""
    from vqabench.gate import append_step_summary, apply_gate, prepare_gate, verdict_lines
    from vqabench.report import build_report, markdown_table, report_markdown

    if args.run_a is not None:
        raise StoreError("compare --baseline gates a session (--session ID or --last), not two runs.")
    gate = prepare_gate(args.baseline, args.fail_on, args.results)
    with ResultsStore(args.results, create=False) as store:
        session = store.session(args.session) if args.session is not None else store.last_session()
        if session is None:
            raise StoreError(f"the results store {store.path} holds no session yet; run 'vqabench --headless' first.")
        report = build_report(store, session.id)
    result = apply_gate(gate, report)
    print(f"{result.table.title} (session {session.id} against {gate.source}):")
    print("\n".join(markdown_table(result.table)))
    print("\n".join(["", *result.table.notes[2:], "", *verdict_lines(result)]))
    try:
        append_step_summary(report_markdown(report))
    except OSError as exc:
        raise StoreError(f"cannot append to $GITHUB_STEP_SUMMARY ({exc.strerror}).") from None
    return 1 if result.failed else 0


def _run_judge(args: argparse.Namespace) -> int:
    from vqabench.rejudge import judge_answers_file, rejudge_run

    spec = _judge_spec(args)
    if args.threshold is not None:
        spec.threshold = args.threshold
    if args.file is not None:
        out = args.output or args.file.with_name(args.file.stem + ".verdicts.jsonl")
        print(judge_answers_file(args.file, spec, out, args.cache))
        return 0
    with ResultsStore(args.results, create=False) as store:
        event = rejudge_run(store, args.run, spec, args.cache)
    score = "n/a" if event.judge_score is None else f"{event.judge_score:.3f}"
    print(
        f"Run {args.run}: {event.judge} judge {score} on {event.judge_n} answers "
        f"({event.unparseable} unparseable), EM {event.em:.3f}, F1 {event.f1:.3f}; recorded in {args.results}."
    )
    return 0


def _overrides(args: argparse.Namespace) -> Overrides:
    settings = tuple(args.settings)
    if args.gpus:
        settings += (f"gpus=[{','.join(map(str, args.gpus))}]",)
    return Overrides(
        epochs=args.epochs,
        limit=args.limit,
        seed=args.seed,
        settings=settings,
        seeds=args.seeds,
        report_to=args.report_to,
    )


def _run_export(args: argparse.Namespace) -> int:
    from vqabench.export import export_json, export_report
    from vqabench.figures import FigureError, figures_dir
    from vqabench.report import build_report, render_json, report_markdown

    with ResultsStore(args.results, create=False) as store:
        session = store.session(args.session) if args.session is not None else store.last_session()
        if session is None:
            raise StoreError(f"the results store {store.path} holds no session yet; run 'vqabench --headless' first.")
        report = build_report(store, session.id, per_seed=args.per_seed)
    if args.output == "-":
        sys.stdout.write(render_json(report) if args.format == "json" else report_markdown(report))
        return 0
    path = Path(args.output)
    try:
        if args.format == "json":
            export_json(report, path)
            print(f"Wrote the JSON report of session {session.id} to {args.output}.")
            return 0
        written = export_report(report, path, figures=args.figures)
    except OSError as exc:
        raise StoreError(f"cannot write {exc.filename or path} ({exc.strerror}).") from None
    except FigureError as exc:
        raise StoreError(str(exc)) from None
    shown = f" and {len(written.figures)} SVG figure(s) to {figures_dir(path)}/" if written.figures else ""
    print(f"Wrote the report of session {session.id} to {args.output}{shown}.")
    return 0


def _run_headless(args: argparse.Namespace) -> int:
    from vqabench.headless import run_headless

    if args.export is not None and not args.export.parent.is_dir():
        raise StoreError(f"--export names {args.export}, but the folder {args.export.parent} does not exist.")
    if args.json is not None and not args.json.parent.is_dir():
        raise StoreError(f"--json names {args.json}, but the folder {args.json.parent} does not exist.")
    gate = None
    if args.baseline is not None:
        from vqabench.gate import prepare_gate

        gate = prepare_gate(args.baseline, args.fail_on, args.results)  # before a run starts: bad input, exit 2
    elif args.fail_on is not None:
        raise StoreError("--fail-on sets the limits of --baseline; name the baseline with --baseline FILE.json.")
    return run_headless(
        args.preset or "all",
        _overrides(args),
        args.results,
        export=args.export,
        json_path=args.json,
        worker_cmd=shlex.split(args.worker_cmd) if args.worker_cmd else None,
        cache_dir=args.cache,
        command=shlex.join(["vqabench", *sys.argv[1:]]),
        parallel=args.parallel,
        figures=args.figures,
        gate=gate,
    )


def _run_dashboard(args: argparse.Namespace) -> int:
    try:
        from vqabench.tui.app import run_dashboard
    except ModuleNotFoundError as exc:
        if exc.name not in ("vqabench.tui", "vqabench.tui.app"):
            raise
        print(
            "vqabench: the dashboard is not part of this build yet; run 'vqabench --headless --preset all' instead.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return run_dashboard(
        selection=args.preset,
        overrides=_overrides(args),
        results_dir=args.results,
        worker_cmd=shlex.split(args.worker_cmd) if args.worker_cmd else None,
        cache_dir=args.cache,
        parallel=args.parallel,
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "export": _run_export,
    "judge": _run_judge,
    "compare": _run_compare,
    "probe": _run_probe,
    "tune": _run_tune,
    "models": _run_models,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, dispatch, and turn user errors into one sentence and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command is not None:
            return COMMANDS[args.command](args)
        if args.headless:
            return _run_headless(args)
        return _run_dashboard(args)
    except (SpecError, StoreError, JudgeError, JudgeInputError, GateError) as exc:
        print(f"vqabench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vqabench: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
