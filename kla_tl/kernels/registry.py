"""Registry of TileLang kernel families: what ``kla-tl compile``, ``kla-tl autotune`` and the schedule lookup see.

Each kernel module declares one :class:`KernelSpec` next to its builder and registers it at import. The spec holds
the tuning space as data (knob -> candidate values, each documented in the kernel module), the default schedule per
architecture, how a problem maps to a shape bucket, and a ``build`` that compiles one (problem, schedule, arch)
without a GPU.

Vocabulary:
- *key*: a JSON-able dict of the problem sizes and flags a kernel is specialised on (e.g. ``{"H": 16, "HV": 16,
  "K": 128, "V": 128, "dtype": "bfloat16", "is_varlen": False}``). T is never part of a key (dynamic in kernels).
- *bucket*: a short string naming a family of keys that share a tuned schedule (``"K128_V128_bf16"``).
- *schedule*: a dict of knob values (``{"block_v": 64, "threads": 128, "num_stages": 1}``).
- *arch*: ``"sm_90a"`` (Hopper path) or ``"sm_80"`` (Ampere path; also run on Hopper through pass configs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

#: Architectures kla-tl builds for.
ARCHS = ("sm_90a", "sm_80")

#: Pass configs that turn TileLang's Hopper lowering into the Ampere one (cp.async + mma.sync), so that the sm_80
#: path can be built for sm_90a and run on an H100 (TILELANG.md section 6).
AMPERE_ON_HOPPER_PASS_CONFIGS = {
    "tl.disable_warp_specialized": True,
    "tl.disable_wgmma": True,
    "tl.disable_tma_lower": True,
}


@dataclass(frozen=True)
class BenchCase:
    """One representative problem of a shape bucket, as ``kla-tl autotune`` times it on a GPU (phase 2).

    The tuner calls ``make_inputs(seed)`` for a few seeds once per bucket (rotating input sets, so a launch does not
    find the previous launch's operands in L2: size one set so that the sets together exceed L2, 50 MB on H100),
    checks every candidate once with ``check`` before timing it, and times ``run`` launches on the rotating sets
    (medians over repetitions). ``run`` may update its inputs in place (decode's state pool); ``check`` then sees
    them after the launch, so an input set that needs its originals for the reference keeps a copy.
    """

    #: short description of the shape, shown in reports (e.g. ``"B=4 T=8192"``)
    label: str
    #: seed -> one input set on the current CUDA device (any object); must not depend on the schedule
    make_inputs: Callable[[int], object]
    #: (built, inputs) -> outputs: one launch of what ``KernelSpec.build`` returned, asynchronous (no sync needed)
    run: Callable[[object, object], object]
    #: (inputs, outputs) -> None when the outputs match the float64 reference, else a message saying what differs
    check: Callable[[object, object], Optional[str]]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel family as the tooling sees it."""

    name: str
    #: knob -> candidate values (the tuning space, documented beside the builder)
    space: dict
    #: default(arch, key) -> schedule; always a member of the space
    default: Callable[[str, dict], dict]
    #: bucket(key) -> bucket name
    bucket: Callable[[dict], str]
    #: build(arch, key, schedule, *, target_arch=None, pass_configs=None) -> compiled tilelang JITKernel
    build: Callable[..., object]
    #: representative keys: what `kla-tl compile` and `autotune --compile-only` build
    example_keys: list = field(default_factory=list)
    #: valid(arch, key, schedule) -> bool: static pruning (divisibility, shared-memory estimate)
    valid: Callable[[str, dict, dict], bool] = lambda arch, key, sch: True
    #: bench(arch, key) -> list[BenchCase]: the representative problems autotune times for key's bucket on a GPU;
    #: None = the family cannot be timed (``kla-tl autotune`` then only compiles and prunes it)
    bench: Optional[Callable[[str, dict], list]] = None

    def candidates(self, arch: str, key: dict) -> list[dict]:
        """Every schedule of the space that passes static pruning, default first."""
        names = sorted(self.space)
        out = [self.default(arch, key)]
        for values in itertools.product(*(self.space[n] for n in names)):
            sch = dict(zip(names, values))
            if sch not in out and self.valid(arch, key, sch):
                out.append(sch)
        return out


_REGISTRY: dict[str, KernelSpec] = {}

#: modules that register kernel families (imported lazily by :func:`all_specs`)
KERNEL_MODULES = ("kla_tl.kernels.chunk_fwd", "kla_tl.kernels.recurrent")


def register(spec: KernelSpec) -> KernelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def all_specs() -> dict[str, KernelSpec]:
    """Import every kernel module (this imports tilelang) and return the registry."""
    import importlib

    for mod in KERNEL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return dict(_REGISTRY)


def target_for(arch: str, run_on_hopper: bool = False):
    """(target dict, pass_configs) to build ``arch``; ``run_on_hopper`` builds the sm_80 path as sm_90a code."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "sm_80" and run_on_hopper:
        return {"kind": "cuda", "arch": "sm_90a"}, dict(AMPERE_ON_HOPPER_PASS_CONFIGS)
    return {"kind": "cuda", "arch": arch}, ({} if arch == "sm_90a" else {})
