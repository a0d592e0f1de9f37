"""Peak activation memory per rank: the planner's memory model against what a run holds.

    python scripts/bench_memory.py                    # GPT 8L x h256, seq 2048, PP=2, M=1 and 4
    python scripts/bench_memory.py --num-layers 4 --hidden-size 64 --seq-length 256 --bf16

For each M, one pair of gloo ranks runs one step of every variant (stock 1F1B, then each order
in --schedules with each S in --num-token-slices; token-interleaved on 2 model chunks per rank
where the layers and micro-batches allow) with the activation tracker on: every
storage autograd saves for backward plus the K/V buffers, their fp32 gradient accumulators and
split backwards' deferred GEMM operands. Next to each rank's measured peak: the peak
`--token-pipeline-memory-cap` and `--token-pipeline-slices auto` plan with
(`slicing.memory.ActivationMemoryModel` on the same pretrain_gpt.py flags, walking the
schedule the variant ran), and its error. Goal: within 10 % on every rank. Memory does not
depend on the host's load; the numbers are the same on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")

from megatron_terapipe.benchmark.cli_args import (  # noqa: E402
    add_model_args,
    int_list,
    model_args,
    parse_with_configs,
    str_list,
)
from megatron_terapipe.benchmark.memory_model_check import (  # noqa: E402
    default_variants,
    format_rows,
    measure,
    memory_spec,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--microbatch-counts", type=int_list, default=[1, 4])
    parser.add_argument("--num-token-slices", type=int_list, default=[1, 8, 16])
    parser.add_argument("--schedules", type=str_list,
                        default=["terapipe", "token-1f1b", "token-interleaved"])
    parser.add_argument("--split-backward", action="store_true",
                        help="run the token rows with split backwards (B/W)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parse_with_configs(parser, argv)
    if args.num_microbatches is not None:
        args.microbatch_counts = [args.num_microbatches]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    met = True
    for count in args.microbatch_counts:
        model = model_args(args, count)
        stages = model.pipeline_model_parallel_size
        even = model.num_layers % (2 * stages) == 0 and count % stages == 0
        chunks = 2 if even else 1
        variants = default_variants(args.schedules, args.num_token_slices, args.split_backward,
                                    chunks)
        rows = measure(memory_spec(model, count, variants), args.timeout)
        met &= all(row.within is not False for row in rows)
        results.append({"num_microbatches": count,
                        "rows": [asdict(row) | {"error": row.error} for row in rows]})
        if not args.json:
            title = (f"M={count}: {model.num_layers} layers, h {model.hidden_size}, seq "
                     f"{model.seq_length}, PP {model.pipeline_model_parallel_size}, "
                     f"{'bf16' if model.bf16 else 'fp16' if model.fp16 else 'fp32'}")
            print(format_rows(rows, title), flush=True)
    if args.json:
        print(json.dumps({"results": results}, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
