"""``kla-tl report``: tables of a results file, the comparison with a baseline, and plots.

Per op, one row per shape (decode: per shape and timing mode) with kla-tl's time, each peer's time, kla-tl's speedup
over each peer (peer ms / kla_tl ms), kla-tl's throughput and fraction of the roofline, and its change against the
baseline. A fraction of the roofline is ``max(frac_flops, frac_bw)``: the time the ceilings allow (the larger of
FLOPs / GEMM rate and bytes / copy bandwidth, :mod:`kla_tl.roofline`) divided by the measured time.

Regression rule: a kla-tl record (``impl`` starting with ``kla_tl``) regresses when it is slower than the baseline
record of the same identity by more than ``threshold`` (relative) **and** by more than its noise, the larger of the
two records' spreads ((p80 - p20) / median). Peers never fail the report: their changes are shown for context
(a driver or library update). Baselines from another GPU are not compared.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from . import records
from .peers import KLA_IMPLS, PEER_IMPLS
from .suites import shape_label

OP_TITLES = {
    "chunk_fwd": "chunk forward (`chunk_kla`)",
    "chunk_fwdbwd": "chunk forward + backward (`chunk_kla` + `.backward`)",
    "decode": "decode (`kla_decode`, one token per row)",
}
PRIMARY = "kla_tl"


@dataclass
class Delta:
    """One record present, with a time, in both the results and the baseline."""

    op: str
    impl: str
    shape: dict
    graph: bool
    base_ms: float
    ms: float
    noise: float

    @property
    def change(self) -> float:
        return self.ms / self.base_ms - 1.0

    def regression(self, threshold: float) -> bool:
        return self.impl.startswith("kla_tl") and self.change > threshold and self.change > self.noise


def _impl_order(names) -> list[str]:
    known = list(KLA_IMPLS) + list(PEER_IMPLS)
    return [n for n in known if n in names] + sorted(n for n in names if n not in known)


def comparable(results: dict, baseline: Optional[dict]) -> Optional[str]:
    """None when ``baseline`` can be compared with ``results``, else why not."""
    if baseline is None:
        return "no baseline"
    a, b = results.get("device", {}).get("key"), baseline.get("device", {}).get("key")
    if a and b and a != b:
        return f"the baseline is from another GPU ({b}, results from {a})"
    return None


def compare(results: dict, baseline: Optional[dict]) -> list[Delta]:
    """Deltas of every record timed in both files (empty when not comparable)."""
    if comparable(results, baseline) is not None:
        return []
    base = {records.record_key(r): r for r in baseline.get("records", []) if r.get("ms")}
    out = []
    for r in results.get("records", []):
        b = base.get(records.record_key(r))
        if b is None or not r.get("ms"):
            continue
        noise = max(r.get("spread") or 0.0, b.get("spread") or 0.0)
        out.append(Delta(r["op"], r["impl"], r["shape"], bool(r.get("graph")), b["ms"], r["ms"], noise))
    return out


def lost(results: dict, baseline: Optional[dict]) -> list[dict]:
    """kla-tl records timed in the baseline that have no time now (error, fallback, or missing)."""
    if comparable(results, baseline) is not None:
        return []
    now = {records.record_key(r): r for r in results.get("records", [])}
    out = []
    for b in baseline.get("records", []):
        if not b.get("ms") or not b["impl"].startswith("kla_tl"):
            continue
        r = now.get(records.record_key(b))
        if r is not None and not r.get("ms"):
            out.append(r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------------------------

def _ms(r: Optional[dict]) -> str:
    if r is None:
        return ""
    if not r.get("ms"):
        err = r.get("error") or "no time"
        if err.startswith("unsupported"):
            return "unsupported"
        if err.startswith("not timed"):
            return "not timed"
        return "check failed" if "check against" in err else "error"
    sp = r.get("spread")
    return f"{r['ms']:.3f} ±{100 * sp:.0f}%" if sp is not None else f"{r['ms']:.3f}"


def _num(x: float) -> str:
    """3 significant digits, no exponent for the usual range."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _roof(r: Optional[dict]) -> Optional[float]:
    if not r or not r.get("ms"):
        return None
    fr = [r[k] for k in ("frac_flops", "frac_bw") if r.get(k) is not None]
    return max(fr) if fr else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return out


