"""Multi-query associative recall (MQAR) with KLA and Gated DeltaNet layers from ``kla_tl.nn``.

Reproduces the MQAR setting of the KLA paper (KLA.md section 9): sequences of 256 tokens holding 32 key-value pairs
over a vocabulary of 8192, 20k/2k/2k train/val/test examples, 2-layer d = 256 models trained with AdamW, and accuracy
on the answers at 1x/2x/4x/8x the training length (same 32 pairs, longer sequences). Paper (single seed):
KLA 98.39/98.16/95.64/73.84, GDN 98.72/98.36/94.31/66.81.

Data (the Zoology MQAR protocol, arXiv 2312.04927): an example opens with the pairs ``k1 v1 k2 v2 ...``, keys drawn
without replacement from ``[1, vocab/2)`` and values from ``[vocab/2, vocab)``; every key is asked once later in the
sequence, at an even offset of the query region drawn without replacement with a power law ``p(i) ~ i^(a-1)``; the
label at a query position is its key's value, every other label is ignored; all other tokens are uniform noise.

Usage::

    python examples/mqar.py --smoke                       # CPU, tiny sizes, seconds
    python examples/mqar.py --device cuda                 # the paper setting, KLA and GDN, seed 42
    python examples/mqar.py --models kla --seeds 0,1,2 --max-steps 4000
    python examples/mqar.py --eval-only --out-dir mqar_out   # re-evaluate saved checkpoints

Writes ``results.json``, ``results.md`` and (with matplotlib) ``mqar.png`` under ``--out-dir``, and the best
checkpoint of every run under ``--out-dir/checkpoints``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
#: Label of positions without a target (ignored by the loss and the accuracy).
IGNORE = -100
MODEL_NAMES = {"kla": "KLA", "gdn": "GDN"}


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

    def forward(self, idx):
        x = self.wte(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


# ------------------------------------------------------------------------------------------------ train / evaluate


def _autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def accuracy(model, inputs, labels, *, batch_size, device, amp) -> float:
    """Fraction of answer positions whose argmax prediction is the value."""
    model.eval()
    correct = total = 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        with _autocast(device, amp):
            logits = model(x)
        mask = y != IGNORE
        correct += (logits.argmax(-1)[mask] == y[mask]).sum().item()
        total += mask.sum().item()
    model.train()
    return correct / max(total, 1)


def train_one(name, seed, cfg: ModelConfig, data, args, device) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = MQARModel(cfg).to(device)
    if args.respect_no_weight_decay:
        decay = [p for p in model.parameters() if not getattr(p, "_no_weight_decay", False)]
        keep = [p for p in model.parameters() if getattr(p, "_no_weight_decay", False)]
        groups = [{"params": decay}, {"params": keep, "weight_decay": 0.0}]
    else:                                              # the released MQAR script decays every parameter
        groups = model.parameters()
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    (xtr, ytr), (xva, yva) = data["train"], data["val"]
    gen = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(len(xtr), generator=gen), 0
    best, best_state, bad, step, t0 = -1.0, None, 0, 0, time.time()
    history = []
    while step < args.max_steps:
        if cursor + args.batch_size > len(xtr):
            perm, cursor = torch.randperm(len(xtr), generator=gen), 0
        bi = perm[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        x, y = xtr[bi].to(device), ytr[bi].to(device)
        with _autocast(device, args.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        if step % args.log_interval == 0:
            print(f"[{name} seed {seed}] step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        if step % args.val_interval == 0 or step == args.max_steps:
            acc = accuracy(model, xva, yva, batch_size=args.eval_batch_size, device=device, amp=args.amp)
            history.append({"step": step, "val_acc": acc, "loss": loss.item()})
            print(f"[{name} seed {seed}] step {step} val acc {100 * acc:.2f}%", flush=True)
            if acc > best:
                best, bad = acc, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= args.patience:
                    print(f"[{name} seed {seed}] early stop at step {step} (best val acc {100 * best:.2f}%)")
                    break
            if best >= args.target_acc:
                print(f"[{name} seed {seed}] val acc reached {100 * args.target_acc:.2f}%: stop")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, {"best_val_acc": best, "steps": step, "train_s": time.time() - t0, "history": history}


# ---------------------------------------------------------------------------------------------------------- report


def write_report(out_dir, results, lengths, factors) -> dict:
    """Write results.md (and mqar.png when matplotlib is present); return the per-model mean/std summary."""
    os.makedirs(out_dir, exist_ok=True)
    models = sorted({r["model"] for r in results["runs"]}, key=lambda m: list(MODEL_NAMES).index(m))
    head = "| model | seeds | " + " | ".join(f"{f}x ({L})" for f, L in zip(factors, lengths)) + " |"
    lines = [head, "|" + "---|" * (2 + len(lengths))]
    summary = {}
    for m in models:
        runs = [r for r in results["runs"] if r["model"] == m]
        accs = np.array([[100 * r["test_acc"][str(L)] for L in lengths] for r in runs])
        mean, std = accs.mean(0), accs.std(0)
        summary[m] = {"mean": mean.tolist(), "std": std.tolist(), "seeds": [r["seed"] for r in runs]}
        cells = [f"{a:.2f}" + (f" ± {s:.2f}" if len(runs) > 1 else "") for a, s in zip(mean, std)]
        lines.append(f"| {MODEL_NAMES[m]} (kla-tl) | {len(runs)} | " + " | ".join(cells) + " |")
    if results["config"]["paper_setting"]:
        for m in models:
            lines.append(f"| {MODEL_NAMES[m]} (paper) | 1 | " + " | ".join(f"{a:.2f}" for a in PAPER[m]) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("# MQAR accuracy (%) on answer positions\n\n" + table + "\n")
    print("\n" + table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return summary
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, m in enumerate(models):
        s = summary[m]
        ax.errorbar(lengths, s["mean"], yerr=s["std"] if len(s["seeds"]) > 1 else None, marker="o",
                    color=f"C{i}", label=f"{MODEL_NAMES[m]} (kla-tl)")
        if results["config"]["paper_setting"]:
            ax.plot(lengths, PAPER[m], ls="--", marker="x", color=f"C{i}", alpha=0.6, label=f"{MODEL_NAMES[m]} (paper)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"MQAR, {results['config']['num_pairs']} pairs, trained at {lengths[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "mqar.png"), dpi=150)
    plt.close(fig)
    return summary


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
    p.add_argument("--eval-only", action="store_true", help="evaluate the checkpoints in --out-dir, no training")
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
    t.add_argument("--eval-batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--respect-no-weight-decay", action="store_true",
                   help="exclude A_log and dt_bias from weight decay (the released script decays everything)")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=10000)
    t.add_argument("--val-interval", type=int, default=200)
    t.add_argument("--patience", type=int, default=10, help="early stop after this many evaluations without gain")
    t.add_argument("--target-acc", type=float, default=1.01, help="stop once validation accuracy reaches this")
    t.add_argument("--log-interval", type=int, default=50)
    args = p.parse_args(argv)
    args.paper_setting = not args.smoke and all(p.get_default(k) == getattr(args, k) for k in (
        "vocab_size", "seq_len", "num_pairs", "num_train", "hidden", "layers", "heads", "head_dim_k", "head_dim_v",
        "mlp", "factors"))
    if args.smoke:
        for k, v in SMOKE.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODEL_NAMES]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; choose from {list(MODEL_NAMES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = [int(f) for f in args.factors.split(",")]
    lengths = [args.seq_len * f for f in factors]

    t0 = time.time()
    data = {"train": make_mqar(args.num_train, args.seq_len, args.num_pairs, args.vocab_size,
                               power_a=args.power_a, seed=args.data_seed),
            "val": make_mqar(args.num_val, args.seq_len, args.num_pairs, args.vocab_size,
                             power_a=args.power_a, seed=args.data_seed + 1)}
    tests = {L: make_mqar(args.num_test, L, args.num_pairs, args.vocab_size, power_a=args.power_a,
                          seed=args.data_seed + 2 + i) for i, L in enumerate(lengths)}
    print(f"data: {args.num_train}/{args.num_val}/{args.num_test} examples, length {args.seq_len} "
          f"(tests at {lengths}), {args.num_pairs} pairs, vocab {args.vocab_size} ({time.time() - t0:.1f} s)")

    ckpt_dir = os.path.join(args.out_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    runs = []
    for name in models:
        cfg = ModelConfig(vocab_size=args.vocab_size, hidden=args.hidden, layers=args.layers, heads=args.heads,
                          head_dim_k=args.head_dim_k, head_dim_v=args.head_dim_v, mlp=args.mlp, gdn=name == "gdn")
        for seed in seeds:
            path = os.path.join(ckpt_dir, f"{name}_seed{seed}.pt")
            if args.eval_only:
                if not os.path.exists(path):
                    raise SystemExit(f"--eval-only: no checkpoint {path}")
                ck = torch.load(path, map_location="cpu")
                model = MQARModel(ModelConfig(**ck["config"])).to(device)
                model.load_state_dict(ck["state_dict"])
                info = ck["info"]
            else:
                model, info = train_one(name, seed, cfg, data, args, device)
                torch.save({"config": asdict(cfg), "state_dict": model.state_dict(), "info": info}, path)
            test_acc = {}
            for L in lengths:
                test_acc[str(L)] = accuracy(model, *tests[L], batch_size=args.eval_batch_size, device=device,
                                            amp=args.amp)
            print(f"[{name} seed {seed}] test acc " + ", ".join(f"{L}: {100 * a:.2f}%" for L, a in test_acc.items()))
            runs.append({"model": name, "seed": seed, "test_acc": test_acc,
                         **{k: v for k, v in info.items() if k != "history"}, "history": info.get("history", [])})
    config = {k: v for k, v in vars(args).items()}
    config["lengths"] = lengths
    results = {"config": config, "paper": PAPER, "runs": runs,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__}
    results["summary"] = write_report(args.out_dir, results, lengths, factors)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out_dir}/results.json, results.md" + (", mqar.png" if os.path.exists(
        os.path.join(args.out_dir, "mqar.png")) else "") + f" ({time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
