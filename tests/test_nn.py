"""CPU tests of :mod:`kla_tl.nn` (``KLAttention`` on the torch reference) and of the MQAR example.

Claims checked: forward and backward give finite gradients for every parameter; prefill + token-by-token decode with
the cache reproduces the full-sequence forward; packed sequences (``cu_seqlens``) reproduce separate ones, outputs,
caches and gradients, and the convolution never reads across a boundary; the ``gdn`` switch is Gated DeltaNet
(beta = eta up to the documented eps) and KLA is GDN with keys and values divided by sqrt(||k||^2 + eps) (KLA.md
section 4); GVA and the published head dims run; the MQAR generator and ``--smoke`` run work.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_rel_close
from kla_tl.nn import KLACache, KLAttention, ShortConvolution
from kla_tl.reference import l2norm

F64 = torch.float64
#: float64 layer vs float64 layer through different but exact paths (chunk vs token recurrence, packed vs separate):
#: rounding only, observed ~1e-15.
TOL_F64 = 1e-10
#: float32 layer, same comparison: fp32 rounding (6e-8) grown through the projections, the chunk solve and the norm.
TOL_F32 = 1e-5
#: gdn layer vs a beta = eta GDN recurrence: kla-tl computes beta = eta / (||k^||^2 + 1e-6) with
#: ||k^||^2 = s / (s + 1e-6), a relative change of at most 1e-6 max(1, 1/s) per token; the smallest per-head
#: s = ||k||^2 here is ~1e-2 (beta off by up to 1e-4), and the output moves by ~1e-5.
TOL_GDN_EPS = 1e-4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layer(hidden=32, H=2, K=8, V=16, HV=None, gdn=False, dtype=F64, seed=0, conv_size=4):
    torch.manual_seed(seed)
    layer = KLAttention(hidden, H, K, V, num_v_heads=HV, gdn=gdn, conv_size=conv_size).to(dtype)
    with torch.no_grad():                  # non-zero eta bias and output-norm weight, so both show up in every check
        layer.b_proj.bias.uniform_(-1.0, 1.0)
        layer.o_norm.weight.uniform_(0.5, 1.5)
    return layer


def _x(B, T, hidden=32, dtype=F64, seed=1):
    return torch.randn(B, T, hidden, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gdn_recurrence(q, k, v, g, beta, scale):
    """Gated DeltaNet token by token (S in R^{K x V}, decay first): q, k [B, T, H, K] used as given."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    q, k = q.repeat_interleave(HV // H, 2), k.repeat_interleave(HV // H, 2)
    S = torch.zeros(B, HV, K, V, dtype=v.dtype)
    out = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None, None] * S
        kt = k[:, t]
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + beta[:, t][..., None, None] * kt[..., :, None] * err[..., None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1)


# ------------------------------------------------------------------------------------------------ forward/backward


@pytest.mark.parametrize("gdn", [False, True], ids=["kla", "gdn"])
def test_forward_and_backward_give_finite_grads_for_every_parameter(gdn):
    layer = _layer(HV=4, gdn=gdn, dtype=torch.float32)
    x = _x(2, 70, dtype=torch.float32).requires_grad_()      # 70 tokens: two chunks of the reference
    y, cache = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype and cache is None
    (y * _x(2, 70, dtype=torch.float32, seed=7)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name}: gradient is all zero"


