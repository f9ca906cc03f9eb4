"""Resource report of a compiled TileLang kernel, without a GPU: registers, spills, stack, shared memory, threads.

TileLang 0.1.15 exposes ptxas' report only through its verbose log, so :func:`resource_usage` re-assembles the
generated CUDA source with nvcc's ``--resource-usage`` using TileLang's own flags (include roots ``$TL/src`` and
CUTLASS), and reads the launch configuration (block size, dynamic shared memory) from the generated host code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile


def _nvcc() -> str:
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return os.path.join(cand, "bin", "nvcc")
    found = shutil.which("nvcc")
    if not found:
        raise RuntimeError("nvcc not found (set CUDA_HOME): needed for the resource report")
    return found


def _arch_flags(arch: str) -> list[str]:
    if arch == "sm_90a":
        return ["-gencode", "arch=compute_90a,code=sm_90a"]
    if arch == "sm_80":
        return ["-gencode", "arch=compute_80,code=sm_80"]
    raise ValueError(f"arch must be sm_80 or sm_90a, got {arch!r}")


def launch_config(host_source: str) -> dict:
    """Block size and dynamic shared memory of the (last) kernel launch in TileLang's generated host code.

    The tvm_ffi host wrapper passes ``grid x, y, z, block x, y, z, dynamic smem`` as the last integer arguments
    before calling the device function.
    """
    calls = list(re.finditer(r"TVMFFIFunctionCall\((\w+)_packed", host_source))
    if not calls:
        return {}
    head = host_source[:calls[-1].start()]
    ints = [int(x) for x in re.findall(r"v_int64\) = \(\(int64_t\)(-?\d+)\);", head)]
    if len(ints) < 4:
        return {}
    return {"threads": ints[-4] * ints[-3] * ints[-2], "dynamic_smem": ints[-1]}


def resource_usage(kernel, arch: str) -> dict:
    """ptxas' report for a compiled ``tilelang`` JITKernel built for ``arch`` (``sm_80`` or ``sm_90a``).

    Returns ``{"registers", "spill_stores", "spill_loads", "stack", "static_smem", "dynamic_smem", "threads"}``
    (bytes for memory sizes).
    """
    import tilelang

    tl_dir = os.path.dirname(tilelang.__file__)
    src = kernel.get_kernel_source()
    with tempfile.TemporaryDirectory() as tmp:
        cu = os.path.join(tmp, "k.cu")
        with open(cu, "w") as f:
            f.write(src)
        cmd = [_nvcc(), "-ccbin=g++", "--cubin", "-O3", "-std=c++20", *_arch_flags(arch),
               f"-I{os.path.join(tl_dir, 'src')}", f"-I{os.path.join(tl_dir, '3rdparty', 'cutlass', 'include')}",
               "--resource-usage", "-w", "-o", os.path.join(tmp, "k.cubin"), cu]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"nvcc failed ({arch}):\n{out.stderr[-2000:]}")
    text = out.stdout + out.stderr

    def grab(pat, default=0):
        m = re.findall(pat, text)
        return int(m[-1]) if m else default

    res = {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack": grab(r"(\d+) bytes stack frame"),
        "static_smem": grab(r"(\d+) bytes smem"),
    }
    res.update({"threads": None, "dynamic_smem": None})
    res.update(launch_config(kernel.get_host_source()))
    return res
