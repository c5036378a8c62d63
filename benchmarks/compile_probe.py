"""Proposal P3 probe: the tracker's per-tensor math as one torch.compile'd kernel vs today's eager foreach math.

Adam foreach, 10M parameters in 10 tensors (CPU). Prints the bare optimizer step, the eager tracker math
(adapter η, min, ‖η⊙g‖², oscillation, Ση, keep η) and the compiled kernel, alternated 7 times (medians), and
checks the compiled min and Ση against eager. Run: ``python benchmarks/compile_probe.py``.
"""
import os, statistics, sys, time

import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench
N=10_000_000; T=10
params=bench.make_params(N); opt=torch.optim.Adam(params, lr=1e-3, foreach=True); opt.step(); opt.step()
states=[opt.state[p] for p in params]; grads=[p.grad for p in params]
prev=[torch.rand_like(p) for p in params]

def per_tensor(v, g, prev, s, c, eps):
    eta = s / (v.sqrt() / c + eps)
    d = eta - prev
    r = torch.stack([eta.min().double(), (eta * g).double().square().sum(), d.abs().sum(dtype=torch.float64),
                     d.double().square().sum(), eta.sum(dtype=torch.float64)])
    prev.copy_(eta)
    return r

t0=time.perf_counter()
cf = torch.compile(per_tensor, dynamic=False, fullgraph=True)
def compiled_all():
    t = float(states[0]["step"])
    s = torch.tensor(1e-3/(1-0.9**t), dtype=torch.float32); c = torch.tensor((1-0.999**t)**0.5, dtype=torch.float32)
    rows = [cf(st["exp_avg_sq"], g, p, s, c, 1e-8) for st, g, p in zip(states, grads, prev)]
    return torch.stack(rows)
compiled_all(); print("compile s", time.perf_counter()-t0)
# baseline tracker math (current package functions), measured in the same process
from lightning_adamtype.adapters import AdamAdapter
from lightning_adamtype.conditions import *
ad=AdamAdapter(); g0=opt.param_groups[0]
prev2=[p.clone() for p in prev]
def baseline():
    etas=ad.effective_stepsizes(g0, states); d=torch.float64
    r=(min_stepsize(etas,d), squared_step_norm(etas,grads,d), oscillation(etas,prev2,d)[:2], stepsize_sum(etas,d))
    prev2[:] = etas
    return r
def tm(f):
    t=time.perf_counter(); f(); f(); f(); return (time.perf_counter()-t)/3*1e3
res={"bare":[], "baseline":[], "compiled":[]}
for _ in range(7):
    res["bare"].append(tm(opt.step)); res["baseline"].append(tm(baseline)); res["compiled"].append(tm(compiled_all))
for k,v in res.items(): print(f"{k:10s} {statistics.median(v):8.2f} ms")
# correctness vs eager
e=[AdamAdapter().effective_stepsizes(g0, states)][0]
r=compiled_all()
print("min ok", torch.allclose(r[:,0].min(), torch.stack([x.min() for x in e]).double().min()),
      "sum rel", ((r[:,4].sum()-sum(x.double().sum() for x in e))/r[:,4].sum()).item())
