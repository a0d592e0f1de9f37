"""Step a: the token-sliced model equals the unsliced one on this device, per SDPA backend.

For fp32 and bf16, for each SDPA backend (flash, efficient, cudnn, math), with RoPE + GQA,
once with plain causal attention and once with an explicit 4-D document mask: the loss and
every gradient of one micro-batch cut into uneven slices against the same model run whole, the
whole run forced onto the same backend with `torch.nn.attention.sdpa_kernel`, and against
megatron-core's own local-spec attention (no SDPA) with the same weights. The sliced run
asks prefix attention for the backend (`prefix_attention_backend`) where it offers that, and
uses `sdpa_kernel` otherwise. A backend that rejects the shapes or dtype is reported as not
applicable with its own message, never as a pass. bf16 gradients accumulate in fp32, as
megatron-core's DDP main_grad does.

Criteria (gpu_check/criteria.py, the CPU suite's): fp32, sliced vs unsliced and vs stock
attention within FP32_RTOL. bf16, where rounding makes any two kernels differ: against an fp32
copy of the model (megatron-core's local-spec attention, same weights and data), the sliced
run's max per-tensor gradient error at most BF16_ERROR_RATIO times the unsliced bf16 run's
error on the same backend (loss errors reported).
"""

from __future__ import annotations

from typing import Any

from megatron_terapipe.compat import sdpa_ops
from megatron_terapipe.gpu_check.common import GPTShape, build_gpt, step_main, token_batch
from megatron_terapipe.gpu_check.criteria import BF16_ERROR_RATIO, FP32_RTOL

BACKENDS = ("flash", "efficient", "cudnn", "math")
GPU_SHAPE = GPTShape(num_layers=2, hidden_size=512, num_attention_heads=8, num_query_groups=2,
                     seq_length=1024)
GPU_SLICES = (128, 384, 200, 312)
GPU_DOCUMENT_ENDS = (99, 500, 511, 900)
DRY_SHAPE = GPTShape(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     seq_length=64)
DRY_SLICES = (8, 24, 12, 20)
DRY_DOCUMENT_ENDS = (9, 31, 32, 50)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def _sliced_backend_context(name: str):
    """Prefix attention's own backend switch (torch's sdpa_kernel does not reach its kernels)."""
    from megatron_terapipe.model.attention_backends import prefix_attention_backend

    return prefix_attention_backend(name)


def _offered_backends(device, dtype) -> list[str]:
    from megatron_terapipe.model.attention_backends import available_prefix_attention_backends

    return list(available_prefix_attention_backends(device, dtype))


class _Fp32Grads:
    """Gradients summed in fp32 per parameter after each backward, like DDP's main_grad."""

    def __init__(self, model) -> None:
        import torch

        self.sums = {p: torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()}
        self.handles = [p.register_post_accumulate_grad_hook(self._add) for p in self.sums]

    def _add(self, param) -> None:
        self.sums[param].add_(param.grad.float())
        param.grad = None

    def take(self) -> list:
        out = [s.clone() for s in self.sums.values()]
        for s in self.sums.values():
            s.zero_()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _loss_of_slice(model, batch):
    losses = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
        labels=batch["labels"],
    ).float()
    return (losses * batch["loss_mask"]).sum(), batch["loss_mask"].sum()


def _relative(a, b) -> float:
    scale = b.float().norm().item()
    return (a.float() - b.float()).norm().item() / scale if scale > 0 else 0.0


def compare_once(model, batch, slices, seq_length, backend: str, stock_grads,
                 reference=None) -> dict[str, Any]:
    """Sliced vs unsliced under `backend` (and sliced vs stock attention): loss and max
    per-tensor gradient error; with `reference` (fp32 loss, grads) both runs' errors to it."""
    from torch.nn.attention import sdpa_kernel

    from megatron_terapipe.model.single_stage import sliced_forward_backward

    grads = _Fp32Grads(model)
    try:
        with sdpa_kernel(_sdpa_backend(backend)):
            whole_sum, whole_count = _loss_of_slice(model, batch)
            whole_loss = whole_sum / whole_count
            whole_loss.backward()
        whole = grads.take()
        with _sliced_backend_context(backend):
            sliced_loss = sliced_forward_backward(
                model, batch, slices, seq_length, _loss_of_slice
            )
        sliced = grads.take()
    finally:
        grads.close()
    grad_errors = [_relative(a, b) for a, b in zip(sliced, whole)]
    errors = {}
    if reference is not None:
        ref_loss, ref_grads = reference
        errors = {
            "sliced_vs_fp32_loss": abs(sliced_loss.item() - ref_loss) / abs(ref_loss),
            "whole_vs_fp32_loss": abs(whole_loss.item() - ref_loss) / abs(ref_loss),
            "sliced_vs_fp32_grad": max(_relative(a, b) for a, b in zip(sliced, ref_grads)),
            "whole_vs_fp32_grad": max(_relative(a, b) for a, b in zip(whole, ref_grads)),
        }
    return {
        **errors,
        "sliced_loss": sliced_loss.item(),
        "whole_loss": whole_loss.item(),
        "loss_rel_diff": abs(sliced_loss.item() - whole_loss.item()) / abs(whole_loss.item()),
        "max_grad_rel_diff": max(grad_errors),
        "stock_max_grad_rel_diff": max(_relative(a, b) for a, b in zip(sliced, stock_grads)),
    }


