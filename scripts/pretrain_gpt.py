#!/usr/bin/env python
"""Pre-train GPT on megatron-core, optionally with the TeraPipe token pipeline.

Megatron-LM's flag names (see `--help`), plus --token-pipeline*; `--config configs/X.args`
reads flags from a file. Run under torchrun, e.g. on CPU:

    torchrun --nproc-per-node 2 scripts/pretrain_gpt.py --config configs/tiny-cpu.args \\
        --token-pipeline --token-pipeline-slices auto

The logic lives in megatron_terapipe.training; this file is the entry point only.
"""

import sys

from megatron_terapipe.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
