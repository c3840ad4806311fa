"""trackio (local-first): its SQLite database in trackio's own folder (``TRACKIO_DIR``, default
``$HF_HOME/trackio``), where ``trackio show`` finds it; project ``TRACKIO_PROJECT`` or "vqabench".

Each run keeps its own ``trackio.Run`` object, so runs that train at the same time (``--parallel``)
do not share trackio's "current run". trackio's own console lines are kept off the console.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any


class TrackioTracker:
    def __init__(self, results_dir: Path) -> None:
        self.run: Any = None
        self.step = 0

    def start(self, name: str, group: str, config: dict[str, Any]) -> None:
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):
            self.run = trackio.init(
                project=os.environ.get("TRACKIO_PROJECT") or "vqabench",
                name=name,
                group=group,
                config=config,
                auto_log_gpu=False,
                auto_log_cpu=False,
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)
        self.step = max(self.step, step)

    def finish(self, summary: dict[str, float], status: str) -> None:
        try:
            if summary:
                self.run.log(summary, step=self.step)
        finally:
            import trackio
            from trackio import context_vars

            with contextlib.redirect_stdout(io.StringIO()):
                if context_vars.current_run.get() is self.run:
                    trackio.finish()  # also clears trackio's current run, which it would finish again at exit
                else:
                    self.run.finish()
