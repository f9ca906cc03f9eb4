"""Orchestration of the token-by-token kernels: ``kla_decode`` (one token on a state pool) and
``fused_recurrent_kla`` (short sequences). Kernel builders live in :mod:`kla_tl.kernels.recurrent`."""

from __future__ import annotations

from typing import Optional

import torch

from .conventions import Problem
from . import dispatch


def decode_refusal(prob: Problem, device: torch.device, state: torch.Tensor) -> Optional[str]:
    reason = dispatch.common_refusal(prob, device)
    if reason is not None:
        return reason
    return "the TileLang decode kernel is not built yet"


def recurrent_refusal(prob: Problem, device: torch.device, *, needs_grad: bool) -> Optional[str]:
    reason = dispatch.common_refusal(prob, device)
    if reason is not None:
        return reason
    return "the TileLang recurrent kernel is not built yet"


def kla_decode_kernel(*args, **kwargs):
    raise NotImplementedError


def fused_recurrent_kla_kernel(*args, **kwargs):
    raise NotImplementedError
