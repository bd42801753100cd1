"""Shared memory of the branched-layer Triton kernels, compiled for a GPU target on any machine (no GPU needed).

Triton compiles for a named target (``GPUTarget("cuda", 90, 32)``: Hopper) without a device, and the compiled
kernel's metadata says how much shared memory one program needs. A launch that needs more than the SM has
fails with ``OutOfResources`` on the GPU only, which the interpreter (the CPU tests) never sees: the first
device run of issue 16 lost its Triton rows to that (294912 bytes asked, 232448 on an H200), because the
low-rank loop's loads of every split-K slice of ``h`` were multi-buffered by the pipeliner.

For every autotuning config of the expand kernel, at the worst case it meets (three sibling layers, mixed
rows, a bias, the most split-K slices) and at one slice, and for the shrink kernel's largest tile:

    python bench/kernel_smem.py [--arch 90] [--limit 232448] [--which all|largest]

It exits non-zero if a config needs more than ``--limit`` bytes, or if the most slices need more shared
memory than one does (the slices' loads must not be multi-buffered).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # compile (the interpreter would hand back plain Python functions)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from branchmerge.runtime import kernels  # noqa: E402

# shared memory per SM that one program may use (bytes): H100/H200 227 KB, A100 163 KB
LIMITS = {90: 232448, 80: 166912}
POINTERS = {"x_ptr": "*bf16", "idx_ptr": "*i32", "w_ptr": "*bf16", "v_ptr": "*bf16", "h_ptr": "*fp32",
            "ut_ptr": "*bf16", "s_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16", "meta_ptr": "*i32",
            "rb_ptr": "*i32", "tb_ptr": "*i32", "ts_ptr": "*i32", "te_ptr": "*i32"}
ALIGNED = ("K_IN", "sx", "sw", "sv", "sy")  # multiples of 16 at real shapes: Triton specializes on that


def shared_bytes(fn, constexprs: dict, warps: int, stages: int, arch: int) -> int:
    """Bytes of shared memory one program of ``fn`` (a ``triton.jit`` function) needs on ``sm_{arch}``."""
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else POINTERS.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in POINTERS or n in ALIGNED}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    done = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    return int(done.metadata.shared)


def cases(which: str) -> list[tuple[str, object, dict, int, int]]:
    """``(label, kernel, constexprs, warps, stages)``: each expand config at the row tiles of its bucket, with
    the most split-K slices and with one; the shrink at its largest tile."""
    sp_max = triton.next_power_of_2(kernels.MAX_SPLITS)
    configs = [(c, (16, 32)) for c in kernels.DECODE_CONFIGS] + [(c, (64,)) for c in kernels.PREFILL_CONFIGS]
    if which == "largest":  # the config of each bucket with the most bytes per pipeline stage × stages
        size = lambda c, bm: c[3] * (bm * c[1] + c[1] * c[0])  # noqa: E731
        configs = [(max(kernels.DECODE_CONFIGS, key=lambda c: size(c, 32)), (32,)),
                   (max(kernels.PREFILL_CONFIGS, key=lambda c: size(c, 64)), (64,))]
    out = []
    for (bn, bk, warps, stages), bms in configs:
        for bm in bms:
            for sp in (sp_max, 1):
                const = dict(M=3, MIXED=True, HAS_BIAS=True, SP=sp, BM=bm, BN=bn, BK=bk, BR=32, UPCAST=False)
                out.append((f"expand BM={bm} BN={bn} BK={bk} warps={warps} stages={stages} SP={sp}",
                            kernels._expand_kernel, const, warps, stages))
    const = dict(M=3, BM=64, BR=32, BK=64, UPCAST=False)  # the shrink's launch: fixed tiles, default stages
    out.append(("shrink BM=64 BR=32 BK=64 stages=3", kernels._shrink_kernel, const, 4, 3))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 to compile for (90: H100/H200)")
    ap.add_argument("--limit", type=int, default=None, help="bytes one program may use (default: the arch's)")
    ap.add_argument("--which", choices=["all", "largest"], default="all")
    args = ap.parse_args(argv)
    limit = args.limit or LIMITS.get(args.arch, LIMITS[80])
    print(f"triton {triton.__version__}, sm_{args.arch}, limit {limit} bytes\n\n| kernel, tiles | shared bytes | |"
          "\n|---|---|---|")
    bad, by_label = [], {}
    for label, fn, const, warps, stages in cases(args.which):
        t0 = time.perf_counter()
        got = shared_bytes(fn, const, warps, stages, args.arch)
        by_label[label] = got
        over = got > limit
        bad += [f"{label}: {got} > {limit} bytes"] if over else []
        print(f"| {label} | {got} | {'OVER' if over else 'fits'} ({time.perf_counter() - t0:.1f} s) |", flush=True)
    sp_max = f"SP={triton.next_power_of_2(kernels.MAX_SPLITS)}"
    for label, got in by_label.items():  # the slices of h are loaded once, not multi-buffered
        one = by_label.get(label.replace(sp_max, "SP=1"))
        if label.endswith(sp_max) and one is not None and got > one:
            bad.append(f"{label}: {got} bytes, more than the {one} of one slice")
    print("\n" + ("\n".join(bad) if bad else "every case fits"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
