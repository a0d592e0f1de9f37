"""configs/: every runnable config validates for the world size its launcher hints give, and
the TeraPipe settings match the paper's table (shared/reference/terapipe_settings.json)."""

from __future__ import annotations

import glob
import json
import os

import pytest

from megatron_terapipe.training import args as targs
from megatron_terapipe.training.config_files import launch_hints, read_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
REFERENCE = os.path.join(os.path.dirname(REPO), "shared", "reference", "terapipe_settings.json")
RUNNABLE = sorted(
    glob.glob(os.path.join(CONFIGS, "*.args"))
    + glob.glob(os.path.join(CONFIGS, "terapipe", "*.args"))
)
FRAGMENTS = sorted(glob.glob(os.path.join(CONFIGS, "gpt3", "*.args")))


def _validated(path: str):
    flags = read_config(path)
    if "--mock-data" not in flags and "--data-path" not in flags:
        flags.append("--mock-data")
    hints = launch_hints(path)
    world = int(hints["nnodes"]) * int(hints["nproc_per_node"])
    args = targs.parse_args(flags)
    errors = targs.validation_errors(args, world)
    assert errors == [], (os.path.relpath(path, REPO), errors)
    return targs.finalize_args(args, world)


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_runnable_configs_validate(path):
    _validated(path)


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_fragments_parse(path):
    targs.parse_args(read_config(path))


def _reference() -> dict:
    if os.path.isfile(REFERENCE):
        with open(REFERENCE, encoding="utf-8") as handle:
            return json.load(handle)
    pytest.skip(f"{REFERENCE} not present")


def test_paper_settings_have_configs():
    ref = _reference()
    columns = ref["columns"]
    seen = set()
    for row in ref["settings"]:
        s = dict(zip(columns, row))
        name = (
            f"{s['model']}_b{s['batch_size_per_pipeline']}_tp{s['tensor_model_parallel']}"
            f"_pp{s['pipeline_stages']}_dp{s['data_parallel']}.args"
        )
        path = os.path.join(CONFIGS, "terapipe", name)
        assert os.path.isfile(path), name
        args = _validated(path)
        model = ref["models"][s["model"]]
        for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            assert getattr(args, key) == model[key], (name, key)
        assert args.tensor_model_parallel_size == s["tensor_model_parallel"]
        assert args.pipeline_model_parallel_size == s["pipeline_stages"]
        assert args.data_parallel_size == s["data_parallel"]
        assert args.global_batch_size == s["batch_size_per_pipeline"] * s["data_parallel"]
        assert args.micro_batch_size == 1
        assert args.token_pipeline and args.token_pipeline_slices == "auto"
        hints = launch_hints(path)
        assert (int(hints["nnodes"]), int(hints["nproc_per_node"])) == (
            s["nodes"],
            s["gpus_per_node"],
        )
        seen.add(name)
    assert len(seen) == len(ref["settings"])


def test_paper_model_fragments_match_reference():
    ref = _reference()
    for name, model in ref["models"].items():
        args = targs.parse_args(read_config(os.path.join(CONFIGS, "gpt3", f"{name}.args")))
        assert args.num_layers == model["num_layers"]
        assert args.hidden_size == model["hidden_size"]
        assert args.num_attention_heads == model["num_attention_heads"]
        assert args.seq_length == model["seq_length"]


def test_planner_runs_on_a_paper_config():
    """`--token-pipeline-slices auto` wiring: the planner accepts the trainer's namespace."""
    from megatron_terapipe.slicing import plan_from_args

    args = _validated(os.path.join(CONFIGS, "terapipe", "gpt3-175b_b2_tp8_pp48_dp1.args"))
    plan = plan_from_args(args)
    assert sum(plan.token_slices) == 2048
    assert len(plan.token_slices) > 1  # few micro-batches on 48 stages: slicing pays


# -- launchers (DRY_RUN prints the command they would run) -------------------------------------
def _bash(script: str, argv: list[str], env: dict[str, str]) -> str:
    import subprocess

    full = {k: v for k, v in os.environ.items() if k != "NPROC_PER_NODE"}
    full.update(DRY_RUN="1", **env)
    result = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", script), *argv],
        capture_output=True, text=True, env=full, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_torchrun_launcher_reads_the_config_hint():
    tiny = "configs/tiny-cpu.args"
    out = _bash("launch_torchrun.sh", [tiny, "--token-pipeline"], {})
    assert "torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2" in out
    assert f"scripts/pretrain_gpt.py --config {os.path.join(REPO, tiny)} --token-pipeline" in out
    out = _bash("launch_torchrun.sh", [tiny], {"NPROC_PER_NODE": "4"})
    assert "--nproc-per-node 4" in out


def test_torchrun_launcher_warns_about_multi_node_configs():
    out = _bash("launch_torchrun.sh", ["configs/terapipe/gpt3-1b_b8_tp1_pp24_dp8.args"], {})
    assert "is for 24 nodes" in out and "launch_slurm.sbatch" in out


def test_slurm_launcher_rendezvous(tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho node007\necho node008\n")
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_NNODES": "24",
        "SLURM_JOB_NODELIST": "node[007-030]",
        "SLURM_JOB_ID": "77",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": REPO,
    }
    config = "configs/terapipe/gpt3-1b_b8_tp1_pp24_dp8.args"
    out = _bash("launch_slurm.sbatch", [config, "--mock-data"], env)
    assert "srun --ntasks-per-node=1" in out
    assert "--nnodes 24 --nproc-per-node 8 --rdzv-id 77 --rdzv-backend c10d" in out
    assert "--rdzv-endpoint node007:29500" in out
    assert f"--config {os.path.join(REPO, config)} --mock-data" in out
    assert "warning" not in out
