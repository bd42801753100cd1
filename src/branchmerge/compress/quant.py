"""Group-wise symmetric quantization of low-rank factors (int8, int4). Pure math.

A factor pair ``U [m, k]``, ``V [k, n]`` from the rSVD has ``U = Ũ·diag(σ)`` with unit columns ``Ũ`` and
orthonormal rows in ``V``. The singular values ``σ`` ``[k]`` stay float32; the unit vectors — rows of
``Ũᵀ`` ``[k, m]`` and of ``V`` ``[k, n]`` — are quantized in groups of ``group_size`` consecutive entries,
each group with its own float16 scale ``absmax / qmax`` (round to nearest, ``qmax = 2^(bits−1) − 1``).
Unit vectors keep every entry near ``1/√L``, so float16 scales neither underflow nor overflow.

int4 values (−7…7) are stored offset by 8 as nibbles, two per byte (low nibble first) — the layout of
GPTQ/AWQ-style packed weights, here along the vector's length.

Delta-CoMe (Ping et al. 2024, https://arxiv.org/abs/2406.08903) gives the top singular vectors more
bits than the tail; :mod:`branchmerge.compress.allocate` picks that split from a byte budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128, 256)
SCALE_BYTES = 2  # float16 per group


def check_bits(bits: int, group_size: int) -> None:
    """Raises ValueError naming the unsupported bit width or group size."""
    if bits not in BITS:
        raise ValueError(f"factor bits {bits} are not supported; use one of {', '.join(map(str, BITS))} (or 16 for "
                         "the storage dtype)")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")


def _padded(length: int, group_size: int) -> int:
    return -(-length // group_size) * group_size


def row_bytes(length: int, bits: int, group_size: int) -> int:
    """Stored bytes of one quantized vector of ``length`` entries (values plus group scales)."""
    lp = _padded(length, group_size)
    return lp * bits // 8 + (lp // group_size) * SCALE_BYTES


def triplet_bytes(m: int, n: int, bits: int, group_size: int, esize: int) -> int:
    """Bytes of one singular triplet ``(u [m], σ, v [n])`` of one branch: ``(m+n)·esize`` unquantized
    (``bits`` 16), else both quantized vectors plus a float32 σ."""
    if bits == 16:
        return (m + n) * esize
    return row_bytes(m, bits, group_size) + row_bytes(n, bits, group_size) + 4


def pack_int4(q: Tensor) -> Tensor:
    """``q`` int8 in [−8, 7], ``[..., L]`` with even ``L`` → uint8 ``[..., L/2]`` (low nibble first)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even length, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., L/2]`` → int8 ``[..., L]``."""
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


@dataclass(frozen=True)
class QuantizedRows:
    """Rows ``[k, L]`` quantized group-wise.

    Attributes:
        q: int8 ``[k, Lp]`` (8 bits) or packed uint8 ``[k, Lp/2]`` (4 bits); ``Lp`` is ``L`` rounded up to
            the group size (zero padding).
        scales: float16 ``[k, Lp/group_size]``.
        bits, group_size, length: as quantized; ``length`` is ``L``.
    """

    q: Tensor
    scales: Tensor
    bits: int
    group_size: int
    length: int

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()

    def codes(self) -> Tensor:
        """The integer codes, int8 ``[k, Lp]`` (int4 unpacked)."""
        return unpack_int4(self.q) if self.bits == 4 else self.q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[k, L]`` in ``dtype``."""
        return dequantize_codes(self.codes(), self.scales.float(), self.group_size, self.length).to(dtype)


def dequantize_codes(codes: Tensor, scales: Tensor, group_size: int, length: int) -> Tensor:
    """int8 ``codes`` ``[k, Lp]`` times their group ``scales`` ``[k, Lp/group_size]`` → ``[k, length]`` in the
    scales' dtype."""
    k = codes.shape[0]
    return (codes.view(k, -1, group_size).to(scales.dtype) * scales[..., None]).view(k, -1)[:, :length]


