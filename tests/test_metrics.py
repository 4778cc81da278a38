"""Each pairwise metric equals a naive double loop over pairs."""

import lpips
import numpy as np
import pytest
import torch

from geneava.core import metrics


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    # random AlexNet backbone (its weights are a download), the package's own learned linear heads
    return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()


def test_cosine_and_euclidean_match_loops():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 16, generator=g), torch.randn(5, 16, generator=g)
    cos, euc = metrics.cosine_matrix(a, b), metrics.euclidean_matrix(a, b)
    for i in range(7):
        for j in range(5):
            assert cos[i, j].item() == pytest.approx(
                torch.nn.functional.cosine_similarity(a[i], b[j], 0).item(), abs=1e-6
            )
            assert euc[i, j].item() == pytest.approx((a[i] - b[j]).norm().item(), abs=1e-5)


def test_euclidean_of_identical_sets_has_a_zero_diagonal():
    a = torch.randn(6, 32)
    assert metrics.euclidean_matrix(a, a).diagonal().abs().max() < 1e-6


def test_lpips_gram_equals_lpips_pair_by_pair(lpips_model):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(5, 3, 64, 64, generator=g) * 2 - 1
    b = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    gram = metrics.LpipsGram(lpips_model)
    fast = metrics.LpipsGram.pairs(gram.features(a), gram.features(b), block=2)
    with torch.no_grad():
        for i in range(5):
            for j in range(4):
                slow = lpips_model(a[i : i + 1], b[j : j + 1]).item()
                assert abs(fast[i, j].item() - slow) <= 1e-5
    same = metrics.LpipsGram.pairs(gram.features(a), gram.features(a))
    assert same.diagonal().abs().max() < 1e-9


def test_lpips_gram_refuses_other_variants(lpips_model):
    with pytest.raises(ValueError, match="lpips=True"):
        metrics.LpipsGram(lpips.LPIPS(net="alex", pnet_rand=True, lpips=False, verbose=False))


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small = torch.from_numpy(rng.normal(0.5, 0.1, (10, 10)))
    large = torch.from_numpy(rng.normal(0.5, 0.1, (200, 200)))
    m, lo, hi = metrics.bootstrap_ci(small, n_boot=300)
    assert lo < m < hi
    m2, lo2, hi2 = metrics.bootstrap_ci(large, n_boot=300)
    assert hi2 - lo2 < hi - lo
    assert metrics.bootstrap_ci(small, n_boot=300, seed=1) == metrics.bootstrap_ci(small, n_boot=300, seed=1)


def test_class_bootstrap_is_paired_and_ignores_dropped_rows():
    g = np.random.default_rng(0)
    a = [g.normal(size=(4, 3)) for _ in range(5)]
    same = metrics.class_bootstrap({"x": a, "y": [m.copy() for m in a]}, n_boot=200)
    assert same["x - y"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "classes": 5}
    # a dropped row (NaN) counts neither in the point estimate nor in any draw
    dropped = [m.copy() for m in a]
    dropped[0][1] = np.nan
    out = metrics.class_bootstrap({"x": dropped}, n_boot=200)["x"]
    expected = np.mean([np.delete(a[0], 1, axis=0).mean(), *(m.mean() for m in a[1:])])
    assert out["mean"] == pytest.approx(expected, abs=1e-12)
    assert out["lo"] < out["mean"] < out["hi"]
    # a real shift between the variants gives a CI of the difference that excludes zero
    shifted = metrics.class_bootstrap({"x": [m + 0.5 for m in a], "y": a}, n_boot=200)["x - y"]
    assert shifted["lo"] == pytest.approx(0.5) and shifted["hi"] == pytest.approx(0.5)


def test_block_mean_equals_the_full_matrix_mean():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(23, 8, generator=g), torch.randn(11, 8, generator=g)
    full = metrics.euclidean_matrix(a, b).mean().item()
    assert metrics.block_mean(metrics.euclidean_matrix, a, b, block=5) == pytest.approx(full, abs=1e-12)