def _groups(results: dict):
    """op -> ordered {(shape json, graph): {impl: record}}."""
    import json
    ops: dict = {}
    for r in results.get("records", []):
        rows = ops.setdefault(r["op"], {})
        rows.setdefault((json.dumps(r["shape"], sort_keys=True), bool(r.get("graph"))), {})[r["impl"]] = r
    return ops


def header_lines(results: dict, baseline: Optional[dict], baseline_path: Optional[str], threshold: float,
                 results_path: Optional[str]) -> list[str]:
    d, v, c = results.get("device", {}), results.get("versions", {}), results.get("ceilings", {}) or {}
    cap = d.get("capability")
    dev = f"{d.get('name')} (`{d.get('key')}`" + (f", sm_{cap[0]}{cap[1]}" if cap else "") + \
        (f", {d['sm_count']} SMs" if d.get("sm_count") else "") + ")"
    vers = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "tilelang", "cuda", "fla", "flash_qla", "kla_tl")
                     if v.get(k))
    missing = [k for k in ("fla", "flash_qla") if k in v and not v[k]]
    lines = ["# kla-tl benchmark report", ""]
    if results_path:
        dirty = " (uncommitted changes)" if results.get("dirty") else ""
        lines.append(f"- Results: `{os.path.basename(results_path)}`, {results.get('date')}, commit "
                     f"`{(results.get('commit') or 'unknown')[:12]}`{dirty}")
    lines.append(f"- Device: {dev}")
    lines.append(f"- Versions: {vers}" + (f" (not installed: {', '.join(missing)})" if missing else ""))
    if c.get("copy_tbps"):
        lines.append(f"- Ceilings measured in the same run: device-to-device copy {c['copy_tbps']:.2f} TB/s "
                     f"(read + write bytes), bf16 GEMM {c.get('bf16_tflops', float('nan')):.0f} TFLOP/s "
                     f"({c.get('gemm_n', 8192)}^3)")
    else:
        lines.append("- Ceilings: not measured (no CUDA device): no roofline fractions")
    why = comparable(results, baseline)
    if baseline_path and baseline is None:
        lines.append(f"- Baseline: `{baseline_path}` not found: no comparison")
    elif baseline is not None and why:
        lines.append(f"- Baseline: `{os.path.basename(baseline_path or '')}` not compared: {why}")
    elif baseline is not None:
        lines.append(f"- Baseline: `{os.path.basename(baseline_path or '')}`, {baseline.get('date')}, commit "
                     f"`{(baseline.get('commit') or 'unknown')[:12]}`; regression = kla-tl slower by more than "
                     f"{100 * threshold:.0f}% and more than the noise (larger p20-p80 spread of the two)")
    lines += ["", "Times are medians in ms, ± the p20-p80 band relative to the median. Speedup = peer time / "
              "kla_tl time (> 1: kla-tl faster). Roofline = time allowed by the two ceilings / measured time.", ""]
    return lines


