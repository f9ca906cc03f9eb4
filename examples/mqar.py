"""Multi-query associative recall (MQAR) with KLA and Gated DeltaNet layers from ``kla_tl.nn``.

Reproduces the MQAR setting of the KLA paper (KLA.md section 9): sequences of 256 tokens holding 32 key-value pairs
over a vocabulary of 8192, 20k/2k/2k train/val/test examples, 2-layer d = 256 models trained with AdamW, and accuracy
on the answers at 1x/2x/4x/8x the training length (same 32 pairs, longer sequences). Paper (single seed):
KLA 98.39/98.16/95.64/73.84, GDN 98.72/98.36/94.31/66.81.

Data (the Zoology MQAR protocol, arXiv 2312.04927): an example opens with the pairs ``k1 v1 k2 v2 ...``, keys drawn
without replacement from ``[1, vocab/2)`` and values from ``[vocab/2, vocab)``; every key is asked once later in the
sequence, at an even offset of the query region drawn without replacement with a power law ``p(i) ~ i^(a-1)``; the
label at a query position is its key's value, every other label is ignored; all other tokens are uniform noise.

Training (the released MQAR script): AdamW, lr 1e-3, betas (0.9, 0.95), weight decay 0.1, grad clip 1.0, batch 32,
validation every 200 steps, early stop after 10 validations without a gain, at most 10k steps, best checkpoint by
validation accuracy. The learning rate is **constant**: the released script uses no schedule and no warmup.
(Zoology's own trainer anneals the rate with a cosine over its epochs; the paper's numbers come from the released
script, so this example does not.) A run therefore stops by patience (2000 steps without a better validation
accuracy) or after 10k steps (16 epochs of 625 steps); the paper does not say how many steps its runs took.
``--max-steps``, ``--patience`` and ``--target-acc`` change when a run stops, ``--max-minutes`` caps its wall clock
and ``--deadline-minutes`` that of the whole invocation; every run prints its validation accuracy as it goes.

Speed (none of it changes the computation): the data sets are generated once and moved to the device once; every
training step draws its batch on the device and reads nothing back (the loss is read every ``--log-interval`` steps,
accuracies at evaluations); the model computes logits only at the answer positions (the same loss: the others are
ignored by it); AdamW is the fused implementation on CUDA; bf16 autocast on CUDA (the released ``bf16-mixed``), with
fp32 gate, eta, norms and the recurrent state inside ``KLAttention``. Evaluation is batched, without autograd, in the
same autocast; every batch has the same size (``--eval-batch-size`` divides 2000), so one kernel build serves all
lengths, 8x (2048 tokens) included.

Usage::

    python examples/mqar.py --smoke                       # CPU, tiny sizes, seconds
    python examples/mqar.py --device cuda                 # the paper setting, KLA and GDN, seed 42
    # one model per call (e.g. under a per-job time limit), then one table:
    python examples/mqar.py --device cuda --models kla --deadline-minutes 8 --out-dir out/kla
    python examples/mqar.py --device cuda --models gdn --deadline-minutes 8 --out-dir out/gdn
    python examples/mqar.py --combine out/kla out/gdn --out-dir examples/results/mqar_h100
    python examples/mqar.py --eval-only --out-dir mqar_out   # re-evaluate saved checkpoints

Writes ``results.json`` (configuration, every run with its exact command line, device, accuracies, validation
history), ``results.md`` (the table beside the paper's numbers, the runs and the command lines) and, with matplotlib,
``mqar.png`` under ``--out-dir``; results are written after every run, so a later failure keeps the earlier runs.
``--merge`` adds the runs to the ``results.json`` already in ``--out-dir`` instead of replacing it (a run of the same
model and seed is replaced); ``--combine`` only merges finished results (files or directories) into a new report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from kla_tl.nn import KLAttention, RMSNorm
except ModuleNotFoundError:                               # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kla_tl.nn import KLAttention, RMSNorm

#: Published MQAR accuracies (%) at 1x/2x/4x/8x of the 256-token training length, single seed (KLA.md section 9).
PAPER = {"kla": [98.39, 98.16, 95.64, 73.84], "gdn": [98.72, 98.36, 94.31, 66.81]}
#: The issue's bar for a reproduction: accuracy (%) at 1x that both models must exceed.
BAR_1X = 95.0
#: Label of positions without a target (ignored by the loss and the accuracy).
IGNORE = -100
MODEL_NAMES = {"kla": "KLA", "gdn": "GDN"}
#: Keys of the configuration that define the data and the model: runs merged into one table must agree on them.
SETTING_KEYS = ("vocab_size", "seq_len", "num_pairs", "num_train", "num_val", "num_test", "power_a", "data_seed",
                "hidden", "layers", "heads", "head_dim_k", "head_dim_v", "mlp", "lengths")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: --deadline-minutes: seconds kept per run for the last validation, the tests at every length and the report.
RESERVE_S = 45.0


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------------------ data


def _distinct(rng: np.random.Generator, n: int, low: int, high: int, k: int, block: int = 1024) -> np.ndarray:
    """[n, k] rows of k distinct integers from [low, high), uniformly random in value and order."""
    out = np.empty((n, k), dtype=np.int64)
    for r0 in range(0, n, block):
        r = rng.random((min(block, n - r0), high - low))
        idx = np.argpartition(r, k - 1, axis=1)[:, :k]                      # the k smallest keys: a uniform k-subset
        order = np.argsort(np.take_along_axis(r, idx, 1), axis=1)          # ... in a uniformly random order
        out[r0:r0 + len(r)] = np.take_along_axis(idx, order, 1) + low
    return out


def make_mqar(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, *, power_a: float = 0.01,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR inputs and labels, both ``[num_examples, seq_len]`` int64 (labels: value at query positions, else -100)."""
    if seq_len % 2 or 4 * num_pairs > seq_len:
        raise ValueError(f"MQAR needs an even seq_len >= 4 * num_pairs, got seq_len={seq_len}, num_pairs={num_pairs}")
    if vocab_size // 2 - 1 < num_pairs:
        raise ValueError(f"vocab_size={vocab_size} is too small for {num_pairs} distinct keys")
    rng = np.random.default_rng(seed)
    n, P = num_examples, num_pairs
    keys = _distinct(rng, n, 1, vocab_size // 2, P)
    values = _distinct(rng, n, vocab_size // 2, vocab_size, P)
    inputs = rng.integers(0, vocab_size, size=(n, seq_len))                 # noise everywhere ...
    inputs[:, 0:2 * P:2], inputs[:, 1:2 * P:2] = keys, values                # ... but the pairs
    # Query slots: even offsets of the region after the pairs, P of them drawn without replacement with
    # p(i) ~ i^(a-1) (i = 1..space), by Gumbel top-k (equivalent to successive weighted draws).
    space = (seq_len - 2 * P) // 2
    logp = (power_a - 1.0) * np.log(np.arange(1, space + 1))
    gumbel = -np.log(-np.log(rng.random((n, space))))
    gaps = np.argpartition(-(logp + gumbel), P - 1, axis=1)[:, :P]
    pos = 2 * P + 2 * gaps
    rows = np.arange(n)[:, None]
    inputs[rows, pos] = keys
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    labels[rows, pos] = values
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def answers(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, targets)``, both ``[n, P]`` int64: the answer positions of every row (ascending) and their values.

    Every MQAR row has exactly P answers, so the loss and the accuracy need logits at these positions only.
    """
    mask = labels != IGNORE
    counts = mask.sum(1)
    P = int(counts[0]) if len(labels) else 0
    if not bool((counts == P).all()):
        raise ValueError("answers: every row must have the same number of labelled positions")
    pos = mask.nonzero()[:, 1].reshape(len(labels), P)
    return pos, labels.gather(1, pos)


def to_device(inputs: torch.Tensor, labels: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """``(inputs, positions, targets)`` on ``device`` (moved once; batches are then sliced on the device)."""
    pos, tgt = answers(labels)
    return inputs.to(device), pos.to(device), tgt.to(device)


# ----------------------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    head_dim_k: int = 48
    head_dim_v: int = 96
    mlp: int = 1024
    conv_size: int = 4
    gdn: bool = False


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc_1 = nn.Linear(hidden, inner, bias=False)
        self.fc_2 = nn.Linear(hidden, inner, bias=False)
        self.proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class Block(nn.Module):
    """Pre-norm block: x + mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm_1 = RMSNorm(cfg.hidden)
        self.attn = KLAttention(cfg.hidden, cfg.heads, cfg.head_dim_k, cfg.head_dim_v, conv_size=cfg.conv_size,
                                gdn=cfg.gdn, layer_idx=layer_idx)
        self.norm_2 = RMSNorm(cfg.hidden)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp)

    def forward(self, x):
        x = x + self.attn(self.norm_1(x))[0]
        return x + self.mlp(self.norm_2(x))


class MQARModel(nn.Module):
    """Embedding, pre-norm blocks, final RMSNorm, LM head tied to the embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.ln_f = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self):
        # The released models' "mamba init": embedding N(0, 0.02), Linear biases zero (eta's logit bias too), the MLP
        # output projection scaled down by sqrt(2 * layers); every other weight keeps torch's default init.
        nn.init.normal_(self.wte.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            with torch.no_grad():
                nn.init.kaiming_uniform_(blk.mlp.proj.weight, a=math.sqrt(5))
                blk.mlp.proj.weight /= math.sqrt(2 * self.cfg.layers)

    def forward(self, idx, positions=None):
        """Logits ``[B, T, vocab]``, or ``[B, P, vocab]`` at ``positions`` ``[B, P]`` only (the rest is per token,
        so the result equals the full logits gathered there)."""
        x = self.wte(idx)
        for blk in self.blocks:
            x = blk(x)
        if positions is not None:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(self.ln_f(x))


# ------------------------------------------------------------------------------------------------ train / evaluate


def _autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def accuracy(model, split, *, batch_size, device, amp) -> float:
    """Fraction of answer positions whose argmax prediction is the value; ``split`` is ``(inputs, positions,
    targets)`` from :func:`to_device`. One host read per call."""
    x, pos, tgt = split
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch_size):
        with _autocast(device, amp):
            logits = model(x[i:i + batch_size], pos[i:i + batch_size])
        correct += (logits.argmax(-1) == tgt[i:i + batch_size]).sum()
    model.train(was_training)
    return correct.item() / max(tgt.numel(), 1)


def make_optimizer(model, args, device):
    if args.respect_no_weight_decay:
        decay = [p for p in model.parameters() if not getattr(p, "_no_weight_decay", False)]
        keep = [p for p in model.parameters() if getattr(p, "_no_weight_decay", False)]
        groups = [{"params": decay}, {"params": keep, "weight_decay": 0.0}]
    else:                                              # the released MQAR script decays every parameter
        groups = model.parameters()
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95), **extra)


def train_one(name, seed, cfg: ModelConfig, data, args, device, budget_s: float = math.inf
              ) -> tuple[nn.Module, dict]:
    """Train one model for at most ``budget_s`` seconds of wall clock (checked after every step); return it with the
    best validation checkpoint loaded, and the run's record."""
    tag = f"[{name} seed {seed}]"
    torch.manual_seed(seed)
    model = MQARModel(cfg).to(device)
    opt = make_optimizer(model, args, device)
    xtr, ptr, ttr = data["train"]
    n, bs = len(xtr), args.batch_size
    gen = torch.Generator().manual_seed(seed)
    budget = budget_s
    perm, cursor = None, n
    step, best, best_step, best_state, bad, stop = 0, -1.0, 0, None, 0, None
    history = []
    loss_sum, loss_n = torch.zeros((), device=device), 0
    t0 = time.time()
    t_win, step_win = t0, 0                       # steps/s over the current window (reset after each evaluation)
    log(f"{tag} training: batch {bs}, lr {args.lr:g}, max {args.max_steps} steps"
        + (f", budget {budget / 60:.2f} min" if budget != math.inf else "")
        + f", validation every {args.val_interval} steps, patience {args.patience}")
    while stop is None:
        if cursor + bs > n:                       # a new epoch: one permutation, moved to the device once
            perm, cursor = torch.randperm(n, generator=gen).to(device), 0
        bi = perm[cursor:cursor + bs]
        cursor += bs
        with _autocast(device, args.amp):
            logits = model(xtr[bi], ptr[bi])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ttr[bi].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        loss_sum += loss.detach()
        loss_n += 1
        if step == 1:
            loss_val = loss.item()                # one read: the first step's time includes kernel compilation
            log(f"{tag} step 1 loss {loss_val:.4f}: first step took {time.time() - t0:.1f} s (kernel builds, "
                f"allocator warm-up)")
            t_win, step_win = time.time(), 1
        elapsed = time.time() - t0
        out_of_time = elapsed >= budget
        if step % args.log_interval == 0 and step > step_win:
            mean_loss = loss_sum.item() / loss_n  # the only host read between evaluations
            loss_sum.zero_()
            loss_n = 0
            now = time.time()
            sps = (step - step_win) / max(now - t_win, 1e-9)
            left = f", {(budget - elapsed) / 60:.1f} min left" if budget != math.inf else ""
            log(f"{tag} step {step} loss {mean_loss:.4f} | {sps:.1f} steps/s ({1e3 / max(sps, 1e-9):.1f} ms/step) "
                f"| {elapsed:.0f} s{left}")
        if step % args.val_interval == 0 or step >= args.max_steps or out_of_time:
            te = time.time()
            acc = accuracy(model, data["val"], batch_size=args.eval_batch_size, device=device, amp=args.amp)
            history.append({"step": step, "val_acc": acc, "time_s": round(time.time() - t0, 2)})
            if acc > best:
                best, best_step, bad = acc, step, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            log(f"{tag} step {step} val acc {100 * acc:.2f}% (best {100 * best:.2f}% at step {best_step}; "
                f"{bad} without gain) | eval {time.time() - te:.1f} s")
            if step >= args.max_steps:
                stop = "max_steps"
            elif out_of_time:
                stop = f"time budget ({budget / 60:.2f} min)"
            elif bad >= args.patience:
                stop = f"patience ({args.patience} validations without gain)"
            elif best >= args.target_acc:
                stop = f"target_acc ({100 * args.target_acc:.2f}%)"
            t_win, step_win = time.time(), step
    train_s = time.time() - t0
    log(f"{tag} stop at step {step}: {stop}; best val acc {100 * best:.2f}% at step {best_step}; "
        f"{train_s:.0f} s, {step / train_s:.1f} steps/s overall")
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, {"best_val_acc": best, "best_step": best_step, "steps": step, "stop_reason": stop,
                   "train_s": round(train_s, 1), "steps_per_s": round(step / train_s, 2), "history": history}


# ---------------------------------------------------------------------------------------------------------- report


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _fmt_min(s: float) -> str:
    return f"{s / 60:.1f} min"


def load_results(path: str) -> dict:
    """A results.json (a file, or a directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        return json.load(f)


def merge_runs(*run_lists) -> list:
    """Runs of several invocations, in order; a later run of the same (model, seed) replaces an earlier one."""
    out = {}
    for runs in run_lists:
        for r in runs:
            out[(r["model"], r["seed"])] = r
    order = list(MODEL_NAMES)
    return sorted(out.values(), key=lambda r: (order.index(r["model"]), r["seed"]))


def check_same_setting(runs) -> None:
    """Refuse to put runs of different data or model settings into one table."""
    ref = runs[0]["setting"]
    for r in runs[1:]:
        diff = {k: (ref.get(k), r["setting"].get(k)) for k in SETTING_KEYS if ref.get(k) != r["setting"].get(k)}
        if diff:
            raise SystemExit(f"cannot merge {r['model']} seed {r['seed']}: its setting differs from "
                             f"{runs[0]['model']} seed {runs[0]['seed']}'s in {diff}")


def write_report(out_dir: str, runs: list, combined_by: str | None = None) -> dict:
    """Write results.json, results.md and (with matplotlib) mqar.png for ``runs``; return the results dict.

    ``combined_by``: the command line that merged finished results into this report (``--combine``), recorded too.
    """
    check_same_setting(runs)
    os.makedirs(out_dir, exist_ok=True)
    setting = runs[0]["setting"]
    lengths = setting["lengths"]
    factors = [L // setting["seq_len"] for L in lengths]
    paper = all(r["paper_setting"] for r in runs)
    models = [m for m in MODEL_NAMES if any(r["model"] == m for r in runs)]
    summary = {}
    for m in models:
        rs = [r for r in runs if r["model"] == m]
        accs = np.array([[100 * r["test_acc"][str(L)] for L in lengths] for r in rs])
        summary[m] = {"mean": accs.mean(0).tolist(), "std": accs.std(0).tolist(), "seeds": [r["seed"] for r in rs]}

    head = "| model | seeds | " + " | ".join(f"{f}x ({L})" for f, L in zip(factors, lengths)) + " |"
    lines = [head, "|" + "---|" * (2 + len(lengths))]
    for m in models:
        s = summary[m]
        many = len(s["seeds"]) > 1
        cells = [f"{a:.2f}" + (f" ± {d:.2f}" if many else "") for a, d in zip(s["mean"], s["std"])]
        lines.append(f"| {MODEL_NAMES[m]} (kla-tl) | {len(s['seeds'])} | " + " | ".join(cells) + " |")
        if paper:
            lines.append(f"| {MODEL_NAMES[m]} (paper) | 1 | " + " | ".join(f"{a:.2f}" for a in PAPER[m]) + " |")
    table = "\n".join(lines)

    md = ["# MQAR accuracy (%) on answer positions", "",
          f"Trained at {setting['seq_len']} tokens with {setting['num_pairs']} key-value pairs, vocabulary "
          f"{setting['vocab_size']}, {setting['num_train']}/{setting['num_val']}/{setting['num_test']} "
          f"train/val/test examples (test: {setting['num_test']} per length); {setting['layers']}-layer d = "
          f"{setting['hidden']} models, {setting['heads']} heads, d_k = {setting['head_dim_k']}, "
          f"d_v = {setting['head_dim_v']}. Test accuracy of the best validation checkpoint."
          + (" Paper rows: the KLA paper's single-seed runs (KLA.md section 9)." if paper else ""), "", table, ""]
    if paper:
        checks = [f"{MODEL_NAMES[m]} {summary[m]['mean'][0]:.2f} "
                  f"({'above' if summary[m]['mean'][0] > BAR_1X else 'NOT above'})" for m in models]
        md += [f"Both models above {BAR_1X:.0f}% at 1x: " + "; ".join(checks) + ".", ""]
    md += ["## Runs", "", "| model | seed | steps | stopped by | train time | steps/s | best val acc (step) | device |",
           "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        md.append(f"| {MODEL_NAMES[r['model']]} | {r['seed']} | {r.get('steps', '?')} | {r.get('stop_reason', '?')} | "
                  f"{_fmt_min(r['train_s']) if 'train_s' in r else '?'} | {r.get('steps_per_s', '?')} | "
                  f"{100 * r.get('best_val_acc', float('nan')):.2f} ({r.get('best_step', '?')}) | "
                  f"{r.get('device', '?')} |")
    md += ["", "## Commands", "", "The command line of each run, from the repository root:", ""]
    for r in runs:
        md.append(f"- {MODEL_NAMES[r['model']]} seed {r['seed']}: `{r['command']}`  ")
        md.append(f"  {r.get('device', '?')}, torch {r.get('torch', '?')}, kla-tl {r.get('commit') or 'commit unknown'}"
                  f", {r.get('date', '?')}" + (f"; re-evaluated by `{r['eval_command']}`" if r.get("eval_command")
                                               else ""))
    if combined_by:
        md += ["", f"This report was put together from those runs' results by `{combined_by}`."]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    log("\n" + table)

    results = {"setting": setting, "paper_setting": paper, "paper": PAPER, "summary": summary, "runs": runs,
               "config": runs[-1]["config"], "combined_by": combined_by}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(out_dir, summary, lengths, setting, paper)
    return results


def _plot(out_dir, summary, lengths, setting, paper):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (m, s) in enumerate(summary.items()):
        ax.errorbar(lengths, s["mean"], yerr=s["std"] if len(s["seeds"]) > 1 else None, marker="o",
                    color=f"C{i}", label=f"{MODEL_NAMES[m]} (kla-tl)")
        if paper:
            ax.plot(lengths, PAPER[m], ls="--", marker="x", color=f"C{i}", alpha=0.6, label=f"{MODEL_NAMES[m]} (paper)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"MQAR, {setting['num_pairs']} pairs, trained at {lengths[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "mqar.png"), dpi=150)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ main


#: --smoke: tiny data and model, a few steps; on CPU every layer runs kla-tl's torch reference.
SMOKE = dict(vocab_size=128, seq_len=32, num_pairs=4, num_train=128, num_val=16, num_test=16, hidden=32, heads=2,
             head_dim_k=16, head_dim_v=16, mlp=64, batch_size=8, eval_batch_size=16, max_steps=6, val_interval=3,
             log_interval=3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="kla,gdn", help="comma list of kla, gdn")
    p.add_argument("--seeds", default="42", help="comma list of model seeds (the paper: one run, seed 42)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["bf16", "none"], default=None,
                   help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--out-dir", default="mqar_out")
    p.add_argument("--ckpt-dir", default=None,
                   help="where the best checkpoint of each run is saved / read (default: OUT_DIR/checkpoints)")
    p.add_argument("--no-save", action="store_true", help="do not save checkpoints")
    p.add_argument("--merge", action="store_true",
                   help="add the runs to OUT_DIR/results.json instead of replacing it (same model and seed: replaced)")
    p.add_argument("--combine", nargs="+", metavar="RESULTS",
                   help="no training: merge these results.json files (or directories holding one) into OUT_DIR")
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoints in --ckpt-dir, no training")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (CPU test)")
    d = p.add_argument_group("data")
    d.add_argument("--vocab-size", type=int, default=8192)
    d.add_argument("--seq-len", type=int, default=256, help="training length")
    d.add_argument("--num-pairs", type=int, default=32)
    d.add_argument("--num-train", type=int, default=20000)
    d.add_argument("--num-val", type=int, default=2000)
    d.add_argument("--num-test", type=int, default=2000, help="examples per test length")
    d.add_argument("--factors", default="1,2,4,8", help="test lengths as multiples of --seq-len")
    d.add_argument("--power-a", type=float, default=0.01, help="query-gap power law exponent (Zoology default)")
    d.add_argument("--data-seed", type=int, default=42)
    m = p.add_argument_group("model (the paper's MQAR models)")
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--head-dim-k", type=int, default=48)
    m.add_argument("--head-dim-v", type=int, default=96)
    m.add_argument("--mlp", type=int, default=1024)
    t = p.add_argument_group("training (the released MQAR script)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--eval-batch-size", type=int, default=100,
                   help="evaluation batch (default 100: divides 2000, so every batch has one shape)")
    t.add_argument("--lr", type=float, default=1e-3, help="constant learning rate (no schedule, as released)")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--respect-no-weight-decay", action="store_true",
                   help="exclude A_log and dt_bias from weight decay (the released script decays everything)")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=10000)
    t.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget of each run's training (kernel builds included): then validate, keep the\n"
                        "best checkpoint and test it. One model in a 10-minute call: 7")
    t.add_argument("--deadline-minutes", type=float, default=None,
                   help="wall-clock limit of the whole invocation (from main, after start-up): each run's\n"
                        f"training budget is cut so that every run, testing included ({RESERVE_S:.0f} s kept per\n"
                        "run), ends within it. Both models in one 10-minute call: 8.5")
    t.add_argument("--val-interval", type=int, default=200)
    t.add_argument("--patience", type=int, default=10, help="early stop after this many evaluations without gain")
    t.add_argument("--target-acc", type=float, default=1.01, help="stop once validation accuracy reaches this")
    t.add_argument("--log-interval", type=int, default=100)
    args = p.parse_args(argv)
    args.paper_setting = not args.smoke and all(p.get_default(k) == getattr(args, k) for k in (
        "vocab_size", "seq_len", "num_pairs", "num_train", "num_val", "num_test", "hidden", "layers", "heads",
        "head_dim_k", "head_dim_v", "mlp", "factors"))
    if args.smoke:
        for k, v in SMOKE.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.ckpt_dir is None:
        args.ckpt_dir = os.path.join(args.out_dir, "checkpoints")
    return args


def _command(argv) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
                   if k.startswith("KLA_TL_") or k == "TILELANG_CACHE_DIR")
    return (env + " " if env else "") + "python examples/mqar.py " + shlex.join(argv)


def _attention_path(device: torch.device, amp: str, cfg: ModelConfig, batch: int) -> str:
    """Which chunk_kla forward the training batches run (TileLang kernels, or the reference and why)."""
    try:
        from kla_tl.chunk import chunk_refusal
        from kla_tl.conventions import Problem
        dt = torch.bfloat16 if amp == "bf16" else torch.float32
        prob = Problem(B=batch, T=256, H=cfg.heads, HV=cfg.heads, K=cfg.head_dim_k, V=cfg.head_dim_v, N=batch,
                       dtype=dt, is_varlen=False, use_h0=False, normalize_q=True)
        reason = chunk_refusal(prob, device, needs_grad=False)
    except Exception as e:                                  # informational only
        return f"unknown ({type(e).__name__}: {e})"
    return "TileLang kernels (backward: kla-tl's torch chunk backward)" if reason is None else \
        f"torch reference ({reason})"


def _budget(args, runs_left: int, start: float) -> float:
    """Training seconds for the next run: --max-minutes, cut so that the runs left fit before --deadline-minutes
    (counted from ``start``)."""
    budget = args.max_minutes * 60.0 if args.max_minutes is not None else math.inf
    if args.deadline_minutes is not None:
        left = args.deadline_minutes * 60.0 - (time.time() - start) - RESERVE_S * runs_left
        budget = min(budget, max(left / runs_left, 0.0))
    return budget


def main(argv=None) -> dict:
    start = time.time()                      # --deadline-minutes counts from here (torch is loaded by now)
    args = parse_args(argv)
    command = _command(argv)
    if args.combine:
        runs = merge_runs(*(load_results(pth)["runs"] for pth in args.combine))
        res = write_report(args.out_dir, runs, combined_by=command)
        log(f"wrote {args.out_dir}/results.json, results.md from {len(runs)} runs")
        return res
    device = torch.device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODEL_NAMES]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; choose from {list(MODEL_NAMES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = [int(f) for f in args.factors.split(",")]
    lengths = [args.seq_len * f for f in factors]
    commit = _git_commit()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log(f"command: {command}")
    log(f"device: {_device_name(device)}, torch {torch.__version__}, amp {args.amp}, kla-tl {commit or '?'}")

    t0 = time.time()
    data = {"train": to_device(*make_mqar(args.num_train, args.seq_len, args.num_pairs, args.vocab_size,
                                          power_a=args.power_a, seed=args.data_seed), device),
            "val": to_device(*make_mqar(args.num_val, args.seq_len, args.num_pairs, args.vocab_size,
                                        power_a=args.power_a, seed=args.data_seed + 1), device)}
    tests = {L: to_device(*make_mqar(args.num_test, L, args.num_pairs, args.vocab_size, power_a=args.power_a,
                                     seed=args.data_seed + 2 + i), device) for i, L in enumerate(lengths)}
    log(f"data: {args.num_train}/{args.num_val}/{args.num_test} examples, length {args.seq_len} "
        f"(tests at {lengths}), {args.num_pairs} pairs, vocab {args.vocab_size} ({time.time() - t0:.1f} s)")

    setting = {k: getattr(args, k) for k in SETTING_KEYS if k != "lengths"}
    setting["lengths"] = lengths
    config = {k: v for k, v in vars(args).items() if k not in ("combine",)}
    previous = []
    if args.merge and os.path.exists(os.path.join(args.out_dir, "results.json")):
        previous = load_results(args.out_dir)["runs"]
        log(f"--merge: {len(previous)} earlier runs in {args.out_dir}/results.json")
    if not args.no_save:
        os.makedirs(args.ckpt_dir, exist_ok=True)
    runs, results = [], None
    n_runs = len(models) * len(seeds)
    for name in models:
        cfg = ModelConfig(vocab_size=args.vocab_size, hidden=args.hidden, layers=args.layers, heads=args.heads,
                          head_dim_k=args.head_dim_k, head_dim_v=args.head_dim_v, mlp=args.mlp, gdn=name == "gdn")
        log(f"[{name}] attention forward on {device.type}: {_attention_path(device, args.amp, cfg, args.batch_size)}")
        for seed in seeds:
            path = os.path.join(args.ckpt_dir, f"{name}_seed{seed}.pt")
            record = {"model": name, "seed": seed, "command": command, "device": _device_name(device),
                      "torch": str(torch.__version__), "commit": commit, "date": date,
                      "paper_setting": args.paper_setting, "setting": setting, "config": config}
            if args.eval_only:
                if not os.path.exists(path):
                    raise SystemExit(f"--eval-only: no checkpoint {path}")
                ck = torch.load(path, map_location="cpu")
                model = MQARModel(ModelConfig(**ck["config"])).to(device)
                model.load_state_dict(ck["state_dict"])
                trained = ck.get("record", {})
                record.update({k: v for k, v in trained.items() if k not in ("test_acc", "eval_command")})
                record["eval_command"] = command
            else:
                model, info = train_one(name, seed, cfg, data, args, device, _budget(args, n_runs - len(runs), start))
                record.update(info)
                if not args.no_save:
                    torch.save({"config": asdict(cfg), "state_dict": model.state_dict(), "record": record}, path)
            te = time.time()
            record["test_acc"] = {str(L): accuracy(model, tests[L], batch_size=args.eval_batch_size, device=device,
                                                   amp=args.amp) for L in lengths}
            log(f"[{name} seed {seed}] test acc " + ", ".join(f"{L}: {100 * a:.2f}%" for L, a in
                                                               record["test_acc"].items())
                + f" ({time.time() - te:.1f} s)")
            runs.append(record)
            results = write_report(args.out_dir, merge_runs(previous, runs))   # after every run
    log(f"wrote {args.out_dir}/results.json, results.md" + (", mqar.png" if os.path.exists(
        os.path.join(args.out_dir, "mqar.png")) else "") + f" ({time.time() - t0:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
