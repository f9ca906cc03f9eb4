"""Tuned kernel schedules per GPU: the JSON files beside this module, their validation, and the runtime lookup.

Shipped as ``kla_tl.schedules`` (pyproject.toml maps this directory into the package). One file per GPU or
architecture, named by a *file key*:

- ``<gpu>.json`` -- tuned on that GPU by ``kla-tl autotune`` (``h100``, ``h200``, ``a100``; other GPUs get their
  sanitised device name, see :func:`gpu_key`);
- ``sm90.json`` / ``sm80.json`` -- the generic file of an architecture (compute capability 9.x / 8.x), used when the
  GPU has no file or no entry for the call.

Schema (``schema_version`` 1)::

    {"schema_version": 1, "gpu": "h100", "arch": "sm_90a", "tilelang": "0.1.15",
     "provenance": {"device": "NVIDIA H100 80GB HBM3", "date": "2025-01-31T12:00:00Z", "commit": "1a2b3c4",
                    "tuned": true, "timings": {"method": "...", ...}},
     "kernels": {"<kernel>": {"<bucket>": {"schedule": {...}, "key": {...}, "tuned": true,
                                           "ms": 0.21, "default_ms": 0.25, ...}}}}

``gpu`` equals the file name, ``arch`` is the TileLang arch the schedules were built for, ``<bucket>`` is
``KernelSpec.bucket(key)`` and every schedule names exactly the knobs of the kernel's space with values from it.

Lookup order for ``lookup(kernel, device, key)``: the GPU's own file, then the generic file of the call's arch, then
the kernel's built-in default. ``KLA_TL_SCHEDULES=<dir>`` searches that directory instead of this one. Files are
validated when first read and cached (re-read when they change on disk); a malformed file raises ``ValueError``
naming the file and the field. Nothing here probes a device or imports tilelang at import time.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: version of the file format described above
SCHEMA_VERSION = 1

#: environment variable naming a directory searched instead of the shipped schedules
ENV_DIR = "KLA_TL_SCHEDULES"

#: source string returned by :func:`lookup` when no file has an entry
BUILTIN = "built-in default"

_log = logging.getLogger(__name__)

#: device-name token -> file key, for the GPUs the issue names (matched as a whole word, case-insensitive)
KNOWN_GPUS = (("H100", "h100"), ("H200", "h200"), ("A100", "a100"))

#: TileLang arch -> generic file key
ARCH_FILES = {"sm_90a": "sm90", "sm_80": "sm80"}

_TOP_FIELDS = ("schema_version", "gpu", "arch", "tilelang", "provenance", "kernels")
_PROVENANCE_REQUIRED = {"device": str, "date": str, "commit": str, "tuned": bool}
#: entry fields besides ``schedule`` (all optional): what autotune records next to the schedule
_ENTRY_OPTIONAL = {"key": dict, "tuned": bool, "ms": (int, float, type(None)), "default_ms": (int, float, type(None)),
                   "default_schedule": dict, "date": str, "commit": str, "cases": list, "note": str}


@dataclass(frozen=True)
class Device:
    """What the lookup needs to know about a GPU: its name (``torch.cuda.get_device_name``) and capability."""

    name: str
    capability: tuple


# ----------------------------------------------------------------------------------------------------------- keys


@functools.lru_cache(maxsize=64)
def gpu_key(device_name: str) -> str:
    """File key of a device name: ``'NVIDIA H100 80GB HBM3' -> 'h100'``, ``H200 -> 'h200'``, ``A100 -> 'a100'``.

    Other names are sanitised: lower case, runs of other characters become ``_``, a leading ``nvidia_`` is dropped
    (``'NVIDIA GeForce RTX 4090' -> 'geforce_rtx_4090'``).
    """
    for token, key in KNOWN_GPUS:
        if re.search(rf"(?<![A-Za-z0-9]){token}(?![A-Za-z0-9])", device_name, re.IGNORECASE):
            return key
    key = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    key = re.sub(r"^nvidia_", "", key)
    return key or "unknown_gpu"


def arch_for(capability) -> str:
    """TileLang arch of a compute capability: ``sm_90a`` for 9.x, ``sm_80`` (the Ampere path) otherwise."""
    return "sm_90a" if tuple(capability)[0] == 9 else "sm_80"


def shipped_dir() -> Path:
    """The directory of the shipped schedule files (this package)."""
    return Path(__file__).resolve().parent


def _display(path: Path) -> str:
    """How a schedule file is named in ``lookup``'s source string (and so in bench records): the shipped files as
    ``schedules/<name>`` (the same on every machine), any other file by its path."""
    return f"schedules/{path.name}" if path.resolve().parent == shipped_dir() else str(path)


def search_dir() -> Path:
    """Where lookups read: ``$KLA_TL_SCHEDULES`` when set, else :func:`shipped_dir`."""
    env = os.environ.get(ENV_DIR, "")
    return Path(env).expanduser() if env else shipped_dir()


def search_path(device: Device, arch: str, directory: Optional[Path] = None) -> list:
    """The files a lookup for ``device`` and ``arch`` reads, in order: the GPU's file, then the arch's generic file."""
    d = search_dir() if directory is None else Path(directory)
    files = [d / f"{gpu_key(device.name)}.json"]
    if arch in ARCH_FILES:
        files.append(d / f"{ARCH_FILES[arch]}.json")
    return files


@functools.lru_cache(maxsize=None)
def _cuda_device(index: int) -> Device:
    import torch

    return Device(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def device_info(device=None) -> Device:
    """:class:`Device` of ``device``: a Device (returned as is), None (current CUDA device), an int index, a string
    such as ``"cuda:1"`` or a ``torch.device``. Queried lazily and cached per device index."""
    if isinstance(device, Device):
        return device
    import torch

    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"schedules: device must be a CUDA device, got {dev}")
        index = torch.cuda.current_device() if dev.index is None else dev.index
    return _cuda_device(index)


# ----------------------------------------------------------------------------------------------------- validation


def _specs(names=()) -> dict:
    """Registered kernel specs; imports the kernel modules (and tilelang) only when a name is not registered yet."""
    from kla_tl.kernels import registry

    specs = dict(registry._REGISTRY)
    if any(n not in specs for n in names):
        specs = registry.all_specs()
    return specs


def _fail(path, field: str, problem: str):
    raise ValueError(f"schedules file {path}: field {field}: {problem}")


def _check_schedule(path, field: str, schedule, space: dict) -> None:
    if not isinstance(schedule, dict):
        _fail(path, field, f"must be an object of knob values, got {type(schedule).__name__}")
    for knob in schedule:
        if knob not in space:
            _fail(path, f"{field}.{knob}", f"unknown knob {knob!r} (the kernel's knobs: {sorted(space)})")
    for knob in sorted(space):
        if knob not in schedule:
            _fail(path, field, f"missing knob {knob!r} (the kernel's knobs: {sorted(space)})")
        value = schedule[knob]
        if value not in list(space[knob]) or isinstance(value, bool) != any(isinstance(v, bool) for v in space[knob]):
            _fail(path, f"{field}.{knob}", f"value {value!r} is not in the kernel's space {list(space[knob])}")


def validate(doc, path="<document>", specs: Optional[dict] = None) -> None:
    """Check a schedule document against the schema and the registered kernels' spaces.

    Raises:
        ValueError: naming ``path`` and the first offending field (dotted, e.g. ``kernels.decode.B1.schedule.threads``).
    """
    if not isinstance(doc, dict):
        _fail(path, "(top level)", f"must be a JSON object, got {type(doc).__name__}")
    for name in _TOP_FIELDS:
        if name not in doc:
            _fail(path, name, "missing")
    for name in doc:
        if name not in _TOP_FIELDS:
            _fail(path, name, f"unknown field (allowed: {list(_TOP_FIELDS)})")
    if doc["schema_version"] != SCHEMA_VERSION or isinstance(doc["schema_version"], bool):
        _fail(path, "schema_version", f"must be {SCHEMA_VERSION}, got {doc['schema_version']!r}")
    if not isinstance(doc["gpu"], str) or not doc["gpu"]:
        _fail(path, "gpu", f"must be a non-empty string, got {doc['gpu']!r}")
    stem = Path(str(path)).stem if str(path).endswith(".json") else None
    if stem is not None and doc["gpu"] != stem:
        _fail(path, "gpu", f"{doc['gpu']!r} does not match the file name {stem!r}")
    from kla_tl.kernels.registry import ARCHS

    if doc["arch"] not in ARCHS:
        _fail(path, "arch", f"must be one of {list(ARCHS)}, got {doc['arch']!r}")
    if not isinstance(doc["tilelang"], str):
        _fail(path, "tilelang", f"must be a version string, got {doc['tilelang']!r}")
    prov = doc["provenance"]
    if not isinstance(prov, dict):
        _fail(path, "provenance", f"must be an object, got {type(prov).__name__}")
    for name, typ in _PROVENANCE_REQUIRED.items():
        if name not in prov:
            _fail(path, f"provenance.{name}", "missing")
        if not isinstance(prov[name], typ):
            _fail(path, f"provenance.{name}", f"must be a {typ.__name__}, got {prov[name]!r}")
    if "timings" in prov and not isinstance(prov["timings"], dict):
        _fail(path, "provenance.timings", f"must be an object, got {prov['timings']!r}")
    kernels = doc["kernels"]
    if not isinstance(kernels, dict):
        _fail(path, "kernels", f"must be an object, got {type(kernels).__name__}")
    if not kernels:
        return
    specs = _specs(kernels) if specs is None else specs
    for kname, buckets in kernels.items():
        if kname not in specs:
            _fail(path, f"kernels.{kname}", f"unknown kernel (registered: {sorted(specs)})")
        spec = specs[kname]
        if not isinstance(buckets, dict):
            _fail(path, f"kernels.{kname}", f"must be an object of buckets, got {type(buckets).__name__}")
        for bname, entry in buckets.items():
            field = f"kernels.{kname}.{bname}"
            if not isinstance(entry, dict):
                _fail(path, field, f"must be an object, got {type(entry).__name__}")
            if "schedule" not in entry:
                _fail(path, f"{field}.schedule", "missing")
            _check_schedule(path, f"{field}.schedule", entry["schedule"], spec.space)
            for name, value in entry.items():
                if name == "schedule":
                    continue
                if name not in _ENTRY_OPTIONAL:
                    _fail(path, f"{field}.{name}", f"unknown field (allowed: {['schedule', *_ENTRY_OPTIONAL]})")
                typ = _ENTRY_OPTIONAL[name]
                if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
                    _fail(path, f"{field}.{name}", f"has the wrong type: {value!r}")
                if name in ("ms", "default_ms") and value is not None and not (math.isfinite(value) and value > 0):
                    _fail(path, f"{field}.{name}", f"must be a positive number of milliseconds, got {value!r}")
            if "default_schedule" in entry:
                _check_schedule(path, f"{field}.default_schedule", entry["default_schedule"], spec.space)
            if "key" in entry:
                try:
                    got = spec.bucket(entry["key"])
                except Exception as e:  # noqa: BLE001 -- a key the bucket function cannot read
                    _fail(path, f"{field}.key", f"bucket(key) failed: {e!r}")
                if got != bname:
                    _fail(path, f"{field}.key", f"falls in bucket {got!r}, not {bname!r}")


# ---------------------------------------------------------------------------------------------------- load / save

_FILES: dict = {}  # resolved path -> ((mtime_ns, size), validated document)


def load(path) -> dict:
    """Read and validate one schedule file; cached until the file changes on disk.

    Raises:
        ValueError: bad JSON or a schema violation, naming the file and the field (or the JSON position).
        FileNotFoundError: no such file.
    """
    p = Path(path).resolve()
    st = p.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _FILES.get(p)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"schedules file {p}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    validate(doc, p)
    _FILES[p] = (stamp, doc)
    return doc


def clear_cache() -> None:
    """Forget every loaded file (tests; after writing files in the same process)."""
    _FILES.clear()


def new_document(gpu: str, arch: str, provenance: dict, tilelang_version: Optional[str] = None) -> dict:
    """An empty schedule document (no kernels) with the given header."""
    if tilelang_version is None:
        tilelang_version = installed_tilelang_version()
    return {"schema_version": SCHEMA_VERSION, "gpu": gpu, "arch": arch, "tilelang": tilelang_version,
            "provenance": dict(provenance), "kernels": {}}


def installed_tilelang_version() -> str:
    """Version of the installed tilelang distribution (read from its metadata; does not import tilelang)."""
    from importlib import metadata

    try:
        return metadata.version("tilelang")
    except metadata.PackageNotFoundError:
        return "not installed"


def dumps(doc: dict) -> str:
    """Canonical text of a document: kernels and buckets sorted, two-space indent, trailing newline."""
    out = dict(doc)
    out["kernels"] = {k: {b: doc["kernels"][k][b] for b in sorted(doc["kernels"][k])} for k in sorted(doc["kernels"])}
    return json.dumps(out, indent=2) + "\n"


def save(doc: dict, path) -> Path:
    """Validate ``doc`` and write it to ``path`` atomically (temporary file + rename)."""
    p = Path(path)
    validate(doc, p)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(doc))
    os.replace(tmp, p)
    _FILES.pop(p.resolve(), None)
    return p


# --------------------------------------------------------------------------------------------------------- lookup


def lookup(kernel: str, device, key: dict, *, arch: Optional[str] = None) -> tuple:
    """The schedule a ``kernel`` call with problem ``key`` should use on ``device``, and where it came from.

    Args:
        kernel: a registered kernel name (``KernelSpec.name``).
        device: the GPU: a :class:`Device`, None (current CUDA device), an index, ``"cuda:N"`` or ``torch.device``.
        key: the problem key; its bucket is ``KernelSpec.bucket(key)``.
        arch: TileLang arch of the code path (default: from the capability, see :func:`arch_for`). Files built for
            another arch are skipped.

    Returns:
        ``(schedule, source)``: a fresh dict of knob values, and ``"<file> [<kernel>/<bucket>]"`` (a shipped file
        as ``schedules/<name>``) or ``"built-in default"``.

    Raises:
        ValueError: unknown kernel, or a malformed schedule file on the search path (naming file and field).
    """
    specs = _specs([kernel])
    if kernel not in specs:
        raise ValueError(f"schedules.lookup: unknown kernel {kernel!r} (registered: {sorted(specs)})")
    spec = specs[kernel]
    dev = device_info(device)
    arch = arch_for(dev.capability) if arch is None else arch
    bucket = spec.bucket(key)
    files = search_path(dev, arch)
    for path in files:
        if not path.is_file():
            continue
        doc = load(path)
        if doc["arch"] != arch:
            continue
        entry = doc["kernels"].get(kernel, {}).get(bucket)
        if entry is not None:
            return dict(entry["schedule"]), f"{_display(path)} [{kernel}/{bucket}]"
    _log.debug("%s: no entry for bucket %s (%s) in %s; using the built-in default", kernel, bucket, arch,
               [str(p) for p in files])
    return dict(spec.default(arch, key)), BUILTIN


def _file_summary(path: Path) -> str:
    try:
        doc = load(path)
    except ValueError as e:
        return f"  {path}: INVALID: {e}"
    prov = doc["provenance"]
    n = sum(len(b) for b in doc["kernels"].values())
    state = "tuned" if prov["tuned"] else "untuned defaults"
    return (f"  {path}: {doc['arch']}, {state}, {n} entries over {len(doc['kernels'])} kernels "
            f"(device {prov['device']!r}, {prov['date']}, commit {prov['commit']}, tilelang {doc['tilelang']})")


def describe_lookup(kernel: Optional[str] = None, key: Optional[dict] = None, device=None) -> str:
    """Human-readable account of the schedule search, for ``kla-tl info``.

    With a GPU (or ``device``): the device, its file key and arch, the files searched in order (present or not),
    and -- for ``kernel`` and ``key`` -- the file and entry a call would use and the schedule. Without a GPU: where a
    call would look, and the files present in the search directory. Never raises on a malformed file: it reports it.
    """
    lines = []
    d = search_dir()
    origin = f"from ${ENV_DIR}" if os.environ.get(ENV_DIR) else "shipped"
    lines.append(f"schedule files: {d} ({origin})")
    dev = None
    if device is not None:
        dev = device_info(device)
    else:
        try:
            import torch

            if torch.cuda.is_available():
                dev = device_info(None)
        except Exception:  # noqa: BLE001 -- torch without CUDA support
            dev = None
    if dev is None:
        lines.append("no CUDA device: a call searches <gpu>.json (h100, h200, a100 or the sanitised device name), "
                     "then sm90.json (capability 9.x) or sm80.json (8.x), then the kernel's built-in default")
        files = sorted(d.glob("*.json")) if d.is_dir() else []
        if not files:
            lines.append("  (no schedule files there)")
        lines += [_file_summary(p) for p in files]
        return "\n".join(lines)
    arch = arch_for(dev.capability)
    lines.append(f"device: {dev.name} (capability {dev.capability[0]}.{dev.capability[1]}, arch {arch}, "
                 f"file key {gpu_key(dev.name)!r})")
    lines.append("search order:")
    for p in search_path(dev, arch, d):
        lines.append(_file_summary(p) if p.is_file() else f"  {p}: absent")
    lines.append(f"  then the kernel's {BUILTIN}")
    if kernel is not None:
        if key is None:
            specs = _specs([kernel])
            spec = specs.get(kernel)
            if spec is None:
                lines.append(f"{kernel}: unknown kernel (registered: {sorted(specs)})")
            else:
                for p in search_path(dev, arch, d):
                    try:
                        buckets = sorted(load(p)["kernels"].get(kernel, {})) if p.is_file() else []
                    except ValueError:
                        buckets = []
                    lines.append(f"{kernel} buckets in {p.name}: {buckets or 'none'}")
        else:
            try:
                schedule, source = lookup(kernel, dev, key, arch=arch)
                lines.append(f"{kernel} {json.dumps(key, sort_keys=True)}: {schedule} from {source}")
            except ValueError as e:
                lines.append(f"{kernel}: lookup fails: {e}")
    return "\n".join(lines)
