"""Weights & Biases, offline unless ``WANDB_MODE`` says otherwise: the run folder goes under
``<results>/wandb/`` (or ``WANDB_DIR``) and ``wandb sync`` uploads it later. Project
``WANDB_PROJECT`` or "vqabench", grouped by the session label."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class WandbTracker:
    def __init__(self, results_dir: Path) -> None:
        self.dir = Path(os.environ.get("WANDB_DIR") or results_dir).resolve()
        self.run: Any = None

    def start(self, name: str, group: str, config: dict[str, Any]) -> None:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        mode: Any = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "vqabench",
            name=name,
            group=group,
            config=config,
            dir=str(self.dir),
            mode=mode,
            reinit="create_new",  # runs trained at the same time (--parallel) each keep their own
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        # Step times arrive with the epoch's end, after the epoch's running losses: W&B's own step
        # must only grow, so the global step is a logged figure that every chart is drawn against.
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "global_step": step})

    def finish(self, summary: dict[str, float], status: str) -> None:
        try:
            for key, value in summary.items():
                self.run.summary[key] = value
        finally:
            self.run.finish(exit_code=0 if status == "done" else 1)