def quantize_rows(x: Tensor, bits: int, group_size: int) -> QuantizedRows:
    """Quantize the rows of ``x`` ``[k, L]`` in groups of ``group_size`` along ``L``.

    Raises:
        ValueError: unsupported ``bits`` or ``group_size``, or ``x`` not 2-D.
    """
    check_bits(bits, group_size)
    if x.ndim != 2:
        raise ValueError(f"quantize_rows needs a 2-D tensor, got shape {list(x.shape)}")
    k, length = x.shape
    lp = _padded(length, group_size)
    xf = torch.zeros(k, lp, dtype=torch.float32, device=x.device)
    xf[:, :length] = x.float()
    g = xf.view(k, lp // group_size, group_size)
    qmax = 2 ** (bits - 1) - 1
    scales = (g.abs().amax(-1) / qmax).to(torch.float16)  # [k, G]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).float()
    q = torch.clamp(torch.round(g / safe[..., None]), -qmax, qmax).to(torch.int8).view(k, lp)
    return QuantizedRows(pack_int4(q) if bits == 4 else q, scales, bits, group_size, length)


@dataclass(frozen=True)
class QuantizedFactors:
    """``U ≈ (Ũᵀ)ᵀ·diag(σ)`` and ``V`` with quantized unit vectors; the first ``len(parts[0])`` triplets at
    ``parts[0]``'s bit width, the rest at the next part's (mixed precision)."""

    sigma: Tensor  # [k] float32
    parts: tuple[tuple[QuantizedRows, QuantizedRows], ...]  # (Ũᵀ rows [k_j, m], V rows [k_j, n]) per bit width

    @property
    def rank(self) -> int:
        return int(self.sigma.numel())

    @property
    def nbytes(self) -> int:
        return self.sigma.numel() * 4 + sum(u.nbytes + v.nbytes for u, v in self.parts)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(U [m, k], V [k, n])`` in ``dtype``, ``U`` carrying the singular values."""
        ut = torch.cat([u.dequantize() for u, _ in self.parts])  # [k, m]
        v = torch.cat([v.dequantize() for _, v in self.parts])  # [k, n]
        return (ut * self.sigma[:, None].float()).T.contiguous().to(dtype), v.to(dtype)


def split_sigma(u: Tensor) -> tuple[Tensor, Tensor]:
    """``U [m, k]`` → ``(σ [k], Ũᵀ [k, m])`` with unit rows (a zero column stays zero)."""
    sigma = torch.linalg.vector_norm(u.float(), dim=0)  # [k]
    unit = u.float() / torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    return sigma, unit.T.contiguous()


def quantize_factors(u: Tensor, v: Tensor, bits: list[tuple[int, int]], group_size: int) -> QuantizedFactors:
    """Quantize ``U [m, k]``, ``V [k, n]``; ``bits`` lists ``(bit width, triplets)`` in order, summing to ``k``
    (e.g. ``[(8, 12), (4, 36)]``: the top 12 triplets at 8 bits, the next 36 at 4).

    Raises:
        ValueError: the triplet counts do not sum to ``k``, or an unsupported width or group size.
    """
    k = u.shape[1]
    if sum(c for _, c in bits) != k or v.shape[0] != k:
        raise ValueError(f"bit split {bits} does not cover the {k} triplets of U {list(u.shape)}, V {list(v.shape)}")
    sigma, ut = split_sigma(u)
    parts, lo = [], 0
    for b, c in bits:
        if c == 0:
            continue
        parts.append((quantize_rows(ut[lo:lo + c], b, group_size), quantize_rows(v[lo:lo + c].float(), b, group_size)))
        lo += c
    return QuantizedFactors(sigma, tuple(parts))


def triplet_errors(u: Tensor, v: Tensor, bits: int, group_size: int) -> Tensor:
    """Squared error ``‖u_j v_j − ũ_j ṽ_j‖²`` each triplet ``j`` would get from quantizing it at ``bits``,
    ``[k]`` float32, exact for a rank-one term: ``‖a‖²‖b‖² + ‖ã‖²‖b̃‖² − 2(a·ã)(b·b̃)``.

    ``u`` ``[m, k]`` carries the singular values, ``v`` ``[k, n]``; ``bits`` 16 means no quantization (0).
    """
    k = u.shape[1]
    if bits == 16 or k == 0:
        return torch.zeros(k)
    uq, vq = quantize_factors(u, v, [(bits, k)], group_size).dequantize()
    a, at = u.double().T, uq.double().T  # [k, m]; float64: the formula subtracts near-equal terms
    b, bt = v.double(), vq.double()  # [k, n]
    na, nat, nb, nbt = (t.pow(2).sum(1) for t in (a, at, b, bt))
    err = na * nb + nat * nbt - 2 * (a * at).sum(1) * (b * bt).sum(1)
    return err.clamp_min(0.0).float()