def op_section(op: str, rows: dict, deltas: dict, threshold: float) -> list[str]:
    impls = _impl_order({i for row in rows.values() for i in row})
    peers_here = [i for i in impls if not i.startswith("kla_tl")]
    has_primary = PRIMARY in impls
    decode = op == "decode"
    header = ["shape"] + (["mode"] if decode else []) + [f"{i} ms" for i in impls]
    if has_primary:
        header += [f"vs {p}" for p in peers_here]
        header += ["kla_tl TFLOP/s" if not decode else "kla_tl GB/s", "kla_tl roofline"]
        if op == "chunk_fwdbwd":
            header.append("kla_tl peak GiB")
    if deltas:
        header += [f"Δ {i}" for i in impls if i.startswith("kla_tl")]
    body, notes = [], []
    import json
    for (shape_json, graph), row in rows.items():
        shape = json.loads(shape_json)
        cells = [shape_label(shape)] + (["graph" if graph else "eager"] if decode else [])
        cells += [_ms(row.get(i)) for i in impls]
        if decode:
            hosts = [f"{i} {1e3 * row[i]['host_ms']:.1f} µs" for i in impls if row.get(i) and row[i].get("host_ms")]
            if hosts:
                notes.append(f"- {shape_label(shape)} eager, wall clock per back-to-back call (host included): "
                             + ", ".join(hosts))
        k = row.get(PRIMARY)
        if has_primary:
            for p in peers_here:
                pr = row.get(p)
                cells.append(f"{pr['ms'] / k['ms']:.2f}×" if (k and pr and k.get("ms") and pr.get("ms")) else "")
            if k and k.get("ms"):
                cells.append(_num(k["gbps"] if decode else k["tflops"]))
            else:
                cells.append("")
            cells.append(_pct(_roof(k)))
            if op == "chunk_fwdbwd":
                cells.append(f"{k['peak_gib']:.2f}" if k and k.get("peak_gib") is not None else "")
        if deltas:
            for i in impls:
                if not i.startswith("kla_tl"):
                    continue
                dl = deltas.get((op, i, shape_json, graph))
                if dl is None:
                    cells.append("")
                else:
                    flag = " **REGRESSION**" if dl.regression(threshold) else ""
                    cells.append(f"{100 * dl.change:+.1f}%{flag}")
        body.append(cells)
        for i in impls:
            r = row.get(i)
            if r is not None and r.get("error") and not r["error"].startswith("unsupported"):
                notes.append(f"- {i}, {shape_label(shape)}{', graph' if graph else ''}: {r['error']}")
            if r is not None and r.get("backend") and r["backend"] != "kernels" and r.get("ms"):
                notes.append(f"- {i}, {shape_label(shape)}: timed on the {r['backend']}")
    lines = [f"## {OP_TITLES.get(op, op)}", ""] + _table(header, body) + [""]
    if notes:
        lines += ["Notes:", ""] + sorted(set(notes), key=notes.index) + [""]
    return lines


def comparison_section(deltas: list[Delta], lost_: list[dict], threshold: float) -> list[str]:
    if not deltas and not lost_:
        return []
    rows = []
    for d in deltas:
        verdict = "REGRESSION" if d.regression(threshold) else (
            "slower (peer)" if not d.impl.startswith("kla_tl") and d.change > max(threshold, d.noise) else
            "faster" if d.change < -max(threshold, d.noise) else "same")
        rows.append([d.op, d.impl, shape_label(d.shape) + (" graph" if d.graph and d.op == "decode" else ""),
                     f"{d.base_ms:.3f}", f"{d.ms:.3f}", f"{100 * d.change:+.1f}%", f"{100 * d.noise:.0f}%", verdict])
    lines = ["## Against the baseline", ""]
    lines += _table(["op", "impl", "shape", "base ms", "now ms", "change", "noise", "verdict"], rows) + [""]
    if lost_:
        lines += ["kla-tl records timed in the baseline but not now:", ""]
        lines += [f"- {r['op']} {r['impl']} {shape_label(r['shape'])}: {r.get('error')}" for r in lost_] + [""]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------

