"""The families presets as a user runs them: a headless session on two families' tiny variants, real workers.

SFT and DPO on one family and SFT on another: enough for the Model column to tell families apart and
for DPO to start from its SFT. Every family's full trio runs in `.ci/run` (`--preset families`), and
IPO, KTO, SimPO and both exact references on a causal family in tests/test_family_methods.py.
"""

from __future__ import annotations

from test_headless import vqabench

from vqabench.store import ResultsStore

RUNS = ["qwen2-vl-sft", "qwen2-vl-dpo", "idefics3-sft"]


def _table(report: str, title: str) -> list[dict[str, str]]:
    lines = [line for line in report.split(f"## {title}\n")[1].split("##")[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def test_two_families_run_headless_and_the_report_names_both_models(tmp_path, vqa_cache):
    proc = vqabench(
        tmp_path,
        "--headless",
        "--preset",
        ",".join(RUNS),
        "--limit",
        "32",
        "--set",
        "dataset.test_size=16",
        "--set",
        "dataset.eval_size=8",
        "--export",
        "r.md",
        timeout=400,
        cache=vqa_cache,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 of 3 run(s) done." in proc.stdout
    with ResultsStore(tmp_path / "vqabench-results", create=False) as store:
        session = store.last_session()
        assert session is not None
        runs = {r.name: r for r in store.runs(session.id)}
    assert {n: r.status for n, r in runs.items()} == dict.fromkeys(RUNS, "done")
    assert runs["qwen2-vl-dpo"].after == "qwen2-vl-sft"
    report = (tmp_path / "r.md").read_text()
    for title in ("Quality", "Efficiency"):
        models = {row["Method"]: row["Model"] for row in _table(report, title) if not row["Method"].startswith("base")}
        assert set(models) == set(RUNS), (title, models)
        for name, model in models.items():
            family, count = model.split(" ")
            assert family == name.rsplit("-", 1)[0]  # the run's family, as its worker said
            assert count.endswith("M") and 0.01 < float(count[:-1]) < 5  # tiny variants: a few hundred thousand
        # a family's runs train the same model (one size); the two families differ
        assert models["qwen2-vl-sft"] == models["qwen2-vl-dpo"] != models["idefics3-sft"]
