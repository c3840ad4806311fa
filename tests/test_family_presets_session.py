"""The families presets as a user runs them: a headless session on two families' tiny variants, real workers."""

from __future__ import annotations

from test_headless import vqabench

from vqabench.store import ResultsStore

TRIOS = [f"{family}-{method}" for family in ("qwen2-vl", "idefics3") for method in ("sft", "dpo", "orpo")]


def _table(report: str, title: str) -> list[dict[str, str]]:
    lines = [line for line in report.split(f"## {title}\n")[1].split("##")[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def test_two_families_trios_run_headless_and_the_report_names_both_models(tmp_path, vqa_cache):
    proc = vqabench(
        tmp_path,
        "--headless",
        "--preset",
        ",".join(TRIOS),
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
    assert "6 of 6 run(s) done." in proc.stdout
    with ResultsStore(tmp_path / "vqabench-results", create=False) as store:
        session = store.last_session()
        assert session is not None
        runs = {r.name: r for r in store.runs(session.id)}
    assert {n: r.status for n, r in runs.items()} == dict.fromkeys(TRIOS, "done")
    assert runs["qwen2-vl-dpo"].after == "qwen2-vl-sft" and runs["idefics3-dpo"].after == "idefics3-sft"
    report = (tmp_path / "r.md").read_text()
    for title in ("Quality", "Efficiency"):
        models = {row["Method"]: row["Model"] for row in _table(report, title) if not row["Method"].startswith("base")}
        assert set(models) == set(TRIOS), (title, models)
        for name, model in models.items():
            family, count = model.split(" ")
            assert family == name.rsplit("-", 1)[0]  # the run's family, as its worker said
            assert count.endswith("M") and 0.01 < float(count[:-1]) < 5  # tiny variants: a few hundred thousand
        # the family's three runs train the same model: one size each
        assert len({models[n] for n in TRIOS[:3]}) == 1 and len({models[n] for n in TRIOS[3:]}) == 1
