"""patches/megatron-lm-<tag>.patch against real Megatron-LM checkouts, one per tag.

Each patch is checked against a checkout of NVIDIA/Megatron-LM at its own tag, named by an
environment variable (patched or not; it is never modified: the files the run needs are
copied and the patch is applied to the copy):

- core_v0.16.1: MEGATRON_LM_PATH
- core_v0.19.0: MEGATRON_LM_019_PATH (Megatron-LM at that tag needs Python >= 3.12)

The copy carries the checkout's own megatron/core, so each tag runs against the megatron-core
it was released with. The parse checks run upstream's own pretrain_gpt.py up to and including
its argument validation, which needs `six regex triton pyyaml pydantic` next to megatron-core;
without them those checks skip and say so. The build check runs upstream's own model-building
code with the model class replaced by a recorder, so it sees the layer spec upstream would
build the model from, without building one. The checks that only read the patch files run
always.

On a machine without CUDA, upstream stops at "Megatron requires CUDA" before parsing; the
runner reports CUDA as available so that parsing and validation run, and the run then ends at
process-group start-up, after the argument table was printed.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from megatron_terapipe.testing.moe import TINY_MOE_FLAGS as MOE_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM_DEPS = ("six", "regex", "triton", "yaml", "pydantic")


@dataclass(frozen=True)
class Upstream:
    tag: str
    env: str  # names a checkout at `tag`
    files: tuple[str, ...]  # what the patch touches: Megatron-LM's entry points only
    max_added: int
    min_python: tuple[int, int]
    builds_from_model_config: bool  # pretrain() gets a GPTModelConfig, not a model provider

    @property
    def patch(self) -> str:
        return os.path.join(REPO, "patches", f"megatron-lm-{self.tag}.patch")


UPSTREAMS = (
    Upstream(
        "core_v0.16.1",
        "MEGATRON_LM_PATH",
        (
            "pretrain_gpt.py",
            "gpt_builders.py",
            "megatron/training/arguments.py",
            "megatron/training/training.py",
        ),
        max_added=20,
        min_python=(3, 10),
        builds_from_model_config=False,
    ),
    # The model is built from a GPTModelConfig whose layer spec may be a callable: no
    # gpt_builders.py change.
    Upstream(
        "core_v0.19.0",
        "MEGATRON_LM_019_PATH",
        ("pretrain_gpt.py", "megatron/training/arguments.py", "megatron/training/training.py"),
        max_added=16,
        min_python=(3, 12),
        builds_from_model_config=True,
    ),
)
IDS = [u.tag for u in UPSTREAMS]

RUNNER = """
import os, runpy, sys
import torch
torch.cuda.is_available = lambda: True  # reach upstream's argument checks on a CPU machine
sys.path.insert(0, ".")
if os.environ.get("PATCH_TEST_BUILD"):
    import megatron.training

    def pretrain(*args, **kwargs):
        # Upstream's model building up to the model class, which records its layer spec.
        specs = []

        def record(**model_kwargs):
            specs.append(model_kwargs["transformer_layer_spec"])
            return "model"

        def layer():
            spec = specs[-1]  # an MoE model's is a block spec: its last layer is an MoE layer
            return spec.layer_specs[-1] if hasattr(spec, "layer_specs") else spec

        def name(cls):
            return f"{cls.__module__}.{cls.__qualname__}"

        def built_modules():
            core = layer().submodules.self_attention.submodules.core_attention
            mlp = layer().submodules.mlp  # a ModuleSpec, or on 0.19 a partial of the module
            submodules = getattr(mlp, "submodules", None) or getattr(mlp, "keywords", {}).get(
                "submodules"
            )
            router = getattr(submodules, "router", None)
            return name(core) + (f" router={name(router)}" if router is not None else "")

        from megatron.core import parallel_state

        # No process group is started here: an MoE model's block spec is built for the first
        # pipeline stage, whose rank megatron-core would read from the group.
        parallel_state.get_pipeline_model_parallel_rank = lambda *a, **k: 0

        if hasattr(args[0], "model"):  # core_v0.19.0: a config container holding the model's
            import megatron.training.models.gpt as gpt
            from megatron.core.transformer.enums import AttnBackend

            gpt.GPTModel = record
            model_config = args[0].model
            builder = model_config.get_builder_cls()(model_config)
            builder.build_model(None, pre_process=True, post_process=True)
            print(f"BUILT core_attention={built_modules()}", flush=True)
            model_config.attention_backend = AttnBackend.local
            try:
                builder.build_model(None, pre_process=True, post_process=True)
                print(f"LOCAL BACKEND core_attention={built_modules()}", flush=True)
            except ValueError as exc:
                print(f"LOCAL BACKEND refused: {exc}", flush=True)
        else:  # core_v0.16.1: pretrain parses the arguments, then calls the model provider
            import gpt_builders
            from megatron.training.arguments import parse_args, validate_args
            from megatron.training.global_vars import set_global_variables

            parsed = parse_args(kwargs.get("extra_args_provider"))
            validate_args(parsed, kwargs.get("args_defaults", {}))
            set_global_variables(parsed)
            gpt_builders.GPTModel = record
            args[1](pre_process=True, post_process=True)
            print(f"BUILT core_attention={built_modules()}", flush=True)
        sys.exit(0)

    megatron.training.pretrain = pretrain
