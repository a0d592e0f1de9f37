"""--gradient-accumulation-fusion on CPU: weight gradients accumulate in main_grad in the GEMM.

Megatron-LM's default (apex's fused_weight_gradient_mlp_cuda on GPUs) is what the trainer
now runs; on CPU compat supplies the same operation. Reference: the unfused path
(--no-gradient-accumulation-fusion) of the same model, weights and data, unsliced.
"""

from __future__ import annotations

import torch

from megatron_terapipe.compat import run_distributed
from megatron_terapipe.compat.cpu import _CpuWeightGradAccumulation

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "1",
         "--vocab-size", "128", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--distributed-backend", "gloo", "--token-pipeline"]


def test_cpu_kernel_adds_the_weight_gradient_in_place():
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(24, 8, generator=gen), torch.randn(24, 5, generator=gen)
    main_grad = torch.randn(5, 8, generator=gen)
    expected = main_grad + g.t() @ x
    _CpuWeightGradAccumulation.wgrad_gemm_accum_fp32(x, g, main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-6, atol=1e-6)
    # bf16 activations into an fp32 main_grad: formed in fp32, as apex accumulates
    main_grad = torch.zeros(5, 8)
    _CpuWeightGradAccumulation.wgrad_gemm_accum_fp32(x.bfloat16(), g.bfloat16(), main_grad)
    torch.testing.assert_close(main_grad, g.bfloat16().float().t() @ x.bfloat16().float())


def _grads(rank: int, world: int) -> dict:
    from megatron_terapipe.model.single_stage import sliced_forward_backward
    from megatron_terapipe.training import args as training_args
    from megatron_terapipe.training.initialize import initialize_distributed, set_random_seed
    from megatron_terapipe.training.model import build_model, transformer_config_from_args

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 128, (1, 65), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(1, 64),
             "position_ids": torch.arange(64).unsqueeze(0)}

    def loss_of_slice(model, piece):
        losses = model(piece["tokens"], piece["position_ids"], None, labels=piece["labels"])
        return (losses.float() * piece["loss_mask"]).sum(), piece["loss_mask"].sum()

    out = {}
    initialize_distributed(training_args.finalize_args(training_args.parse_args(FLAGS),
                                                       world_size=1))
    for name, extra, slices in (("unfused", ["--no-gradient-accumulation-fusion"], [64]),
                                ("fused", [], [64]), ("fused_sliced", [], [8, 24, 1, 31])):
        margs = training_args.finalize_args(training_args.parse_args(FLAGS + extra),
                                            world_size=1)
        set_random_seed(1234)
        config = transformer_config_from_args(margs)
        model = build_model(margs, config)[0]
        sliced_forward_backward(model, batch, slices, 64, loss_of_slice)
        out[name] = {
            "fusion": config.gradient_accumulation_fusion,
            "grads": {n: p.main_grad.clone() for n, p in model.named_parameters()},
        }
    return out


def test_fused_gradients_match_the_unfused_path_sliced_or_not():
    (result,) = run_distributed(_grads, 1, timeout_s=240)
    assert result["unfused"]["fusion"] is False
    assert result["fused"]["fusion"] is True
    reference = result["unfused"]["grads"]
    for name in ("fused", "fused_sliced"):
        grads = result[name]["grads"]
        assert grads.keys() == reference.keys()
        for key, ref in reference.items():
            assert ref.abs().sum() > 0, key
            torch.testing.assert_close(grads[key], ref, rtol=1e-5, atol=1e-6, msg=key)
