"""Orchestration of the chunkwise kernels behind ``chunk_kla``: packing, launch tables, the kernel launches of the
forward and the backward. Autograd, and the choice between these kernels and the reference, live in
:mod:`kla_tl.ops`.

Every call is run in packed form (B = 1, TT tokens): a dense batch [B, T] is a varlen batch of B sequences of T
tokens, so one kernel variant serves both. Forward (:func:`chunk_fwd`): stage 1 (:mod:`kla_tl.kernels.chunk_prepare`)
runs over all chunks in parallel; stage 2 (:mod:`kla_tl.kernels.chunk_scan`) walks each sequence's chunks in order.
Backward (:func:`chunk_bwd`): stage 1 again (w and u recomputed from the L, Aqk, gates and norms the forward kept,
:class:`Saved`; all of it when called without them), the two state recurrences
(:mod:`kla_tl.kernels.chunk_states`: the state entering and the state gradient leaving every chunk), then the chunk
gradients, chunk-parallel (:mod:`kla_tl.kernels.chunk_bwd_grads`).

Environment: ``KLA_TL_ARCH=sm_80`` forces the Ampere code path on a Hopper GPU (built for sm_90a with wgmma, TMA and
warp specialization disabled), so that path is tested on real hardware.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from . import dispatch
from .conventions import CHUNK, Problem, sequence_bounds

#: Environment variable forcing a code path (``sm_80`` or ``sm_90a``).
ARCH_ENV = "KLA_TL_ARCH"
_TABLES: dict = {}


def chunk_refusal(prob: Problem, device: torch.device, *, needs_grad: bool) -> Optional[str]:
    """Why the TileLang chunk kernels cannot serve this call, or None."""
    reason = dispatch.common_refusal(prob, device)
    if reason is not None:
        return reason
    if prob.dtype == torch.float16:
        return "float16 inputs (the chunk kernels are built for bfloat16)"
    return None


#: Largest head dim K of the backward kernels (K = 256 needs K blocks in the chunk-gradient kernels).
BWD_MAX_K = 128


def chunk_bwd_refusal(prob: Problem, device: torch.device) -> Optional[str]:
    """Why the TileLang backward kernels cannot serve this call, or None."""
    reason = chunk_refusal(prob, device, needs_grad=True)
    if reason is not None:
        return reason
    if prob.K > BWD_MAX_K:
        return f"K={prob.K} (the backward kernels take K <= {BWD_MAX_K})"
    return None


def select_arch(device: torch.device) -> tuple[str, bool]:
    """(arch, run_on_hopper): the code path for ``device``, honouring ``KLA_TL_ARCH``."""
    native = dispatch.arch_of(device)
    forced = os.environ.get(ARCH_ENV, "")
    if forced and forced not in ("sm_80", "sm_90a"):
        raise ValueError(f"{ARCH_ENV} must be sm_80 or sm_90a, got {forced!r}")
    arch = forced or native
    if arch == "sm_90a" and native != "sm_90a":
        raise ValueError(f"{ARCH_ENV}=sm_90a needs a Hopper GPU, got capability "
                         f"{torch.cuda.get_device_capability(device)}")
    return arch, (arch == "sm_80" and native == "sm_90a")


def _tables(prob: Problem, cu: Optional[list[int]], device: torch.device):
    """(seqs [N, 2], chunks [NC, 2], coff [N]) int32 on ``device``: (start, end) per sequence and (first token,
    sequence end) per chunk, in packed token coordinates, and each sequence's first row in the chunk table.
    Cached per layout."""
    key = (prob.B, prob.T, None if cu is None else tuple(cu), device)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    seqs = [(b * prob.T + s, b * prob.T + e) for b, s, e in sequence_bounds(prob, cu)]
    chunks, coff = [], []
    for s, e in seqs:
        coff.append(len(chunks))
        chunks += [(t0, e) for t0 in range(s, e, CHUNK)]
    seq_t = torch.tensor(seqs, dtype=torch.int32).reshape(-1, 2).to(device)
    chunk_t = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2).to(device)
    coff_t = torch.tensor(coff, dtype=torch.int32).to(device)
    if len(_TABLES) > 256:
        _TABLES.clear()
    _TABLES[key] = (seq_t, chunk_t, coff_t)
    return seq_t, chunk_t, coff_t


def problem_key(prob: Problem, *, use_h0: bool, store_ht: bool) -> dict:
    """Problem key of both stages (see :mod:`kla_tl.kernels.chunk_fwd`); ``tiles`` picks the scan's bucket."""
    from .kernels.chunk_fwd import tiles_class

    return {"H": prob.H, "HV": prob.HV, "K": prob.K, "V": prob.V, "dtype": str(prob.dtype).replace("torch.", ""),
            "normalize_q": prob.normalize_q, "use_h0": use_h0, "store_ht": store_ht,
            "tiles": tiles_class(prob.N, prob.HV, prob.V)}


