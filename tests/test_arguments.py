"""Flag parsing and validation of pretrain_gpt.py and the --token-pipeline* group.

Validation is plain Python, so every bad flag set here is checked in milliseconds; each case
names the flags the message must mention, because a message that does not say which flag is
wrong is not good enough.
"""

from __future__ import annotations

import argparse
import os

import pytest

from megatron_terapipe.arguments import (
    TokenPipelineArgumentError,
    add_token_pipeline_args,
    parse_slices,
    token_pipeline_config_from_args,
    token_pipeline_errors,
    validate_token_pipeline_args,
)
from megatron_terapipe.training import args as targs
from megatron_terapipe.training.config_files import (
    ConfigFileError,
    expand_config_args,
    launch_hints,
    read_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny-cpu.args")

BASE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128",
    "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "16",
    "--lr", "1e-3", "--train-iters", "20", "--mock-data",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
]  # fmt: skip


def _without(flags: list[str], flag: str, takes_value: bool = True) -> list[str]:
    out, skip = [], 0
    for token in flags:
        if skip:
            skip -= 1
            continue
        if token == flag:
            skip = 1 if takes_value else 0
            continue
        out.append(token)
    return out


def errors_for(extra: list[str], world: int = 2, base: list[str] | None = None) -> list[str]:
    args = targs.parse_args((BASE if base is None else base) + extra)
    return targs.validation_errors(args, world)


def test_base_flags_are_valid():
    assert errors_for([]) == []
    args = targs.validate_args(targs.parse_args(BASE), 2)
    assert args.data_parallel_size == 1
    assert args.padded_vocab_size == 256  # 255 ids + EOD, padded to 128
    assert args.token_pipeline is False
    assert args.distributed_backend in ("gloo", "nccl")


@pytest.mark.parametrize(
    "extra",
    [
        ["--token-pipeline"],
        ["--token-pipeline", "--token-pipeline-slices", "4"],
        ["--token-pipeline", "--token-pipeline-slices", "32,32,64"],
        ["--token-pipeline", "--token-pipeline-slices", "auto",
         "--token-pipeline-granularity", "8"],
        ["--token-pipeline", "--token-pipeline-schedule", "token-1f1b"],
        [
            "--token-pipeline", "--token-pipeline-schedule", "token-interleaved",
            "--num-layers-per-virtual-pipeline-stage", "1",
        ],
        ["--token-pipeline", "--token-pipeline-cost-model", "analytic:cpu"],
        ["--token-pipeline", "--token-pipeline-memory-cap", "0.5"],
        ["--token-pipeline", "--token-pipeline-split-backward"],
        ["--no-token-pipeline", "--token-pipeline-slices", "4"],
        # stock interleaving at PP 2: overlapped un-batched P2P (model/transformer_config.py)
        ["--num-layers-per-virtual-pipeline-stage", "1"],
    ],
)  # fmt: skip
def test_good_token_pipeline_flag_sets(extra):
    assert errors_for(extra) == []


def _load_dir_without_checkpoint(tmp_path):
    return ["--load", str(tmp_path)]


