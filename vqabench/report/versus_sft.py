"""The Versus SFT table: paired differences to the SFT run of the same setup on the same test questions."""

from __future__ import annotations

from collections.abc import Sequence

from vqabench.report.model import (
    BASE,
    TOO_FEW,
    Cell,
    ReportTable,
    figure,
    p_cell,
    word,
)
from vqabench.report.runs import (
    RunData,
    base_rows,
    read_predictions,
    seed_suffix,
)


def versus_sft_table(runs: Sequence[RunData]) -> ReportTable | None:
    """Paired differences to the SFT run of the same setup on the very same test items."""
    from vqabench.stats import MIN_PAIRED_ITEMS, mcnemar_exact, paired_bootstrap

    done = [r for r in runs if r.status == "done" and r.final_eval is not None]
    baselines: dict[tuple[str, str], RunData] = {}  # (setup, seed suffix) -> SFT run; "" = any seed
    for r in done:
        if r.method == "sft":
            baselines.setdefault((r.setup, seed_suffix(r.name)), r)
            baselines.setdefault((r.setup, ""), r)
    rows: list[list[Cell]] = []
    candidates = [(name, run, "base") for name, run in base_rows(runs)] + [(r.name, r, "test") for r in done]
    for name, run, split in candidates:
        suffix = "" if split == "base" else seed_suffix(run.name)
        base = baselines.get((run.setup, suffix)) or baselines.get((run.setup, ""))
        if base is None or (base is run and split == "test"):
            continue
        ours, theirs = read_predictions(run, split), read_predictions(base)
        if (
            not ours
            or not theirs
            or len(ours) != len(theirs)
            or any(
                (a["question"], a["reference"]) != (b["question"], b["reference"])
                for a, b in zip(ours, theirs, strict=True)
            )
        ):
            continue
        row = [word(name), word(base.name)]
        for key in ("em", "f1"):
            a, b = [x[key] for x in ours], [x[key] for x in theirs]
            d = paired_bootstrap(a, b)
            if len(a) < MIN_PAIRED_ITEMS:
                p = word(TOO_FEW)
            elif key == "em":  # a binary score: the exact McNemar test
                p = p_cell(mcnemar_exact(a, b).p_value)
            else:
                p = p_cell(d.p_value)
            row += [figure(d.mean_diff, 3, "fraction", interval=[d.low, d.high], signed=True), p]
        graded = [
            (x["verdict"] == "correct", y["verdict"] == "correct")
            for x, y in zip(ours, theirs, strict=True)
            if x.get("verdict") in ("correct", "incorrect") and y.get("verdict") in ("correct", "incorrect")
        ]
        if graded:
            test = mcnemar_exact([int(x) for x, _ in graded], [int(y) for _, y in graded])
            diff = (test.a_only - test.b_only) / test.n
            row += [figure(diff, 3, "fraction", signed=True), word(TOO_FEW) if test.too_few else p_cell(test.p_value)]
        else:
            row += [word(None), word(None)]
        rows.append([*row, figure(len(ours), 0, "questions")])
    if not rows:
        return None
    notes = [
        "Difference to the SFT run of the same model and data, training the same part in the same precision, "
        "on the same test questions (positive: "
        "better than SFT), with a 95% paired bootstrap interval (2,000 resamples of questions). "
        "p (EM) and p (judge): exact McNemar test on the questions only one of the two runs got right "
        "(judge: questions both verdicts graded); p (F1): two-sided paired bootstrap. "
        f"Fewer than {MIN_PAIRED_ITEMS} paired questions: '{TOO_FEW}' instead of a p-value. "
        "An interval that contains 0 means no measurable difference."
    ]
    if any(row[0].text.startswith(BASE) for row in rows):
        notes.append(
            "base: the starting model, before any training, against SFT: negative is what SFT gained over it "
            "(a method's own gain over the starting model is its difference minus the base row's)."
        )
    return ReportTable(
        "Versus SFT",
        ["Method", "Baseline", "ΔEM [95% CI]", "p (EM)", "ΔF1 [95% CI]", "p (F1)", "ΔJudge", "p (judge)", "n"],
        ["left", "left"] + ["right"] * 7,
        rows,
        notes,
        "versus_sft",
    )
