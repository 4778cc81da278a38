"""Benchmark: nearest-neighbour identity search at the paper's size, as blocked matrix products.

13,230 generated faces x 10,177 CelebA identities (the paper's sizes), random 512-d embeddings (ArcFace's
width), cosine similarity; also Euclidean distance (dlib's rule). Prints the time of each and checks one
block against a brute-force search. Usage: python benchmarks/nn_search.py [--queries N] [--refs M] [--dim D]
"""

from __future__ import annotations

import argparse
import time

import torch

from geneava.networks.identity import nearest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=13_230)
    ap.add_argument("--refs", type=int, default=10_177)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--block", type=int, default=4096)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(args.queries, args.dim, generator=g)
    r = torch.randn(args.refs, args.dim, generator=g)
    print(
        f"{args.queries} x {args.refs} pairs, {args.dim}-d, block {args.block}, "
        f"{torch.get_num_threads()} threads"
    )
    for metric in ("cosine", "euclidean"):
        t0 = time.perf_counter()
        best, arg = nearest(q, r, metric, args.block)
        dt = time.perf_counter() - t0
        sub = q[:256].double()
        if metric == "cosine":
            full = (
                torch.nn.functional.normalize(sub, dim=1) @ torch.nn.functional.normalize(r.double(), dim=1).T
            )
            ok = torch.equal(full.argmax(1), arg[:256])
        else:
            ok = torch.equal(torch.cdist(sub, r.double()).argmin(1), arg[:256])
        print(f"{metric:9s}: {dt:6.2f} s  (first 256 rows equal brute force: {ok})")


if __name__ == "__main__":
    main()
