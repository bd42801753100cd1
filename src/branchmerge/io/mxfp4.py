"""MXFP4, the format of gpt-oss's released checkpoints' experts: 4-bit floats (E2M1) in blocks of 32 values
sharing one power-of-two scale. A fused experts tensor ``gate_up_proj`` is stored as ``gate_up_proj_blocks``
``[E, R, G, 16]`` (two codes per byte, the low nibble first) and ``gate_up_proj_scales`` ``[E, R, G]`` (the
exponent plus 127), for the ``[E, R, G·32]`` matrix that transformers transposes to ``[E, G·32, R]``."""

from __future__ import annotations

import torch
from torch import Tensor

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
QUANT_METHOD = "mxfp4"


def fused_shape(blocks: tuple[int, ...]) -> tuple[int, int, int]:
    """The fused tensor's shape ``[E, G·32, R]`` (as transformers holds it) of blocks ``[E, R, G, 16]``."""
    return blocks[0], blocks[2] * blocks[3] * 2, blocks[1]


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``blocks`` ``[..., G, 16]`` uint8 and ``scales`` ``[..., G]`` uint8 → ``[..., G·32]`` in ``dtype`` (exact in
    bfloat16 and float32: every value is a 2-bit mantissa times a power of two)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape \
            or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype} do not match (want uint8 [..., G, 16] and uint8 [..., G])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()  # [..., G, 32]
    values = torch.ldexp(lut[codes], scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).to(dtype)


def quantize_mxfp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w`` ``[..., K]`` (K a multiple of 32) → ``(blocks [..., K/32, 16], scales [..., K/32])``: each block's
    scale the power of two that brings its largest magnitude to at most 6, each value the nearest code."""
    g = w.float().unflatten(-1, (-1, 32))  # [..., G, 32]
    top = g.abs().amax(-1).clamp(min=2.0 ** -126)
    exp = torch.ceil(torch.log2(top / 6.0)).clamp(-127, 127).to(torch.int32)
    scaled = torch.ldexp(g, -exp[..., None])
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)