def _schedule(spec, arch: str, key: dict, device) -> dict:
    """Tuned schedule from ``schedules/`` (GPU file, then arch file), else the untuned default."""
    if device is not None:
        from . import schedules

        return schedules.lookup(spec.name, device, key, arch=arch)[0]
    return spec.default(arch, key)


def build_kernels(prob: Problem, arch: str, on_hopper: bool, *, scale: float, eps: float, use_h0: bool,
                  device=None, store_l: bool = False):
    """Compiled (chunk_prepare, chunk_scan) for a problem and code path; no GPU needed (``device=None``).
    ``store_l``: the prepare stage also stores L beside Aqk (aqk ``[1, TT, HV, 2 * CHUNK]``) for the backward."""
    from .kernels.chunk_fwd import PREPARE, SCAN

    key = problem_key(prob, use_h0=use_h0, store_ht=True)
    prep = PREPARE.build(arch, key, _schedule(PREPARE, arch, key, device), run_on_hopper=on_hopper,
                         scale=scale, eps=eps, store_l=store_l)
    scan = SCAN.build(arch, key, _schedule(SCAN, arch, key, device), run_on_hopper=on_hopper,
                      scale=scale, eps=eps, aqk_width=2 * CHUNK if store_l else CHUNK)
    return prep, scan


class Saved(NamedTuple):
    """What a forward that will be differentiated keeps for its backward (``chunk_fwd(..., save=True)``), so that
    the backward's stage 1 only recomputes w and u (no Gram matrix, no triangular solve, no Aqk): the same
    quantities fla keeps (its A, cumulated gates and norms), plus Aqk. Packed layout, as the kernels write them."""

    #: [1, TT, HV, 2 * CHUNK] input dtype: Aqk, then L
    aqk: torch.Tensor
    #: [1, TT, HV] fp32 chunk-local cumulative gate
    gcum: torch.Tensor
    #: [1, TT, H] fp32 1 / sqrt(||k||^2 + eps)
    rk: torch.Tensor
    #: [1, TT, H] fp32 1 / |q| (written only with normalize_q)
    rq: torch.Tensor


def saved_shapes(TT: int, H: int, HV: int, dtype: torch.dtype, aqk_width: int = 2 * CHUNK) -> tuple:
    """((shape, dtype) of each :class:`Saved` field, in field order) for TT packed tokens; ``aqk_width`` is CHUNK
    for a forward that keeps nothing (Aqk alone)."""
    f32 = torch.float32
    return (((1, TT, HV, aqk_width), dtype), ((1, TT, HV), f32), ((1, TT, H), f32), ((1, TT, H), f32))


