"""Assertions on a stored `vqabench probe` session, for the GPU scripts: exits 1 on any violation.

    python benchmarks/probe_check.py RESULTS_DIR [--max-peak-gb GB]

The newest session in RESULTS_DIR must be a probe that finished, with every preset measured in
every round it was asked for (each timed step finite); with --max-peak-gb, no round's peak may pass that many
gigabytes (10^9 bytes, as the issue's "40 GB"). It prints one line per preset: median ms/step and
its peak (CUDA max allocated on a GPU, the process's RSS on a CPU), then each violation.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from vqabench import events as ev
from vqabench.store import DB_NAME, ResultsStore

GB = 1e9
MIB = 2**20


def probe_violations(
    started: ev.ProbeStarted | None,
    measured: Sequence[ev.ProbeMeasured],
    *,
    status: str,
    max_peak_gb: float | None = None,
) -> list[str]:
    """A probe session's faults: not finished, a preset or round missing, a bad step time, a peak over the limit."""
    if started is None:
        return ["the session is not a probe (no probe_started)"]
    found = [] if status == "done" else [f"the probe session ended {status!r}, not 'done'"]
    for preset in started.presets:
        mine = [m for m in measured if m.preset == preset]
        if sorted(m.round for m in mine) != list(range(1, started.rounds + 1)):
            found.append(f"{preset}: measured in rounds {sorted(m.round for m in mine)}, expected 1..{started.rounds}")
        for m in mine:
            if not m.step_ms or not all(math.isfinite(t) and t > 0 for t in m.step_ms):
                found.append(f"{preset}: round {m.round} step times {m.step_ms}")
            if m.peak_memory_mib is None:
                found.append(f"{preset}: round {m.round} has no peak memory")
            elif max_peak_gb is not None and m.peak_memory_mib * MIB > max_peak_gb * GB:
                found.append(
                    f"{preset}: round {m.round} {m.memory_source} peak {m.peak_memory_mib * MIB / GB:.2f} GB "
                    f"> {max_peak_gb:g} GB"
                )
    return found


def probe_figures(measured: Sequence[ev.ProbeMeasured]) -> list[str]:
    """Per preset: the median of its timed steps over all rounds, and its largest peak."""
    lines = []
    for preset in dict.fromkeys(m.preset for m in measured):
        mine = [m for m in measured if m.preset == preset]
        steps = [t for m in mine for t in m.step_ms]
        peaks = [m.peak_memory_mib for m in mine if m.peak_memory_mib is not None]
        peak = f"{max(peaks) * MIB / GB:.2f} GB ({max(peaks):.0f} MiB)" if peaks else "n/a"
        median = f"{statistics.median(steps):.1f}" if steps else "n/a"
        lines.append(f"{preset}: {median} ms/step (median of {len(steps)}), {mine[0].memory_source} peak {peak}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("--max-peak-gb", type=float, default=None)
    args = p.parse_args(argv)
    if not (args.results / DB_NAME).exists():
        print(f"probe_check: no results store in {args.results}: the probe did not start", file=sys.stderr)
        return 1
    with ResultsStore(args.results, create=False) as store:
        session = store.last_session()
        probed = store.probe(session.id) if session is not None else None
        started, measured = probed if probed is not None else (None, [])
        status = session.status if session is not None else "absent"
    for line in probe_figures(measured):
        print(line)
    found = probe_violations(started, measured, status=status, max_peak_gb=args.max_peak_gb)
    for violation in found:
        print(f"VIOLATION: {violation}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
