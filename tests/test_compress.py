"""Pure math: ranks, randomized SVD accuracy, storage decisions."""

import pytest
import torch

from branchmerge.compress import (
    compress_difference,
    low_rank_factors,
    rank_for,
    relative_error,
    stores_dense,
    truncated_svd_factors,
)


def test_rank_for_formula():
    assert rank_for((4096, 4096), 0.95) == round(0.05 * 4096)
    assert rank_for((64, 128), 0.0) == 64
    assert rank_for((64, 128), 1.0) == 0
    with pytest.raises(ValueError, match="compress_rate"):
        rank_for((4, 4), 1.5)


def test_rsvd_recovers_exact_low_rank():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(120, 8, generator=g) @ torch.randn(8, 90, generator=g)
    u, v = low_rank_factors(a, 8, oversample=5, n_iter=1, generator=torch.Generator().manual_seed(1))
    assert u.shape == (120, 8) and v.shape == (8, 90)
    assert relative_error(u @ v, a) < 1e-5


def test_rsvd_close_to_truncated_svd_on_noisy_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 10, generator=g) @ torch.randn(10, 150, generator=g) + 0.05 * torch.randn(200, 150, generator=g)
    u, v = low_rank_factors(a, 10, oversample=10, n_iter=2, generator=torch.Generator().manual_seed(3))
    ue, ve = truncated_svd_factors(a, 10)
    assert relative_error(u @ v, a) <= 1.02 * relative_error(ue @ ve, a)


def test_rsvd_is_seeded():
    a = torch.randn(100, 80)
    f1 = low_rank_factors(a, 5, generator=torch.Generator().manual_seed(7))
    f2 = low_rank_factors(a, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(f1[0], f2[0]) and torch.equal(f1[1], f2[1])


def test_rsvd_rejects_bad_rank_and_shape():
    with pytest.raises(ValueError, match="rank"):
        low_rank_factors(torch.randn(4, 4), 5)
    with pytest.raises(ValueError, match="2-D"):
        low_rank_factors(torch.randn(4), 1)


def test_dense_when_factors_not_smaller():
    assert stores_dense((64, 64), 32)  # 32*128 == 64*64
    assert not stores_dense((64, 64), 31)
    w = torch.randn(16, 16)
    mean = torch.randn(16, 16)
    d = compress_difference(w, mean, 16)
    assert d.dense is not None and torch.allclose(d.apply(mean), w, atol=1e-6)
    assert compress_difference(w, mean, 0).rank == 0 and compress_difference(w, mean, 0).dense is None
