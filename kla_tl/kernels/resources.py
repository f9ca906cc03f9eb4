"""Resource report of a built TileLang kernel: registers, spills, shared memory, threads, without a GPU (used by
`kla-tl compile` and by autotune phase 1).

How it is measured, and why this way:

- **Registers and spills** come from ptxas. TileLang prints the ``ptxas -v`` report only under ``TILELANG_VERBOSE=1``
  and only when nvcc actually runs: a kernel served from TileLang's disk cache produces none, and the verbose flag
  changes the binary cache key. So the report is produced here, independently: the kernel's CUDA source
  (``get_kernel_source()``) is compiled once more with the flags TileLang uses (``--cubin -O3 -std=c++20``, its
  template and CUTLASS include paths, the target's ``-arch``, and the flags its pass configs add) plus
  ``--resource-usage``, and the per-entry lines (``bytes spill stores``, ``Used N registers``, ``bytes smem``) are
  parsed. The report is cached under ``$TILELANG_CACHE_DIR/kla_tl/resource-usage/`` keyed by a hash of the device
  source, the host source (which fixes the launch configuration) and the flags, so a second run costs nothing.
- **Dynamic shared memory and threads per block** are not in the device source: they are the
  ``dyn_shared_memory_buf`` and ``thread_extent`` attributes of the lowered device module. A fresh compile keeps
  them on ``kernel.artifact``; a kernel loaded from TileLang's cache has no artifact, and is lowered again (no nvcc).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

#: Largest shared memory one block may use (static + dynamic), from the CUDA programming guide's table of
#: compute-capability limits: 227 KB on 9.0, 163 KB on 8.0.
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}

#: 32-bit registers per SM on 8.x and 9.x: registers/thread x threads/block above this cannot launch
REGS_PER_SM = 64 * 1024

#: bump when the report format changes (part of the cache key)
REPORT_VERSION = 1

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict:
    """``{entry: {"regs", "spill_stores", "spill_loads", "stack", "static_smem"}}`` from ``ptxas -v`` output."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"regs": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                                              "static_smem": 0})
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _SMEM.search(line)
            cur["static_smem"] = int(s.group(1)) if s else 0
    return out


def _nvcc_flags(kernel) -> list:
    """The device-compile flags TileLang's CUDA backend uses for ``kernel`` (tilelang/cuda/backend.py, 0.1.15)."""
    import shlex

    from tilelang.contrib import nvcc
    from tilelang.env import CUTLASS_INCLUDE_DIR, TILELANG_TEMPLATE_PATH
    from tilelang.transform import PassConfigKey

    arch, code = nvcc.get_target_arch_and_code(kernel.target)
    gencode = nvcc.format_target_code_for_gencode(code)
    flags = [f"-arch=sm_{arch}"] if gencode is None else ["-gencode", f"arch=compute_{arch},code={gencode}"]
    flags += ["-O3", "-std=c++20", "-I" + TILELANG_TEMPLATE_PATH, "-I" + CUTLASS_INCLUDE_DIR, "-w"]
    cfg = dict(kernel.pass_configs or {})
    extra = cfg.get(PassConfigKey.TL_DEVICE_COMPILE_FLAGS) or cfg.get(str(PassConfigKey.TL_DEVICE_COMPILE_FLAGS))
    if extra:
        flags += shlex.split(extra) if isinstance(extra, str) else [t for f in extra for t in shlex.split(str(f))]
    for f in kernel.compile_flags or []:
        flags += shlex.split(f) if isinstance(f, str) else [str(f)]
    if bool(cfg.get(PassConfigKey.TL_ENABLE_FAST_MATH, False)):
        flags.append("--use_fast_math")
    level = cfg.get(PassConfigKey.TL_PTXAS_REGISTER_USAGE_LEVEL)
    if level is not None:
        flags.append(f"--ptxas-options=--register-usage-level={int(level)}")
    return flags


