"""``KLAttention``: the token mixer of the published KLA model as a plain torch module, on top of kla-tl's kernels.

Parametrization (KLA.md section 8, the released ``relaxed_kaczmarz_q_norm`` layer), for input x ``[B, T, hidden]``::

    q = SiLU(ShortConv(W_q x))   [B, T, H, K]      raw (the kernel L2-normalizes q: normalize_q=True)
    k = SiLU(ShortConv(W_k x))   [B, T, H, K]      raw keys (KLA) / L2-normalized (gdn=True)
    v = SiLU(ShortConv(W_v x))   [B, T, HV, V]
    g   = -exp(A_log) * softplus(W_a x + dt_bias)  [B, T, HV] fp32 (Mamba2-style log-decay)
    eta = sigmoid(W_b x + b_b)                      [B, T, HV] fp32 (beta = eta / (||k||^2 + eps) inside kla-tl)
    o   = chunk_kla(q, k, v, g, eta, normalize_q=True)          (kla_decode for one cached token)
    y   = W_o [RMSNorm_V(o) * SiLU(W_g x)]

``ShortConv`` is a causal depthwise convolution of kernel ``conv_size`` without bias. With ``num_v_heads > num_heads``
the layer is GVA: value head ``hv`` reads q/k head ``hv // (HV // H)`` (kla-tl's convention).

Caching: :class:`KLACache` holds, per sequence, the last ``conv_size - 1`` inputs of the three convolutions and the
recurrent state ``[N, HV, K, V]`` (float32; float64 for a float64 layer). A prefill (any T, with ``use_cache=True`` or
a cache) runs ``chunk_kla`` from the cached state; one token per row with a cache runs ``kla_decode``, which updates
the state in place. Packed sequences (``cu_seqlens``, B = 1) never mix inside the convolution, and the cache then
holds one entry per sequence, ready for a batched decode with ``x`` of shape ``[N, 1, hidden]``.

Parameter names follow the released layer except ``gk_proj`` -> ``a_proj``, ``{q,k,v}_conv1d`` -> ``{q,k,v}_conv``
(weight ``[D, W]``, the released ``[D, 1, W]`` squeezed) and ``g_norm_swish_gate`` -> ``o_norm``; the released
layer's unused ``D`` parameter is left out. With ``num_v_heads == num_heads`` (the published models) the shapes match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .api import chunk_kla, kla_decode
from .conventions import check_cu_seqlens, state_dtype_for
from .reference import l2norm

__all__ = ["KLAttention", "KLACache", "ShortConvolution", "RMSNorm"]

#: Init range of A in the Mamba2-style gate, A ~ U(0, 16), stored as A_log = log A (released code).
A_INIT_RANGE = (0.0, 16.0)
#: Init of the gate's time step: dt log-uniform in [1e-3, 0.1], floored at 1e-4, stored through softplus^-1.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
#: Epsilon of the output RMSNorm over d_v (fla ``FusedRMSNormSwishGate`` default in the released layer).
NORM_EPS = 1e-5


def _fail(msg: str, exc=ValueError):
    raise exc(f"KLAttention: {msg}")


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in its arithmetic dtype: float32, or float64 for float64 tensors (so a float64 layer stays exact)."""
    return x.to(state_dtype_for(x.dtype))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, computed in float32 (float64 for float64 x),
    returned in x's dtype."""

    def __init__(self, dim: int, eps: float = NORM_EPS, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _acc(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(xf.dtype)
        return y.to(x.dtype)


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution (kernel ``kernel_size``, no bias) followed by SiLU, with a carried state.

    ``y_t = SiLU(sum_j w[:, j] * x_{t - (W-1) + j})`` with ``W = kernel_size``; inputs before the start of a sequence
    are read from the state (its last ``W - 1`` inputs, oldest first) or are zero. ``weight`` is ``[D, W]``
    (``nn.Conv1d``'s ``[D, 1, W]`` without the middle axis) and has ``nn.Conv1d``'s default init.
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        bound = 1.0 / math.sqrt(kernel_size)      # kaiming_uniform(a=sqrt(5)) with fan_in = W, as nn.Conv1d
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, state: Optional[torch.Tensor] = None,
                cu: Optional[list[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, T, D]``; state ``[N, W-1, D]`` or None (zeros); cu: host list of packed offsets (B = 1) or None.

        Returns ``(y [B, T, D], new_state [N, W-1, D])``: y in x's dtype; new_state holds the last ``W - 1`` inputs
        of each sequence (earlier ones from ``state`` when a sequence is shorter than ``W - 1``).
        """
        W = self.kernel_size
        w = self.weight.to(x.dtype)
        if state is not None:
            state = state.to(x.dtype)
        if cu is None:
            B, T, D = x.shape
            pad = state if state is not None else x.new_zeros(B, W - 1, D)
            xp = torch.cat([pad, x], dim=1)                                    # [B, W-1+T, D]
            # W shifted multiply-adds (no conv1d: its CPU backend re-plans for every new shape, ~1 s per call)
            y = xp[:, :T] * w[:, 0]
            for j in range(1, W):
                y = y + xp[:, j:j + T] * w[:, j]
            return F.silu(y), xp[:, T:]
        return self._packed(x, w, state, cu)

    def _packed(self, x, w, state, cu):
        # Gather form: every tap of every token reads an index into [tokens ; state rows ; one zero row], so a tap that
        # falls before its sequence's start reads that sequence's state (or zero) instead of the previous sequence.
        W, TT, D = self.kernel_size, x.shape[1], x.shape[2]
        N, dev = len(cu) - 1, x.device
        lengths = torch.tensor([cu[i + 1] - cu[i] for i in range(N)], device=dev)
        starts = torch.tensor(cu[:-1], device=dev)
        ends = torch.tensor(cu[1:], device=dev)
        seq = torch.repeat_interleave(torch.arange(N, device=dev), lengths)    # [TT] sequence of each token
        rows = [x[0]]
        if state is not None:
            rows.append(state.reshape(N * (W - 1), D))
        rows.append(x.new_zeros(1, D))
        table = torch.cat(rows, 0)
        zero_row = table.shape[0] - 1

        def index(pos, seq_of, bos):
            rel = pos - bos                                                     # position inside the sequence
            if state is not None:
                before = TT + seq_of * (W - 1) + (W - 1) + rel                  # the state's rows, oldest first
            else:
                before = torch.full_like(pos, zero_row)
            return torch.where(rel >= 0, pos, before)

        taps = torch.arange(W, device=dev) - (W - 1)                            # offsets -(W-1) .. 0
        tok = torch.arange(TT, device=dev)
        idx = index(tok[:, None] + taps[None, :], seq[:, None], starts[seq][:, None])       # [TT, W]
        y = (table[idx] * w.t().unsqueeze(0)).sum(1)                                         # [TT, D]
        last = ends[:, None] + torch.arange(1 - W, 0, device=dev)[None, :]                   # [N, W-1]
        sidx = index(last, torch.arange(N, device=dev)[:, None], starts[:, None])
        return F.silu(y).unsqueeze(0), table[sidx]


@dataclass
class KLACache:
    """Per-layer inference state of :class:`KLAttention`, one entry per sequence (N = B, or the packed count).

    Attributes:
        conv_q, conv_k: ``[N, conv_size - 1, H * K]`` last inputs of the q/k convolutions (before the convolution).
        conv_v: ``[N, conv_size - 1, HV * V]`` last inputs of the v convolution.
        state: ``[N, HV, K, V]`` recurrent state, K-major, float32 (float64 for a float64 layer).
        seen_tokens: tokens processed so far per sequence, when all sequences advanced together (bookkeeping only).
    """

    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    state: torch.Tensor
    seen_tokens: int = 0

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def clone(self) -> "KLACache":
        return KLACache(self.conv_q.clone(), self.conv_k.clone(), self.conv_v.clone(), self.state.clone(),
                        self.seen_tokens)


class KLAttention(nn.Module):
    """Kaczmarz Linear Attention layer (or Gated DeltaNet with ``gdn=True``), the published parametrization.

    Args:
        hidden_size: model width (input and output size).
        num_heads: q/k heads H.
        head_dim_k: key/query head dim K.
        head_dim_v: value head dim V.
        num_v_heads: value heads HV (default H); GVA when HV > H, which needs ``HV % H == 0``. The decay gate, eta,
            the output gate and the state are per value head.
        conv_size: kernel of the causal depthwise short convolutions on q, k, v (default 4).
        gdn: Gated DeltaNet instead of KLA, for comparison: keys are L2-normalized (``k^ = k / sqrt(||k||^2 + 1e-6)``,
            fla's l2norm, as the released GDN layer) before ``chunk_kla``, so kla-tl's ``beta = eta / (||k^||^2 + eps)``
            is GDN's ``beta = eta`` divided by ``||k^||^2 + eps = 1 + eps - 1e-6 / (||k||^2 + 1e-6)``, i.e.
            ``beta ~= eta / (1 + eps)`` (KLA.md section 2, last bullet). The relative difference from ``beta = eta`` is
            at most ``1e-6 * max(1, 1 / ||k||^2)``: about 1e-6 for keys of ordinary size, larger only for keys with
            ``||k||^2`` near 1e-6, whose normalized key is itself short.
        layer_idx: index of the layer in its model (kept for the caller's cache bookkeeping).

    Parameters without weight decay carry ``_no_weight_decay = True`` (``A_log``, ``dt_bias``).

    Example:
        >>> layer = KLAttention(256, 4, 48, 96)
        >>> x = torch.randn(2, 100, 256)
        >>> y, _ = layer(x)                                    # training / full sequence
        >>> y, cache = layer(x[:, :90], use_cache=True)        # prefill
        >>> y1, cache = layer(x[:, 90:91], cache=cache)        # one decode step (cache.state updated in place)
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim_k: int, head_dim_v: int, *,
                 num_v_heads: Optional[int] = None, conv_size: int = 4, gdn: bool = False,
                 layer_idx: Optional[int] = None):
        super().__init__()
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim_k", head_dim_k),
                          ("head_dim_v", head_dim_v), ("num_v_heads", num_v_heads), ("conv_size", conv_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                _fail(f"{name} must be a positive int, got {val!r}")
        if num_v_heads % num_heads != 0:
            _fail(f"num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads}")
        self.hidden_size = hidden_size
        self.num_heads, self.num_v_heads = num_heads, num_v_heads
        self.head_dim_k, self.head_dim_v = head_dim_k, head_dim_v
        self.key_dim, self.value_dim = num_heads * head_dim_k, num_v_heads * head_dim_v
        self.conv_size = conv_size
        self.gdn = bool(gdn)
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.q_conv = ShortConvolution(self.key_dim, conv_size)
        self.k_conv = ShortConvolution(self.key_dim, conv_size)
        self.v_conv = ShortConvolution(self.value_dim, conv_size)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False)       # decay gate input (W_a)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=True)        # eta logits
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)    # output gate
        self.o_norm = RMSNorm(head_dim_v, eps=NORM_EPS)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

        A = torch.empty(num_v_heads, dtype=torch.float32).uniform_(*A_INIT_RANGE)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        dt = torch.exp(torch.rand(num_v_heads) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_FLOOR)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))     # softplus^-1(dt)
        self.dt_bias._no_weight_decay = True

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_v_heads={self.num_v_heads}, "
                f"head_dim_k={self.head_dim_k}, head_dim_v={self.head_dim_v}, conv_size={self.conv_size}, "
                f"gdn={self.gdn}")

    # ---------------------------------------------------------------------------------------------------- caching

    def init_cache(self, batch_size: int, *, device=None, dtype: Optional[torch.dtype] = None) -> KLACache:
        """An empty cache (zeros) for ``batch_size`` sequences; dtype is the dtype of the activations."""
        p = self.q_proj.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        W = self.conv_size - 1
        return KLACache(
            conv_q=torch.zeros(batch_size, W, self.key_dim, device=device, dtype=dtype),
            conv_k=torch.zeros(batch_size, W, self.key_dim, device=device, dtype=dtype),
            conv_v=torch.zeros(batch_size, W, self.value_dim, device=device, dtype=dtype),
            state=torch.zeros(batch_size, self.num_v_heads, self.head_dim_k, self.head_dim_v, device=device,
                              dtype=state_dtype_for(dtype)))

    def _check(self, x, cache, cu_seqlens):
        if not isinstance(x, torch.Tensor):
            _fail(f"x must be a torch.Tensor [B, T, hidden_size], got {type(x).__name__}", TypeError)
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            _fail(f"x must have shape [B, T, hidden_size={self.hidden_size}], got {tuple(x.shape)}")
        cu = None
        if cu_seqlens is not None:
            if x.shape[0] != 1:
                _fail(f"with cu_seqlens the sequences are packed in one row: B (x.shape[0]) must be 1, "
                      f"got B={x.shape[0]}")
            cu = check_cu_seqlens("KLAttention", cu_seqlens, x.shape[1], x.shape[0])
        N = x.shape[0] if cu is None else len(cu) - 1
        if cache is not None:
            if not isinstance(cache, KLACache):
                _fail(f"cache must be a KLACache (see init_cache), got {type(cache).__name__}", TypeError)
            want = {"conv_q": (N, self.conv_size - 1, self.key_dim), "conv_k": (N, self.conv_size - 1, self.key_dim),
                    "conv_v": (N, self.conv_size - 1, self.value_dim),
                    "state": (N, self.num_v_heads, self.head_dim_k, self.head_dim_v)}
            bad = [f"cache.{n} {tuple(getattr(cache, n).shape)} != {s}" for n, s in want.items()
                   if tuple(getattr(cache, n).shape) != s]
            if bad:
                _fail(f"cache does not fit this layer and N={N} sequences "
                      f"({'len(cu_seqlens)-1' if cu is not None else 'B'}): " + "; ".join(bad))
        return cu

    # ---------------------------------------------------------------------------------------------------- forward

    def kernel_inputs(self, x: torch.Tensor, cache: Optional[KLACache] = None, cu: Optional[list[int]] = None):
        """The attention inputs of x: ``(q, k, v, g, eta, conv_states)``.

        q, k ``[B, T, H, K]`` and v ``[B, T, HV, V]`` in the activation dtype (k already L2-normalized for gdn; q raw,
        the kernel normalizes it); g, eta ``[B, T, HV]`` float32 (float64 for a float64 layer); conv_states the new
        ``(conv_q, conv_k, conv_v)``. ``cu`` is cu_seqlens as a host list (validated by :meth:`forward`).
        """
        B, T, _ = x.shape
        H, HV, K, V = self.num_heads, self.num_v_heads, self.head_dim_k, self.head_dim_v
        cq, ck, cv = (None, None, None) if cache is None else (cache.conv_q, cache.conv_k, cache.conv_v)
        q, cq = self.q_conv(self.q_proj(x), cq, cu)
        k, ck = self.k_conv(self.k_proj(x), ck, cu)
        v, cv = self.v_conv(self.v_proj(x), cv, cu)
        dt = v.dtype
        q = q.to(dt).reshape(B, T, H, K)
        k = k.to(dt).reshape(B, T, H, K)
        v = v.reshape(B, T, HV, V)
        if self.gdn:
            k = l2norm(_acc(k)).to(dt)
        a = _acc(self.a_proj(x))
        g = -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype))
        eta = torch.sigmoid(_acc(self.b_proj(x)))
        return q, k, v, g, eta, (cq, ck, cv)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``W_o [RMSNorm_V(o) * SiLU(W_g x)]`` for the attention output o ``[B, T, HV, V]``."""
        B, T = x.shape[:2]
        gate = self.g_proj(x).reshape(B, T, self.num_v_heads, self.head_dim_v)
        y = self.o_norm(o) * F.silu(_acc(gate)).to(o.dtype)
        return self.o_proj(y.reshape(B, T, self.value_dim).to(gate.dtype))

    def forward(self, x: torch.Tensor, cache: Optional[KLACache] = None,
                cu_seqlens: Optional[torch.Tensor] = None, *, use_cache: bool = False):
        """Run the layer on x ``[B, T, hidden_size]``.

        Args:
            x: activations ``[B, T, hidden_size]`` (any float dtype; bf16 on GPU for the kernels).
            cache: a :class:`KLACache` to continue from (N = B, or ``len(cu_seqlens) - 1``). It is updated and
                returned: its conv tensors are replaced, and on the decode path ``cache.state`` is updated in place.
            cu_seqlens: ``[N + 1]`` int32/int64 offsets of N sequences packed along T (B must be 1). No state
                crosses a boundary, in the convolutions or in the recurrence.
            use_cache: return a cache even when none was given (prefill from zeros).

        Returns:
            ``(y [B, T, hidden_size], cache or None)``.

        With a cache, one token per row (T == 1, no cu_seqlens) runs ``kla_decode`` (an inference path: the cached
        state is detached, no gradient flows into earlier tokens); anything else runs ``chunk_kla`` from the cached
        state (differentiable).
        """
        cu = self._check(x, cache, cu_seqlens)
        want_cache = use_cache or cache is not None
        q, k, v, g, eta, convs = self.kernel_inputs(x, cache, cu)
        if cache is not None and x.shape[1] == 1 and cu is None:
            state = cache.state
            if state.requires_grad or not state.is_contiguous() or state.dtype != state_dtype_for(v.dtype):
                state = state.detach().to(state_dtype_for(v.dtype)).contiguous()
            o = kla_decode(q, k, v, g, eta, state, normalize_q=True)
        else:
            h0 = None if cache is None else cache.state
            o, state = chunk_kla(q, k, v, g, eta, normalize_q=True, initial_state=h0,
                                 output_final_state=want_cache, cu_seqlens=cu_seqlens)
        y = self.output(o, x)
        if not want_cache:
            return y, None
        if cache is None:
            cache = KLACache(*convs, state=state)
        else:
            cache.conv_q, cache.conv_k, cache.conv_v = convs
            cache.state = state
        cache.seen_tokens += x.shape[1] if cu is None else 0
        return y, cache
