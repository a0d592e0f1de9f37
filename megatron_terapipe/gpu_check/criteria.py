"""Pass criteria, the same as the CPU test suite's (quoted there; not tuned to GPU output)."""

# fp32: tests/test_single_stage.py, tests/test_token_pipeline_exact.py.
FP32_RTOL = 1e-5
# bf16: tests/test_token_semantics.py (BF16_GRAD_RTOL, BF16_LOSS_RTOL).
BF16_GRAD_RTOL = 3e-2
BF16_LOSS_RTOL = 1e-4


def tolerances(dtype_name: str) -> tuple[float, float]:
    """(loss rtol, gradient rtol) for 'fp32' or 'bf16'."""
    if dtype_name == "fp32":
        return FP32_RTOL, FP32_RTOL
    return BF16_LOSS_RTOL, BF16_GRAD_RTOL
