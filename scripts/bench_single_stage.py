"""Single-stage cost of token slicing: time and peak memory of one micro-batch by S.

    python scripts/bench_single_stage.py                      # GPT 4L x h256, 4 heads, seq 2048
    python scripts/bench_single_stage.py --num-token-slices 1,8 --rounds 6 --json out.json
    python scripts/bench_single_stage.py --device cuda --bf16

Prints, per S: min and median seconds of one forward+backward over --rounds alternating rounds,
t_S/t_1, and the step's peak memory growth (fresh process per S) as a ratio to S = 1.
Targets on a quiet machine: t_8/t_1 <= 1.04; memory at S = 8 <= 1.10x, at S = 16 <= 1.15x.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")

from megatron_terapipe.benchmark.single_stage import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
