"""``kla-tl autotune``: enumerate, prune (phase 1, CPU), check and time (phase 2, GPU), merge into schedules/.

For every selected kernel (``KernelSpec``) and shape bucket:

1. candidates: ``spec.candidates(arch, key)`` (default first); ``--max-configs N`` keeps the default plus a
   deterministic sample of N-1 others (the same sample on every run, so a ``--compile-only`` run warms the cache for
   the GPU run);
2. phase 1 (:mod:`.compile`): build all candidates of all buckets on all cores; drop failures, spills and
   over-budget shared memory;
3. phase 2 (:mod:`.measure`, GPU only): check each survivor against the reference, time it on the bucket's
   representative problems, keep the fastest;
4. merge the winners into ``<out-dir>/<gpu>.json`` (provenance: device, date, commit, default vs tuned ms).

Progress is saved after each bucket to ``<out-dir>/autotune-runs/<gpu>-<arch>.json`` (a subdirectory, so it is never
shipped as a schedule file); ``--resume`` skips the buckets finished there. ``--compile-only`` stops after phase 1;
with ``--write-defaults`` it also writes each bucket's compile-validated default, marked untuned, to
``<out-dir>/<gpu>.json`` (``<gpu>`` = ``sm90``/``sm80`` unless ``--gpu`` names another file).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import measure

#: name of the progress subdirectory of --out-dir
RUNS_DIR = "autotune-runs"


@dataclass
class Options:
    """Parsed ``kla-tl autotune`` options (see :mod:`kla_tl.cli.autotune` for their help)."""

    kernels: Optional[list] = None
    shapes: Optional[list] = None
    max_configs: Optional[int] = None
    budget_seconds: Optional[float] = None
    resume: bool = False
    compile_only: bool = False
    arch: Optional[str] = None
    out_dir: Optional[Path] = None
    gpu: Optional[str] = None
    workers: Optional[int] = None
    write_defaults: bool = False
    warmup: int = measure.DEFAULT_WARMUP
    reps: int = measure.DEFAULT_REPS
    rotate: int = measure.DEFAULT_ROTATE
    spec_modules: list = field(default_factory=list)
    commit: Optional[str] = None  # recorded in provenance; default: git of the checkout


# ------------------------------------------------------------------------------------------------- enumeration


def select_specs(names: Optional[list], spec_modules=()) -> dict:
    """Registered specs, restricted to ``names`` (unknown names raise ``ValueError`` listing the registered ones)."""
    import importlib

    from kla_tl.kernels import registry

    for mod in spec_modules:
        importlib.import_module(mod)
    if names and all(n in registry._REGISTRY for n in names):
        return {n: registry._REGISTRY[n] for n in names}  # no need to import the other kernel modules
    specs = registry.all_specs()
    if not names:
        return specs
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; registered: {sorted(specs)}")
    return {n: specs[n] for n in names}


def resolve_buckets(spec, shapes: Optional[list]) -> list:
    """``[(bucket, key)]`` to tune for ``spec``: one per bucket of its ``example_keys`` (the first key of each), or
    those named by ``shapes`` (bucket names, matched against the example keys, or problem keys as JSON objects).
    Bucket names this spec does not have are ignored here (they may belong to another kernel)."""
    by_bucket = {}
    for key in spec.example_keys:
        by_bucket.setdefault(spec.bucket(key), key)
    if not shapes:
        return list(by_bucket.items())
    out = []
    for item in shapes:
        item = item.strip()
        if item.startswith("{"):
            try:
                key = json.loads(item)
            except json.JSONDecodeError as e:
                raise ValueError(f"--shapes: {item!r} is not a JSON object: {e}") from e
            try:
                bucket = spec.bucket(key)
            except (KeyError, TypeError) as e:
                raise ValueError(f"--shapes: key {item} lacks a field {spec.name} needs: {e!r}") from e
            pair = (bucket, key)
        elif item in by_bucket:
            pair = (item, by_bucket[item])
        else:
            continue
        if pair[0] not in [b for b, _ in out]:
            out.append(pair)
    return out


def select_candidates(spec, arch: str, bucket: str, key: dict, max_configs: Optional[int]) -> list:
    """The default first, then every other candidate, or a deterministic sample of ``max_configs - 1`` of them
    (seeded by kernel and bucket; kept in space order)."""
    cands = spec.candidates(arch, key)
    if max_configs is None or len(cands) <= max_configs:
        return cands
    rest = cands[1:]
    rng = random.Random(f"{spec.name}/{bucket}/{arch}")
    picked = sorted(rng.sample(range(len(rest)), max(0, max_configs - 1)))
    return [cands[0]] + [rest[i] for i in picked]


# ------------------------------------------------------------------------------------------------- bookkeeping


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def current_commit() -> str:
    """Short commit of the kla-tl checkout (``-dirty`` with uncommitted tracked changes), or ``unknown``."""
    import kla_tl

    root = Path(kla_tl.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def _default_out_dir() -> Path:
    from kla_tl import schedules

    return schedules.shipped_dir()


class Progress:
    """The per-bucket results file under ``<out-dir>/autotune-runs/`` (written after every bucket)."""

    def __init__(self, path: Path, header: dict, resume: bool):
        self.path = path
        self.doc = {**header, "buckets": {}}
        if resume and path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = {}
            if old.get("arch") == header["arch"] and old.get("mode") == header["mode"]:
                self.doc["buckets"] = {k: v for k, v in old.get("buckets", {}).items() if v.get("complete")}

    def done(self, kernel: str, bucket: str) -> Optional[dict]:
        return self.doc["buckets"].get(f"{kernel}/{bucket}")

    def put(self, kernel: str, bucket: str, record: dict) -> None:
        self.doc["buckets"][f"{kernel}/{bucket}"] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        os.replace(tmp, self.path)


def merge_into(out_dir: Path, gpu: str, arch: str, entries: dict, provenance: dict) -> Path:
    """Merge ``{kernel: {bucket: entry}}`` into ``<out_dir>/<gpu>.json`` and return its path.

    The base is the existing ``<out_dir>/<gpu>.json``, else the searched directory's file of that name, else an
    empty document; entries of other kernels and buckets are kept. The header (tilelang version, provenance) is the
    current run's; ``provenance.tuned`` is true when any entry of the merged file was timed on a GPU.
    """
    from kla_tl import schedules

    target = Path(out_dir) / f"{gpu}.json"
    base_path = target if target.is_file() else schedules.search_dir() / f"{gpu}.json"
    if base_path.is_file():
        doc = json.loads(json.dumps(schedules.load(base_path)))  # deep copy of the validated document
        if doc["arch"] != arch:
            raise ValueError(f"{base_path} holds {doc['arch']} schedules; this run produced {arch} ones "
                             f"(use --gpu to write another file)")
    else:
        doc = schedules.new_document(gpu, arch, provenance)
    for kernel, buckets in entries.items():
        doc["kernels"].setdefault(kernel, {}).update(buckets)
    doc["tilelang"] = schedules.installed_tilelang_version()
    tuned = any(e.get("tuned", False) for b in doc["kernels"].values() for e in b.values())
    doc["provenance"] = {**provenance, "tuned": tuned}
    return schedules.save(doc, target)


def _table(headers: list, rows: list) -> str:
    cols = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in cols[1:]]
    return "\n".join(lines)


def _fmt_ms(ms) -> str:
    return "-" if ms is None else f"{ms:.4f}"


def _sched(s) -> str:
    return "-" if not s else ",".join(f"{k}={v}" for k, v in sorted(s.items()))


def _module_file(module: str) -> str:
    mod = sys.modules.get(module)
    return str(getattr(mod, "__file__", "") or "")


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU host without tqdm still tunes, just without bars
        return _NoBar()
    # disable=None: bars on a terminal only, so captured logs stay readable
    return tqdm(total=total, desc=desc, unit="cfg", file=sys.stderr, dynamic_ncols=True, disable=None)


# ------------------------------------------------------------------------------------------------------- driver


def run(opts: Options, *, out=None) -> int:
    """Run an autotune session (see the module docstring); returns the process exit status.

    Exit status 0 when every selected bucket kept at least one candidate, 1 otherwise, 2 for usage errors.
    """
    from kla_tl import schedules
    from kla_tl.kernels.registry import ARCHS

    out = sys.stdout if out is None else out
    say = lambda msg="": print(msg, file=out, flush=True)  # noqa: E731
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    t_start = time.monotonic()
    deadline = None if opts.budget_seconds is None else t_start + opts.budget_seconds

    # --- device / arch / output file
    device_name = None
    if opts.compile_only:
        arch = opts.arch or "sm_90a"
        gpu = opts.gpu or schedules.ARCH_FILES[arch]
    else:
        import torch

        if not torch.cuda.is_available():
            say("kla-tl autotune: no CUDA device; use --compile-only --arch sm_90a|sm_80 to build candidates here")
            return 2
        dev = schedules.device_info(None)
        device_name = dev.name
        arch = schedules.arch_for(dev.capability)
        if opts.arch and opts.arch != arch:
            say(f"kla-tl autotune: --arch {opts.arch} differs from this GPU's {arch}; on a GPU the device decides "
                f"(--arch is for --compile-only)")
            return 2
        gpu = opts.gpu or schedules.gpu_key(dev.name)
    if arch not in ARCHS:
        say(f"kla-tl autotune: --arch must be one of {ARCHS}")
        return 2
    out_dir = Path(opts.out_dir) if opts.out_dir is not None else _default_out_dir()
    commit = opts.commit or current_commit()
    mode = "compile-only" if opts.compile_only else "tune"
    progress = Progress(out_dir / RUNS_DIR / f"{gpu}-{arch}.json",
                        {"gpu": gpu, "arch": arch, "mode": mode, "device": device_name, "commit": commit,
                         "tilelang": schedules.installed_tilelang_version(), "started": utc_now()}, opts.resume)

    # --- what to tune
    try:
        specs = select_specs(opts.kernels, opts.spec_modules)
    except (ValueError, ModuleNotFoundError) as e:
        say(f"kla-tl autotune: {e}")
        return 2
    if not opts.compile_only:
        untimeable = sorted(n for n, s in specs.items() if s.bench is None)
        if untimeable:
            say(f"kla-tl autotune: skipping {untimeable}: no KernelSpec.bench hook, so they cannot be timed "
                f"(--compile-only still builds and prunes them)")
        specs = {n: s for n, s in specs.items() if s.bench is not None}
        if not specs:
            say("kla-tl autotune: nothing to tune on the GPU")
            return 2
    plan = []  # (spec, bucket, key, candidates)
    skipped_resume = []
    for spec in specs.values():
        try:
            pairs = resolve_buckets(spec, opts.shapes)
        except ValueError as e:
            say(f"kla-tl autotune: {e}")
            return 2
        for bucket, key in pairs:
            if progress.done(spec.name, bucket):
                skipped_resume.append((spec.name, bucket))
                continue
            plan.append((spec, bucket, key, select_candidates(spec, arch, bucket, key, opts.max_configs)))
    if opts.shapes and not plan and not skipped_resume:
        say(f"kla-tl autotune: --shapes {opts.shapes} match no bucket of {sorted(specs)}; buckets: "
            + "; ".join(f"{s.name}: {sorted({s.bucket(k) for k in s.example_keys})}" for s in specs.values()))
        return 2
    say(f"kla-tl autotune: {mode}, arch {arch}, file {out_dir / (gpu + '.json')}"
        + (f", device {device_name}" if device_name else "")
        + f"; {len(plan)} buckets, {sum(len(p[3]) for p in plan)} candidates"
        + (f"; resumed past {len(skipped_resume)} finished buckets" if skipped_resume else ""))

    # --- phase 1: compile and prune, every candidate of every bucket at once
    from .compile import Task, compile_all

    tasks = [Task(spec.name, spec.build.__module__, arch, bucket, key, sch, _module_file(spec.build.__module__))
             for spec, bucket, key, cands in plan for sch in cands]
    workers = opts.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    bar = _bar(len(tasks), "phase 1: compile")
    try:
        results = compile_all(tasks, workers=workers, deadline=deadline, progress=lambda r: bar.update(1))
    finally:
        bar.close()
    by_bucket: dict = {}
    for r in results:
        by_bucket.setdefault((r.kernel, r.bucket), []).append(r)

    records = {}  # (kernel, bucket) -> record
    for spec, bucket, key, cands in plan:
        rs = by_bucket.get((spec.name, bucket), [])
        records[(spec.name, bucket)] = {
            "kernel": spec.name, "bucket": bucket, "key": key, "default": cands[0],
            "candidates": [r.as_dict() for r in rs], "complete": opts.compile_only and
            all(r.status != "skipped" for r in rs)}
        if opts.compile_only:
            progress.put(spec.name, bucket, records[(spec.name, bucket)])

    # --- phase 2: check and time on the GPU
    if not opts.compile_only:
        _phase2(plan, records, arch, opts, deadline, progress, say)

    # --- merge and report
    entries: dict = {}
    date = utc_now()
    for (kernel, bucket), rec in list(records.items()) + [((k, b), progress.done(k, b)) for k, b in skipped_resume]:
        entry = _entry_for(rec, opts, date, commit)
        if entry is not None:
            entries.setdefault(kernel, {})[bucket] = entry
    wrote = None
    if entries and (not opts.compile_only or opts.write_defaults):
        if opts.compile_only:
            prov = {"device": f"none (compile-only build for {arch})", "date": date, "commit": commit,
                    "tuned": False, "timings": {}}
        else:
            import torch

            prov = {"device": device_name, "date": date, "commit": commit, "tuned": True,
                    "timings": {"method": "per bucket: sum over its representative problems of the median ms per "
                                          "launch over timed passes; each pass launches once per rotating input set",
                                "warmup_passes": opts.warmup, "timed_passes": opts.reps,
                                "rotating_inputs": opts.rotate, "torch": torch.__version__,
                                "cuda": torch.version.cuda}}
        try:
            wrote = merge_into(out_dir, gpu, arch, entries, prov)
        except ValueError as e:
            say(f"kla-tl autotune: results kept in {progress.path}, but not merged: {e}")
            return 1
    say()
    say(_summary(records, skipped_resume, progress, opts.compile_only))
    if wrote is not None:
        say(f"\nwrote {wrote}")
    say(f"progress file: {progress.path}; {time.monotonic() - t_start:.0f} s")
    lost = [k for k, rec in records.items() if not any(c["status"] in ("ok", "untimed") for c in rec["candidates"])]
    if lost:
        say("no candidate survived for: " + ", ".join(f"{k}/{b}" for k, b in lost))
    return 1 if lost else 0


def _phase2(plan, records, arch, opts, deadline, progress, say) -> None:
    import torch

    n_ok = sum(1 for rec in records.values() for c in rec["candidates"] if c["status"] == "ok")
    bar = _bar(n_ok, "phase 2: check+time")
    try:
        for spec, bucket, key, _cands in plan:
            rec = records[(spec.name, bucket)]
            ok = [c for c in rec["candidates"] if c["status"] == "ok"]
            if spec.bench is None:
                for c in ok:
                    c["status"], c["reason"] = "untimed", "the kernel's spec has no bench hook"
                bar.update(len(ok))
                say(f"{spec.name}/{bucket}: not timed (KernelSpec.bench is None)")
                continue
            if deadline is not None and time.monotonic() > deadline:
                for c in ok:
                    c["status"], c["reason"] = "skipped", "time budget exhausted"
                bar.update(len(ok))
                continue
            try:
                cases = spec.bench(arch, key)
                inputs = measure.make_inputs(cases, opts.rotate)
            except Exception as e:  # noqa: BLE001 -- the bucket cannot be timed; the others still can
                for c in ok:
                    c["status"], c["reason"] = "mismatch", f"bench setup failed: {e!r}"[:500]
                bar.update(len(ok))
                say(f"{spec.name}/{bucket}: bench setup failed: {e!r}")
                continue
            rec["cases"] = [c.label for c in cases]
            for c in ok:
                if deadline is not None and time.monotonic() > deadline:
                    c["status"], c["reason"] = "skipped", "time budget exhausted"
                    bar.update(1)
                    continue
                try:
                    built = spec.build(arch, key, c["schedule"])
                    t = measure.time_candidate(built, cases, inputs, warmup=opts.warmup, reps=opts.reps)
                except Exception as e:  # noqa: BLE001
                    t = measure.Timing(False, reason=f"build failed on the GPU host: {e!r}"[:500])
                if t.ok:
                    c["ms"], c["per_case"] = t.ms, t.per_case
                else:
                    c["status"], c["reason"] = "mismatch", t.reason
                bar.update(1)
            del inputs
            torch.cuda.empty_cache()
            rec["complete"] = all(c["status"] != "skipped" for c in rec["candidates"])
            progress.put(spec.name, bucket, rec)
    finally:
        bar.close()


def _best(rec: dict) -> tuple:
    """(best candidate, default candidate) of a record; either may be None."""
    timed = [c for c in rec["candidates"] if c["status"] == "ok" and c.get("ms") is not None]
    default = next((c for c in rec["candidates"] if c["schedule"] == rec["default"]), None)
    return (min(timed, key=lambda c: c["ms"]) if timed else None), default


def _entry_for(rec: Optional[dict], opts: Options, date: str, commit: str) -> Optional[dict]:
    if rec is None:
        return None
    if opts.compile_only:
        if not opts.write_defaults:
            return None
        ok = [c for c in rec["candidates"] if c["status"] == "ok"]
        if not ok:
            return None
        first = next((c for c in ok if c["schedule"] == rec["default"]), ok[0])
        note = "compile-validated default, not timed"
        if first["schedule"] != rec["default"]:
            note = f"the default {rec['default']} failed phase 1; first surviving candidate, not timed"
        return {"schedule": first["schedule"], "key": rec["key"], "tuned": False, "date": date, "commit": commit,
                "note": note}
    best, default = _best(rec)
    if best is None:
        return None
    return {"schedule": best["schedule"], "key": rec["key"], "tuned": True, "ms": round(best["ms"], 6),
            "default_ms": round(default["ms"], 6) if default and default.get("ms") is not None else None,
            "default_schedule": rec["default"], "date": date, "commit": commit, "cases": rec.get("cases", [])}


def _summary(records: dict, skipped_resume: list, progress: Progress, compile_only: bool) -> str:
    rows = []
    items = list(records.items()) + [((k, b), progress.done(k, b)) for k, b in skipped_resume]
    for (kernel, bucket), rec in items:
        cs = rec["candidates"]
        count = {s: sum(1 for c in cs if c["status"] == s) for s in
                 ("ok", "error", "spill", "smem", "regs", "skipped", "mismatch", "untimed")}
        pruned = count["error"] + count["spill"] + count["smem"] + count["regs"]
        default = next((c for c in cs if c["schedule"] == rec["default"]), None)
        dstat = default["status"] if default else "-"
        resumed = " (resumed)" if (kernel, bucket) in skipped_resume else ""
        if compile_only:
            rows.append([kernel, bucket + resumed, len(cs), count["ok"], count["error"], count["spill"],
                         count["smem"] + count["regs"], count["skipped"], dstat])
        else:
            best, dflt = _best(rec)
            dms = dflt.get("ms") if dflt else None
            bms = best["ms"] if best else None
            speed = f"{dms / bms:.2f}x" if dms and bms else "-"
            rows.append([kernel, bucket + resumed, len(cs), pruned, count["mismatch"], count["ok"],
                         _fmt_ms(dms), _fmt_ms(bms), speed, _sched(best["schedule"] if best else None)])
    if compile_only:
        return _table(["kernel", "bucket", "cands", "ok", "error", "spill", "smem/regs", "skipped", "default"], rows)
    return _table(["kernel", "bucket", "cands", "pruned", "mismatch", "timed", "default ms", "tuned ms", "speedup",
                   "tuned schedule"], rows)
