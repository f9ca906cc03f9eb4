"""Time the two chunk-forward kernels separately (chunk_prepare, chunk_scan) for a few scan schedules, on a GPU.

This produced the prepare/scan split quoted in the README (H100: prepare 0.61 ms, scan 0.33 ms at B=8, T=4096, H=16).

    python tools/profile_chunk_fwd.py sm_90a [sm_80]      # also writes the timings to prof.json
"""
import json
import sys
import torch

from kla_tl.kernels.chunk_fwd import build_prepare, build_scan
from kla_tl.chunk import _tables
from kla_tl.conventions import Problem

VARIANTS = [dict(block_v=64, threads=128, num_stages=1, warp_specialize=False),
            dict(block_v=32, threads=128, num_stages=2, warp_specialize=True),
            dict(block_v=32, threads=128, num_stages=1, warp_specialize=False)]
PREPS = [dict(threads=128)]

def setup(B, T, H, K, V):
    HV = H; TT = B * T; dev = 'cuda'; bf = torch.bfloat16
    prob = Problem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=B, dtype=bf, is_varlen=False, use_h0=False, normalize_q=True)
    seqs, chunks, _ = _tables(prob, None, torch.device(dev))
    t = dict(q=torch.randn(1, TT, H, K, device=dev, dtype=bf), k=torch.randn(1, TT, H, K, device=dev, dtype=bf),
             v=torch.randn(1, TT, HV, V, device=dev, dtype=bf),
             g=torch.nn.functional.logsigmoid(torch.randn(1, TT, HV, device=dev) + 2), eta=torch.rand(1, TT, HV, device=dev),
             w=torch.empty(1, TT, HV, K, device=dev, dtype=bf), u=torch.empty(1, TT, HV, V, device=dev, dtype=bf),
             aqk=torch.empty(1, TT, HV, 64, device=dev, dtype=bf), gcum=torch.empty(1, TT, HV, device=dev),
             rq=torch.empty(1, TT, H, device=dev), rk=torch.empty(1, TT, H, device=dev),
             o=torch.empty(1, TT, HV, V, device=dev, dtype=bf), ht=torch.empty(B, HV, K, V, device=dev))
    return prob, seqs, chunks, t

def main(arch):
    import triton.testing as tt
    on_hop = arch == "sm_80"
    out = []
    for (B, T, H, K, V) in [(8, 4096, 16, 128, 128), (2, 16384, 16, 128, 128), (8, 4096, 12, 96, 192)]:
        prob, seqs, chunks, t = setup(B, T, H, K, V)
        key = {"H": H, "HV": H, "K": K, "V": V, "dtype": "bfloat16", "normalize_q": True, "use_h0": False, "store_ht": True}
        for p in PREPS:
            kp = build_prepare(arch, key, p, run_on_hopper=on_hop)
            f = lambda: kp(t['q'], t['k'], t['v'], t['g'], t['eta'], chunks, t['w'], t['u'], t['aqk'], t['gcum'], t['rq'], t['rk'])
            f(); torch.cuda.synchronize()
            out.append((arch, (B, T, H, K, V), "prep", p, tt.do_bench(f, warmup=20, rep=100, return_mode="median")))
            print(out[-1], flush=True)
        for s in VARIANTS:
            if (on_hop and (s["num_stages"] != 1 or s["warp_specialize"])) or (K == 96 and s["warp_specialize"]):
                continue
            try:
                ks = build_scan(arch, key, s, run_on_hopper=on_hop)
            except Exception as e:
                print("build fail", s, str(e)[-200:]); continue
            f = lambda: ks(t['q'], t['k'], t['w'], t['u'], t['aqk'], t['gcum'], t['rq'], t['rk'], seqs, t['ht'], t['o'], t['ht'])
            f(); torch.cuda.synchronize()
            out.append((arch, (B, T, H, K, V), "scan", s, tt.do_bench(f, warmup=20, rep=100, return_mode="median")))
            print(out[-1], flush=True)
    return out

if __name__ == "__main__":
    res = []
    for a in sys.argv[1:]:
        res += main(a)
    with open("prof.json", "w") as f:
        json.dump(res, f, default=str)
