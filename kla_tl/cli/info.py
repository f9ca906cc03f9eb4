"""``kla-tl info``: versions, the device, and which schedule a call would use.

Reads package versions from their metadata where it can (tilelang is not imported), queries CUDA only through
torch, and asks :mod:`kla_tl.schedules` (when present) to describe its lookup. Touches no kernel.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
from typing import Optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--kernel", metavar="NAME",
                        help="also list the schedule entries this kernel family would look up (imports tilelang)")


def _dist_version(name: str) -> Optional[str]:
    """Installed version of distribution ``name`` without importing it, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> Optional[str]:
    """NVIDIA driver version from ``nvidia-smi`` (torch does not expose it), or None."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[0] if lines else None


def _schedules(kernel: Optional[str] = None) -> object:
    """What :func:`kla_tl.schedules.describe_lookup` says, or the fallback line when the module is absent."""
    try:
        from kla_tl import schedules
    except ImportError:
        return "built-in defaults"
    describe = getattr(schedules, "describe_lookup", None)
    if describe is None:
        return "built-in defaults"
    try:
        return describe() if kernel is None else describe(kernel=kernel)
    except Exception as e:  # the lookup must not take `info` down with it
        return f"built-in defaults (describe_lookup failed: {type(e).__name__}: {e})"


def collect(kernel: Optional[str] = None) -> dict:
    """Everything ``kla-tl info`` reports, as a JSON-able dict."""
    import torch

    import kla_tl

    versions = {
        "python": platform.python_version(),
        "kla_tl": kla_tl.__version__,
        "torch": torch.__version__,
        "triton": _dist_version("triton"),
        "tilelang": _dist_version("tilelang"),
        "torch_cuda": torch.version.cuda,
    }
    info: dict = {"versions": versions, "platform": platform.platform()}
    if torch.cuda.is_available():
        from kla_tl.dispatch import arch_of

        dev = torch.device("cuda", torch.cuda.current_device())
        major, minor = torch.cuda.get_device_capability(dev)
        versions["driver"] = _driver_version()
        info["device"] = {
            "name": torch.cuda.get_device_name(dev),
            "compute_capability": f"{major}.{minor}",
            "count": torch.cuda.device_count(),
            "kernel_path": arch_of(dev) if major >= 8 else "none (kernels need sm_80 or newer; reference runs)",
        }
    else:
        info["device"] = None
    sch = _schedules(kernel)
    try:
        json.dumps(sch)
    except (TypeError, ValueError):
        sch = str(sch)
    info["schedules"] = sch
    return info


def _print_text(info: dict) -> None:
    width = max(len(k) for k in info["versions"]) + 1
    print("kla-tl info")
    for name, ver in info["versions"].items():
        if ver is None:
            ver = "none (CPU build of torch)" if name == "torch_cuda" else "not installed"
        print(f"  {name + ':':<{width}} {ver}")
    print(f"  {'platform:':<{width}} {info['platform']}")
    dev = info["device"]
    if dev is None:
        print("device: no CUDA device (every call runs the torch reference)")
    else:
        print(f"device: {dev['name']} (compute capability {dev['compute_capability']}, {dev['count']} visible), "
              f"kernel path {dev['kernel_path']}")
    sch = info["schedules"]
    if isinstance(sch, dict):
        print("schedules:")
        for k, v in sch.items():
            print(f"  {k}: {v}")
    elif isinstance(sch, (list, tuple)):
        print("schedules:")
        for line in sch:
            print(f"  {line}")
    elif isinstance(sch, str) and "\n" in sch:
        print("schedules:")
        for line in sch.splitlines():
            print(f"  {line}")
    else:
        print(f"schedules: {sch}")


def run(args: argparse.Namespace) -> int:
    info = collect(args.kernel)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_text(info)
    return 0
