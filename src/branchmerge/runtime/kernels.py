"""Triton kernels for branched linear layers: two kernels per layer, whatever the branches of the rows.

``y = s_b · (x W̄ᵀ) + (x V_bᵀ)(s_b U_b)ᵀ + bias_b`` for each row's branch ``b``, as Punica's SGMV
(Chen et al. 2023, https://arxiv.org/abs/2310.18547) and vLLM's ``lora_shrink``/``lora_expand`` do it:
each program reads only the factors of the branches its rows use (segment offsets; the rows themselves
stay where they are, an index list says which to read).

* **shrink**: ``h = x V_bᵀ`` ``[R, KP]`` (float32), one program per (tile of one branch's rows, rank
  chunk, K split): a decode step has a handful of row tiles × rank chunks, so the input dimension is
  split until the GPU is full, each split storing its partial sum in its own slice (no zeroing kernel,
  no atomics: the same result every run);
* **expand**: one GEMM per (row tile, column tile) whose K loop runs over ``x`` against ``W̄`` — a tile
  of consecutive rows whatever their branches, so a mixed decode batch reads ``W̄`` once — then
  scales by ``s_b``, adds ``h (s_b U_b)ᵀ`` (a second, short K loop over the rank, summing the split
  slices as it loads them) for each branch present over its own rows, and the bias, in its epilogue.

A single branch is one segment. Triton is optional: :func:`available` says whether it imported, and
the torch paths of :class:`~branchmerge.runtime.modules.BranchedLinear` are used without it. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors (for tests); tiles are upcast to float32 before
``tl.dot`` there, since the interpreter's bfloat16 dot is wrong. On CUDA the expand kernel's tile sizes
are autotuned per shape and row-count bucket, among a few configs per bucket (:func:`expand_configs`).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from torch import Tensor

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

logger = logging.getLogger(__name__)


# process-wide: turned off (with a warning) if a kernel fails or disagrees with the torch path on first use
STATE = {"ok": True, "checked": False, "why": None}


def disable(why: str) -> None:
    """Stop using the kernels in this process; the torch paths answer from now on."""
    if STATE["ok"]:
        logger.warning("Triton kernels turned off, the torch paths are used instead: %s", why)
    STATE.update(ok=False, why=why)


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device`` here (CUDA, or any device under the interpreter)."""
    return available() and (device.type == "cuda" or interpreting())


# the expand kernel's autotuning space, (BN, BK, warps, stages): decode tiles (16 or 32 rows) stream W̄ like
# a GEMV, so wide K steps and narrow column tiles (enough programs for every SM); prefill tiles (64 rows)
# are a GEMM. Each row-count bucket tries only its own (each config is a compile: ~1 s on the GPU).
DECODE_CONFIGS = [(bn, bk, 4, 4) for bn in (16, 32, 64) for bk in (128, 256)]
PREFILL_CONFIGS = [(bn, 64, w, st) for bn in (64, 128) for w in (4, 8) for st in (3, 4)]
EXPAND_CONFIGS = DECODE_CONFIGS + PREFILL_CONFIGS


def resolve(kernels: str, device: torch.device) -> str:
    """``auto`` → ``triton`` on CUDA when triton is installed, else ``torch``.

    Raises:
        ValueError: an unknown name, or ``triton`` where its kernels cannot run (saying why).
    """
    if kernels not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")
    if kernels == "auto":
        return "triton" if device.type == "cuda" and available() else "torch"
    if kernels == "triton" and not usable_on(device):
        why = ("triton is not installed (pip install triton)" if not available() else
               f"the device is {device.type}: Triton kernels need CUDA, or TRITON_INTERPRET=1 to run them in "
               "Triton's (slow) interpreter")
        raise ValueError(f"kernels='triton' cannot run here: {why}")
    if kernels == "triton":
        prepare(device)
    return kernels


def expand_configs(m_bucket: int) -> list[tuple[int, int, int, int]]:
    """The configs autotuning tries for row tiles of ``m_bucket`` rows."""
    return DECODE_CONFIGS if m_bucket <= 32 else PREFILL_CONFIGS


