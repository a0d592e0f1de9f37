"""Body of scripts/demo.sh: the same tiny GPT, same seed, under stock 1F1B and the token pipeline.

Three real `scripts/pretrain_gpt.py` runs under torchrun (2 gloo ranks, PP = 2, CPU), with
`configs/tiny-cpu-demo.args`:
1. stock megatron-core 1F1B with ``--attention-backend flash``: the token pipeline's attention
   kernel (torch SDPA) under the stock schedule, the baseline of the schedule's gain;
2. the token pipeline, ``--token-pipeline --token-pipeline-slices auto`` (TeraPipe's DP slicer);
3. stock 1F1B with megatron-core's local-spec DotProductAttention (the trainer's default on CPU).
The table shows `lm loss` per iteration of the first two side by side, and both ratios of the
median time per iteration (first two iterations excluded as warm-up), labelled: "schedule gain,
same kernel" (1 vs 2) and "vs stock local-spec attention" (3 vs 2, mostly a kernel difference:
on GPUs stock Megatron runs fused attention, so users see only the schedule's gain).
Exit status 0 when every loss of the token pipeline agrees with same-kernel stock to 1e-5
relative.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "pretrain_gpt.py")
CONFIG = os.path.join(ROOT, "configs", "tiny-cpu-demo.args")
LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([.0-9]+) \|"
    r".*?\| lm loss: ([-+.0-9Ee]+) \|"
)
SLICES = re.compile(r"> schedule: (\S+)(?: \(token slices (\[[^\]]*\])\))?")
RTOL = 1e-5
WARMUP = 2


def run(label: str, flags: Sequence[str], nproc: int) -> tuple[dict[int, tuple[float, float]], str]:
    """One pretrain_gpt.py run; returns {iteration: (ms, loss)} and its schedule summary."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        SCRIPT, "--config", CONFIG, *flags,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    print(f"demo: [{label}] {' '.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        sys.stderr.write(output[-8000:])
        raise SystemExit(f"demo: the {label} run failed (exit status {result.returncode})")
    rows = {int(it): (float(ms), float(loss)) for it, ms, loss in LINE.findall(output)}
    match = SLICES.search(output)
    summary = match.group(1) + (f", token slices {match.group(2)}" if match.group(2) else "")
    print(
        f"demo: [{label}] {len(rows)} iterations, {summary} "
        f"({time.perf_counter() - start:.1f}s including start-up)",
        flush=True,
    )
    return rows, summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-iters", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "extra", nargs="*", help="more pretrain_gpt.py flags for both runs (after --)"
    )
    args = parser.parse_args(argv)
    common = list(args.extra)
    if args.train_iters is not None:
        common += ["--train-iters", str(args.train_iters)]
    if args.seed is not None:
        common += ["--seed", str(args.seed)]
    print(
        "demo: tiny GPT (4 layers, hidden 128, seq 512, 1 micro-batch of 4 per step) on 2 gloo "
        "ranks (CPU), PP=2, same seed for both runs",
        flush=True,
    )
    stock, stock_summary = run("stock 1F1B, same kernel",
                               common + ["--attention-backend", "flash"], 2)
    token, token_summary = run(
        "token pipeline", common + ["--token-pipeline", "--token-pipeline-slices", "auto"], 2
    )
    local, _ = run("stock 1F1B, local-spec attention", common, 2)

    print()
    print(
        f"{'iteration':>9} | {'stock 1F1B lm loss':>18} | {'token pipeline lm loss':>22} | "
        f"{'rel. diff':>9} | {'1F1B ms':>8} | {'token ms':>8} | {'local ms':>8}"
    )
    print("-" * 103)
    worst = 0.0
    for it in sorted(stock):
        s_ms, s_loss = stock[it]
        t_ms, t_loss = token.get(it, (float("nan"), float("nan")))
        l_ms = local.get(it, (float("nan"), float("nan")))[0]
        diff = abs(t_loss - s_loss) / abs(s_loss)
        worst = max(worst, diff)
        print(
            f"{it:>9} | {s_loss:>18.6f} | {t_loss:>22.6f} | {diff:>9.1e} | "
            f"{s_ms:>8.1f} | {t_ms:>8.1f} | {l_ms:>8.1f}"
        )
    timed = [it for it in sorted(stock) if it > WARMUP and it in token and it in local]
    s_med = statistics.median(stock[it][0] for it in timed)
    t_med = statistics.median(token[it][0] for it in timed)
    l_med = statistics.median(local[it][0] for it in timed)
    local_worst = max(abs(local[it][1] - stock[it][1]) / abs(stock[it][1]) for it in timed)
    print("-" * 103)
    print(f"schedules: stock = {stock_summary} (SDPA attention); token = {token_summary}")
    print(f"median time per iteration (iterations > {WARMUP}):")
    print(f"  schedule gain, same kernel:    {s_med / t_med:.2f}x  (stock 1F1B {s_med:.1f} ms "
          f"-> token pipeline {t_med:.1f} ms; both torch SDPA attention)")
    print(f"  vs stock local-spec attention: {l_med / t_med:.2f}x  (stock 1F1B with megatron-core "
          f"DotProductAttention {l_med:.1f} ms; mostly the kernel, not the schedule)")
    same = worst <= RTOL and set(token) == set(stock)
    print(
        f"losses {'match' if same else 'DIFFER'}: token pipeline vs same-kernel stock, max "
        f"relative difference {worst:.1e} (tolerance {RTOL:g}); local-spec stock vs "
        f"same-kernel stock: {local_worst:.1e}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
