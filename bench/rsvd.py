"""rSVD vs full SVD on random-plus-low-rank differences at r=0.95 (same run, same matrices).

Target (issue 2): randomized SVD at least 20× faster than torch.linalg.svd, with a reconstruction
error within 1.1× of the truncated full SVD's.

    python bench/rsvd.py [--shapes 4096x4096 14336x4096]
"""

from __future__ import annotations

import argparse
import time

import torch

from branchmerge.compress import low_rank_factors, rank_for, relative_error


def make_difference(m: int, n: int, true_rank: int, noise: float, seed: int) -> torch.Tensor:
    """A fine-tune-like difference: a decaying-spectrum low-rank part plus small dense noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, true_rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, true_rank, generator=g))[0]
    s = torch.logspace(0, -2, true_rank)
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=g) / (m * n) ** 0.5 * s.norm()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096"])
    ap.add_argument("--rate", type=float, default=0.95)
    ap.add_argument("--oversample", type=int, default=10)
    ap.add_argument("--n-iter", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rate {args.rate}")
    print("| shape | rank k | n_iter | rSVD s | full SVD s | speed-up | rSVD err | SVD err | err ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        m, n = map(int, shape.split("x"))
        k = rank_for((m, n), args.rate)
        a = make_difference(m, n, true_rank=2 * k, noise=0.3, seed=0)
        rsvd = {}
        for q in args.n_iter:
            t0 = time.perf_counter()
            u, v = low_rank_factors(a, k, oversample=args.oversample, n_iter=q,
                                    generator=torch.Generator().manual_seed(0))
            rsvd[q] = (time.perf_counter() - t0, relative_error(u @ v, a))
            del u, v
        t0 = time.perf_counter()
        uf, sf, vhf = torch.linalg.svd(a, full_matrices=False)
        t_f = time.perf_counter() - t0
        err_f = relative_error((uf[:, :k] * sf[:k]) @ vhf[:k], a)
        del uf, sf, vhf
        for q, (t_r, err_r) in rsvd.items():
            print(f"| {m}×{n} | {k} | {q} | {t_r:.2f} | {t_f:.1f} | {t_f / t_r:.1f}× | {err_r:.4f} | {err_f:.4f} | "
                  f"{err_r / err_f:.3f} |", flush=True)


if __name__ == "__main__":
    main()
