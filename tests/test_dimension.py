import numpy as np
import pytest

from memloc.analyses.dimension import MLE, TwoNN, intrinsic_dimension


@pytest.mark.parametrize("d", [2, 5, 10])
def test_twonn_recovers_the_dimension_of_a_linear_subspace(d):
    rng = np.random.default_rng(d)
    X = rng.normal(size=(4000, d)) @ rng.normal(size=(d, 60))
    assert abs(TwoNN().fit(X).dimension_ - d) < 0.1 * d


def test_agreement_with_scikit_dimension():
    skdim = pytest.importorskip("skdim")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1500, 6)) @ rng.normal(size=(6, 30))
    assert abs(TwoNN().fit(X).dimension_ - skdim.id.TwoNN().fit(X).dimension_) < 1e-9
    assert abs(MLE(comb="mle").fit(X).dimension_ - skdim.id.MLE().fit(X).dimension_) < 1e-9
    assert abs(MLE(comb="mean").fit(X).dimension_ - skdim.id.MLE().fit(X, comb="mean").dimension_) < 1e-9


def test_duplicates_are_dropped_and_counted():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 4)) @ rng.normal(size=(4, 20))
    dup = np.concatenate([X, X[:100], np.zeros((50, 20))])
    est = TwoNN().fit(dup)
    assert est.n_duplicates_ == 149 and abs(est.dimension_ - TwoNN().fit(np.concatenate([X, np.zeros((1, 20))])).dimension_) < 1e-12
    assert MLE().fit(dup).n_duplicates_ == 149 and np.isfinite(MLE().fit(dup).dimension_)
    with pytest.raises(ValueError, match="149 duplicate rows"):
        TwoNN(duplicates="error").fit(dup)


def test_bad_input():
    with pytest.raises(ValueError, match="'discard_fraction' parameter must be in \\[0, 1\\)"):
        TwoNN(discard_fraction=1.0).fit(np.random.default_rng(0).normal(size=(50, 3)))
    with pytest.raises(ValueError, match="at least 3 distinct points"):
        TwoNN().fit(np.ones((10, 3)))
    with pytest.raises(ValueError, match="Unknown estimator"):
        intrinsic_dimension(np.ones((10, 3)), "pca")
