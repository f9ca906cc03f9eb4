"""Benchmark suites as data: load ``suites.json`` and expand each suite into :class:`Case` objects.

The installed package ships ``perf/suites.json`` as ``kla_tl.perfdata/suites.json`` (a ``package-dir`` mapping in
pyproject.toml, no copy); a checkout without an install reads ``perf/suites.json`` next to the package. Any other file
in the same format can be passed with ``kla-tl bench --suites-file``.

Format (see the ``_doc`` entry of the file)::

    {"defaults": {"K": 128, "V": 128, "normalize_q": true},
     "shapes": {"b8-t4096-h16": {"B": 8, "T": 4096, "H": 16, "HV": 16}, ...},
     "suites": {"quick": [{"op": "chunk_fwd", "shapes": ["b8-t4096-h16"], "dtypes": ["bfloat16"]}, ...]}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

#: Ops a suite may name.
OPS = ("chunk_fwd", "chunk_fwdbwd", "decode")
#: dtype names accepted for q/k/v and for decode state pools.
DTYPES = ("bfloat16", "float16", "float32")
STATE_DTYPES = ("float32", "bfloat16")

_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class Case:
    """One benchmarked problem: an op on one shape, dtype and (decode) state dtype."""

    op: str
    name: str                       #: shape name in the suites file
    B: int
    T: int                          #: tokens per sequence (varlen: total packed tokens); 1 for decode
    H: int
    HV: int
    K: int
    V: int
    dtype: str
    state_dtype: Optional[str] = None   #: decode only
    varlen: Optional[tuple] = None      #: packed sequence lengths (B == 1), or None
    normalize_q: bool = True

    def shape(self) -> dict:
        """The ``shape`` dict of a result record (part of the record's identity)."""
        return {"B": self.B, "T": self.T, "H": self.H, "HV": self.HV, "K": self.K, "V": self.V,
                "dtype": self.dtype, "state_dtype": self.state_dtype,
                "varlen": list(self.varlen) if self.varlen is not None else None}

    @property
    def label(self) -> str:
        return shape_label(self.shape())


def shape_label(shape: dict) -> str:
    """Compact human label of a record shape: ``B8 T4096 H16/16 K128 V128 bf16`` (+ state dtype, varlen)."""
    parts = [f"B{shape['B']}"]
    if shape.get("varlen"):
        parts.append(f"T{shape['T']} ({len(shape['varlen'])} seqs)")
    elif shape.get("T", 1) != 1 or not shape.get("state_dtype"):
        parts.append(f"T{shape['T']}")
    parts.append(f"H{shape['H']}/{shape['HV']}")
    parts.append(f"K{shape['K']} V{shape['V']}")
    parts.append(_SHORT.get(shape.get("dtype"), str(shape.get("dtype"))))
    if shape.get("state_dtype"):
        parts.append(f"state {_SHORT.get(shape['state_dtype'], shape['state_dtype'])}")
    return " ".join(parts)


def default_suites_path() -> str:
    """Path of the suites file shipped with the package (or of the checkout's ``perf/suites.json``)."""
    try:
        from importlib import resources
        p = resources.files("kla_tl.perfdata").joinpath("suites.json")
        if p.is_file():
            return str(p)
    except (ModuleNotFoundError, FileNotFoundError, TypeError):
        pass
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = os.path.join(here, "perf", "suites.json")
    if os.path.isfile(p):
        return p
    raise FileNotFoundError("kla-tl bench: no suites.json found in the package (kla_tl.perfdata) or next to it "
                            "(perf/suites.json); pass --suites-file")


def load(path: Optional[str] = None) -> dict:
    """Read and validate a suites file (default: :func:`default_suites_path`)."""
    path = path or default_suites_path()
    with open(path) as f:
        data = json.load(f)
    validate(data, path)
    return data


def _fail(where: str, msg: str):
    raise ValueError(f"suites file {where}: {msg}")


def validate(data: dict, where: str = "<data>") -> None:
    """Check the structure of a suites dict; raises ValueError naming the offending entry."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("suites", "shapes")):
        _fail(where, "needs top-level objects 'shapes' and 'suites'")
    for sname, entries in data["suites"].items():
        if not isinstance(entries, list):
            _fail(where, f"suite {sname!r} must be a list of entries")
        for i, e in enumerate(entries):
            at = f"suite {sname!r} entry {i}"
            if e.get("op") not in OPS:
                _fail(where, f"{at}: op must be one of {OPS}, got {e.get('op')!r}")
            for sh in e.get("shapes", []):
                if sh not in data["shapes"]:
                    _fail(where, f"{at}: unknown shape {sh!r}")
                T = {**data.get("defaults", {}), **data["shapes"][sh]}.get("T")
                if e["op"] != "decode" and (not isinstance(T, int) or T < 1):
                    _fail(where, f"{at}: shape {sh!r} needs a positive int T for op {e['op']!r}")
            for dt in e.get("dtypes", ["bfloat16"]):
                if dt not in DTYPES:
                    _fail(where, f"{at}: dtype must be one of {DTYPES}, got {dt!r}")
            for dt in e.get("state_dtypes", []):
                if dt not in STATE_DTYPES:
                    _fail(where, f"{at}: state dtype must be one of {STATE_DTYPES}, got {dt!r}")
    for name, sh in data["shapes"].items():
        full = {**data.get("defaults", {}), **sh}
        for key in ("B", "H", "HV", "K", "V"):
            if not isinstance(full.get(key), int) or full[key] < 1:
                _fail(where, f"shape {name!r}: {key} must be a positive int, got {full.get(key)!r}")
        if full["HV"] % full["H"]:
            _fail(where, f"shape {name!r}: HV={full['HV']} must be a multiple of H={full['H']}")
        if full.get("varlen") is not None:
            vl = full["varlen"]
            if full["B"] != 1 or not vl or sum(vl) != full.get("T"):
                _fail(where, f"shape {name!r}: varlen needs B == 1 and sum(varlen) == T, got B={full['B']}, "
                             f"sum={sum(vl) if vl else 0}, T={full.get('T')}")


def expand(data: dict, suite: str, *, ops=None, shapes=None) -> list[Case]:
    """The cases of ``suite`` in file order, optionally restricted to some ops and shape names."""
    if suite not in data["suites"]:
        raise ValueError(f"unknown suite {suite!r}; the suites file has {sorted(data['suites'])}")
    defaults = data.get("defaults", {})
    cases: list[Case] = []
    seen = set()
    for e in data["suites"][suite]:
        op = e["op"]
        if ops and op not in ops:
            continue
        for sname in e.get("shapes", []):
            if shapes and sname not in shapes:
                continue
            sh = {**defaults, **data["shapes"][sname]}
            for dt in e.get("dtypes", ["bfloat16"]):
                sdts = (e.get("state_dtypes") or ["float32"]) if op == "decode" else [None]
                for sdt in sdts:
                    vl = sh.get("varlen")
                    c = Case(op=op, name=sname, B=sh["B"], T=1 if op == "decode" else sh["T"], H=sh["H"],
                             HV=sh["HV"], K=sh["K"], V=sh["V"], dtype=dt, state_dtype=sdt,
                             varlen=tuple(vl) if (vl and op != "decode") else None,
                             normalize_q=bool(sh.get("normalize_q", True)))
                    if c not in seen:
                        seen.add(c)
                        cases.append(c)
    return cases
