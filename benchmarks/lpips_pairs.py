"""Benchmark: all-pairs LPIPS as a Gram matrix against `lpips.LPIPS` called pair by pair.

Same pairs, same model (AlexNet backbone with random weights, since the torchvision download is not
available offline, and the lpips package's learned linear heads); prints both times, the speed-up and
the largest absolute difference. Usage: python benchmarks/lpips_pairs.py [--n 48] [--size 64]
"""

from __future__ import annotations

import argparse
import time

import lpips
import torch

from geneava.core.metrics import LpipsGram


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="images per side: n x n pairs")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    a = torch.rand(args.n, 3, args.size, args.size) * 2 - 1
    b = torch.rand(args.n, 3, args.size, args.size) * 2 - 1

    t0 = time.perf_counter()
    gram = LpipsGram(model)
    fast = LpipsGram.pairs(gram.features(a), gram.features(b))
    t_fast = time.perf_counter() - t0

    slow = torch.empty(args.n, args.n, dtype=torch.float64)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(args.n):
            for j in range(args.n):
                slow[i, j] = model(a[i : i + 1], b[j : j + 1]).item()
    t_slow = time.perf_counter() - t0

    print(f"{args.n} x {args.n} = {args.n**2} pairs, {args.size}px, CPU ({torch.get_num_threads()} threads)")
    print(f"lpips.LPIPS pair by pair : {t_slow:8.3f} s")
    print(f"Gram over cached features: {t_fast:8.3f} s")
    print(f"speed-up x{t_slow / t_fast:.0f}, max |difference| {(fast - slow).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
