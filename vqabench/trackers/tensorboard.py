"""TensorBoard through tensorboardX (no TensorFlow): event files under ``<results>/tensorboard/<session>/<run>``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vqabench.trackers import flat_config


class TensorBoardTracker:
    def __init__(self, results_dir: Path) -> None:
        self.root = results_dir / "tensorboard"
        self.writer: Any = None
        self.config: dict[str, Any] = {}
        self.step = 0

    def start(self, name: str, group: str, config: dict[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        run = name[len(group) + 1 :] if name.startswith(f"{group}-") else name
        self.writer = SummaryWriter(logdir=str(self.root / group / run))
        self.config = flat_config(config)
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.step = max(self.step, step)

    def finish(self, summary: dict[str, float], status: str) -> None:
        try:
            for key, value in summary.items():
                self.writer.add_scalar(key, value, self.step)
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.config.items()}
            self.writer.add_hparams(hparams, {**summary, "status_done": float(status == "done")}, name="hparams")
        finally:
            self.writer.close()
