"""GPU check: every mechanism against its dense oracle on CUDA, then forward timings.

    PYTHONPATH=src python scripts/gpu_check.py [--no-bench]
"""

import sys
import time

import torch

import longrange as lr


def check_correctness(dev):
    torch.manual_seed(0)
    worst = {}
    for name in lr.list_attentions():
        cls = lr.mechanisms.ATTENTIONS.get(name)[1]
        for cfg in cls.test_configs():
            m = lr.build_attention(name, dim=32, heads=2, **cfg).double().to(dev)
            for n in (1, 7, 33):
                x = torch.randn(2, n, 32, dtype=torch.float64, device=dev, requires_grad=True)
                keep = torch.rand(2, n, device=dev) > 0.3
                keep[1] = False  # a fully padded example
                extra = {"global_mask": torch.rand(2, n, device=dev) > 0.7} if cls.supports_global_mask else {}
                a = m(x, attention_mask=keep, **extra)
                (ga,) = torch.autograd.grad(a.square().sum(), x)
                r = m.reference_forward(x, attention_mask=keep, **extra)
                (gr,) = torch.autograd.grad(r.square().sum(), x)
                err = max((a - r).abs().max().item(), (ga - gr).abs().max().item())
                worst[name] = max(worst.get(name, 0.0), err)
    for name, err in worst.items():
        print(f"cuda float64 {name:20s} max |ours - oracle| (out, grad) = {err:.2e}")
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = torch.randn(3, 2, 4, 300, 64, device=dev, dtype=dtype).unbind(0)
        keep = torch.rand(2, 300, device=dev) > 0.5
        keep[1] = False
        o = lr.sparse_attention(q, k, v, lr.patterns.Window(32) | lr.patterns.Global([0]), 64, keep)
        r = lr.reference_attention(q, k, v, (lr.patterns.Window(32) | lr.patterns.Global([0])).to_dense(300).to(dev)
                                   & keep[:, None, None, :])
        print(f"cuda {dtype}: finite={bool(torch.isfinite(o).all())} padded-example zeros={bool((o[1] == 0).all())} "
              f"max err={(o.float() - r.float()).abs().max().item():.2e}")


def bench(dev):
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        for n in (4096, 16384, 65536):
            row = []
            for name, opts in (("full", {}), ("longformer", {"window": 512}), ("bigbird", {"block_size": 64})):
                m = lr.build_attention(name, dim=768, heads=12, **opts).to(dev, dtype).eval()
                x = torch.randn(1, n, 768, device=dev, dtype=dtype)
                g = torch.zeros(1, n, dtype=torch.bool, device=dev)
                g[:, 0] = True
                kw = {"global_mask": g} if name == "longformer" else {}
                with torch.no_grad():
                    for _ in range(3):
                        m(x, **kw)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    t = time.perf_counter()
                    for _ in range(5):
                        m(x, **kw)
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - t) / 5 * 1000
                mb = torch.cuda.max_memory_allocated() / 2**20
                row.append(f"{name} {ms:7.2f} ms {mb:7.0f} MB")
            print(f"{str(dtype):15s} n={n:6d}: " + " | ".join(row))


if __name__ == "__main__":
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name())
    check_correctness(dev)
    if "--no-bench" not in sys.argv:
        bench(dev)