if triton is not None:

    @triton.jit
    def _tile(idx_ptr, tb_ptr, ts_ptr, te_ptr, BM: tl.constexpr):
        """This program's tile: its branch, the ``BM`` batch rows it reads (sorted by branch) and their mask."""
        t = tl.program_id(0)
        offs = tl.load(ts_ptr + t) + tl.arange(0, BM)
        mrow = offs < tl.load(te_ptr + t)
        return tl.load(tb_ptr + t), tl.load(idx_ptr + offs, mask=mrow, other=0), mrow

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr):
        """``a · b`` accumulated in float32; ``UPCAST`` (the interpreter) computes it in float32 throughout."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        return tl.dot(a.to(b.dtype), b)

    @triton.jit
    def _member_of(meta_ptr, pos, FIELD: tl.constexpr, M: tl.constexpr):
        """Which member each ``pos`` (a rank column, or an output column) falls in: the number of members
        after the first whose ``FIELD`` (start) is at or before it."""
        j = tl.zeros_like(pos)
        for i in tl.static_range(1, M):
            j += (pos >= tl.load(meta_ptr + i * 6 + FIELD)).to(pos.dtype)
        return j

    @triton.jit
    def _shrink_kernel(x_ptr, idx_ptr, v_ptr, h_ptr, meta_ptr, tb_ptr, ts_ptr, te_ptr, K_IN, KP, K_SPLIT, sx, sv, sh,
                       s_split, M: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                       UPCAST: tl.constexpr):
        """``x V_bᵀ`` over the ``K_SPLIT`` input columns of split ``program_id(2)``, stored in that split's
        slice of ``h`` ``[S, R, KP]`` (every element written: no zeroing, no atomics, the same sum every
        run); the expand kernel adds the slices. Rank column ``r`` of ``h`` is rank ``r - koff_j`` of member
        ``j`` (:func:`member_table`), whose ``V`` rows start at ``vbase_j`` (``b·kp_j`` further for branch b)."""
        b, rows, mrow = _tile(idx_ptr, tb_ptr, ts_ptr, te_ptr, BM)
        rr = tl.program_id(1) * BR + tl.arange(0, BR)
        mr = rr < KP
        j = _member_of(meta_ptr, rr, 3, M)
        vrow = tl.load(meta_ptr + j * 6 + 4) + b * tl.load(meta_ptr + j * 6 + 2) + rr - tl.load(meta_ptr + j * 6 + 3)
        k_lo = tl.program_id(2) * K_SPLIT
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K_SPLIT, BK):
            kk = k_lo + k0 + tl.arange(0, BK)
            mk = kk < K_IN
            a = tl.load(x_ptr + rows[:, None] * sx + kk[None, :], mask=mrow[:, None] & mk[None, :], other=0.0)
            w = tl.load(v_ptr + vrow[None, :] * sv + kk[:, None], mask=mr[None, :] & mk[:, None], other=0.0)
            acc += _dot(a, w, UPCAST)
        tl.store(h_ptr + tl.program_id(2) * s_split + rows[:, None] * sh + rr[None, :], acc,
                 mask=mrow[:, None] & mr[None, :])

    @triton.jit
    def _lowrank_add(acc, h_ptr, ut_ptr, rows, mrow, cols, mcol, b, kp, koff, ubase, cstart, ustride, sh, S,
                     s_split, SP: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
        """``acc += h[:, koff:koff+kp] · UT[b·kp:(b+1)·kp, cols - cstart]`` (``UT`` rows ``ustride`` apart),
        ``h`` the sum of the shrink's ``S`` slices (``SP``: ``S`` rounded up to a power of two)."""
        # not pipelined: multi-buffering the [SP, BM, BR] slices of h (and UT) took 288-448 KB of shared memory
        # per program at 16 slices, over any SM's (bench/kernel_smem.py); the K loop over W̄ stays pipelined
        for r0 in tl.range(0, kp, BR, num_stages=1):
            rr = r0 + tl.arange(0, BR)
            mr = rr < kp
            if SP == 1:
                hh = tl.load(h_ptr + rows[:, None] * sh + (koff + rr)[None, :], mask=mrow[:, None] & mr[None, :],
                             other=0.0)
            else:  # every slice in one load, then their sum
                sp = tl.arange(0, SP)
                hh = tl.sum(tl.load(h_ptr + sp[:, None, None] * s_split + rows[None, :, None] * sh
                                    + (koff + rr)[None, None, :],
                                    mask=(sp < S)[:, None, None] & mrow[None, :, None] & mr[None, None, :], other=0.0),
                            axis=0)
            u = tl.load(ut_ptr + ubase + (b * kp + rr)[:, None] * ustride + (cols - cstart)[None, :],
                        mask=mr[:, None] & mcol[None, :], other=0.0)
            acc += _dot(hh, u, UPCAST)
        return acc

    @triton.jit
    def _expand_kernel(x_ptr, idx_ptr, w_ptr, h_ptr, ut_ptr, s_ptr, bias_ptr, y_ptr, meta_ptr, rb_ptr, tb_ptr, ts_ptr,
                       te_ptr, K_IN, N_OUT, KP, NB, S, sx, sw, sh, s_split, sy, M_BUCKET,
                       M: tl.constexpr, MIXED: tl.constexpr, HAS_BIAS: tl.constexpr, SP: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
        """``y = s · x W̄ᵀ + h · UT + bias`` for one (row tile, column tile). Each column takes its member's
        scale, factors and bias (:func:`member_table`: one member, or sibling layers concatenated along the
        output).

        ``MIXED``: the tile's rows may belong to several branches (``rb_ptr``: each row's branch), so W̄ is
        read once for all of them; the low-rank term adds each branch present, over its own rows. Else the
        tile is one branch's rows (``tb_ptr``)."""
        b, rows, mrow = _tile(idx_ptr, tb_ptr, ts_ptr, te_ptr, BM)
        c0 = tl.program_id(1) * BN
        cols = c0 + tl.arange(0, BN)
        mcol = cols < N_OUT
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K_IN, BK):  # x W̄ᵀ
            kk = k0 + tl.arange(0, BK)
            mk = kk < K_IN
            a = tl.load(x_ptr + rows[:, None] * sx + kk[None, :], mask=mrow[:, None] & mk[None, :], other=0.0)
            w = tl.load(w_ptr + cols[None, :] * sw + kk[:, None], mask=mcol[None, :] & mk[:, None], other=0.0)
            acc += _dot(a, w, UPCAST)
        if MIXED:  # each row's branch; every branch may be present
            rb = tl.load(rb_ptr + rows, mask=mrow, other=-1)
            b_lo = 0
            b_hi = NB
        else:  # the tile's one branch
            rb = tl.zeros_like(rows) + b
            b_lo = b
            b_hi = b + 1
        jc = _member_of(meta_ptr, cols, 0, M)  # each column's member
        acc = acc * tl.load(s_ptr + jc[None, :] * NB + rb[:, None], mask=mrow[:, None] & mcol[None, :],
                            other=0.0).to(tl.float32)
        for j in tl.static_range(M):  # members with columns in this tile
            cs = tl.load(meta_ptr + j * 6)
            ce = tl.load(meta_ptr + j * 6 + 1)
            if (cs < c0 + BN) & (ce > c0):
                mj = mcol & (cols >= cs) & (cols < ce)
                kpj = tl.load(meta_ptr + j * 6 + 2)
                koffj = tl.load(meta_ptr + j * 6 + 3)
                ubj = tl.load(meta_ptr + j * 6 + 5)
                for bb in range(b_lo, b_hi):  # each branch present, over its own rows
                    sel = mrow & (rb == bb)
                    if tl.sum(sel.to(tl.int32), axis=0) > 0:
                        acc = _lowrank_add(acc, h_ptr, ut_ptr, rows, sel, cols, mj, bb, kpj, koffj, ubj, cs, ce - cs,
                                           sh, S, s_split, SP, BR, UPCAST)
        if HAS_BIAS:  # member j's [NB, out_j] block starts at NB·cs_j
            cs_c = tl.load(meta_ptr + jc * 6, mask=mcol, other=0)
            ce_c = tl.load(meta_ptr + jc * 6 + 1, mask=mcol, other=1)
            acc += tl.load(bias_ptr + (NB * cs_c + cols - cs_c)[None, :] + rb[:, None] * (ce_c - cs_c)[None, :],
                           mask=mrow[:, None] & mcol[None, :], other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * sy + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mrow[:, None] & mcol[None, :])

    _expand_tuned = triton.autotune(
        configs=[triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st) for bn, bk, w, st in EXPAND_CONFIGS],
        key=["K_IN", "N_OUT", "KP", "M_BUCKET", "M", "MIXED"],
        prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
            c for c in configs if (c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages)
            in expand_configs(nargs["M_BUCKET"])]},
    )(_expand_kernel)


