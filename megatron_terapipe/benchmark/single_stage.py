"""What token slicing costs one pipeline stage: time and peak memory of one micro-batch, by S.

One process runs one GPT stage (embedding, layers, loss), built the way the trainer builds it
(`training.args` -> `training.model`: Megatron flags -> TransformerConfig -> GPTModel in DDP,
with the token-pipeline layer spec), and times one micro-batch's forward then backward cut into
S equal token slices (`model.single_stage.sliced_forward_backward`, the executor's inner loop),
rounds alternating between the S values so that drift in machine load hits every S alike.

Peak memory is measured once per S in a fresh process, since a process's allocator keeps what
it once held: on CPU the growth of the peak resident set over the resident set just before the
step (glibc thresholds fixed so that freed blocks go back to the OS at once: without them the
same run varied by a quarter), on CUDA `torch.cuda.max_memory_allocated` over the allocation
before the step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch

from megatron_terapipe.benchmark.cli_args import int_list
from megatron_terapipe.benchmark.host_noise import Judgement, judge_ratio, noise_note
from megatron_terapipe.compat.allocator import allocator_note, keep_freed_memory

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# Goals against S = 1: t_8/t_1 (median of the per-round ratios) and peak memory at S = 8 and 16.
TARGETS = {"time_8": 1.04, "memory_8": 1.10, "memory_16": 1.15}


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--num-query-groups", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--num-token-slices", type=int_list, default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=8,
                        help="timed rounds (at least 5 for the time goal's 90 %% interval)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results here")
    parser.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject what cannot run before building anything."""
    for count in args.num_token_slices:
        if count < 1 or args.seq_length % count:
            raise SystemExit(
                f"--num-token-slices: {count} does not divide --seq-length {args.seq_length}; "
                "use divisors of the sequence length"
            )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_stage(args: argparse.Namespace):
    """(model, batch) of one whole GPT stage, through the trainer's own model path."""
    from megatron_terapipe.training import args as training_args
    from megatron_terapipe.training.initialize import initialize_distributed, set_random_seed
    from megatron_terapipe.training.model import build_model, transformer_config_from_args

    flags = [
        "--num-layers", str(args.num_layers),
        "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads),
        "--seq-length", str(args.seq_length),
        "--max-position-embeddings", str(args.seq_length),
        "--micro-batch-size", "1",
        "--vocab-size", str(args.vocab_size),
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--distributed-backend", "nccl" if args.device == "cuda" else "gloo",
        "--token-pipeline",
    ]
    if args.num_query_groups:
        flags += ["--group-query-attention", "--num-query-groups", str(args.num_query_groups)]
    if args.bf16:
        flags.append("--bf16")
    margs = training_args.finalize_args(training_args.parse_args(flags), world_size=1)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    initialize_distributed(margs)
    set_random_seed(1234)
    model = build_model(margs, transformer_config_from_args(margs))[0]
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" \
        else torch.device("cpu")
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, args.vocab_size, (1, args.seq_length + 1), generator=gen)
    batch = {
        "tokens": tokens[:, :-1].to(device),
        "labels": tokens[:, 1:].to(device),
        "loss_mask": torch.ones(1, args.seq_length, device=device),
        "position_ids": torch.arange(args.seq_length, device=device).unsqueeze(0),
    }
    return model, batch


def _loss_of_slice(model, batch):
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return (losses.float() * batch["loss_mask"]).sum(), batch["loss_mask"].sum()


def run_step(model, batch, num_slices: int, seq_length: int) -> float:
    """Seconds of one micro-batch's forward then backward in `num_slices` equal slices."""
    from megatron_terapipe.model.single_stage import sliced_forward_backward
    from megatron_terapipe.timing import synchronized_clock

    slices = [seq_length // num_slices] * num_slices
    start = synchronized_clock()
    sliced_forward_backward(model, batch, slices, seq_length, _loss_of_slice)
    return synchronized_clock() - start


def time_slicings(model, batch, args: argparse.Namespace) -> dict[int, list[float]]:
    """Per S, the seconds of every timed round; each round runs every S once, in turn."""
    times: dict[int, list[float]] = {s: [] for s in args.num_token_slices}
    for round_index in range(args.warmup + args.rounds):
        order = args.num_token_slices if round_index % 2 == 0 else args.num_token_slices[::-1]
        for count in order:
            seconds = run_step(model, batch, count, args.seq_length)
            model.zero_grad_buffer() if hasattr(model, "zero_grad_buffer") else None
            if round_index >= args.warmup:
                times[count].append(seconds)
    return times


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Set the process's peak resident set (VmHWM) to the current one (Linux clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def step_peak_bytes(model, batch, num_slices: int, seq_length: int, device: str) -> int:
    """Growth of peak memory over the memory held just before one step (after a warm-up)."""
    import gc

    run_step(model, batch, num_slices, seq_length)  # first-call allocations out of the way
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_step(model, batch, num_slices, seq_length)
        return torch.cuda.max_memory_allocated() - before
    if _reset_peak_rss():
        before = _rss_kib("VmRSS")
        run_step(model, batch, num_slices, seq_length)
        return (_rss_kib("VmHWM") - before) * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_step(model, batch, num_slices, seq_length)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def _child_argv(args: argparse.Namespace, count: int) -> list[str]:
    argv = [
        "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(args.num_attention_heads),
        "--seq-length", str(args.seq_length), "--vocab-size", str(args.vocab_size),
        "--device", args.device, "--threads", str(args.threads), "--memory-of", str(count),
    ]
    if args.num_query_groups:
        argv += ["--num-query-groups", str(args.num_query_groups)]
    if args.bf16:
        argv.append("--bf16")
    return argv


def memory_in_fresh_process(args: argparse.Namespace, count: int) -> int:
    env = {**os.environ, **MALLOC_ENV}
    env.pop("MASTER_PORT", None)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_terapipe.benchmark.single_stage",
         *_child_argv(args, count)],
        env=env, capture_output=True, text=True, check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory process for S={count} failed (rc {result.returncode}):\n"
            f"{result.stderr[-3000:]}"
        )
    return int(json.loads(lines[-1])["peak_bytes"])