sys.argv = ["pretrain_gpt.py", *sys.argv[1:]]
runpy.run_path("pretrain_gpt.py", run_name="__main__")
"""

FLAGS = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
    "--global-batch-size", "8", "--train-iters", "10", "--lr", "1e-3", "--mock-data",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "255", "--transformer-impl", "local",
    "--pipeline-model-parallel-size", "2",
]  # fmt: skip
PREFIX_KV = "megatron_terapipe.model.prefix_attention.PrefixKVAttention"
STOCK_LOCAL = "megatron.core.transformer.dot_product_attention.DotProductAttention"


def test_every_patch_has_its_checks():
    """A patch added for a new tag without an entry here would never be checked."""
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "patches", "*")))
    assert found == sorted(os.path.basename(u.patch) for u in UPSTREAMS)


@pytest.mark.parametrize("upstream", UPSTREAMS, ids=IDS)
def test_patch_is_small_and_touches_only_entry_points(upstream):
    with open(upstream.patch, encoding="utf-8") as handle:
        text = handle.read()
    files = [line.split(" b/")[-1] for line in text.splitlines() if line.startswith("diff --git")]
    assert sorted(files) == sorted(upstream.files)
    added = [ln for ln in text.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert len(added) <= upstream.max_added, len(added)
    hooks = "\n".join(added)
    for hook in ("combined_extra_args_provider", "wrap_forward_step", "validate_args"):
        assert hook in hooks
    assert "from megatron_terapipe.megatron_lm import get_forward_backward_func" in hooks


@pytest.fixture(scope="module", params=UPSTREAMS, ids=IDS)
def patched_tree(request, tmp_path_factory):
    """A copy of the tag's checkout (Python sources) with the tag's patch applied."""
    upstream = request.param
    checkout = os.environ.get(upstream.env)
    if not checkout or not os.path.isfile(os.path.join(checkout, "pretrain_gpt.py")):
        pytest.skip(
            f"{upstream.env} is not set to a Megatron-LM checkout at tag {upstream.tag}; e.g. "
            f"git clone -b {upstream.tag} https://github.com/NVIDIA/Megatron-LM && "
            f"{upstream.env}=$PWD/Megatron-LM pytest tests/test_patch.py"
        )
    if sys.version_info[:2] < upstream.min_python:
        pytest.skip(
            f"Megatron-LM {upstream.tag} needs Python >= "
            f"{'.'.join(map(str, upstream.min_python))}; this is {sys.version.split()[0]}"
        )
    tree = tmp_path_factory.mktemp(f"megatron-lm-{upstream.tag}")
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py"):
        shutil.copy2(os.path.join(checkout, name), tree / name)
    shutil.copytree(
        os.path.join(checkout, "megatron"),
        tree / "megatron",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    reverse = subprocess.run(
        ["git", "apply", "--reverse", "--check", upstream.patch], cwd=tree, capture_output=True
    )
    if reverse.returncode == 0:
        return tree, "already applied", upstream
    check = subprocess.run(
        ["git", "apply", "--check", upstream.patch], cwd=tree, capture_output=True
    )
    assert check.returncode == 0, (
        f"{os.path.basename(upstream.patch)} does not apply to {checkout} "
        f"(is {upstream.env} at tag {upstream.tag}?): {check.stderr.decode()}"
    )
    subprocess.run(["git", "apply", upstream.patch], cwd=tree, check=True)
    return tree, "applied", upstream


def test_patch_applies(patched_tree):
    tree, how, _ = patched_tree
    assert how in ("applied", "already applied")
    with open(tree / "pretrain_gpt.py", encoding="utf-8") as handle:
        assert "token_pipeline.combined_extra_args_provider" in handle.read()


def _run_upstream(tree, flags, build=False):
    missing = [m for m in UPSTREAM_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"upstream pretrain_gpt.py needs {', '.join(missing)} (pip install them)")
    (tree / "_run_upstream.py").write_text(RUNNER)
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", PYTHONWARNINGS="ignore")
    env.pop("PATCH_TEST_BUILD", None)
    if build:
        env["PATCH_TEST_BUILD"] = "1"
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # end the run at process-group start-up, after validation
    result = subprocess.run(
        [sys.executable, "_run_upstream.py", *flags],
        cwd=tree, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return result.stdout + result.stderr


def test_patched_pretrain_gpt_parses_and_validates_token_flags(patched_tree):
    tree, _, _ = patched_tree
    output = _run_upstream(
        tree, FLAGS + ["--token-pipeline", "--token-pipeline-slices", "32,32,64",
                       "--token-pipeline-schedule", "token-1f1b"]
    )  # fmt: skip
    assert "TokenPipelineArgumentError" not in output, output[-4000:]
    assert "> token pipeline: schedule token-1f1b, slices 32,32,64" in output, output[-4000:]
    for row in ("token_pipeline ", "token_pipeline_slices ", "token_pipeline_schedule "):
        assert row in output, row  # in Megatron-LM's own argument table
    assert "(32, 32, 64)" in output
    # The run got past the arguments and ended where the runner ends it.
    assert "MASTER_ADDR" in output, output[-4000:]


def test_patched_pretrain_gpt_rejects_bad_token_flags_in_validation(patched_tree):
    tree, _, _ = patched_tree
    output = _run_upstream(tree, FLAGS + ["--token-pipeline", "--token-pipeline-slices", "32,32"])
    assert "TokenPipelineArgumentError" in output, output[-4000:]
    assert "--token-pipeline-slices=32,32 sums to 64" in output
    assert "token_pipeline_slices ...." not in output  # stopped before the argument table


TOKEN_ROUTER = "megatron_terapipe.model.moe.TokenSliceTopKRouter"
STOCK_ROUTER = "megatron.core.transformer.moe.router.TopKRouter"


def test_patched_pretrain_gpt_builds_the_token_router_for_moe(patched_tree):
    """An MoE GPT through upstream's own arguments and model building: under --token-pipeline
    its MoE layers get the router whose aux and z-losses span the micro-batch; without it,
    stock's router."""
    tree, _, _ = patched_tree
    token = FLAGS + MOE_FLAGS + ["--token-pipeline", "--token-pipeline-slices", "32,32,64"]
    output = _run_upstream(tree, token, build=True)
    assert f"BUILT core_attention={PREFIX_KV} router={TOKEN_ROUTER}\n" in output, output[-4000:]
    stock = _run_upstream(tree, FLAGS + MOE_FLAGS, build=True)
    assert f"BUILT core_attention={STOCK_LOCAL} router={STOCK_ROUTER}\n" in stock, stock[-4000:]
    refused = _run_upstream(tree, token + ["--moe-expert-capacity-factor", "1.0"])
    assert "TokenPipelineArgumentError" in refused, refused[-4000:]
    assert "--moe-expert-capacity-factor" in refused, refused[-4000:]


