"""The real worker, with rank 0's preparation made slow, for tests.

Run as ``python tests/slow_preparation_worker.py SECONDS SPEC.json`` (the runner appends
SPEC.json): rank 0 sleeps SECONDS before it loads the model and data; the other ranks run
unchanged.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from vqabench.engine import prepare, worker
from vqabench.engine.progress import Emit
from vqabench.spec import RunSpec


def main() -> int:
    seconds, spec_path = float(sys.argv[1]), sys.argv[2]
    load = prepare.load_model_and_data

    def slow(spec: RunSpec, cache_dir: Path, emit: Emit) -> tuple:
        if os.environ.get("RANK") == "0":
            time.sleep(seconds)
        return load(spec, cache_dir, emit)

    prepare.load_model_and_data = slow
    return worker.main([spec_path])


if __name__ == "__main__":
    sys.exit(main())