def make_plots(results: dict, out_dir: str) -> list[str]:
    """Write speedup_<op>.png and roofline.png; returns their file names. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import json
    from kla_tl import roofline

    files = []
    for op, rows in _groups(results).items():
        labels, series = [], {}
        impls = _impl_order({i for row in rows.values() for i in row})
        peers_here = [i for i in impls if not i.startswith("kla_tl")]
        for (shape_json, graph), row in rows.items():
            k = row.get(PRIMARY)
            if not k or not k.get("ms"):
                continue
            labels.append(shape_label(json.loads(shape_json)) + (" graph" if graph and op == "decode" else ""))
            for p in peers_here:
                pr = row.get(p)
                series.setdefault(p, []).append(pr["ms"] / k["ms"] if pr and pr.get("ms") else float("nan"))
        series = {p: v for p, v in series.items() if any(not math.isnan(x) for x in v)}
        if not labels or not series:
            continue
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.6 * len(labels) + 2)), 4.5))
        w = 0.8 / len(series)
        for j, (p, vals) in enumerate(series.items()):
            ax.bar([i + j * w - 0.4 + w / 2 for i in range(len(labels))], vals, w, label=f"vs {p}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("speedup of kla_tl (peer ms / kla_tl ms)")
        ax.set_title(f"{op}: kla_tl speedup over peers")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"speedup_{op}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)
        files.append(name)

    c = results.get("ceilings") or {}
    pts = [r for r in results.get("records", []) if r.get("ms") and r.get("tflops")]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 5))
        markers = {"chunk_fwd": "o", "chunk_fwdbwd": "s", "decode": "^"}
        impls = _impl_order({r["impl"] for r in pts})
        colors = {i: f"C{j}" for j, i in enumerate(impls)}
        for r in pts:
            ai = roofline.cost_of(r["op"], r["shape"]).intensity
            ax.scatter(ai, r["tflops"], marker=markers.get(r["op"], "x"), color=colors[r["impl"]], s=22)
        xs = [roofline.cost_of(r["op"], r["shape"]).intensity for r in pts]
        lo, hi = min(xs) / 2, max(max(xs) * 2, 1000.0)
        if c.get("copy_tbps") and c.get("bf16_tflops"):
            grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
            ax.plot(grid, [min(c["bf16_tflops"], x * c["copy_tbps"]) for x in grid], "k-", lw=1,
                    label=f"ceilings: {c['copy_tbps']:.2f} TB/s copy, {c['bf16_tflops']:.0f} TFLOP/s bf16 GEMM")
        for i in impls:
            ax.scatter([], [], color=colors[i], label=i)
        for op, m in markers.items():
            if any(r["op"] == op for r in pts):
                ax.scatter([], [], marker=m, color="gray", label=op)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / minimum HBM byte)")
        ax.set_ylabel("achieved TFLOP/s")
        ax.set_title("roofline view")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "roofline.png"), dpi=120)
        plt.close(fig)
        files.append("roofline.png")
    return files


# ----------------------------------------------------------------------------------------------------------------
# tuned against default schedules
# ----------------------------------------------------------------------------------------------------------------

def schedules_section(results: dict) -> list[str]:
    """Tuned against default schedule per kernel and bucket: the results' ``schedules`` block (what ``kla-tl
    autotune`` measured on this GPU, copied by ``kla-tl bench`` from the schedule file it ran with)."""
    summary = results.get("schedules")
    if not summary or not summary.get("entries"):
        return []
    prov = summary.get("provenance", {})
    rows = []
    for e in summary["entries"]:
        sch = ", ".join(f"{k}={v}" for k, v in sorted(e["schedule"].items()))
        rows.append([e["kernel"], e["bucket"], ", ".join(e.get("cases", [])), f"{e['default_ms']:.4f}",
                     f"{e['tuned_ms']:.4f}", f"{e['default_ms'] / e['tuned_ms']:.2f}×", sch])
    lines = [f"## Tuned against default schedules (`{summary.get('file')}`)", "",
             f"From `kla-tl autotune` on {prov.get('device')} ({prov.get('date')}, commit "
             f"{str(prov.get('commit'))[:12]}): per bucket, the sum of the median ms per launch of its "
             "representative problems, default schedule against the tuned one.", ""]
    return lines + _table(["kernel", "bucket", "problems", "default ms", "tuned ms", "speedup", "tuned schedule"],
                          rows) + [""]


# ----------------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------------

def build(results: dict, baseline: Optional[dict], *, threshold: float = 0.05, results_path: Optional[str] = None,
          baseline_path: Optional[str] = None, plots: Optional[list] = None, plot_note: Optional[str] = None):
    """(markdown text, deltas, regressions, lost records)."""
    deltas = compare(results, baseline)
    by_key = {(d.op, d.impl, records.record_key({"op": d.op, "impl": d.impl, "shape": d.shape, "graph": d.graph})[2],
               d.graph): d for d in deltas}
    lost_ = lost(results, baseline)
    lines = header_lines(results, baseline, baseline_path, threshold, results_path)
    order = ["chunk_fwd", "chunk_fwdbwd", "decode"]
    groups = _groups(results)
    for op in sorted(groups, key=lambda o: order.index(o) if o in order else len(order)):
        lines += op_section(op, groups[op], by_key, threshold)
    lines += schedules_section(results)
    lines += comparison_section(deltas, lost_, threshold)
    regs = [d for d in deltas if d.regression(threshold)]
    if baseline is not None and comparable(results, baseline) is None:
        lines += [f"**{len(regs)} kla-tl regression(s)** beyond {100 * threshold:.0f}% and the noise." if regs
                  else f"No kla-tl regression beyond {100 * threshold:.0f}% and the noise.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    elif plot_note:
        lines += [f"Plots: {plot_note}", ""]
    return "\n".join(lines), deltas, regs, lost_