def summarize(times: dict[int, list[float]], memory: dict[int, int]) -> dict[str, Any]:
    first = min(times)
    base_min = min(times[first])
    rows = {}
    for count, seconds in times.items():
        row = {
            "min_s": min(seconds),
            "median_s": statistics.median(seconds),
            "time_ratio_min": min(seconds) / base_min,
            "time_ratio_median": statistics.median(seconds) / statistics.median(times[first]),
            "rounds_s": list(seconds),
        }
        if count in memory:
            row["peak_bytes"] = memory[count]
            row["memory_ratio"] = memory[count] / memory[first] if memory.get(first) else None
        rows[count] = row
    # The t_8/t_1 goal: S = 8's round i over S = 1's round i (timed in the same rotation).
    reference = {f"S={count}": times[count] for count in (first, 8) if count in times}
    time_8 = (judge_ratio(times[8], times[first], TARGETS["time_8"], at_least=False)
              if first == 1 and 8 in times else None)
    summary = {"baseline_slices": first, "by_slices": rows,
               # None: nothing to say (no time goal, or too few rounds to tell)
               "host_quiet": (None if time_8 is None or not time_8.enough_rounds
                              else not time_8.host_noisy),
               "undecided_reason": None if time_8 is None else time_8.reason,
               "host_note": noise_note(reference)}
    summary["goals"] = judge_goals(rows, time_8) if first == 1 else {}
    return summary


GOAL_LABELS = {"time_8": "t_8/t_1 (median of the per-round ratios)",
               "memory_8": "peak memory S=8 / S=1", "memory_16": "peak memory S=16 / S=1"}


def judge_goals(rows: dict[int, dict[str, Any]], time_8: Judgement | None
                ) -> dict[str, dict[str, Any]]:
    """Each goal whose S was run: the measured ratio, the bound, and met (None: not decided).

    Time by the quiet-host gauge on the paired rounds (`host_noise.judge_ratio`: its interval
    against the bound, nothing decided on a noisy host); memory (fresh processes, fixed
    allocator thresholds) always."""
    goals: dict[str, dict[str, Any]] = {}
    if time_8 is not None:
        goals["time_8"] = {**time_8.to_dict(), "bound": TARGETS["time_8"]}
    for count in (8, 16):
        ratio = rows.get(count, {}).get("memory_ratio")
        if ratio is not None:
            bound = TARGETS[f"memory_{count}"]
            goals[f"memory_{count}"] = {"ratio": ratio, "bound": bound, "met": ratio <= bound}
    return goals


def format_goals(summary: dict[str, Any]) -> list[str]:
    """One line per goal: a time goal on a noisy host says so instead of met / NOT met."""
    lines = []
    for name, goal in summary.get("goals", {}).items():
        decided = {True: "met", False: "NOT met", None: f"not decided ({goal.get('reason')})"}
        ratio = "-" if goal["ratio"] is None else f"{goal['ratio']:.3f}"
        if goal.get("interval"):
            low, high = goal["interval"]
            aside = goal.get("set_aside") or 0
            ratio += (f" ({100 * goal['confidence']:.0f} % interval {low:.3f}-{high:.3f}"
                      + (f", {aside} spiked round(s) set aside" if aside else "") + ")")
        lines.append(f"goal: {GOAL_LABELS[name]} {ratio} <= {goal['bound']}: "
                     f"{decided[goal['met']]}")
    return lines


def format_table(summary: dict[str, Any]) -> str:
    first = summary["baseline_slices"]
    lines = [
        f"{'S':>4} {'min s':>8} {'median s':>9} {f't_S/t_{first} min':>13} "
        f"{'median':>7} {'peak MiB':>9} {f'mem/S={first}':>9}"
    ]
    for count, row in summary["by_slices"].items():
        peak = row.get("peak_bytes")
        ratio = row.get("memory_ratio")
        lines.append(
            f"{count:>4} {row['min_s']:>8.3f} {row['median_s']:>9.3f} "
            f"{row['time_ratio_min']:>13.3f} {row['time_ratio_median']:>7.3f} "
            f"{'-' if peak is None else f'{peak / 2**20:.1f}':>9} "
            f"{'-' if ratio is None else f'{ratio:.3f}':>9}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    check_args(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # Timing: every S on memory the process keeps (compat.allocator); the memory processes
    # give memory back at once instead (MALLOC_ENV), so that the peak resident set is the step's.
    allocator_held = args.memory_of is None and keep_freed_memory()
    model, batch = build_stage(args)
    if args.memory_of is not None:
        peak = step_peak_bytes(model, batch, args.memory_of, args.seq_length, args.device)
        print(json.dumps({"slices": args.memory_of, "peak_bytes": peak}), flush=True)
        return 0
    times = time_slicings(model, batch, args)
    memory = {}
    if not args.no_memory:
        memory = {count: memory_in_fresh_process(args, count) for count in args.num_token_slices}
    summary = summarize(times, memory)
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("json", "memory_of")}
    summary["load_average"] = os.getloadavg()
    summary["cpu_allocator"] = allocator_note(allocator_held)
    print(format_table(summary))
    for line in format_goals(summary):
        print(line)
    print(summary["host_note"])
    print(f"CPU allocator (timing): {summary['cpu_allocator']}")
    print(f"load average: {' '.join(f'{v:.2f}' for v in summary['load_average'])}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
