"""Data: megatron-core GPT datasets (mock or indexed), Megatron-LM's sampling order, batches.

Sampling follows Megatron-LM's pretraining sampler: samples are consumed in dataset order,
each global batch split into micro-batches per data-parallel rank, and resuming at
`consumed_samples` continues exactly where the checkpointed run was. That, plus the dataset's
own seeded shuffling, is what makes a resumed run see the same batches as an uninterrupted one.

Every rank that needs data (first and last pipeline stage, every TP rank) reads it itself;
Megatron-LM broadcasts from TP rank 0 instead, which saves I/O but ties batch shapes to
--seq-length (awkward for per-slice batches). Same samples either way.
"""

from __future__ import annotations

from argparse import Namespace
from collections import OrderedDict
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from megatron_terapipe.training.data_checks import built_split_matrix, drawn_splits
from megatron_terapipe.training.initialize import device, on_gpu


class NullTokenizer:
    """Megatron-LM's NullTokenizer semantics: ids are the data; EOD is `vocab_size`.

    Only what megatron-core's GPT datasets read: `vocab_size` (EOD included), `eod`, and the
    `unique_identifiers` that key dataset caches.
    """

    def __init__(self, vocab_size: int) -> None:
        self._vocab_size_without_eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._vocab_size_without_eod

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            {
                "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "vocab_size": self._vocab_size_without_eod,
            }
        )


def _blend(data_path: list[str] | None):
    if not data_path:
        return None
    if len(data_path) == 1:
        return ([data_path[0]], None)
    return (list(data_path[1::2]), [float(w) for w in data_path[0::2]])


def dataset_config(args: Namespace):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=_blend(args.data_path),
        split=None if args.mock_data else args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=NullTokenizer(args.vocab_size),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        # Plain causal masks come from the attention's mask type; [s, s] masks are made only
        # for document masks (--reset-attention-mask), which the token pipeline slices.
        create_attention_mask=bool(args.reset_attention_mask),
        mmap_bin_files=True,
    )
    if config.split_matrix is not None:
        # Splits this run never draws from are not built: megatron-core would still fill them
        # (and loops forever on one without tokens). The data guard checks this same matrix.
        config.split_matrix = built_split_matrix(config.split_matrix, args)
    return config


def train_valid_test_num_samples(args: Namespace) -> list[int]:
    """Megatron-LM's sizes: enough samples for every train and eval step of the run.

    The test split gets none: this trainer has no test pass (see `drawn_splits`)."""
    _, validates, tests = drawn_splits(args)
    evaluations = args.train_iters // args.eval_interval + 1 if validates else 0
    return [
        args.train_iters * args.global_batch_size,
        evaluations * args.eval_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size if tests else 0,
    ]


def needs_data(vp_stage: int | None) -> bool:
    """Only the chunks with the embedding (tokens) or the loss (labels) read batches."""
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_first_stage(
        ignore_virtual=False, vp_stage=vp_stage
    ) or parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)


def build_datasets(args: Namespace) -> tuple[Any, Any, Any]:
    """Train/valid/test datasets (None on ranks that read no data). Call on every rank."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    vp = args.virtual_pipeline_model_parallel_size
    stages = range(vp) if vp else [None]
    on_rank = any(needs_data(stage) for stage in stages)
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return tuple(
        BlendedMegatronDatasetBuilder(
            cls, train_valid_test_num_samples(args), lambda: on_rank, dataset_config(args)
        ).build()
    )


class PretrainingBatchSampler:
    """Megatron-LM's MegatronPretrainingSampler: this DP rank's micro-batch indices, in order."""

    def __init__(
        self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        self.total = total
        self.consumed = consumed
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for first in range(self.consumed, self.total - step + 1, step):
            yield list(range(first + start, first + start + self.micro_batch_size))


def data_iterator(dataset: Any, consumed: int, args: Namespace) -> Iterator | None:
    if dataset is None:
        return None
    from megatron.core import parallel_state

    sampler = PretrainingBatchSampler(
        len(dataset),
        consumed,
        args.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=on_gpu(),
        persistent_workers=args.num_workers > 0,
    )
    # Starting a DataLoader iterator draws its workers' base seed from torch's global RNG. The
    # iterators are built after a checkpoint is loaded, so that draw would shift a resumed
    # run's dropout masks away from the uninterrupted run's; keep the RNG where it was.
    state = torch.get_rng_state()
    iterator = iter(loader)
    torch.set_rng_state(state)
    return iterator


def build_iterators(args: Namespace, datasets, consumed_train: int, consumed_valid: int):
    """Per-chunk train and valid iterators (a list under virtual stages, else one)."""
    train_ds, valid_ds, _ = datasets
    vp = args.virtual_pipeline_model_parallel_size
    stages = list(range(vp)) if vp else [None]
    train, valid = [], []
    for stage in stages:
        wanted = needs_data(stage)
        train.append(data_iterator(train_ds, consumed_train, args) if wanted else None)
        valid.append(data_iterator(valid_ds, consumed_valid, args) if wanted else None)
    if vp:
        return train, valid
    return train[0], valid[0]


def get_batch(data_iterator: Iterator | None, model) -> dict[str, torch.Tensor | None]:
    """The batch a chunk needs (nothing for chunks without embedding or loss)."""
    from megatron.core.utils import get_attr_wrapped_model

    pre = get_attr_wrapped_model(model, "pre_process")
    post = get_attr_wrapped_model(model, "post_process")
    keys = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")
    if not (pre or post):
        # Like Megatron-LM: middle stages read no batch (and so no document mask).
        return dict.fromkeys(keys)
    data = next(data_iterator)
    target = device()
    return {key: data[key].to(target, non_blocking=True) if key in data else None for key in keys}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """pretrain_gpt.py's loss: (masked loss sum, token count, {'lm loss': [sum, count]})."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def forward_step(data_iterator: Iterator | None, model):
    """The forward_step_func of pretrain_gpt.py, unchanged under the token pipeline.

    Under the token pipeline `data_iterator` yields the current token slice of each tensor;
    the model sees a shorter sequence and the prefix-KV attention supplies the rest.
    """
    batch = get_batch(data_iterator, model)
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(loss_func, batch["loss_mask"])
