"""What ``kla-tl bench`` times: kla-tl's own paths and the peers, each computing KLA exactly.

Every implementation offers the same two calls on KLA inputs (``q k v g eta`` in the layouts of
:mod:`kla_tl.conventions`):

- ``chunk(q, k, v, g, eta, normalize_q=, cu_seqlens=) -> o`` (differentiable: the fwd+bwd timing calls
  ``o.backward(do)`` on it);
- ``decode(q, k, v, g, eta, state, normalize_q=, out=) -> (o, new_state)`` for one token per row.

kla-tl implementations (``--impls``):

- ``kla_tl``: the public API (``chunk_kla``, ``kla_decode``) with the default architecture path;
- ``kla_tl_ampere``: the same with ``KLA_TL_ARCH=sm_80`` set around the calls, which makes kla-tl's launchers take
  the Ampere path (cp.async + mma.sync) on a Hopper GPU. Only meaningful on compute capability >= 9.

Peers (``--peers``) run KLA in the *literal* form of KLA.md section 4: ``beta = eta / (||k||^2 + 1e-6)`` computed in
float32 from the raw keys, q L2-normalized outside the kernel when ``normalize_q`` (fla's ``x / sqrt(sum x^2 +
1e-6)``), ``use_qk_l2norm_in_kernel=False``. Both preprocessing steps sit inside the timed call, since kla-tl does
them in its kernels.

- ``fla_triton``: fla's pure-Triton kernels: ``chunk_gated_delta_rule`` (forward) and
  ``fused_recurrent_gated_delta_rule`` (decode).
- ``fla``: fla as it dispatches by default, with routing to FlashQLA switched off (``FLA_FLASH_QLA=0``); used for
  fwd+bwd, because on Hopper fla 0.6.0 refuses its pure-Triton GDN backward under triton 3.6 (its issue #640) and
  the default dispatch runs one backward sub-kernel in TileLang instead.
- ``flash_qla``: ``flash_qla.chunk_gated_delta_rule`` (K = V = 128, bf16/fp16, SM90+), forward and fwd+bwd.

Environment variables and when fla reads them (checked in fla's source, ``fla/backends``, as of 0.6.0):

- ``FLA_DISABLE_BACKEND_DISPATCH`` is read **once, when fla is imported** (a module constant; with it set, the
  ``@dispatch`` decorator returns the undecorated Triton function at import time). It cannot be switched per call, so
  ``fla_triton`` and ``fla`` cannot share a process: each implementation declares it in ``process_env``, and the
  bench runs implementations whose ``process_env`` does not match the current process in a child process
  (``kla-tl bench`` re-invoked with that variable set; its records are merged back). See :func:`process_groups`.
- ``FLA_FLASH_QLA`` is read **on every call** (``BaseBackend.is_enabled`` looks at ``os.environ``): it is set in
  ``call_env``, applied around the check and the timing of the implementation (and around CUDA-graph capture).
- ``KLA_TL_ARCH`` is read by kla-tl's launchers at call time: ``call_env`` as well.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
from typing import Optional

import torch

from ..conventions import DEFAULT_EPS, QNORM_EPS

#: kla-tl implementations, in report order.
KLA_IMPLS = ("kla_tl", "kla_tl_ampere")
#: peer implementations, in report order.
PEER_IMPLS = ("fla_triton", "fla", "flash_qla")

#: The environment variable that makes kla-tl's launchers take the Ampere path.
ARCH_ENV = "KLA_TL_ARCH"


@contextlib.contextmanager
def environ(vars: dict):
    """Set environment variables for the duration of the block, restoring the previous values after."""
    old = {k: os.environ.get(k) for k in vars}
    os.environ.update({k: str(v) for k, v in vars.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def literal_kla_inputs(q: torch.Tensor, k: torch.Tensor, eta: torch.Tensor, *, normalize_q: bool,
                       eps: float = DEFAULT_EPS):
    """(q for the kernel, beta float32) of KLA's literal form: beta = eta / (||k||^2 + eps) per value head."""
    H, HV = k.shape[2], eta.shape[2]
    d = k.float().square().sum(-1) + eps                    # [B, T, H]
    if HV != H:                                             # value head hv reads q/k head hv // (HV/H)
        B, T = d.shape[:2]
        d = d[..., None].expand(B, T, H, HV // H).reshape(B, T, HV)   # (no host sync: CUDA-graph safe)
    beta = eta.float() / d
    if normalize_q:
        qf = q.float()
        q = (qf * torch.rsqrt(qf.square().sum(-1, keepdim=True) + QNORM_EPS)).to(q.dtype)
    return q, beta


def dist_version(*names: str) -> Optional[str]:
    """Installed version of the first distribution found among ``names`` (no import of the package)."""
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


class Impl:
    """One timed implementation. Subclasses fill in the class attributes and ``chunk`` / ``decode``."""

    name: str = ""
    kind: str = "peer"                 #: "kla_tl" or "peer"
    ops: tuple = ()                    #: ops it runs
    call_env: dict = {}                #: environment around every call
    process_env: dict = {}             #: environment that must hold when the package is first imported

    #: top-level package that must be installed (looked up without importing it); None for kla-tl itself
    package: Optional[str] = None

    def installed(self) -> Optional[str]:
        """None when the package is installed (found without importing it), else why not."""
        if self.package and importlib.util.find_spec(self.package) is None:
            return f"{self.package} is not installed"
        return None

    #: module imported to prove the package works (None: nothing to import)
    import_module: Optional[str] = None

    def available(self, device: torch.device) -> Optional[str]:
        """None when it can run on ``device`` at all (this imports ``import_module``), else why not."""
        if self.installed():
            return self.installed()
        if self.import_module:
            try:
                importlib.import_module(self.import_module)
            except Exception as e:  # noqa: BLE001 -- any import failure makes the peer unavailable
                return f"{self.import_module} not importable ({type(e).__name__}: {e})"
        return None

    def unsupported(self, case, device: torch.device) -> Optional[str]:
        """None when it can run ``case`` on ``device``, else why not."""
        if case.op not in self.ops:
            return f"{self.name} does not implement {case.op}"
        return None

    def backend(self, case, inputs: dict, device: torch.device) -> Optional[str]:
        """What ran underneath (kla-tl: kernels or the reference fallback); None for peers."""
        return None

    def schedule(self, case, device: torch.device) -> Optional[dict]:
        """The kernel schedule a kla-tl call used (best effort, after the check compiled it); None when unknown."""
        return None

    def environment(self):
        return environ(self.call_env)

    def chunk(self, q, k, v, g, eta, *, normalize_q: bool, cu_seqlens=None):
        raise NotImplementedError

    def decode(self, q, k, v, g, eta, state, *, normalize_q: bool, out=None):
        raise NotImplementedError


class KlaTl(Impl):
    name = "kla_tl"
    kind = "kla_tl"
    ops = ("chunk_fwd", "chunk_fwdbwd", "decode")

    def chunk(self, q, k, v, g, eta, *, normalize_q, cu_seqlens=None):
        from kla_tl import chunk_kla
        o, _ = chunk_kla(q, k, v, g, eta, normalize_q=normalize_q, cu_seqlens=cu_seqlens)
        return o

    def decode(self, q, k, v, g, eta, state, *, normalize_q, out=None):
        from kla_tl import kla_decode
        o = kla_decode(q, k, v, g, eta, state, normalize_q=normalize_q, out=out)
        return o, state                                      # updated in place

    def backend(self, case, inputs, device):
        """"kernels" when kla-tl's TileLang kernels serve the call, else "reference: <reason>"."""
        from kla_tl.conventions import check_decode_inputs, check_inputs
        with self.environment():
            if case.op == "decode":
                from kla_tl.recurrent import decode_refusal
                x = inputs
                prob = check_decode_inputs("bench", x["q"], x["k"], x["v"], x["g"], x["eta"], x["state"],
                                           normalize_q=case.normalize_q, out=x.get("out"))
                reason = decode_refusal(prob, device, x["state"])
            else:
                from kla_tl.chunk import chunk_bwd_refusal, chunk_refusal
                x = inputs
                prob, _ = check_inputs("bench", x["q"], x["k"], x["v"], x["g"], x["eta"],
                                       normalize_q=case.normalize_q, cu_seqlens=x.get("cu_seqlens"))
                reason = chunk_refusal(prob, device, needs_grad=False)
                if reason is None and case.op == "chunk_fwdbwd":
                    reason = chunk_bwd_refusal(prob, device)
                    if reason is not None:
                        return f"kernels forward, torch backward: {reason}"
        return "kernels" if reason is None else f"reference: {reason}"


    def schedule(self, case, device):
        """Decode: the launcher's schedule, its source and code path (``kla_tl.recurrent.kernel_info``)."""
        if case.op != "decode" or device.type != "cuda":
            return None
        try:
            from kla_tl.conventions import Problem
            from kla_tl.recurrent import decode_key, kernel_info
            dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
            prob = Problem(B=case.B, T=1, H=case.H, HV=case.HV, K=case.K, V=case.V, N=case.B, dtype=dt[case.dtype],
                           is_varlen=False, use_h0=True, normalize_q=case.normalize_q)
            key = decode_key(prob, dtype=dt[case.dtype], gate_dtype=torch.float32,
                             state_dtype=dt[case.state_dtype or "float32"], use_indices=False,
                             normalize_q=case.normalize_q)
            with self.environment():
                info = kernel_info("decode", device, key)
            return {"schedule": info.get("schedule"), "source": info.get("source"), "arch": info.get("arch")}
        except Exception:  # noqa: BLE001 -- informational only; the API is young
            return None


class KlaTlAmpere(KlaTl):
    name = "kla_tl_ampere"
    call_env = {ARCH_ENV: "sm_80"}

    def available(self, device):
        if device.type != "cuda":
            return "the Ampere path on a newer GPU needs CUDA"
        if torch.cuda.get_device_capability(device)[0] < 9:
            return "this GPU is pre-Hopper: kla_tl already runs the Ampere path"
        return None


class _FlaBase(Impl):
    call_env = {"FLA_FLASH_QLA": "0"}
    package = "fla"
    import_module = "fla.ops.gated_delta_rule"

    def unsupported(self, case, device):
        r = super().unsupported(case, device)
        if r:
            return r
        if device.type != "cuda":
            return "fla's kernels need CUDA"
        if case.dtype == "float32" and case.op != "decode":
            return "fla's chunk kernels take bf16/fp16"
        if case.K > 256:
            return "fla asserts K <= 256"
        return None

    def chunk(self, q, k, v, g, eta, *, normalize_q, cu_seqlens=None):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        qn, beta = literal_kla_inputs(q, k, eta, normalize_q=normalize_q)
        o, _ = chunk_gated_delta_rule(qn, k, v, g, beta, use_qk_l2norm_in_kernel=False, cu_seqlens=cu_seqlens)
        return o

    def decode(self, q, k, v, g, eta, state, *, normalize_q, out=None):
        # fused_recurrent has no in-place state: it reads `state` (any dtype, cast to fp32) and returns a new fp32
        # final state. `out` is ignored (fla allocates o).
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
        qn, beta = literal_kla_inputs(q, k, eta, normalize_q=normalize_q)
        o, ht = fused_recurrent_gated_delta_rule(qn, k, v, g=g, beta=beta, initial_state=state,
                                                 output_final_state=True, use_qk_l2norm_in_kernel=False)
        return o, ht


class FlaTriton(_FlaBase):
    name = "fla_triton"
    ops = ("chunk_fwd", "decode")
    process_env = {"FLA_DISABLE_BACKEND_DISPATCH": "1"}


class Fla(_FlaBase):
    name = "fla"
    ops = ("chunk_fwdbwd",)
    process_env = {"FLA_DISABLE_BACKEND_DISPATCH": "0"}


class FlashQla(Impl):
    name = "flash_qla"
    ops = ("chunk_fwd", "chunk_fwdbwd")
    package = "flash_qla"
    import_module = "flash_qla"

    def unsupported(self, case, device):
        r = super().unsupported(case, device)
        if r:
            return r
        if device.type != "cuda":
            return "FlashQLA needs CUDA"
        if (case.K, case.V) != (128, 128):
            return f"FlashQLA supports K = V = 128 only (got K={case.K}, V={case.V})"
        if case.dtype not in ("bfloat16", "float16"):
            return "FlashQLA takes bf16/fp16 q, k, v"
        if torch.cuda.get_device_capability(device)[0] < 9:
            return "FlashQLA needs SM90 or newer"
        return None

    def chunk(self, q, k, v, g, eta, *, normalize_q, cu_seqlens=None):
        import flash_qla
        qn, beta = literal_kla_inputs(q, k, eta, normalize_q=normalize_q)
        o, _ = flash_qla.chunk_gated_delta_rule(qn, k, v, g, beta, use_qk_l2norm_in_kernel=False,
                                                cu_seqlens=cu_seqlens)
        return o


#: name -> implementation
IMPLS = {c.name: c() for c in (KlaTl, KlaTlAmpere, FlaTriton, Fla, FlashQla)}


def env_matches(process_env: dict, environ_: Optional[dict] = None) -> bool:
    """Whether the current (or given) environment satisfies ``process_env`` (an unset variable reads as "0")."""
    env = os.environ if environ_ is None else environ_
    return all(env.get(k, "0") == v for k, v in process_env.items())


def process_groups(names, environ_: Optional[dict] = None) -> tuple[list[str], list[tuple[dict, list[str]]]]:
    """Split implementations into those this process can run and groups that need a child process.

    Returns ``(here, [(env, names), ...])``: ``env`` is the ``process_env`` the child must be started with.
    """
    here, away = [], {}
    for n in names:
        pe = IMPLS[n].process_env
        if env_matches(pe, environ_):
            here.append(n)
        else:
            away.setdefault(tuple(sorted(pe.items())), []).append(n)
    return here, [(dict(k), v) for k, v in away.items()]


def versions() -> dict:
    """Installed versions of the peers (from package metadata: importing fla would freeze its environment)."""
    return {
        "fla": dist_version("fla-core", "flash-linear-attention"),
        "flash_qla": dist_version("flash-qla", "flash_qla"),
    }