def test_patched_pretrain_gpt_rejects_local_attention_backend(patched_tree):
    """megatron-core's DotProductAttention cannot attend to earlier slices; core_v0.19.0's
    builder would put it in place of prefix-KV attention. Upstream allows the backend only
    with --spec local (whose spec it never imports)."""
    tree, _, _ = patched_tree
    output = _run_upstream(
        tree, FLAGS + ["--token-pipeline", "--attention-backend", "local", "--spec", "local", "x"]
    )
    assert "TokenPipelineArgumentError" in output, output[-4000:]
    assert "--attention-backend local with --token-pipeline" in output


def test_patched_pretrain_gpt_builds_prefix_kv_attention(patched_tree):
    """Through upstream's own model building: the layer spec holds prefix-KV core attention
    under --token-pipeline and upstream's own choice without it. Where the model is built from
    a GPTModelConfig, a config switched to the local attention backend after our checks (as a
    Python caller may) is refused when the spec is resolved, not silently built stock."""
    tree, _, upstream = patched_tree
    output = _run_upstream(tree, FLAGS + ["--token-pipeline", "--token-pipeline-slices", "4"], True)
    assert f"BUILT core_attention={PREFIX_KV}\n" in output, output[-4000:]
    stock = _run_upstream(tree, FLAGS, build=True)
    assert f"BUILT core_attention={STOCK_LOCAL}\n" in stock, stock[-4000:]
    if upstream.builds_from_model_config:
        assert "LOCAL BACKEND refused: --attention-backend local with --token-pipeline" in output
        assert f"LOCAL BACKEND core_attention={STOCK_LOCAL}\n" in stock  # upstream's override
