"""Shared TileLang constants and helpers of the kla-tl kernels."""

from __future__ import annotations

import math

import torch

#: log2(e): kernels evaluate exp(x) as exp2(x * LOG2E).
LOG2E = 1.0 / math.log(2.0)

#: Floor applied to the log-decay g inside kernels. exp(-100) ~ 3.7e-44 is already below every term that matters,
#: and a finite floor keeps g = -inf from producing (-inf) - (-inf) = NaN in chunk-local differences (KLA.md 10.6).
G_FLOOR = -100.0

#: torch dtype -> TileLang dtype string
TL_DTYPE = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}


def tl_dtype(dtype: torch.dtype) -> str:
    return TL_DTYPE[dtype]


def storage_dtype(in_dtype: str) -> str:
    """Dtype of the intermediates (w, u, Aqk) and GEMM operands: the input dtype (fp32 stays fp32)."""
    return in_dtype
