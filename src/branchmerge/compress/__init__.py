"""Pure math of branch compression: tensors in, tensors out. No paths, no HF objects.

* :mod:`.lowrank` — scales, the normalized mean, rSVD factors of each difference (the method).
* :mod:`.quant` — group-wise int8/int4 quantization of the factors.
* :mod:`.rows` — the rows where one matrix differs from another (row patches).
* :mod:`.allocate` — ranks (and bit widths) per tensor under a byte budget, from spectra.
* :mod:`.baselines` — delta-compression baselines (BitDelta, DARE, top-k) at equal bytes, for benches.
"""

from branchmerge.compress.lowrank import (
    Difference,
    compress_difference,
    frobenius_scale,
    low_rank_factors,
    normalize,
    rank_for,
    reconstruct,
    relative_error,
    stored_bytes,
    stores_dense,
    tensor_seed,
    truncated_svd_factors,
)

__all__ = ["Difference", "compress_difference", "frobenius_scale", "low_rank_factors", "normalize", "rank_for",
           "reconstruct", "relative_error", "stored_bytes", "stores_dense", "tensor_seed", "truncated_svd_factors"]
