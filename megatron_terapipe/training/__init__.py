"""Our GPT trainer on megatron-core: the logic behind scripts/pretrain_gpt.py.

One job per module: `args` (flags, validation), `config_files` (configs/*.args), `initialize`
(process groups, CPU, seeds), `model` (GPTModel chunks, DDP), `data` (megatron-core datasets),
`optim` (optimizer, LR schedule), `checkpointing` (atomic dist-checkpointing), `loop` (train,
evaluate, log), `pretrain` (the entry point tying them together). Argument handling is pure
Python, so bad flags fail before torch or megatron-core are imported.
"""