def _launch_info(kernel) -> dict:
    """``{entry: {"threads", "dyn_smem"}}`` from the lowered device module (lowering again for a cached kernel)."""
    artifact = kernel.artifact
    if artifact is None:
        import tilelang
        import tvm

        with tvm.transform.PassContext(opt_level=3, config=dict(kernel.pass_configs or {})), \
                tvm.target.Target(kernel.target):
            artifact = tilelang.lower(kernel.prim_func, target=kernel.target)
    out = {}
    for gv, func in artifact.device_mod.functions.items():
        attrs = func.attrs or {}
        name = str(attrs["global_symbol"]) if "global_symbol" in attrs else gv.name_hint
        ext = attrs["thread_extent"] if "thread_extent" in attrs else {}
        threads = 1
        for axis in ("threadIdx.x", "threadIdx.y", "threadIdx.z"):
            if axis in ext:
                threads *= int(ext[axis])
        dyn = attrs["dyn_shared_memory_buf"] if "dyn_shared_memory_buf" in attrs else 0
        out[name] = {"threads": threads, "dyn_smem": int(dyn)}
    return out


def _cache_dir() -> Path:
    from tilelang.env import env

    return Path(env.TILELANG_CACHE_DIR) / "kla_tl" / "resource-usage"


def _run_nvcc(source: str, flags: list) -> str:
    from tilelang.contrib import nvcc

    with tempfile.TemporaryDirectory(prefix="kla_tl_ru_") as tmp:
        src = os.path.join(tmp, "kernel.cu")
        Path(src).write_text(source)
        cmd = [nvcc.get_nvcc_compiler(), f"-ccbin={nvcc.get_cplus_compiler()}", "--cubin", *flags,
               "--resource-usage", "-o", os.path.join(tmp, "kernel.cubin"), src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc --resource-usage failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def resource_report(kernel) -> dict:
    """Per-entry resource usage of a built TileLang kernel (any number of ``__global__`` entries).

    Returns ``{entry: {"regs", "spill_stores", "spill_loads", "stack", "static_smem", "threads", "dyn_smem"}}``;
    cached on disk (see the module docstring).
    """
    source = kernel.get_kernel_source()
    flags = _nvcc_flags(kernel)
    digest = hashlib.sha256(json.dumps([REPORT_VERSION, source, kernel.get_host_source(), flags]).encode()).hexdigest()
    path = _cache_dir() / f"{digest}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    usage = parse_ptxas(_run_nvcc(source, flags))
    launch = _launch_info(kernel)
    report = {name: {**u, **launch.get(name, {"threads": 0, "dyn_smem": 0})} for name, u in usage.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a recompute next time
    return report


def verdict(report: dict, arch: str) -> tuple:
    """``(status, reason)`` of a resource report: ``"ok"``, ``"spill"`` (ptxas spilled registers), ``"smem"``
    (static + dynamic shared memory over :data:`SMEM_LIMIT`) or ``"regs"`` (registers x threads over one SM)."""
    if not report:
        return "error", "ptxas reported no kernel entry"
    for name, u in sorted(report.items()):
        if u["spill_stores"] or u["spill_loads"]:
            return "spill", (f"{name}: {u['spill_stores']} bytes spill stores, {u['spill_loads']} bytes spill loads "
                             f"({u['regs']} registers)")
        smem = u["static_smem"] + u["dyn_smem"]
        if smem > SMEM_LIMIT[arch]:
            return "smem", (f"{name}: {smem} bytes shared memory ({u['static_smem']} static + {u['dyn_smem']} "
                            f"dynamic) > {SMEM_LIMIT[arch]} on {arch}")
        if u["threads"] and u["regs"] * u["threads"] > REGS_PER_SM:
            return "regs", f"{name}: {u['regs']} registers x {u['threads']} threads > {REGS_PER_SM} per SM"
    return "ok", ""


def summary(kernel) -> dict:
    """One row for a single-entry kernel: the entry's report (the largest, if several)."""
    report = resource_report(kernel)
    return max(report.values(), key=lambda u: u["regs"]) if report else {}
