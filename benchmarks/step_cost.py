"""Step cost of SFT, ORPO, DPO (copy) and DPO (precompute) on the same batches, one process.

The same measurement as benchmarks/efficiency.py (which also takes the real-size model and
more methods); this name runs it with the embedded model's defaults:

    python benchmarks/step_cost.py [--steps 40 --rounds 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from efficiency import main

if __name__ == "__main__":
    sys.exit(main(["--model", "embedded", "--methods", "sft,orpo,dpo-copy,dpo-precompute", *sys.argv[1:]]))