def row_tile(rows: int) -> int:
    """Rows per program: 16 for decode (``tl.dot`` needs at least 16), up to 64 for prefill."""
    return 16 if rows <= 16 else 32 if rows <= 64 else 64


def segments(branch_of_row: Tensor | int, rows: int, bm: int, device: torch.device
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tiles of rows grouped by branch: ``(idx [R] rows sorted by branch, tile_branch [T], tile_start [T],
    tile_end [T])``, int32 on ``device``. A branch with no rows gets no tile.

    ``branch_of_row``: ``[R]`` branch ids (CPU), or one id for every row.
    """
    if isinstance(branch_of_row, int):
        idx = torch.arange(rows, dtype=torch.int32)
        ids, counts = [branch_of_row], [rows]
    else:
        order = torch.argsort(branch_of_row, stable=True)
        idx = order.to(torch.int32)
        uniq, cnt = torch.unique_consecutive(branch_of_row[order], return_counts=True)
        ids, counts = uniq.tolist(), cnt.tolist()
    tb, ts, te = [], [], []
    start = 0
    for b, c in zip(ids, counts):
        for s in range(start, start + c, bm):
            tb.append(b)
            ts.append(s)
            te.append(start + c)
        start += c
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return idx.to(device), as_t(tb), as_t(ts), as_t(te)


class Tiles(NamedTuple):
    """The programs' rows: ``shrink`` tiles group rows by branch (each reads its branch's ``V``); ``expand``
    tiles are the rows in order whatever their branches (each reads ``W̄`` once for all of them) when
    ``row_branch`` ``[R]`` (int32) is given, else the shrink's. Each is :func:`segments`' four tensors."""

    shrink: tuple[Tensor, Tensor, Tensor, Tensor]
    expand: tuple[Tensor, Tensor, Tensor, Tensor]
    row_branch: Tensor | None


def tiles(branch_of_row: Tensor | int, rows: int, device: torch.device) -> Tiles:
    """:class:`Tiles` for ``rows`` rows: ``branch_of_row`` ``[R]`` branch ids (CPU), or one id for all."""
    bm = row_tile(rows)
    shrink = segments(branch_of_row, rows, bm, device)
    if isinstance(branch_of_row, int):
        return Tiles(shrink, shrink, None)
    starts = torch.arange(0, rows, bm, dtype=torch.int32)
    expand = (torch.arange(rows, dtype=torch.int32, device=device), torch.zeros_like(starts, device=device),
              starts.to(device), (starts + bm).clamp(max=rows).to(device))
    return Tiles(shrink, expand, branch_of_row.to(torch.int32).to(device))


_SINGLE: dict[tuple, Tiles] = {}


def cached_tiles(branch: int, rows: int, device: torch.device) -> Tiles:
    """:func:`tiles` for ``rows`` rows of one branch, made once per shape (every layer and step reuses
    them, so no host-to-device copy per call)."""
    key = (branch, rows, str(device))
    got = _SINGLE.get(key)
    if got is None:
        if len(_SINGLE) > 4096:
            _SINGLE.clear()
        got = _SINGLE[key] = tiles(branch, rows, device)
    return got


# BRANCHMERGE_AUTOTUNE=0: one tile config on CUDA too (bench/gpu.sh's kernel cases: a compile per config)
AUTOTUNE = os.environ.get("BRANCHMERGE_AUTOTUNE", "1") != "0"

# streaming multiprocessors per CUDA device, filled by :func:`prepare` at load (outside any compiled region)
SMS: dict[int, int] = {}


def prepare(device: torch.device) -> None:
    """Note the SM count of ``device`` (used to size the shrink's split-K)."""
    if device.type == "cuda" and torch.cuda.is_available():
        i = device.index if device.index is not None else torch.cuda.current_device()
        SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count


MAX_SPLITS = 16  # the expand kernel loads every split's slice of h at once: [S, rows, rank chunk] registers
H_SLICE_VALUES = 8192  # at most this many float32 values of h's slices per expand program (64 per thread at 4 warps)


def split_k(k_in: int, programs: int, bk: int, device: torch.device, rows: int = 16, br: int = 32) -> tuple[int, int]:
    """``(splits, columns per split)`` for the shrink: enough programs to fill the GPU twice over when the
    row tiles × rank chunks alone would leave most SMs idle (decode: a handful of programs over a long
    ``k_in``), at least four ``bk`` steps per split, at most :data:`MAX_SPLITS`, and at most as many as
    keep the expand's ``[splits, rows, br]`` load of the slices within :data:`H_SLICE_VALUES` (``rows``:
    its row tile). The interpreter counts 4 SMs, so tests split too."""
    sms = 4 if device.type != "cuda" else SMS.get(device.index if device.index is not None else 0, 132)
    cap = max(1, min(MAX_SPLITS, H_SLICE_VALUES // (rows * br)))
    return _even_split(k_in, max(1, min(_cdiv(k_in, 4 * bk), (2 * sms) // max(programs, 1), cap)), bk)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _even_split(k_in: int, splits: int, bk: int) -> tuple[int, int]:
    """``(splits, per)``: ``k_in`` in chunks of ``per`` columns (a multiple of ``bk``), none of them empty."""
    per = _cdiv(_cdiv(k_in, splits), bk) * bk
    return _cdiv(k_in, per), per


def branched_linear(x: Tensor, mean: Tensor, v_cat: Tensor, ut_cat: Tensor, scales: Tensor, kp: int,
                    branch_of_row: Tensor | int, bias_cat: Tensor | None = None,
                    plan: Tiles | None = None, splits: int | None = None,
                    members: Tensor | None = None) -> Tensor:
    """``y[r] = s_b · x[r] W̄ᵀ + (x[r] V_bᵀ)(s_b U_b)ᵀ + bias_b`` with ``b`` the branch of row ``r``.

    Args:
        x: ``[R, in]`` (contiguous rows).
        mean: ``W̄`` ``[out, in]``.
        v_cat: every branch's ``V`` stacked, ``[N·kp, in]`` (rows ``b·kp…b·kp+kp``; zero-padded ranks).
        ut_cat: every branch's ``s_b U_bᵀ`` stacked, ``[N·kp, out]`` (contiguous).
        scales: ``s_b`` ``[N]``.
        kp: rows per branch in ``v_cat``/``ut_cat``.
        branch_of_row: ``[R]`` branch ids (CPU long tensor), or one id for every row.
        bias_cat: ``[N, out]`` or None.
        plan: :func:`tiles` for these rows, when the caller caches it.
        splits: the shrink's split-K (default: :func:`split_k`); tests set it.
        members: for ``M`` sibling layers that read the same ``x`` (q/k/v), run as one:
            :func:`member_table` ``[M, 6]`` (default: the one layer's, :func:`one_member`). Then ``mean``
            is their ``W̄`` concatenated ``[Σout_j, in]``; ``v_cat`` their ``v_cat`` one after another
            ``[Σ N·kp_j, in]``; ``ut_cat``, ``scales`` and ``bias_cat`` their ``ut_cat`` ``[N·kp_j, out_j]``,
            ``s`` ``[N]`` and bias ``[N, out_j]`` one after another, flat; ``kp`` is ``Σ kp_j``.

    Returns:
        ``y`` ``[R, out]`` in ``x``'s dtype (``[R, Σout_j]`` with ``members``).
    """
    if triton is None:
        raise RuntimeError("the triton kernels need `pip install triton`")
    r, k_in = x.shape
    n_out = mean.shape[0]
    if members is None:
        if ut_cat.stride(0) != n_out:
            raise ValueError(f"ut_cat must be contiguous [N·kp, {n_out}], got strides {tuple(ut_cat.stride())}")
        members = one_member(n_out, kp, scales.numel(), x.device)
    m = members.shape[0]
    bm = row_tile(r)
    plan = plan if plan is not None else tiles(branch_of_row, r, x.device)
    idx, tb, ts, te = plan.shrink
    upcast = interpreting()
    br = 16 if kp <= 16 else 32
    bk = 32 if upcast else 64
    chunks = triton.cdiv(kp, br)
    splits, per = (split_k(k_in, tb.numel() * chunks, bk, x.device, bm, br) if splits is None
                   else _even_split(k_in, splits, bk))
    h = torch.empty(splits, r, kp, device=x.device, dtype=torch.float32)  # [S, R, KP]: every element written
    _shrink_kernel[(tb.numel(), chunks, splits)](x, idx, v_cat, h, members, tb, ts, te, k_in, kp, per, x.stride(0),
                                                 v_cat.stride(0), h.stride(1), h.stride(0), M=m, BM=bm, BR=br, BK=bk,
                                                 UPCAST=upcast)
    y = torch.empty(r, n_out, device=x.device, dtype=x.dtype)
    bias = bias_cat if bias_cat is not None else scales
    mixed = plan.row_branch is not None
    e_idx, e_tb, e_ts, e_te = plan.expand
    tiles_e = e_tb.numel()
    args = (x, e_idx, mean, h, ut_cat, scales, bias, y, members, plan.row_branch if mixed else e_tb, e_tb, e_ts,
            e_te, k_in, n_out, kp, scales.numel() // m, splits, x.stride(0), mean.stride(0), h.stride(1),
            h.stride(0), y.stride(0), bm)
    sp = triton.next_power_of_2(splits)
    if upcast or x.device.type != "cuda" or not AUTOTUNE:
        _expand_kernel[(tiles_e, triton.cdiv(n_out, 32))](*args, M=m, MIXED=mixed, HAS_BIAS=bias_cat is not None,
                                                          SP=sp, BM=bm, BN=32, BK=32, BR=br, UPCAST=upcast)
    else:  # pragma: no cover - needs a GPU
        _expand_tuned[lambda meta: (tiles_e, triton.cdiv(n_out, meta["BN"]))](
            *args, M=m, MIXED=mixed, HAS_BIAS=bias_cat is not None, SP=sp, BM=bm, BR=br, UPCAST=False)
    return y


_ONE: dict[tuple, Tensor] = {}


def one_member(out: int, kp: int, branches: int, device: torch.device) -> Tensor:
    """:func:`member_table` of one layer, made once per shape (no host-to-device copy per call)."""
    key = (out, kp, branches, str(device))
    got = _ONE.get(key)
    if got is None:
        got = _ONE[key] = member_table([out], [kp], branches, device)
    return got


def member_table(outs: list[int], kps: list[int], branches: int, device: torch.device) -> Tensor:
    """Per sibling ``j``: ``(column start, column end, kp_j, rank offset in h, first V row, first UT
    element)`` ``[M, 6]`` int32 on ``device``, for :func:`branched_linear`'s ``members``."""
    rows, cs, koff, vbase, ubase = [], 0, 0, 0, 0
    for out, kp in zip(outs, kps):
        rows.append([cs, cs + out, kp, koff, vbase, ubase])
        cs, koff, vbase, ubase = cs + out, koff + kp, vbase + branches * kp, ubase + branches * kp * out
    if max(ubase, branches * cs) >= 2**31:  # the kernels index in int32, as for one layer
        raise ValueError(f"sibling layers too large to run as one call ({ubase} factor elements)")
    return torch.tensor(rows, dtype=torch.int32, device=device)