class _Launch:
    """Packed inputs, intermediates and outputs of one forward call: the argument lists of the two kernels."""

    def __init__(self, q, k, v, g, eta, *, prob: Problem, cu, initial_state, backward: bool = False,
                 store_l: bool = False, saved: Optional["Saved"] = None):
        device = q.device
        TT, H, HV, K, V, N = prob.B * prob.T, prob.H, prob.HV, prob.K, prob.V, prob.N
        self.seqs, self.chunks, self.coff = _tables(prob, cu, device)
        self.q = q.reshape(1, TT, H, K).contiguous()
        self.k = k.reshape(1, TT, H, K).contiguous()
        self.v = v.reshape(1, TT, HV, V).contiguous()
        self.g = g.reshape(1, TT, HV).to(torch.float32).contiguous()
        self.eta = eta.reshape(1, TT, HV).to(torch.float32).contiguous()
        st = q.dtype
        # the backward's prepare: u in fp32, and L stored beside Aqk (build_bwd_prepare_kernel); with ``saved``
        # (the forward's Aqk and L, gamma, 1/|k|, 1/|q|) it reads those instead of writing them
        self.w = torch.empty(1, TT, HV, K, dtype=st, device=device)
        self.u = torch.empty(1, TT, HV, V, dtype=getattr(torch, n_dtype_name(prob)) if backward else st, device=device)
        if saved is not None:
            self.aqk, self.gcum, self.rk, self.rq = saved.aqk, saved.gcum, saved.rk, saved.rq
        else:
            aw = 2 * CHUNK if backward or store_l else CHUNK
            self.aqk, self.gcum, self.rk, self.rq = (torch.empty(shape, dtype=dt, device=device)
                                                     for shape, dt in saved_shapes(TT, H, HV, st, aw))
        # the output only for the forward (the backward's stages never write one)
        self.o = None if backward else torch.empty(1, TT, HV, V, dtype=q.dtype, device=device)
        self.ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=device)
        self.h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else self.ht

    def prepare(self, prep) -> None:
        if self.chunks.shape[0] > 0:
            prep(self.q, self.k, self.v, self.g, self.eta, self.chunks, self.w, self.u, self.aqk, self.gcum, self.rq,
                 self.rk)

    def scan(self, scan) -> None:
        scan(self.q, self.k, self.w, self.u, self.aqk, self.gcum, self.rq, self.rk, self.seqs, self.h0, self.o,
             self.ht)

    def states(self, kernel) -> None:
        """The state recurrence storing the state entering every chunk (:func:`build_states_kernel`) after
        :meth:`prepare`: keeps ``hs`` and ``vn`` (N) on the object, and the final state in ``ht``."""
        NC = self.chunks.shape[0]
        HV, K, V = self.w.shape[2], self.w.shape[3], self.u.shape[3]
        self.hs = torch.empty(NC, HV, K, V, dtype=self.w.dtype, device=self.w.device)
        self.vn = torch.empty_like(self.u)
        kernel(self.k, self.w, self.u, self.gcum, self.rk, self.seqs, self.coff, self.h0, self.hs, self.vn, self.ht)
        self.u = None                                  # not needed by the later stages: free it before they run

    def dstates(self, kernel, do: torch.Tensor, dht: Optional[torch.Tensor], zparts: int, tparts: int) -> None:
        """The backward's reverse state-gradient recurrence (:func:`build_dstates_kernel`) after :meth:`states`:
        keeps ``dhs`` (gradient at the state leaving every chunk), ``dvn`` (gradient of N, input dtype), ``zp``
        ([zparts, TT, HV] fp32, dg's state-update term by column block), ``tp`` ([tparts, NC, HV] fp32, dg's chunk
        tail <dS_out, S_in> by column block and warp) and ``dh0`` on the object."""
        NC, TT = self.chunks.shape[0], self.q.shape[1]
        HV, K, V = self.w.shape[2], self.w.shape[3], self.vn.shape[3]
        self.dhs = torch.empty(NC, HV, K, V, dtype=self.w.dtype, device=self.w.device)
        self.dvn = torch.empty(self.vn.shape, dtype=self.w.dtype, device=self.w.device)
        self.zp = torch.empty(zparts, TT, HV, dtype=torch.float32, device=self.w.device)
        self.tp = torch.empty(tparts, NC, HV, dtype=torch.float32, device=self.w.device)
        self.dh0 = torch.empty_like(self.ht)
        self.do = do.reshape(1, TT, HV, V).to(self.q.dtype).contiguous()
        self.dht = dht.to(torch.float32).contiguous() if dht is not None else self.dh0
        kernel(self.q, self.k, self.w, self.aqk, self.gcum, self.rq, self.rk, self.do, self.seqs, self.coff, self.dht,
               self.vn, self.hs, self.dhs, self.dvn, self.dh0, self.zp, self.tp)
        self.w = None

    def grads(self, kernel, fused: bool) -> dict:
        """The chunk gradients (:func:`build_bwd_grads_kernel`) after :meth:`dstates`. ``fused``: the kernel sums
        each GVA group itself (dq, dk [1, TT, H, K] in the input dtype); else it writes them per value head in fp32
        and they are summed here. Returns ``{"dq", "dk" [1, TT, H, K], "dv" [1, TT, HV, V], "dg", "deta"
        [1, TT, HV] fp32, "dh0"}``."""
        TT, H, HV, K = self.q.shape[1], self.q.shape[2], self.dhs.shape[1], self.dhs.shape[2]
        per_head = not fused and HV != H
        oh, odt = (HV, torch.float32) if per_head else (H, self.q.dtype)
        self.dq = torch.empty(1, TT, oh, K, dtype=odt, device=self.q.device)
        self.dk = torch.empty(1, TT, oh, K, dtype=odt, device=self.q.device)
        self.dv = torch.empty(self.vn.shape, dtype=self.v.dtype, device=self.q.device)
        self.dg, self.deta = (torch.empty(1, TT, HV, dtype=torch.float32, device=self.q.device) for _ in range(2))
        if self.chunks.shape[0] > 0:
            kernel(self.q, self.k, self.v, self.g, self.eta, self.vn, self.do, self.dvn, self.hs, self.dhs, self.aqk,
                   self.gcum, self.rq, self.rk, self.zp, self.tp, self.chunks, self.dq, self.dk, self.dv, self.dg,
                   self.deta)
        dq, dk, dv, dg, deta = self.dq, self.dk, self.dv, self.dg, self.deta
        if per_head:
            dq = dq.view(1, TT, H, HV // H, K).sum(3).to(self.q.dtype)
            dk = dk.view(1, TT, H, HV // H, K).sum(3).to(self.k.dtype)
        return {"dq": dq, "dk": dk, "dv": dv, "dg": dg, "deta": deta, "dh0": self.dh0}


def state_schedule(arch: str, key: dict) -> dict:
    """Untuned schedule of the state recurrences: 64 state columns per CTA (32 with few tiles or float32), 256
    threads for K > 128 or float32, one stage, no warp specialization."""
    exact = key.get("dtype") == "float32"     # FMA products: half the columns per CTA (shared memory), 256 threads
    return {"block_v": 32 if key.get("tiles") == "few" or exact else 64,
            "threads": 256 if key["K"] > 128 or exact else 128}


def dstate_schedule(arch: str, key: dict) -> dict:
    """Untuned schedule of the state-gradient recurrence: the state recurrence's, with narrower column blocks for
    bfloat16 where an H100 measured them faster (its per-chunk step is longer): 16 columns with few tiles (2.19 vs
    2.78 ms at B=1, T=32768, H/HV=16/32), 32 with K padded to the tile (1.04 vs 1.15 ms at the published 96/192)."""
    sch = state_schedule(arch, key)
    if key.get("dtype") != "float32" and key["K"] <= BWD_MAX_K:     # (K = 256: no wgmma layout for 16 columns)
        if key.get("tiles") == "few":
            sch["block_v"] = 16
        elif key["K"] % 64:
            sch["block_v"] = 32
    return sch


def _state_kernel_args(prob: Problem, arch: str, on_hopper: bool, *, use_h0: bool, grad: bool = False) -> dict:
    """Builder arguments of the state recurrence (``grad``: of the state-gradient recurrence): dims, dtype, schedule,
    target, pass configs."""
    import json

    from .kernels.registry import target_for

    key = problem_key(prob, use_h0=use_h0, store_ht=True)
    sch = (dstate_schedule if grad else state_schedule)(arch, key)
    target, pcs = target_for(arch, on_hopper)
    pcs = dict(pcs, **{"tl.disable_warp_specialized": True})
    return dict(H=prob.H, HV=prob.HV, K=prob.K, V=prob.V, in_dtype=key["dtype"], block_v=sch["block_v"],
                threads=sch["threads"], num_stages=1, target=json.dumps(target, sort_keys=True),
                pass_configs=tuple(sorted(pcs.items())))


def n_dtype_name(prob: Problem) -> str:
    """Dtype of the backward's u and N (``vn``): fp32 (see :mod:`kla_tl.kernels.chunk_prepare`, ``u_dtype``)."""
    return "float32"


def zparts(prob: Problem, arch: str) -> int:
    """Column blocks of the state-gradient kernel (its dg term ``zp`` comes in that many parts)."""
    key = problem_key(prob, use_h0=False, store_ht=True)
    return -(-prob.V // dstate_schedule(arch, key)["block_v"])


def tparts(prob: Problem, arch: str) -> int:
    """Parts of dg's chunk tail from the state-gradient kernel (``tp``): one per column block and warp."""
    from .kernels.chunk_states import tail_parts_per_cta

    key = problem_key(prob, use_h0=False, store_ht=True)
    return zparts(prob, arch) * tail_parts_per_cta(dstate_schedule(arch, key)["threads"])


def build_bwd_prepare_kernel(prob: Problem, arch: str, on_hopper: bool, *, scale: float, eps: float, device=None,
                             given_l: bool = False):
    """The forward's chunk_prepare (same schedule) writing u in fp32 and L beside Aqk, for the backward; with
    ``given_l``, reading the forward's :class:`Saved` and writing only w and u. No GPU needed."""
    from .kernels.chunk_fwd import PREPARE

    key = problem_key(prob, use_h0=prob.use_h0, store_ht=True)
    return PREPARE.build(arch, key, _schedule(PREPARE, arch, key, device), run_on_hopper=on_hopper, scale=scale,
                         eps=eps, u_dtype=n_dtype_name(prob), store_l=True, given_l=given_l)


def build_states_kernel(prob: Problem, arch: str, on_hopper: bool, *, use_h0: bool):
    """Compiled state recurrence storing the state entering every chunk (the backward's first sweep); no GPU
    needed."""
    from .kernels.chunk_states import build_chunk_states

    return build_chunk_states(use_h0=use_h0, store_ht=True, n_dtype=n_dtype_name(prob),
                              **_state_kernel_args(prob, arch, on_hopper, use_h0=use_h0))


def build_dstates_kernel(prob: Problem, arch: str, on_hopper: bool, *, scale: float, use_dht: bool):
    """Compiled reverse state-gradient recurrence of the backward; no GPU needed."""
    from .kernels.chunk_states import build_chunk_dstates

    return build_chunk_dstates(normalize_q=prob.normalize_q, scale=scale, use_dht=use_dht, store_dh0=True,
                               n_dtype=n_dtype_name(prob), aqk_width=2 * CHUNK,
                               **_state_kernel_args(prob, arch, on_hopper, use_h0=False, grad=True))


def fuse_group(prob: Problem, arch: str) -> bool:
    """Whether the chunk-gradient kernel walks each GVA group in one CTA: on the Hopper path with bfloat16 (the fused
    group needs ~205 KB of shared memory; an A100 has 164 KB, and with float32 tiles it would need 260 KB). Otherwise
    one CTA per value head, and dq, dk summed over each group in torch."""
    return arch == "sm_90a" and prob.dtype != torch.float32


#: Threads of the chunk-gradient kernel. 512 caps the registers at 128 a thread; 256 threads (about 210 registers,
#: one CTA an SM) were 1.8x slower on an H100 (5.4 vs 3.1 ms at B=8, T=4096, H=16).
BWD_GRADS_THREADS = 512


def build_bwd_grads_kernel(prob: Problem, arch: str, on_hopper: bool, *, scale: float, eps: float,
                           threads: int = BWD_GRADS_THREADS):
    """Compiled chunk-gradient kernel of the backward (:mod:`kla_tl.kernels.chunk_bwd_grads`); no GPU needed."""
    import json

    from .kernels.chunk_bwd_grads import build_chunk_bwd_grads
    from .kernels.registry import target_for

    dtype = str(prob.dtype).replace("torch.", "")
    target, pcs = target_for(arch, on_hopper)
    pcs = dict(pcs, **{"tl.disable_warp_specialized": True})
    return build_chunk_bwd_grads(H=prob.H, HV=prob.HV, K=prob.K, V=prob.V, in_dtype=dtype,
                                 normalize_q=prob.normalize_q, scale=scale, eps=eps,
                                 block_v=32 if dtype == "float32" else 64, threads=threads,
                                 target=json.dumps(target, sort_keys=True), pass_configs=tuple(sorted(pcs.items())),
                                 n_dtype=n_dtype_name(prob), zparts=zparts(prob, arch), tparts=tparts(prob, arch),
                                 fuse_group=fuse_group(prob, arch), bulk=arch == "sm_90a")


def chunk_fwd(q, k, v, g, eta, *, prob: Problem, cu, scale, eps, normalize_q, initial_state, output_final_state,
              save: bool = False):
    """Run the two forward kernels; returns (o [B, T, HV, V], final_state [N, HV, K, V] fp32 or None, saved):
    ``saved`` is the :class:`Saved` for :func:`chunk_bwd` with ``save`` (None without it, or with no tokens)."""
    device = q.device
    B, T, H, HV, K, V, N = prob.B, prob.T, prob.H, prob.HV, prob.K, prob.V, prob.N
    TT = B * T
    scale = K ** -0.5 if scale is None else float(scale)
    if TT == 0:
        o = q.new_empty(B, T, HV, V)
        ht = None
        if output_final_state:
            ht = (initial_state.float().clone() if initial_state is not None
                  else torch.zeros(N, HV, K, V, dtype=torch.float32, device=device))
        return o, ht, None
    arch, on_hopper = select_arch(device)
    prep, scan = build_kernels(prob, arch, on_hopper, scale=scale, eps=eps, use_h0=initial_state is not None,
                               device=device, store_l=save)
    run = _Launch(q, k, v, g, eta, prob=prob, cu=cu, initial_state=initial_state, store_l=save)
    run.prepare(prep)
    run.scan(scan)
    saved = Saved(run.aqk, run.gcum, run.rk, run.rq) if save else None
    return run.o.reshape(B, T, HV, V), (run.ht if output_final_state else None), saved


def bwd_prepared(q, k, v, g, eta, *, prob: Problem, cu, initial_state, arch: str, on_hopper: bool, scale: float,
                 eps: float, saved: Optional[Saved] = None) -> "_Launch":
    """The backward's launch state after its stage 1 (chunk_prepare recomputed, u in fp32, L stored; with the
    forward's ``saved``, only w and u recomputed): ready for :meth:`_Launch.states`."""
    prep = build_bwd_prepare_kernel(prob, arch, on_hopper, scale=scale, eps=eps, device=q.device,
                                    given_l=saved is not None)
    run = _Launch(q, k, v, g, eta, prob=prob, cu=cu, initial_state=initial_state, backward=True, saved=saved)
    run.prepare(prep)
    return run


def chunk_bwd(q, k, v, g, eta, do, dht, *, prob: Problem, cu, scale, eps, normalize_q, initial_state,
              saved: Optional[Saved] = None) -> dict:
    """The backward kernels: gradients of q, k, v, g, eta and initial_state as a dict (``dh0`` None without
    initial_state), each in its input's shape and dtype.

    Recomputes the forward's chunk intermediates (chunk_prepare, u in fp32; with the forward's ``saved``
    (:class:`Saved`) only w and u, from its L), then: the states entering every chunk
    (chunk_states), the state gradients leaving every chunk (chunk_dstates), and every gradient of every chunk in
    one kernel (chunk_bwd_grads; on the Ampere path with GVA, dq and dk per value head and one sum over each group
    in torch). The per-chunk states and state gradients are stored ([NC, HV, K, V] each, in the input dtype), as
    fla does; each intermediate is released as soon as the last stage that reads it has run."""
    B, T, H, HV, K, V = prob.B, prob.T, prob.H, prob.HV, prob.K, prob.V
    if B * T == 0:
        dh0 = None
        if initial_state is not None:
            dh0 = (dht.to(initial_state.dtype).clone() if dht is not None else torch.zeros_like(initial_state))
        grads = {n: torch.zeros_like(x) for n, x in (("dq", q), ("dk", k), ("dv", v), ("dg", g), ("deta", eta))}
        return dict(grads, dh0=dh0)
    arch, on_hopper = select_arch(q.device)
    run = bwd_prepared(q, k, v, g, eta, prob=prob, cu=cu, initial_state=initial_state, arch=arch,
                       on_hopper=on_hopper, scale=scale, eps=eps, saved=saved)
    run.states(build_states_kernel(prob, arch, on_hopper, use_h0=initial_state is not None))
    run.dstates(build_dstates_kernel(prob, arch, on_hopper, scale=scale, use_dht=dht is not None), do, dht,
                zparts(prob, arch), tparts(prob, arch))
    gr = run.grads(build_bwd_grads_kernel(prob, arch, on_hopper, scale=scale, eps=eps), fuse_group(prob, arch))
    return {"dq": gr["dq"].view(B, T, H, K), "dk": gr["dk"].view(B, T, H, K), "dv": gr["dv"].view(B, T, HV, V),
            "dg": gr["dg"].view(B, T, HV).to(g.dtype), "deta": gr["deta"].view(B, T, HV).to(eta.dtype),
            "dh0": None if initial_state is None else gr["dh0"].to(initial_state.dtype)}


# ------------------------------------------------------------------------------------------- autotune bench hooks

#: Representative problems the tuner times per bucket: (B, T) by the scan's tiles class (the prepare stage uses
#: "many"). One input set is B * T * (H * 2K + HV * V) bf16 values plus the intermediates: > 100 MB at K = V = 128,
#: so the tuner's rotating sets exceed the 50 MB L2.
BENCH_SHAPES = {"many": (8, 4096), "few": (2, 16384)}
#: Relative error of o and the final state of sequence 0 against the float64 reference (the bf16 tolerance).
BENCH_TOL = 5e-3


def chunk_bench_cases(stage: str, key: dict) -> list:
    """``KernelSpec.bench`` of ``chunk_prepare`` (``stage="prepare"``) and ``chunk_scan`` (``"scan"``): one
    representative problem of the key's bucket (:data:`BENCH_SHAPES`), Hopper path. ``run`` launches the candidate
    stage alone (the other stage's inputs come from the default schedule, prepared once per input set); ``check``
    runs the whole forward with the candidate and compares o and the final state of the first sequence with the
    float64 reference."""
    from .kernels.chunk_fwd import PREPARE, SCAN
    from .kernels.registry import BenchCase
    from .reference import chunk_kla_reference

    dt = getattr(torch, key["dtype"])
    B, T = BENCH_SHAPES[key.get("tiles", "many") if stage == "scan" else "many"]
    H, HV, K, V = key["H"], key["HV"], key["K"], key["V"]
    prob = Problem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=B, dtype=dt, is_varlen=False,
                   use_h0=bool(key.get("use_h0", False)), normalize_q=bool(key.get("normalize_q", True)))
    pkey = dict(key, tiles=problem_key(prob, use_h0=prob.use_h0, store_ht=True)["tiles"])
    other = SCAN if stage == "prepare" else PREPARE
    fixed = other.build("sm_90a", pkey, other.default("sm_90a", pkey))

    def make_inputs(seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=gen, device="cuda")       # noqa: E731
        x = {"built": None, "q": rnd(B, T, H, K).to(dt), "k": rnd(B, T, H, K).to(dt), "v": rnd(B, T, HV, V).to(dt),
             "g": -0.1 * torch.rand(B, T, HV, generator=gen, device="cuda"),
             "eta": torch.rand(B, T, HV, generator=gen, device="cuda"),
             "h0": 0.1 * rnd(B, HV, K, V) if prob.use_h0 else None}
        x["run"] = _Launch(x["q"], x["k"], x["v"], x["g"], x["eta"], prob=prob, cu=None, initial_state=x["h0"])
        if stage == "scan":
            x["run"].prepare(fixed)
        return x

    def run(built, x):
        x["built"] = built
        getattr(x["run"], stage)(built)
        return x["run"].o if stage == "scan" else x["run"].u     # the stage's own output (prepare: u)

    def check(x, _out):
        r = x["run"]
        for t in (r.w, r.u, r.aqk, r.gcum, r.rq, r.rk, r.o, r.ht):     # poisoned: every value must be rewritten
            t.fill_(float("nan"))
        prep, scan = (x["built"], fixed) if stage == "prepare" else (fixed, x["built"])
        r.prepare(prep)
        r.scan(scan)
        torch.cuda.synchronize()
        h0 = None if x["h0"] is None else x["h0"][:1].double()
        o_ref, ht_ref = chunk_kla_reference(*(x[n][:1].double() for n in ("q", "k", "v", "g", "eta")),
                                            normalize_q=prob.normalize_q, initial_state=h0,
                                            output_final_state=True)
        errs = {"o": _rel(r.o.reshape(B, T, HV, V)[:1], o_ref), "ht": _rel(r.ht[:1], ht_ref)}
        bad = {n: e for n, e in errs.items() if not e <= BENCH_TOL}
        return None if not bad else f"relative error {bad} > {BENCH_TOL} against the float64 reference"

    label = f"B={B} T={T}" + (f" H={H}/{HV}" if H != HV else f" H={H}")
    return [BenchCase(label=label, make_inputs=make_inputs, run=run, check=check)]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))