def test_gate_init_ranges_and_no_weight_decay_marks():
    layer = KLAttention(64, 4, 16, 16, num_v_heads=8)
    A, dt = layer.A_log.exp(), F.softplus(layer.dt_bias)
    assert layer.A_log.shape == layer.dt_bias.shape == (8,)
    assert (A > 0).all() and (A <= 16).all()
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
    marked = {n for n, p in layer.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert marked == {"A_log", "dt_bias"}
    x = _x(1, 5, 64, dtype=torch.float32)
    _, _, _, g, eta, _ = layer.kernel_inputs(x)
    assert g.dtype == eta.dtype == torch.float32 and (g <= 0).all() and ((eta > 0) & (eta < 1)).all()


# -------------------------------------------------------------------------------------------------------- decode


DECODE_CASES = [
    # (dtype, T, prefill, gdn): prefill 0 starts from init_cache; 66 of 70 crosses a 64-token chunk
    (F64, 12, 5, False),
    (F64, 12, 5, True),
    (F64, 70, 66, False),
    (F64, 6, 0, False),
    (torch.float32, 12, 5, False),
    (torch.float32, 12, 5, True),
]


@pytest.mark.parametrize("dtype,T,prefill,gdn", DECODE_CASES,
                         ids=[f"{str(c[0])[6:]}-T{c[1]}-pre{c[2]}-{'gdn' if c[3] else 'kla'}" for c in DECODE_CASES])
def test_prefill_then_decode_token_by_token_equals_full_forward(dtype, T, prefill, gdn):
    layer = _layer(HV=4, gdn=gdn, dtype=dtype)
    x = _x(3, T, dtype=dtype)
    tol = TOL_F64 if dtype == F64 else TOL_F32
    with torch.no_grad():
        y_full, c_full = layer(x, use_cache=True)
        if prefill:
            y0, cache = layer(x[:, :prefill], use_cache=True)
            outs = [y0]
        else:
            cache, outs = layer.init_cache(3, dtype=dtype), []
        for t in range(prefill, T):
            yt, cache2 = layer(x[:, t:t + 1], cache=cache)
            assert cache2 is cache
            outs.append(yt)
    assert_rel_close("y (prefill + decode)", torch.cat(outs, 1), y_full, tol)
    assert_rel_close("cache.state", cache.state, c_full.state, tol)
    for name in ("conv_q", "conv_k", "conv_v"):
        assert_rel_close(f"cache.{name}", getattr(cache, name), getattr(c_full, name), tol)
    assert cache.state.dtype == (F64 if dtype == F64 else torch.float32)
    assert cache.seen_tokens == T


# ------------------------------------------------------------------------------------------------------ varlen


def test_packed_sequences_equal_separate_sequences_outputs_caches_and_grads():
    layer = _layer(HV=4)
    lens = [5, 0, 11, 1, 70]                 # an empty sequence, one shorter than the conv window, one over a chunk
    xs = [_x(1, L, seed=10 + i) for i, L in enumerate(lens)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    xp = torch.cat(xs, 1)
    w = _x(1, xp.shape[1], seed=99)

    yp, cp = layer(xp, cu_seqlens=cu, use_cache=True)
    (yp * w).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    total = 0.0
    for i, x in enumerate(xs):
        y, c = layer(x, use_cache=True)
        a, b = int(cu[i]), int(cu[i + 1])
        assert_rel_close(f"y of sequence {i}", yp[:, a:b], y, TOL_F64)
        for name in ("state", "conv_q", "conv_k", "conv_v"):
            assert_rel_close(f"cache.{name} of sequence {i}", getattr(cp, name)[i:i + 1], getattr(c, name), TOL_F64)
        total = total + (y * w[:, a:b]).sum()
    total.backward()
    for n, p in layer.named_parameters():
        assert_rel_close(f"grad {n}", grads_packed[n], p.grad, TOL_F64)


def test_packed_prefill_cache_continues_as_a_batch():
    """A packed prefill's cache (one entry per sequence) serves both a packed continuation and a batched decode."""
    layer = _layer(HV=4)
    lens, more = [4, 9, 2], [3, 1, 6]
    full = [_x(1, a + b, seed=20 + i) for i, (a, b) in enumerate(zip(lens, more))]

    def packed(parts):
        return torch.cat(parts, 1), torch.tensor([0] + list(torch.tensor([p.shape[1] for p in parts]).cumsum(0)))

    with torch.no_grad():
        ref = [layer(x)[0] for x in full]
        xp, cu = packed([x[:, :a] for x, a in zip(full, lens)])
        _, cache = layer(xp, cu_seqlens=cu, use_cache=True)
        dec_cache = cache.clone()
        # packed continuation from the cache
        xp2, cu2 = packed([x[:, a:] for x, a in zip(full, lens)])
        y2, _ = layer(xp2, cu_seqlens=cu2, cache=cache)
        for i, (a, b) in enumerate(zip(cu2[:-1].tolist(), cu2[1:].tolist())):
            assert_rel_close(f"continued y of sequence {i}", y2[:, a:b], ref[i][:, lens[i]:], TOL_F64)
        # batched decode of the next token of every sequence: x [N, 1, hidden]
        step = torch.cat([x[:, a:a + 1] for x, a in zip(full, lens)], 0)
        y3, _ = layer(step, cache=dec_cache)
        want = torch.cat([r[:, a:a + 1] for r, a in zip(ref, lens)], 0)
        assert_rel_close("batched decode after packed prefill", y3, want, TOL_F64)


def test_short_convolution_reads_nothing_across_a_packed_boundary():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4).double()
    cu = [0, 3, 8]
    x = torch.randn(1, 8, 6, dtype=F64)
    y, st = conv(x, None, cu)
    x2 = x.clone()
    x2[:, :3] += 100.0                                      # change only the first sequence
    y2, st2 = conv(x2, None, cu)
    assert torch.equal(y[:, 3:], y2[:, 3:]) and torch.equal(st[1], st2[1])
    # the first output of sequence 2 sees only its own first token (zero history)
    want = F.silu(conv.weight[:, -1] * x[0, 3])
    assert_rel_close("first output of sequence 2", y[0, 3], want, TOL_F64)
    # the state of the 3-token sequence is its 3 inputs; of the 5-token one, its last 3
    assert torch.equal(st[0], x[0, 0:3]) and torch.equal(st[1], x[0, 5:8])


# ----------------------------------------------------------------------------------------------------- gdn vs kla


def test_gdn_layer_equals_gated_deltanet_with_beta_eta():
    layer = _layer(HV=4, gdn=True)
    x = _x(2, 20)
    with torch.no_grad():
        q, k, v, g, eta, _ = layer.kernel_inputs(x)
        assert_rel_close("gdn keys are unit", (k * k).sum(-1), torch.ones(k.shape[:3], dtype=F64), 1e-4)
        scale = layer.head_dim_k ** -0.5
        got = layer(x)[0]
        want = layer.output(_gdn_recurrence(l2norm(q), k, v, g, eta, scale), x)
        # the whole difference is kla-tl's beta = eta / (||k^||^2 + eps) on the normalized keys:
        beta = eta / ((k * k).sum(-1) + 1e-6).repeat_interleave(layer.num_v_heads // layer.num_heads, 2)
        exact = layer.output(_gdn_recurrence(l2norm(q), k, v, g, beta, scale), x)
    assert_rel_close("gdn layer vs GDN (beta = eta)", got, want, TOL_GDN_EPS)
    assert_rel_close("gdn layer vs GDN (beta = eta / (||k^||^2 + eps))", got, exact, TOL_F64)


def test_kla_layer_equals_gdn_on_normalized_keys_and_scaled_values():
    """KLA.md section 4: KLA == GDN with k^ = k / r, v' = v / r, beta = eta, r = sqrt(||k||^2 + eps), exactly."""
    layer = _layer(HV=4, gdn=False)
    x = _x(2, 20)
    with torch.no_grad():
        q, k, v, g, eta, _ = layer.kernel_inputs(x)
        r = torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)              # [B, T, H, 1]
        r_v = r.repeat_interleave(layer.num_v_heads // layer.num_heads, 2)
        o = _gdn_recurrence(l2norm(q), k / r, v / r_v, g, eta, layer.head_dim_k ** -0.5)
        want = layer.output(o, x)
        got = layer(x)[0]
    assert_rel_close("kla layer vs GDN(k/r, v/r, eta)", got, want, TOL_F64)


def test_gdn_and_kla_differ_only_in_the_keys():
    kla, gdn = _layer(gdn=False), _layer(gdn=True)
    gdn.load_state_dict(kla.state_dict())
    x = _x(2, 9)
    with torch.no_grad():
        a, b = kla.kernel_inputs(x), gdn.kernel_inputs(x)
    for name, j in (("q", 0), ("v", 2), ("g", 3), ("eta", 4)):
        assert torch.equal(a[j], b[j]), name
    assert_rel_close("gdn k = l2norm(kla k)", b[1], l2norm(a[1]), TOL_F64)


# ------------------------------------------------------------------------------------------------ shapes, errors


@pytest.mark.parametrize("H,HV", [(2, 2), (2, 4), (1, 4)], ids=["mha", "gva2", "gva4"])
def test_gva_shapes_forward_cache_and_decode(H, HV):
    layer = _layer(H=H, HV=HV, K=8, V=12, dtype=torch.float32)
    x = _x(2, 7, dtype=torch.float32)
    q, k, v, g, eta, _ = layer.kernel_inputs(x)
    assert q.shape == k.shape == (2, 7, H, 8) and v.shape == (2, 7, HV, 12) and g.shape == eta.shape == (2, 7, HV)
    with torch.no_grad():
        y, cache = layer(x, use_cache=True)
        assert y.shape == (2, 7, 32)
        assert cache.state.shape == (2, HV, 8, 12) and cache.conv_q.shape == (2, 3, H * 8)
        assert cache.conv_v.shape == (2, 3, HV * 12)
        y1, _ = layer(_x(2, 1, dtype=torch.float32, seed=5), cache=cache)
    assert y1.shape == (2, 1, 32) and torch.isfinite(y1).all()


def test_published_head_dims_construct_and_run():
    layer = KLAttention(1536, 12, 96, 192)            # the "0.4B" model's layer: key_dim 0.75 h, value_dim 1.5 h
    assert layer.key_dim == 1152 and layer.value_dim == 2304
    h, kd, vd, H = 1536, 1152, 2304, 12
    want = h * (2 * kd + 2 * vd) + 4 * (2 * kd + vd) + h * H + (h * H + H) + 192 + vd * h + 2 * H
    assert sum(p.numel() for p in layer.parameters()) == want
    with torch.no_grad():
        y, _ = layer(torch.randn(1, 8, 1536))
    assert y.shape == (1, 8, 1536) and torch.isfinite(y).all()


def test_rejects_bad_inputs_and_names_them():
    layer = _layer(HV=4)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(5, 32, dtype=F64))
    with pytest.raises(ValueError, match="hidden_size=32"):
        layer(torch.randn(1, 5, 16, dtype=F64))
    with pytest.raises(ValueError, match=r"B \(x.shape\[0\]\) must be 1"):
        layer(_x(2, 5), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="cache does not fit"):
        layer(_x(2, 5), cache=layer.init_cache(3))
    with pytest.raises(ValueError, match="N=2 sequences"):
        layer(_x(1, 5), cu_seqlens=torch.tensor([0, 2, 5]), cache=layer.init_cache(1))
    with pytest.raises(TypeError, match="KLACache"):
        layer(_x(1, 5), cache=(1, 2))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        KLAttention(32, 3, 8, 8, num_v_heads=4)
    assert isinstance(layer.init_cache(1), KLACache)


# --------------------------------------------------------------------------------------------------------- MQAR


def _load_mqar():
    spec = importlib.util.spec_from_file_location("mqar_example", os.path.join(ROOT, "examples", "mqar.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                     # dataclasses resolve the module through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_mqar_generator_asks_every_key_once_with_its_value():
    mqar = _load_mqar()
    P, L, vocab = 8, 96, 256
    x, y = mqar.make_mqar(50, L, P, vocab, seed=3)
    assert x.shape == y.shape == (50, L) and x.dtype == y.dtype == torch.int64
    keys, values = x[:, 0:2 * P:2], x[:, 1:2 * P:2]
    assert (keys >= 1).all() and (keys < vocab // 2).all() and (values >= vocab // 2).all() and (values < vocab).all()
    for i in range(50):
        assert len(set(keys[i].tolist())) == P and len(set(values[i].tolist())) == P
        pos = (y[i] != mqar.IGNORE).nonzero().flatten()
        assert len(pos) == P and (pos >= 2 * P).all() and ((pos - 2 * P) % 2 == 0).all()
        table = dict(zip(keys[i].tolist(), values[i].tolist()))
        assert sorted(x[i, pos].tolist()) == sorted(table)                     # every key asked once
        assert all(table[int(x[i, p])] == int(y[i, p]) for p in pos)          # label = its value
    x2, y2 = mqar.make_mqar(50, L, P, vocab, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_mqar_smoke_run_trains_evaluates_and_writes_results(tmp_path):
    mqar = _load_mqar()
    out = tmp_path / "mqar"
    res = mqar.main(["--smoke", "--out-dir", str(out), "--device", "cpu"])
    assert {r["model"] for r in res["runs"]} == {"kla", "gdn"}
    for r in res["runs"]:
        assert set(r["test_acc"]) == {"32", "64", "128", "256"}
        assert all(0.0 <= a <= 1.0 for a in r["test_acc"].values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["smoke"] is True and saved["summary"].keys() == {"kla", "gdn"}
    assert "| KLA (kla-tl) |" in (out / "results.md").read_text()
    again = mqar.main(["--smoke", "--out-dir", str(out), "--device", "cpu", "--eval-only", "--models", "kla"])
    assert again["runs"][0]["test_acc"] == res["runs"][0]["test_acc"]


def test_mqar_separate_invocations_merge_into_one_table(tmp_path):
    """One model per invocation (as on a time-limited GPU), then one table: --combine and --merge, with time budgets
    (--max-minutes, --deadline-minutes) that stop training after its first step and still validate, restore the best
    and test."""
    mqar = _load_mqar()
    a, b, both = tmp_path / "kla", tmp_path / "gdn", tmp_path / "both"
    ra = mqar.main(["--smoke", "--device", "cpu", "--models", "kla", "--out-dir", str(a), "--no-save"])
    rb = mqar.main(["--smoke", "--device", "cpu", "--models", "gdn", "--out-dir", str(b), "--no-save",
                    "--max-minutes", "0"])
    (run_b,) = rb["runs"]
    assert run_b["steps"] == 1 and run_b["stop_reason"].startswith("time budget")
    assert [h["step"] for h in run_b["history"]] == [1]
    combined = mqar.main(["--combine", str(a), str(b / "results.json"), "--out-dir", str(both)])
    assert [r["model"] for r in combined["runs"]] == ["kla", "gdn"]
    assert combined["runs"][0]["test_acc"] == ra["runs"][0]["test_acc"]
    assert combined["runs"][1]["test_acc"] == run_b["test_acc"]
    md = (both / "results.md").read_text()
    for line in ("| KLA (kla-tl) |", "| GDN (kla-tl) |", "--models kla", "--models gdn --out-dir", "--combine"):
        assert line in md, line
    assert json.loads((both / "results.json").read_text())["summary"].keys() == {"kla", "gdn"}
    # --merge: the second invocation adds its run to the first one's results.json
    mqar.main(["--smoke", "--device", "cpu", "--models", "gdn", "--out-dir", str(a), "--no-save", "--merge",
               "--deadline-minutes", "0"])                   # a deadline already passed: one step, then test
    merged = json.loads((a / "results.json").read_text())
    assert [r["model"] for r in merged["runs"]] == ["kla", "gdn"] and merged["runs"][1]["steps"] == 1
    assert merged["runs"][0]["command"] == ra["runs"][0]["command"]
    # runs of different settings are never put into one table
    c = tmp_path / "other"
    mqar.main(["--smoke", "--device", "cpu", "--models", "kla", "--out-dir", str(c), "--no-save", "--seeds", "1",
               "--num-pairs", "2"])
    with pytest.raises(SystemExit, match="setting differs"):
        mqar.main(["--combine", str(a), str(c), "--out-dir", str(tmp_path / "bad")])


def test_mqar_loss_at_answer_positions_equals_full_logits_loss():
    """The training loss from logits at the answer positions only equals cross-entropy over all positions with the
    other labels ignored (the released loss)."""
    mqar = _load_mqar()
    x, y = mqar.make_mqar(6, 40, 4, 64, seed=1)
    pos, tgt = mqar.answers(y)
    assert pos.shape == tgt.shape == (6, 4) and torch.equal(y.gather(1, pos), tgt)
    torch.manual_seed(0)
    model = mqar.MQARModel(mqar.ModelConfig(vocab_size=64, hidden=16, heads=2, head_dim_k=8, head_dim_v=8, mlp=32))
    with torch.no_grad():
        full = model(x)
        part = model(x, pos)
        want = F.cross_entropy(full.reshape(-1, 64), y.reshape(-1), ignore_index=mqar.IGNORE)
        got = F.cross_entropy(part.flatten(0, 1), tgt.flatten())
    assert_rel_close("logits at the answers", part, full.gather(1, pos[..., None].expand(-1, -1, 64)), 1e-6)
    assert_rel_close("loss", got, want, 1e-6)
