"""One prepared check of the token pipeline on one GPU (scripts/gpu_check.sh), and its dry run.

Five steps, each run in its own process (a crash or a hang of one is reported, the others
still run), each writing one JSON record that `summary.py` turns into summary.json and
summary.md:

a. exactness: token-sliced vs unsliced model on the device, per SDPA backend, fp32 and bf16.
b. nccl: the trainer's step (DDP, distributed optimizer, per-token loss, bf16) on a world-size-1
   NCCL group, stock schedule vs token pipeline: equal losses.
c. latency: forward+backward grid t(l, c) of one GPT-3 layer per paper model and TP size, saved
   as the planner's latency tables; DP plan and simulated speedup for configs/terapipe/*.args.
d. inflation: same-kernel single-stage t_S / t_1 at GPT-3 13B shape.
e. upstream: Megatron-LM (the carried tag) + patches/, stock vs --token-pipeline: equal lm loss.

`--dry-run` runs the same code at toy sizes on the CPU (gloo, math attention), so the script is
exercised by the test suite. See docs/gpu.md.
"""