# (extra flags, world size, substrings that must all appear in one error message)
BAD_CASES = {
    "token pipeline with context parallelism": (
        ["--token-pipeline", "--context-parallel-size", "2"], 4,
        ["--token-pipeline", "--context-parallel-size=2"],
    ),
    "slices not summing to seq-length": (
        ["--token-pipeline", "--token-pipeline-slices", "32,32,32"], 2,
        ["--token-pipeline-slices=32,32,32", "sums to 96", "--seq-length=128"],
    ),
    "global batch not divisible by micro-batch x DP": (
        ["--global-batch-size", "15"], 2,
        ["--global-batch-size=15", "--micro-batch-size=2"],
    ),
    "global batch not divisible under DP=2": (
        ["--global-batch-size", "6"], 4,
        ["--global-batch-size=6", "data-parallel size 2"],
    ),
    "virtual stages without divisibility": (
        ["--num-layers-per-virtual-pipeline-stage", "3"], 2,
        ["--num-layers-per-virtual-pipeline-stage=3", "--num-layers=4"],
    ),
    "virtual stages per rank without divisibility": (
        ["--num-virtual-stages-per-pipeline-rank", "3"], 2,
        ["--num-virtual-stages-per-pipeline-rank=3"],
    ),
    "both virtual pipeline flags": (
        ["--num-virtual-stages-per-pipeline-rank", "2",
         "--num-layers-per-virtual-pipeline-stage", "1"], 2,
        ["--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank"],
    ),
    "token-interleaved micro-batches not divisible by PP": (
        ["--token-pipeline", "--token-pipeline-schedule", "token-interleaved",
         "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "6"], 2,
        ["micro-batches", "--pipeline-model-parallel-size=2"],
    ),
    "world size not divisible by model parallel size": (
        [], 3, ["world size 3", "--pipeline-model-parallel-size=2"],
    ),
    "layers not divisible by pipeline stages": (
        ["--num-layers", "5"], 2, ["--num-layers=5", "--pipeline-model-parallel-size=2"],
    ),
    "hidden size not divisible by heads": (
        ["--hidden-size", "66"], 2, ["--hidden-size=66", "--num-attention-heads=4"],
    ),
    "heads not divisible by tensor parallel size": (
        ["--tensor-model-parallel-size", "2", "--num-attention-heads", "3",
         "--hidden-size", "66"], 4,
        ["--num-attention-heads=3", "--tensor-model-parallel-size=2"],
    ),
    "query groups not dividing heads": (
        ["--num-query-groups", "3"], 2, ["--num-query-groups=3", "--num-attention-heads=4"],
    ),
    "bf16 and fp16": (["--bf16", "--fp16"], 2, ["--bf16", "--fp16"]),
    "position embeddings shorter than the sequence": (
        ["--max-position-embeddings", "64"], 2,
        ["--max-position-embeddings=64", "--seq-length=128"],
    ),
    "min lr above lr": (["--min-lr", "1e-2"], 2, ["--min-lr", "--lr"]),
    "warm-up not shorter than decay": (
        ["--lr-warmup-iters", "20"], 2, ["--lr-warmup-iters=20", "--lr-decay-iters"],
    ),
    "unsupported tokenizer": (
        ["--tokenizer-type", "GPT2BPETokenizer"], 2, ["--tokenizer-type GPT2BPETokenizer"],
    ),
    "data path after mock data": (
        ["--data-path", "/nonexistent/prefix"], 2, ["--data-path /nonexistent/prefix: missing"],
    ),
    "zero layers": (["--num-layers", "0"], 2, ["--num-layers=0", ">= 1"]),
    "save interval without save": (["--save-interval", "10"], 2, ["--save-interval", "--save"]),
    "ckpt step without load": (["--ckpt-step", "10"], 2, ["--ckpt-step", "--load"]),
    "load directory that does not exist": (
        ["--load", "/nonexistent/checkpoints"], 2, ["--load /nonexistent/checkpoints"],
    ),
    "token flags without --token-pipeline": (
        ["--token-pipeline-schedule", "token-1f1b", "--token-pipeline-slices", "4"], 2,
        ["--token-pipeline-schedule", "--token-pipeline-slices", "without --token-pipeline"],
    ),
    "token-1f1b with virtual stages": (
        ["--token-pipeline", "--token-pipeline-schedule", "token-1f1b",
         "--num-layers-per-virtual-pipeline-stage", "1"], 2,
        ["--token-pipeline-schedule=token-1f1b", "token-interleaved"],
    ),
    "token-interleaved without virtual stages": (
        ["--token-pipeline", "--token-pipeline-schedule", "token-interleaved"], 2,
        ["token-interleaved", "--num-layers-per-virtual-pipeline-stage"],
    ),
    "more slices than tokens": (
        ["--token-pipeline", "--token-pipeline-slices", "200"], 2,
        ["--token-pipeline-slices=200", "--seq-length=128"],
    ),
    "zero slices": (
        ["--token-pipeline", "--token-pipeline-slices", "0"], 2,
        ["--token-pipeline-slices=0", ">= 1"],
    ),
    "slices not multiples of TP under sequence parallelism": (
        ["--token-pipeline", "--tensor-model-parallel-size", "2", "--sequence-parallel",
         "--pipeline-model-parallel-size", "1", "--token-pipeline-slices", "33,95"], 2,
        ["--token-pipeline-slices=33,95", "--sequence-parallel", "--tensor-model-parallel-size=2"],
    ),
    "granularity not dividing the sequence": (
        ["--token-pipeline", "--token-pipeline-granularity", "48"], 2,
        ["--token-pipeline-granularity=48", "--seq-length=128", "valid values"],
    ),
    "explicit slices not multiples of the granularity": (
        ["--token-pipeline", "--token-pipeline-granularity", "32",
         "--token-pipeline-slices", "48,80"], 2,
        ["--token-pipeline-slices=48,80", "--token-pipeline-granularity=32"],
    ),
    "unknown cost model": (
        ["--token-pipeline", "--token-pipeline-cost-model", "roofline"], 2,
        ["--token-pipeline-cost-model='roofline'", "analytic"],
    ),
    "missing latency table": (
        ["--token-pipeline", "--token-pipeline-cost-model", "/nonexistent/table.npz"], 2,
        ["--token-pipeline-cost-model=/nonexistent/table.npz", "no such file"],
    ),
    "non-positive memory cap": (
        ["--token-pipeline", "--token-pipeline-memory-cap", "0"], 2,
        ["--token-pipeline-memory-cap=0", "> 0"],
    ),
    "split backward without the token pipeline": (
        ["--token-pipeline-split-backward"], 2,
        ["--token-pipeline-split-backward", "without --token-pipeline"],
    ),
    "split backward without gradient-accumulation fusion": (
        ["--token-pipeline", "--token-pipeline-split-backward",
         "--no-gradient-accumulation-fusion"], 2,
        ["--token-pipeline-split-backward", "--no-gradient-accumulation-fusion"],
    ),
    "split backward with sequence parallelism": (
        ["--token-pipeline", "--token-pipeline-split-backward", "--tensor-model-parallel-size",
         "2", "--sequence-parallel", "--pipeline-model-parallel-size", "1"], 2,
        ["--token-pipeline-split-backward", "--sequence-parallel"],
    ),
    "split backward with Transformer Engine": (
        ["--token-pipeline", "--token-pipeline-split-backward", "--transformer-impl",
         "transformer_engine"], 2,
        ["--token-pipeline-split-backward", "--transformer-impl local"],
    ),
    "token pipeline with MoE token dropping": (
        ["--token-pipeline", "--num-experts", "4", "--moe-expert-capacity-factor", "1.0"], 2,
        ["--moe-expert-capacity-factor", "token dropping"],
    ),
    "token pipeline with multi-token prediction": (
        ["--token-pipeline", "--mtp-num-layers", "1"], 2, ["--mtp-num-layers"],
    ),
    "token pipeline with relative positions": (
        ["--token-pipeline", "--position-embedding-type", "relative"], 2,
        ["--position-embedding-type=relative", "learned_absolute, rope, none"],
    ),
    "full recompute without a method": (
        ["--recompute-granularity", "full"], 2,
        ["--recompute-granularity full", "--recompute-method"],
    ),
    "recompute method without granularity": (
        ["--recompute-method", "uniform"], 2, ["--recompute-method", "--recompute-granularity"],
    ),
    "sequence length not divisible by TP under SP": (
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "127",
         "--max-position-embeddings", "128", "--pipeline-model-parallel-size", "1"], 2,
        ["--sequence-parallel", "--seq-length=127"],
    ),
    "context parallelism without Transformer Engine": (
        ["--context-parallel-size", "2"], 4, ["--context-parallel-size=2", "transformer_engine"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_flag_sets_name_the_flags(name):
    extra, world, needles = BAD_CASES[name]
    errors = errors_for(extra, world)
    assert errors, f"{name}: accepted"
    assert any(all(n in e for n in needles) for e in errors), (name, errors)


def test_at_least_25_bad_cases():
    assert len(BAD_CASES) >= 25


def test_missing_required_flags_are_listed():
    errors = errors_for([], base=_without(_without(BASE, "--lr"), "--train-iters"))
    assert any("--lr" in e and "--train-iters" in e for e in errors), errors


def test_null_tokenizer_needs_vocab_size():
    errors = errors_for([], base=_without(BASE, "--vocab-size"))
    assert any("--vocab-size" in e for e in errors), errors


def test_data_source_required():
    errors = errors_for([], base=_without(BASE, "--mock-data", takes_value=False))
    assert any("--mock-data" in e and "--data-path" in e for e in errors), errors


def test_data_path_prefix_must_exist(tmp_path):
    base = _without(BASE, "--mock-data", takes_value=False)
    errors = errors_for(["--data-path", str(tmp_path / "corpus_text_document")], base=base)
    assert any("--data-path" in e and ".bin" in e for e in errors), errors
    (tmp_path / "corpus_text_document.bin").write_bytes(b"")
    (tmp_path / "corpus_text_document.idx").write_bytes(b"")
    assert errors_for(["--data-path", str(tmp_path / "corpus_text_document")], base=base) == []
    errors = errors_for(["--data-path", "x", str(tmp_path / "corpus_text_document")], base=base)
    assert any("weight" in e for e in errors), errors


def test_load_directory_without_checkpoint(tmp_path):
    errors = errors_for(["--load", str(tmp_path)])
    assert any(f"--load {tmp_path} holds no checkpoint" in e for e in errors), errors


def test_load_tracker_pointing_at_incomplete_checkpoint(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")
    (tmp_path / "iter_0000010").mkdir()
    errors = errors_for(["--load", str(tmp_path)])
    assert any("not a complete checkpoint" in e and "10" in e for e in errors), errors
    (tmp_path / "iter_0000010" / "metadata.json").write_text("{}")
    assert errors_for(["--load", str(tmp_path)]) == []
    errors = errors_for(["--load", str(tmp_path), "--ckpt-step", "5"])
    assert any("--ckpt-step 5" in e and "[10]" in e for e in errors), errors


def test_nccl_without_cuda_is_rejected(monkeypatch):
    monkeypatch.setattr(targs, "_cuda_available", lambda: False)
    errors = errors_for(["--distributed-backend", "nccl"])
    assert any("--distributed-backend nccl" in e and "gloo" in e for e in errors), errors


def test_tensorboard_dir_needs_tensorboard(monkeypatch, tmp_path):
    monkeypatch.setattr(targs, "_tensorboard_importable", lambda: False)
    errors = errors_for(["--tensorboard-dir", str(tmp_path)])
    assert any("--tensorboard-dir" in e and "tensorboard" in e for e in errors), errors


def test_every_problem_is_reported_at_once():
    errors = errors_for(["--bf16", "--fp16", "--min-lr", "1", "--save-interval", "3"])
    assert len(errors) >= 3, errors
    with pytest.raises(targs.ArgumentValidationError) as info:
        targs.validate_args(targs.parse_args(BASE + ["--bf16", "--fp16"]), 2)
    assert "--bf16" in str(info.value)


# -- argparse-level errors -------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--definitely-not-a-megatron-flag", "3"], "--definitely-not-a-megatron-flag"),
        (["--token-pipe"], "--token-pipe"),  # no abbreviations, as in Megatron-LM
        (["--token-pipeline-schedule", "gpipe"], "--token-pipeline-schedule"),
        (["--token-pipeline-slices", "a,b"], "--token-pipeline-slices"),
        (["--lr-decay-style", "step"], "--lr-decay-style"),
        (["--num-layers", "four"], "--num-layers"),
    ],
)
def test_argparse_rejects_with_flag_name(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        targs.parse_args(BASE + argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


# -- the token-pipeline group on its own (as Megatron-LM's extra_args_provider) ---------------
def test_add_token_pipeline_args_on_a_foreign_parser():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    assert add_token_pipeline_args(parser) is parser
    args = parser.parse_args(["--token-pipeline", "--token-pipeline-slices", "512,512,1024"])
    assert args.token_pipeline is True and args.token_pipeline_slices == (512, 512, 1024)
    args.seq_length = 2048
    validate_token_pipeline_args(args)
    assert args.token_pipeline_schedule == "terapipe"
    config = token_pipeline_config_from_args(args)
    assert config.resolve_token_slices(2048) == (512, 512, 1024)


def test_parse_slices_forms():
    assert parse_slices("auto") == "auto"
    assert parse_slices("8") == 8
    assert parse_slices("1, 2,3") == (1, 2, 3)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_slices("eight")


def test_token_errors_on_megatron_like_namespace():
    ns = argparse.Namespace(
        token_pipeline=True,
        token_pipeline_slices=(100, 100),
        seq_length=256,
        context_parallel_size=2,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=4,
    )
    errors = token_pipeline_errors(ns)
    assert any("--context-parallel-size=2" in e for e in errors)
    assert any("sums to 200" in e for e in errors)
    with pytest.raises(TokenPipelineArgumentError):
        validate_token_pipeline_args(ns)


def test_split_backward_on_upstream_megatron_lm_namespaces():
    """Upstream Megatron-LM's own flags (its default is Transformer Engine; it has FSDP)."""
    ns = argparse.Namespace(
        token_pipeline=True, token_pipeline_split_backward=True, seq_length=256,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
        transformer_impl="transformer_engine", use_megatron_fsdp=True,
        gradient_accumulation_fusion=True,
    )
    errors = token_pipeline_errors(ns)
    assert any("--use-megatron-fsdp" in e for e in errors), errors
    assert any("--transformer-impl local" in e for e in errors), errors
    ns.transformer_impl, ns.use_megatron_fsdp = "local", False
    assert token_pipeline_errors(ns) == []
    assert token_pipeline_config_from_args(
        argparse.Namespace(**vars(ns), token_pipeline_slices=4)).split_backward is True


def test_config_for_auto_needs_a_plan():
    ns = argparse.Namespace(token_pipeline_schedule="terapipe", token_pipeline_slices="auto")
    with pytest.raises(ValueError, match="planner"):
        token_pipeline_config_from_args(ns)


# -- config files ------------------------------------------------------------------------------
def test_config_expansion_and_override(tmp_path):
    inner = tmp_path / "inner.args"
    inner.write_text("--num-layers 8  # comment\n--hidden-size 128\n")
    outer = tmp_path / "outer.args"
    outer.write_text("#@ nproc_per_node=4 nnodes=2\n--config inner.args\n--seq-length 256\n")
    assert read_config(str(outer)) == [
        "--num-layers", "8", "--hidden-size", "128", "--seq-length", "256",
    ]  # fmt: skip
    argv = expand_config_args(["--config", str(outer), "--num-layers", "2"])
    assert argv[-2:] == ["--num-layers", "2"]
    assert launch_hints(str(outer)) == {"nproc_per_node": "4", "nnodes": "2"}
    args = targs.parse_args(["--config", str(outer), "--num-layers", "2"])
    assert args.num_layers == 2 and args.hidden_size == 128


def test_config_errors(tmp_path):
    loop = tmp_path / "loop.args"
    loop.write_text("--config loop.args\n")
    with pytest.raises(ConfigFileError, match="cycle"):
        read_config(str(loop))
    with pytest.raises(ConfigFileError, match="no such file"):
        read_config(str(tmp_path / "missing.args"))


def test_tiny_config_is_valid():
    args = targs.validate_args(targs.parse_args(["--config", TINY]), 2)
    assert args.pipeline_model_parallel_size == 2 and args.hidden_dropout == 0.0


# -- issue 14: resume flags, auto-resume, on/off overrides, up-front rejections ---------------
def test_auto_resume_on_empty_or_missing_directory(tmp_path):
    fresh = tmp_path / "fresh"
    assert errors_for(["--save", str(fresh), "--load", str(fresh)]) == []  # missing
    fresh.mkdir()
    (fresh / "iter_0000003.tmp").mkdir()  # left by a killed first save: still empty
    assert errors_for(["--save", str(fresh), "--load", str(fresh)]) == []
    # --load alone on an empty directory stays an error, now naming the auto-resume pattern.
    errors = errors_for(["--load", str(fresh)])
    assert any("holds no checkpoint" in e and "same directory to --save" in e for e in errors)


def test_missing_ckpt_step_lists_complete_checkpoints_even_under_auto_resume(tmp_path):
    for it in (2, 4):
        (tmp_path / f"iter_{it:07d}").mkdir()
        (tmp_path / f"iter_{it:07d}" / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000006").mkdir()  # incomplete
    errors = errors_for(["--save", str(tmp_path), "--load", str(tmp_path), "--ckpt-step", "6"])
    assert errors == [
        f"--ckpt-step 6: {tmp_path}/iter_0000006 is not a complete checkpoint; complete "
        f"checkpoints in --load {tmp_path}: [2, 4]"
    ]
    # No tracker, but complete checkpoints: not "empty", so no silent fresh start.
    errors = errors_for(["--save", str(tmp_path), "--load", str(tmp_path)])
    assert any("--ckpt-step 4" in e for e in errors), errors


def test_save_pointing_at_a_file_fails_at_argument_time(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("x")
    assert errors_for(["--save", str(target)]) == [
        f"--save {target} is an existing file, not a directory; name a directory"
    ]


def test_both_scheduler_flags_are_refused():
    errors = errors_for(
        ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"]
    )
    assert any(
        "--override-opt_param-scheduler" in e and "--use-checkpoint-opt_param-scheduler" in e
        for e in errors
    ), errors


def test_fp16_on_cpu_is_refused_up_front(monkeypatch, capsys):
    from megatron_terapipe.training import pretrain

    monkeypatch.setattr(targs, "_cuda_available", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pretrain.main(BASE + ["--fp16"]) == 2  # before any process group or model
    assert capsys.readouterr().err == (
        "pretrain_gpt.py: error: invalid arguments:\n  - --fp16 needs a GPU: on the CPU the "
        "float16 model overflows in its first iteration (NaN grad norm); use --bf16 or full "
        "precision (no flag) for CPU runs\n"
    )
    # The configs stay valid (they are GPU configs); only this machine cannot run them.
    assert errors_for(["--fp16"]) == []
    monkeypatch.setattr(targs, "_cuda_available", lambda: True)
    monkeypatch.setattr(targs, "_te_importable", lambda: False)
    args = targs.validate_args(targs.parse_args(BASE + ["--fp16"]), 2)
    assert targs.machine_errors(args) == []


def test_later_flags_turn_off_switches_from_a_config_file():
    # TINY sets --mock-data: a later --data-path means real data, --no-mock-data turns it off.
    args = targs.parse_args(["--config", TINY, "--data-path", "corpus"])
    assert (args.mock_data, args.data_path) == (False, ["corpus"])
    args = targs.parse_args(["--config", TINY, "--no-mock-data"])
    assert (args.mock_data, args.data_path) == (False, None)
    args = targs.parse_args(["--data-path", "corpus", "--mock-data"])
    assert (args.mock_data, args.data_path) == (True, None)
    args = targs.parse_args(
        ["--bf16", "--sequence-parallel", "--no-bf16", "--no-sequence-parallel"]
    )
    assert not args.bf16 and not args.sequence_parallel


def test_memory_cap_applies_to_explicit_slices():
    # A thin last slice frees little before the first backward makes the fp32 K/V-gradient
    # accumulators, so it peaks higher than one slice; the cap is set between the two
    # slicings' peaks as the planner's memory model computes them.
    from megatron_terapipe.slicing.memory import GIB, ActivationMemoryModel

    # Attention dropout off: its masks grow with each slice's context, which favours cuts.
    no_dropout = ["--attention-dropout", "0"]
    args = targs.parse_args(BASE + no_dropout + ["--token-pipeline"])
    memory = ActivationMemoryModel.from_args(args)
    micro = 16 // 2
    one = memory.peak_bytes("terapipe", (2,) * micro, ((128,),) * micro, 2)
    thin = memory.peak_bytes("terapipe", (2,) * micro, ((120, 8),) * micro, 2)
    assert one < thin
    cap = (one + thin) / 2 / GIB
    flags = no_dropout + ["--token-pipeline", "--token-pipeline-memory-cap", repr(cap)]
    assert errors_for(flags + ["--token-pipeline-slices", "128,"]) == []
    errors = errors_for(flags + ["--token-pipeline-slices", "120,8"])
    assert len(errors) == 1 and errors[0].startswith(
        f"--token-pipeline-slices=120,8 needs {thin / GIB:.3f} GiB of activations per "
        f"stage (the planner's memory model), over --token-pipeline-memory-cap={cap:g}"
    ), errors
    # N equal slices are checked the same way (16 slices of 8 end on the same thin slice).
    assert errors_for(flags + ["--token-pipeline-slices", "16"]) == [
        errors[0].replace("120,8", "16", 1)
    ]


def test_token_pipeline_at_pp1_is_allowed_with_one_warning():
    from megatron_terapipe.arguments import token_pipeline_warnings

    base = _without(BASE, "--pipeline-model-parallel-size")
    flags = ["--token-pipeline", "--token-pipeline-slices", "4"]
    assert errors_for(flags, world=1, base=base) == []
    args = targs.parse_args(base + ["--token-pipeline"])
    warnings = token_pipeline_warnings(args)
    assert len(warnings) == 1 and "--pipeline-model-parallel-size 1" in warnings[0]
    assert token_pipeline_warnings(targs.parse_args(BASE + ["--token-pipeline"])) == []


def test_split_backward_at_pp1_warns_that_nothing_is_split():
    from megatron_terapipe.arguments import token_pipeline_warnings

    base = _without(BASE, "--pipeline-model-parallel-size")
    warnings = token_pipeline_warnings(
        targs.parse_args(base + ["--token-pipeline", "--token-pipeline-split-backward"]))
    assert len(warnings) == 2 and "none is split" in warnings[1]
    assert token_pipeline_warnings(
        targs.parse_args(BASE + ["--token-pipeline", "--token-pipeline-split-backward"])) == []
