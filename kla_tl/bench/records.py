"""The results file of ``kla-tl bench`` (``perf/results/<gpu>.json``): build, derive, validate, merge, save.

Format (``schema`` 1)::

    {"schema": 1,
     "device": {"name": "NVIDIA H100 80GB HBM3", "key": "h100", "capability": [9, 0], "sm_count": 132,
                "l2_mib": 50.0},
     "versions": {"python", "torch", "triton", "tilelang", "cuda", "kla_tl", "fla", "flash_qla"},
     "commit": "<git rev-parse HEAD or null>", "dirty": false, "date": "2026-...Z",
     "ceilings": {"copy_tbps": 3.0, "bf16_tflops": 700.0, ...},
     "settings": {"suite": "quick", "warmup_ms": 10, "rep_ms": 40, ...},
     "schedules": {"file", "provenance", "entries": [{"kernel", "bucket", "default_ms", "tuned_ms", ...}]} (optional:
                  tuned against default per kernel, from the GPU's schedule file; see schedule_summary),
     "records": [{"op", "impl", "shape": {"B","T","H","HV","K","V","dtype","state_dtype","varlen"},
                  "ms", "spread", "graph", ...optional: "p20", "p80", "tflops", "gbps", "frac_flops", "frac_bw",
                  "peak_gib", "backend", "schedule", "check", "case", "sets", "commit", "error",
                  "host_ms", "host_spread" (decode eager: wall clock per back-to-back call, host overhead included)}]}

A record's identity is ``(op, impl, shape, graph)``; merging replaces records of the same identity and keeps the
others (``kla-tl bench --merge``), so a suite can be run in pieces. ``ms`` is null exactly when ``error`` says why.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from typing import Optional

from .. import roofline

SCHEMA = 1
SHAPE_KEYS = ("B", "T", "H", "HV", "K", "V", "dtype", "state_dtype", "varlen")
REQUIRED = ("op", "impl", "shape", "ms", "spread", "graph")


# ----------------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------------

def device_key(name: str) -> str:
    """Short key of a GPU name, used for file names: ``NVIDIA H100 80GB HBM3`` -> ``h100``.

    The first model-like token (letters then digits: H100, H200, A100, L40S, B200, GB200, H20) wins; GeForce/RTX parts
    become ``rtx4090``; anything else is the lower-cased name with non-alphanumerics replaced by ``-``.
    """
    if not name or name.lower() == "cpu":
        return "cpu"
    m = re.search(r"RTX\s*(?:PRO\s*)?(\d{4})", name, re.IGNORECASE)
    if m:
        return f"rtx{m.group(1)}"
    m = re.search(r"\b([A-Z]{1,3}\d{1,4}[A-Z]?)\b", name.replace("NVIDIA", " "))
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def device_info(device) -> dict:
    import torch
    if device.type != "cuda":
        return {"name": platform.processor() or "cpu", "key": "cpu", "capability": None}
    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "key": device_key(p.name), "capability": list(torch.cuda.get_device_capability(device)),
            "sm_count": p.multi_processor_count,
            "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None,
            "memory_gib": round(p.total_memory / 2**30, 1)}


def versions() -> dict:
    """Versions of everything that shapes a timing (package metadata; nothing heavy is imported)."""
    import torch
    from .peers import dist_version, versions as peer_versions
    import kla_tl
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "triton": dist_version("triton", "pytorch-triton"), "tilelang": dist_version("tilelang"),
         "cuda": torch.version.cuda, "kla_tl": kla_tl.__version__}
    v.update(peer_versions())
    return v


def git_commit(cwd: Optional[str] = None) -> tuple[Optional[str], Optional[bool]]:
    """(HEAD commit, whether tracked files differ from it) of the checkout at ``cwd``; (None, None) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                            text=True, timeout=30)
        return head.stdout.strip(), (bool(st.stdout.strip()) if st.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_results(device: dict, *, versions_: dict, ceilings: dict, settings: dict, commit=None, dirty=None) -> dict:
    return {"schema": SCHEMA, "device": device, "versions": versions_, "commit": commit, "dirty": dirty,
            "date": now_utc(), "ceilings": ceilings, "settings": settings, "records": []}


def schedule_summary(device_key: Optional[str]) -> Optional[dict]:
    """Tuned against default schedules on this GPU, as ``kla-tl autotune`` measured them and stored them in the
    shipped ``schedules/<gpu>.json``: ``{"file", "provenance", "entries": [{"kernel", "bucket", "cases",
    "default_ms", "tuned_ms", "schedule", "default_schedule"}]}``; None without such a file."""
    if not device_key:
        return None
    try:
        from kla_tl import schedules
        path = schedules.shipped_dir() / f"{device_key}.json"
        if not path.is_file():
            return None
        doc = schedules.load(path)
    except (ImportError, ValueError):
        return None
    entries = []
    for kernel, buckets in sorted(doc["kernels"].items()):
        for bucket, e in sorted(buckets.items()):
            if e.get("ms") and e.get("default_ms"):
                entries.append({"kernel": kernel, "bucket": bucket, "cases": e.get("cases", []),
                                "default_ms": e["default_ms"], "tuned_ms": e["ms"], "schedule": e["schedule"],
                                "default_schedule": e.get("default_schedule")})
    p = doc["provenance"]
    return {"file": f"schedules/{path.name}", "entries": entries,
            "provenance": {k: p.get(k) for k in ("device", "date", "commit", "tuned")}}


# ----------------------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------------------

def record_key(r: dict) -> tuple:
    """Identity of a record: (op, impl, shape, graph)."""
    return (r["op"], r["impl"], json.dumps(r["shape"], sort_keys=True), bool(r.get("graph", False)))


def derive(r: dict, ceilings: Optional[dict]) -> dict:
    """Fill ``tflops``, ``gbps`` (from :mod:`kla_tl.roofline`) and their fractions of the ceilings, in place."""
    for k in ("tflops", "gbps", "frac_flops", "frac_bw"):
        r.pop(k, None)
    if not r.get("ms"):
        return r
    cost = roofline.cost_of(r["op"], r["shape"])
    sec = r["ms"] * 1e-3
    r["tflops"] = cost.flops / sec / 1e12
    r["gbps"] = cost.bytes / sec / 1e9
    if ceilings and ceilings.get("bf16_tflops"):
        r["frac_flops"] = r["tflops"] / ceilings["bf16_tflops"]
    if ceilings and ceilings.get("copy_tbps"):
        r["frac_bw"] = r["gbps"] / (ceilings["copy_tbps"] * 1e3)
    return r


def merge_records(old: list[dict], new: list[dict]) -> list[dict]:
    """Records of ``old`` with those of the same identity replaced by ``new`` (in place), then the other new ones."""
    pos = {record_key(r): i for i, r in enumerate(old)}
    out = list(old)
    for r in new:
        k = record_key(r)
        if k in pos:
            out[pos[k]] = r
        else:
            pos[k] = len(out)
            out.append(r)
    return out


def merge(existing: dict, new: dict) -> dict:
    """Merge results ``new`` into ``existing`` (same GPU): header from ``new`` (but the ceilings of ``existing`` when
    ``new`` measured none, as a peer's child process does), records merged, all re-derived."""
    ek, nk = existing.get("device", {}).get("key"), new.get("device", {}).get("key")
    if ek and nk and ek != nk:
        raise ValueError(f"cannot merge results of GPU {nk!r} into a file of GPU {ek!r}; write to another --out")
    out = dict(new)
    if not new.get("ceilings") and existing.get("ceilings"):
        out["ceilings"] = existing["ceilings"]
    out["records"] = merge_records(existing.get("records", []), new.get("records", []))
    for r in out["records"]:
        derive(r, out.get("ceilings"))
    return out


def validate(data: dict) -> list[str]:
    """Problems of a results dict (empty when valid)."""
    errs = []
    for k in ("device", "versions", "commit", "date", "ceilings", "records"):
        if k not in data:
            errs.append(f"missing top-level key {k!r}")
    if errs:
        return errs
    if not isinstance(data["device"], dict) or "key" not in data["device"] or "name" not in data["device"]:
        errs.append("device needs 'name' and 'key'")
    seen = set()
    for i, r in enumerate(data["records"]):
        at = f"record {i}"
        for k in REQUIRED:
            if k not in r:
                errs.append(f"{at}: missing {k!r}")
        if any(k not in r for k in REQUIRED):
            continue
        if set(r["shape"]) != set(SHAPE_KEYS):
            errs.append(f"{at}: shape keys {sorted(r['shape'])} != {sorted(SHAPE_KEYS)}")
        if r["ms"] is None and not r.get("error"):
            errs.append(f"{at}: ms is null without an 'error'")
        if r["ms"] is not None and (not isinstance(r["ms"], (int, float)) or r["ms"] <= 0):
            errs.append(f"{at}: ms must be a positive number, got {r['ms']!r}")
        k = record_key(r)
        if k in seen:
            errs.append(f"{at}: duplicate identity {k}")
        seen.add(k)
    return errs


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def save(data: dict, path: str) -> None:
    """Write atomically (a temporary file renamed over ``path``), creating the directory."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
