"""FLOPs and HBM bytes of each benchmarked call: the numerators of TFLOP/s, GB/s and the roofline fractions.

One function per op, all in axis letters of :mod:`kla_tl.conventions` (``B T H HV K V``, ``C`` chunk length):

- :func:`chunk_fwd` -- one ``chunk_kla`` forward;
- :func:`chunk_fwdbwd` -- one forward plus one backward (training step of the layer);
- :func:`decode` -- one ``kla_decode`` step (one token per row on the state pool);
- :func:`gemm`, :func:`copy` -- the two ceilings measured beside every benchmark run.

The counts follow PEERS.md section 4 and count *useful* work of the chunkwise algorithm with full tiles (a
multiply-add is 2 FLOPs; every GEMM ``m x n x k`` is ``2 m n k``), not what a given kernel happens to execute.
With K = V = 128, C = 64 the forward is 1.82e5 FLOP per token and value head (PEERS.md), so numbers computed here are
comparable with the peers' figures quoted there. The byte counts are the *minimum* HBM traffic of a fully fused
implementation (each input read once, each output written once); unfused pipelines move more, so ``frac_bw`` is a
fraction of what an ideal kernel would need, never more than 1 for a correct measurement.

Everything is a float (counts reach 1e12). Token count is ``B * T`` (varlen: B = 1 and T = total packed tokens);
partial last chunks are counted as full (a < 1 % effect at the benchmarked lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Chunk length the FLOP counts assume (KLA.md section 5; every peer uses 64 on Hopper).
CHUNK = 64

#: Bytes per element of the dtype names used in result files and suites.
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Cost:
    """FLOPs and minimum HBM bytes of one call."""

    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP per byte."""
        return self.flops / self.bytes if self.bytes else float("inf")


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (``"bfloat16"``), ``torch.bfloat16`` accepted too."""
    name = str(dtype).replace("torch.", "")
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"roofline: unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}") from None


# ----------------------------------------------------------------------------------------------------------------
# chunk forward
# ----------------------------------------------------------------------------------------------------------------

def chunk_fwd_flops_per_token_head(K: int, V: int, *, H: int = 1, HV: int = 1, C: int = CHUNK,
                                   masked: bool = False) -> float:
    """Forward FLOPs per token and value head (PEERS.md section 4, ``F_fwd``).

    ``masked=True`` exploits the triangular shapes of the intra-chunk products (halves every C-sized GEMM), which
    gives PEERS.md's ``6KV + 3CK + 2CV + C^2/3`` (1.41e5 at K = V = 128) plus the KLA term.
    """
    half = 0.5 if masked else 1.0
    return (
        4.0 * K * V            # state scan: N = U - W S_in (2KV) and S_out += K^T diag(.) N (2KV)
        + 2.0 * K * V          # inter-chunk output: Q^ S_in
        + half * 2.0 * C * K   # Gram K K^T (its diagonal gives ||k||^2 + eps for beta)
        + half * 2.0 * C * K   # W = L diag(beta e^gamma) K (L is lower-triangular)
        + half * 2.0 * C * K   # Q^ K^T for the intra-chunk output
        + half * 2.0 * C * V   # U = L diag(beta) V (L is lower-triangular)
        + half * 2.0 * C * V   # (Q^ K^T * Gamma) N, intra-chunk output
        + C * C / 3.0          # L = (I + A)^-1 of a unit lower-triangular C x C block, per C tokens
        + 2.0 * K * H / HV     # KLA extra: ||k||^2 per q/k head, shared by the HV/H value heads of a group
    )


def chunk_fwd_bytes_per_token_head(K: int, V: int, *, H: int = 1, HV: int = 1, dtype: str = "bfloat16") -> float:
    """Minimum HBM bytes per token and value head of a fully fused forward (PEERS.md section 4)."""
    s = dtype_bytes(dtype)
    return (
        2.0 * K * H / HV * s   # read q and k (one q/k head serves HV/H value heads)
        + V * s                # read v
        + V * s                # write o (q's dtype)
        + 4.0 + 4.0            # read g and eta (float32)
    )


def chunk_fwd(*, B: int, T: int, H: int, HV: int, K: int, V: int, dtype: str = "bfloat16", C: int = CHUNK,
              masked: bool = False, **_ignored) -> Cost:
    """One ``chunk_kla`` forward over ``B * T`` tokens (no initial/final state)."""
    th = float(B) * T * HV  # token-heads
    return Cost(flops=th * chunk_fwd_flops_per_token_head(K, V, H=H, HV=HV, C=C, masked=masked),
                bytes=th * chunk_fwd_bytes_per_token_head(K, V, H=H, HV=HV, dtype=dtype))


# ----------------------------------------------------------------------------------------------------------------
# chunk backward (+ forward)
# ----------------------------------------------------------------------------------------------------------------

def chunk_bwd_flops_per_token_head(K: int, V: int, *, H: int = 1, HV: int = 1, C: int = CHUNK) -> float:
    """Backward FLOPs per token and value head, counting every GEMM of KLA.md section 6 once (full tiles).

    The K*V terms add up to PEERS.md's 16 KV; the C-sized terms are its ``O(C (K + V))``. With K = V = 128, C = 64
    the result is 2.5x the forward (PEERS.md: 2-2.5x).
    """
    return (
        # recompute the forward pieces the backward needs (h is not stored)
        2.0 * C * K            # Gram K K^T (A, and the rowsum(M * G) term of dbeta)
        + C * C / 3.0          # L = (I + A)^-1
        + 2.0 * C * K          # W = L Y
        + 2.0 * C * V          # U = L X
        + 4.0 * K * V          # N = U - W S_in and the forward state scan (S_in per chunk)
        + 2.0 * C * K          # P = s Q^ K^T * Gamma
        # adjoint of the output and of the state scan
        + 2.0 * C * V          # dP = dO N^T
        + 2.0 * C * V          # dN  = P^T dO ...
        + 2.0 * K * V          #      ... + diag(.) K dS_out
        + 2.0 * K * V          # dS_in = s Q^T diag(e^gamma) dO ...
        + 2.0 * K * V          #      ... - W^T dN
        + 2.0 * K * V          # dQ^ = s diag(e^gamma) dO S_in^T ...
        + 2.0 * C * K          #      ... + s (dP * Gamma) K
        + 2.0 * C * K          # dK  = s (dP * Gamma)^T Q^ ...
        + 2.0 * K * V          #      ... + diag(.) N dS_out^T
        + 4.0 * C * K          #      ... + (diag(beta) M + M^T diag(beta)) K
        # adjoint of the WY representation
        + 2.0 * C * V          # dX = L^T dN
        + 2.0 * K * V          # dY = -dX S_in^T
        + 2.0 * C * V          # dA = -dX N^T
        + 4.0 * K * H / HV     # KLA extra: ||k||^2 recompute and the beta chain rule into dk (per q/k head)
    )


def chunk_fwdbwd_bytes_per_token_head(K: int, V: int, *, H: int = 1, HV: int = 1, dtype: str = "bfloat16") -> float:
    """Minimum HBM bytes per token and value head of a fused forward plus a fused backward."""
    s = dtype_bytes(dtype)
    fwd = chunk_fwd_bytes_per_token_head(K, V, H=H, HV=HV, dtype=dtype)
    bwd = (
        2.0 * K * H / HV * s   # read q and k again
        + V * s                # read v again
        + V * s                # read dO
        + 4.0 + 4.0            # read g and eta again
        + 2.0 * K * H / HV * s # write dq and dk (reduced over the value heads of a group)
        + V * s                # write dv
        + 4.0 + 4.0            # write dg and deta (float32)
    )
    return fwd + bwd


def chunk_fwdbwd(*, B: int, T: int, H: int, HV: int, K: int, V: int, dtype: str = "bfloat16", C: int = CHUNK,
                 **_ignored) -> Cost:
    """One forward and one backward of ``chunk_kla`` over ``B * T`` tokens (no initial/final state)."""
    th = float(B) * T * HV
    f = chunk_fwd_flops_per_token_head(K, V, H=H, HV=HV, C=C) + chunk_bwd_flops_per_token_head(K, V, H=H, HV=HV, C=C)
    return Cost(flops=th * f, bytes=th * chunk_fwdbwd_bytes_per_token_head(K, V, H=H, HV=HV, dtype=dtype))


# ----------------------------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------------------------

def decode_flops_per_row_head(K: int, V: int, *, H: int = 1, HV: int = 1) -> float:
    """FLOPs of one decode token per value head (PEERS.md section 4: about 7 K V)."""
    return (
        K * V                  # decay: S~ = exp(g) S
        + 2.0 * K * V          # k S~ (the prediction)
        + 2.0 * K * V          # rank-1 update S~ + beta k^T (v - k S~)
        + 2.0 * K * V          # o = s q^ S
        + 2.0 * K * H / HV     # KLA extra: ||k||^2 per q/k head
    )


def decode_bytes_per_row_head(K: int, V: int, *, H: int = 1, HV: int = 1, dtype: str = "bfloat16",
                              state_dtype: str = "float32") -> float:
    """HBM bytes of one decode token per value head: the state dominates (PEERS.md section 4)."""
    s, ss = dtype_bytes(dtype), dtype_bytes(state_dtype)
    return (
        2.0 * K * V * ss       # read and write the state slot (in place)
        + 2.0 * K * H / HV * s # read q and k
        + V * s                # read v
        + V * s                # write o
        + 4.0 + 4.0            # read g and eta (float32)
    )


def decode(*, B: int, H: int, HV: int, K: int, V: int, dtype: str = "bfloat16", state_dtype: str = "float32",
           **_ignored) -> Cost:
    """One ``kla_decode`` step for B rows (T = 1 each)."""
    rh = float(B) * HV
    return Cost(flops=rh * decode_flops_per_row_head(K, V, H=H, HV=HV),
                bytes=rh * decode_bytes_per_row_head(K, V, H=H, HV=HV, dtype=dtype, state_dtype=state_dtype))


# ----------------------------------------------------------------------------------------------------------------
# ceilings
# ----------------------------------------------------------------------------------------------------------------

def gemm(M: int, N: int, K: int) -> float:
    """FLOPs of one ``[M, K] @ [K, N]`` product."""
    return 2.0 * M * N * K     # one multiply-add per (m, n, k)


def copy(nbytes: int) -> float:
    """HBM bytes moved by a device-to-device copy of ``nbytes``: read the source, write the destination."""
    return 2.0 * nbytes


#: op name (as in suites and result records) -> cost function
OPS = {
    "chunk_fwd": chunk_fwd,
    "chunk_fwdbwd": chunk_fwdbwd,
    "decode": decode,
}


def cost_of(op: str, shape: dict) -> Cost:
    """Cost of a result record's ``op`` and ``shape`` dict (keys ``B T H HV K V dtype state_dtype varlen``)."""
    try:
        fn = OPS[op]
    except KeyError:
        raise ValueError(f"roofline: unknown op {op!r}; known: {sorted(OPS)}") from None
    kw = {k: shape[k] for k in ("B", "H", "HV", "K", "V")}
    kw["dtype"] = shape.get("dtype", "bfloat16")
    if op == "decode":
        kw["state_dtype"] = shape.get("state_dtype") or "float32"
    else:
        kw["T"] = shape["T"]
    return fn(**kw)
