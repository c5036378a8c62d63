"""Probe: is a read-then-write of the same buffer in one Triton kernel slow here, and why? CUDA only.
(Investigation of the STORED mode of lightning_adamtype.triton_kernels; kept with its numbers in benchmarks/README.md.)"""
import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def k_inplace(v_ptr, g_ptr, eta_ptr, out_ptr, partial, n, BLOCK: tl.constexpr, SEPARATE: tl.constexpr, REDUCE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    eta = 1e-3 / (tl.sqrt(v) + 1e-8)
    prev = tl.load(eta_ptr + offs, mask=mask, other=0.0)
    d = tl.where(mask, eta - prev, 0.0)
    if SEPARATE:
        tl.store(out_ptr + offs, eta, mask=mask)
    else:
        tl.store(eta_ptr + offs, eta, mask=mask)
    if REDUCE:
        tl.store(partial + pid, tl.sum(tl.abs(d), axis=0) + tl.sum(eta * g, axis=0))


def main():
    n = 100_000_000
    v = torch.rand(n, device="cuda") * 1e-3
    g = torch.randn(n, device="cuda")
    eta = torch.rand(n, device="cuda")
    out = torch.empty(n, device="cuda")
    for block in (1024, 4096):
        partial = torch.empty(triton.cdiv(n, block), device="cuda")
        for separate in (False, True):
            for reduce in (False, True):
                ms = triton.testing.do_bench(
                    lambda: k_inplace[(triton.cdiv(n, block),)](v, g, eta, out, partial, n, BLOCK=block, SEPARATE=separate, REDUCE=reduce),
                    return_mode="median")
                print(f"BLOCK {block} separate={separate} reduce={reduce}: {ms:.3f} ms, {16 * n / ms / 1e9:.2f} TB/s", flush=True)
    ms = triton.testing.do_bench(lambda: eta.mul_(1.0001), return_mode="median")
    print(f"torch eta.mul_: {ms:.3f} ms {8 * n / ms / 1e9:.2f} TB/s")


if __name__ == "__main__":
    main()