def stock_reference(model, shape, dtype, device, batch) -> tuple[float, list]:
    """Loss and fp32-summed gradients of megatron-core's own local-spec attention (baddbmm +
    masked softmax, no SDPA) with the same weights, unsliced: the kernel-independent truth."""
    stock = build_gpt(shape, dtype, device, token_spec=False)
    stock.load_state_dict(model.state_dict())
    grads = _Fp32Grads(stock)
    try:
        loss_sum, count = _loss_of_slice(stock, batch)
        loss = loss_sum / count
        loss.backward()
        return loss.item(), grads.take()
    finally:
        grads.close()


def run(dry_run: bool, out_dir: str, deadline: float | None = None) -> dict[str, Any]:
    """All rows in one process (no subprocess: the orchestrator's window bounds it, so
    `deadline` is not needed here)."""
    import torch

    from megatron_terapipe.gpu_check.common import pick_device, single_rank_megatron

    device = pick_device(dry_run)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (1e-5 criterion)
    torch.backends.cudnn.allow_tf32 = False
    single_rank_megatron()
    shape, slices, ends = (
        (DRY_SHAPE, DRY_SLICES, DRY_DOCUMENT_ENDS) if dry_run
        else (GPU_SHAPE, GPU_SLICES, GPU_DOCUMENT_ENDS)
    )
    # On the CPU torch has the flash (CPU) and math kernels.
    backends = ("flash", "math") if device.type == "cpu" else BACKENDS
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = build_gpt(shape, dtype, device)
        offered = _offered_backends(device, dtype)
        for mask_name, document_ends in (("causal", ()), ("document mask", ends)):
            batch = token_batch(shape, 2, device, document_ends)
            stock_loss, stock_grads = stock_reference(model, shape, dtype, device, batch)
            reference = None
            if dtype != torch.float32:
                reference = stock_reference(model, shape, torch.float32, device, batch)
            for backend in backends:
                row: dict[str, Any] = {"dtype": dtype_name, "mask": mask_name, "backend": backend}
                if dtype == torch.float32:
                    row["rtol"] = FP32_RTOL
                else:
                    row["error_ratio_bound"] = BF16_ERROR_RATIO
                if backend not in offered:
                    row.update(status="n/a", reason="not offered by "
                               "available_prefix_attention_backends for this device/dtype")
                    rows.append(row)
                    continue
                try:
                    row.update(compare_once(model, batch, slices, shape.seq_length, backend,
                                            stock_grads, reference))
                except RuntimeError as exc:
                    model.zero_grad(set_to_none=True)
                    row.update(status="n/a", reason=str(exc).strip().splitlines()[0][:240])
                    rows.append(row)
                    continue
                row["stock_loss_rel_diff"] = abs(row["sliced_loss"] - stock_loss) / abs(stock_loss)
                if reference is None:
                    ok = (
                        max(row["loss_rel_diff"], row["stock_loss_rel_diff"]) <= FP32_RTOL
                        and max(row["max_grad_rel_diff"], row["stock_max_grad_rel_diff"])
                        <= FP32_RTOL
                    )
                else:
                    # The bf16 bar is on gradients; one micro-batch's loss errors are single
                    # roundings (about 1e-6), reported, too small to rank.
                    ok = (row["sliced_vs_fp32_grad"]
                          <= BF16_ERROR_RATIO * row["whole_vs_fp32_grad"])
                row["status"] = "pass" if ok else "FAIL"
                rows.append(row)
        del model
    ran = [r for r in rows if r["status"] != "n/a"]
    failed = [r for r in rows if r["status"] == "FAIL"]
    ran_dtypes = {r["dtype"] for r in ran}
    # The private SDPA ops the fused backends call, against this torch's schemas (a changed op
    # withdraws its backend, which would show above only as "not offered").
    schema_mismatches = sdpa_ops.schema_mismatches()
    status = "fail" if failed or schema_mismatches else (
        "pass" if ran_dtypes == {"fp32", "bf16"} else "incomplete"
    )
    return {
        "step": "a",
        "title": "exactness on the device: token-sliced vs unsliced, per SDPA backend",
        "status": status,
        "device": str(device),
        "shape": shape.__dict__,
        "token_slices": list(slices),
        "document_ends": list(ends),
        "rows": rows,
        "torch": torch.__version__,
        "sdpa_schema_mismatches": schema_mismatches,
    }


if __name__ == "__main__":
    step_main(run)
