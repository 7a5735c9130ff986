"""Similarity measures: properties, and agreement with the reference formulas computed independently here.

The reference functions below re-implement google/svcca ``cca_core.get_cca_similarity`` (epsilon=0) and
``pwcca.compute_pwcca`` step by step, in their neurons x datapoints layout, from the published source
(see ../shared/references/probes.md, sec. 2), and Kornblith et al.'s Gram-matrix CKA.
"""
import numpy as np
import pytest
import torch

from memloc.analyses.similarity import (MinibatchCKA, cca_coefficients, cca_summary, linear_cka, mean_cca, pwcca,
                                        similarity, svcca, svcca_details)


def ref_cca(acts1, acts2):
    """google/svcca get_cca_similarity(acts1, acts2, epsilon=0) core (neurons x datapoints)."""
    n1 = acts1.shape[0]
    sigma = np.cov(acts1, acts2)
    sxx, sxy, syx, syy = sigma[:n1, :n1], sigma[:n1, n1:], sigma[n1:, :n1], sigma[n1:, n1:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy = sxx / xmax, syy / ymax
    sxy, syx = sxy / np.sqrt(xmax * ymax), syx / np.sqrt(xmax * ymax)

    def positivedef_matrix_sqrt(a):
        w, v = np.linalg.eigh(a)
        wsqrt = np.sqrt(np.clip(w, 0, None))  # google: np.sqrt(w), NaN (then LinAlgError) on round-off below 0
        return v @ np.diag(wsqrt) @ v.T

    invsqrt_xx = positivedef_matrix_sqrt(np.linalg.pinv(sxx))
    invsqrt_yy = positivedef_matrix_sqrt(np.linalg.pinv(syy))
    arr = invsqrt_xx @ sxy @ invsqrt_yy
    u, s, v = np.linalg.svd(arr)
    return u, np.abs(s), v


def sum_threshold(array, threshold):
    """google/svcca cca_core.sum_threshold, verbatim."""
    for i in range(len(array)):
        if np.sum(array[:i]) / np.sum(array) >= threshold:
            return i


def ref_pwcca(acts1, acts2):
    """google/svcca compute_pwcca (acts1 must have fewer neurons, as the reference requires)."""
    u, s, _ = ref_cca(acts1, acts2)
    mu = acts1.mean(1, keepdims=True)
    dirns = u.T @ (acts1 - mu) + mu
    p, _ = np.linalg.qr(dirns.T)
    weights = np.sum(np.abs(p.T @ acts1.T), axis=1)
    weights = weights / np.sum(weights)
    return np.sum(weights * s)


def ref_gram_cka(x, y):
    """Kornblith et al. demo: cka(gram_linear(x), gram_linear(y))."""
    def center(g):
        means = g.mean(0)
        means -= means.mean() / 2
        return g - means[:, None] - means[None, :]

    gx, gy = center(x @ x.T), center(y @ y.T)
    return (gx.ravel() @ gy.ravel()) / (np.linalg.norm(gx) * np.linalg.norm(gy))


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 8))
    x = np.maximum(z @ rng.normal(size=(8, 30)) + 0.5 * rng.normal(size=(2000, 30)), 0) + 1.0
    y = np.tanh(z @ rng.normal(size=(8, 50))) + 0.3 * rng.normal(size=(2000, 50))
    return x, y


def test_cca_matches_google_svcca(pair):
    x, y = pair
    _, s_ref, _ = ref_cca(x.T, y.T)
    s = cca_coefficients(x, y)
    assert np.allclose(s, s_ref[:len(s)], atol=1e-9)
    assert abs(mean_cca(x, y) - s_ref.mean()) < 1e-9
    # google's result["mean"] = mean(s[:sum_threshold(s, 0.98)])
    for t in (0.98, 0.9, 0.5, 1.0):
        assert abs(cca_summary(x, y, t)["mean_thresholded"] - np.mean(s_ref[:sum_threshold(s_ref, t)])) < 1e-9


def test_thresholded_mean_keeps_the_coefficient_that_reaches_the_threshold():
    """google/svcca's sum_threshold returns the first i with sum(s[:i]) >= t * sum(s): the coefficient that crosses
    the threshold is kept (memloc kept one fewer before)."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(3000, 6))
    x = z @ rng.normal(size=(6, 12)) + rng.normal(size=(3000, 12))
    y = z @ rng.normal(size=(6, 9)) + rng.normal(size=(3000, 9))
    s = cca_coefficients(x, y)
    i = sum_threshold(s, 0.98)
    assert i is None or 0 < i < len(s)
    got = cca_summary(x, y)["mean_thresholded"]
    assert abs(got - np.mean(s[:i])) < 1e-12
    assert abs(got - np.mean(s[:(i or len(s)) - 1])) > 1e-4  # the old answer
    with pytest.raises(ValueError, match="'threshold' parameter"):
        cca_summary(x, y, 0.0)


def test_pwcca_reference_mode_matches_google_and_works_in_both_orders(pair):
    x, y = pair
    ref = ref_pwcca(x.T, y.T)
    assert abs(pwcca(x, y, reference=True) - ref) < 1e-8
    assert abs(pwcca(y, x, reference=True) - ref) < 1e-8  # the reference raises IndexError in this order
    assert abs(pwcca(x, y) - pwcca(y, x)) < 1e-12


def test_pwcca_reference_mode_with_dead_units_matches_google(pair):
    """A ReLU layer's dead (all-zero) or constant units: google's compute_pwcca keeps them (epsilon=0), each adding a
    zero coefficient, and returns a value; memloc's reference mode raised LinAlgError (Cholesky of a singular
    basis) when such a unit came last."""
    x, y = pair
    for pos, value in ((0, 0.0), (12, 1.0), (30, 0.0)):  # (30, 0.0): the old code's LinAlgError
        xd = np.insert(x, pos, value, axis=1)
        ref = ref_pwcca(xd.T, y.T)
        assert np.isfinite(ref)
        assert abs(pwcca(xd, y, reference=True) - ref) < 1e-9
        assert abs(pwcca(y, xd, reference=True) - ref) < 1e-9
    xd = np.insert(x, 0, 0.0, axis=1)
    assert abs(pwcca(xd, y, reference=True) - pwcca(x, y, reference=True)) > 1e-3  # the dead unit counts
    assert abs(pwcca(xd, y) - pwcca(x, y)) < 1e-9  # memloc's own PWCCA drops null directions
    # epsilon > 0 drops the dead unit, as google's remove_small does
    assert abs(pwcca(xd, y, reference=True, epsilon=1e-8) - pwcca(x, y, reference=True)) < 1e-6
    with pytest.raises(ValueError, match="'epsilon' parameter"):
        pwcca(x, y, epsilon=1e-3)


def test_pwcca_centred_is_shift_invariant_reference_is_not(pair):
    x, y = pair
    assert abs(pwcca(x + 3.0, y) - pwcca(x, y)) < 1e-9
    assert abs(pwcca(x + 3.0, y, reference=True) - pwcca(x, y, reference=True)) > 1e-4


def test_cka_matches_gram_form_and_published_values(pair):
    x, y = pair
    assert abs(linear_cka(x[:500], y[:500]) - ref_gram_cka(x[:500], y[:500])) < 1e-10
    rs = np.random.RandomState(1337)
    a = rs.randn(100, 10)
    b = rs.randn(100, 10) + a
    assert abs(linear_cka(a, b) - 0.55761) < 5e-6  # Kornblith et al. demo notebook
    assert abs(linear_cka(a, b, debiased=True) - 0.51346) < 5e-6


def test_cka_properties(pair):
    x, y = pair
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(30, 30)))
    assert abs(linear_cka(x, x) - 1) < 1e-12 and abs(linear_cka(x, x, debiased=True) - 1) < 1e-12
    assert abs(linear_cka(x @ q * 7.5, y) - linear_cka(x, y)) < 1e-10
    general = np.random.default_rng(2).normal(size=(30, 30))
    assert abs(linear_cka(x @ general, y) - linear_cka(x, y)) > 1e-3  # not invariant to any linear map
    # ... but CCA is
    assert abs(mean_cca(x @ general, y) - mean_cca(x, y)) < 1e-8
    assert abs(mean_cca(x @ q * 3, y) - mean_cca(x, y)) < 1e-10
    ind = np.random.default_rng(3).normal(size=(2000, 30))
    assert linear_cka(x, ind) < 0.1 and abs(linear_cka(x, ind, debiased=True)) < 0.01


def test_minibatch_cka(pair):
    x, y = pair
    one = MinibatchCKA().update(x[:300], y[:300]).value()
    assert abs(one - linear_cka(x[:300], y[:300], debiased=True)) < 1e-10
    acc = MinibatchCKA()
    for s in range(0, 2000, 250):
        acc.update(torch.as_tensor(x[s:s + 250]), y[s:s + 250])
    assert acc.n_examples == 2000 and abs(acc.value() - linear_cka(x, y, debiased=True)) < 0.02
    with pytest.raises(ValueError, match="no batch"):
        MinibatchCKA().value()


def test_svcca_rules_and_reported_k():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3000, 10))
    x = z @ rng.normal(size=(10, 40)) + 0.05 * rng.normal(size=(3000, 40))
    y = z @ rng.normal(size=(10, 60)) + 0.05 * rng.normal(size=(3000, 60))
    d = svcca_details(x, y, k=10)
    assert d["k_x"] == 10 and d["k_y"] == 10 and d["svcca"] > 0.99
    sq = svcca_details(x, y)
    sg = svcca_details(x, y, variance="singular")
    assert sq["variance"] == "squared" and sq["k_x"] <= sg["k_x"]  # squared values concentrate faster
    assert abs(svcca(x, y, k=40) - mean_cca(x, y[:, :60])) < 1  # runs with k capped by rank
    with pytest.raises(ValueError, match="'variance' parameter"):
        svcca(x, y, variance="cubed")


def test_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="CCA needs more examples than features: got 20 examples for 30"):
        mean_cca(rng.normal(size=(20, 30)), rng.normal(size=(20, 5)))
    with pytest.raises(ValueError, match="same examples \\(rows\\): got 20 and 21"):
        linear_cka(rng.normal(size=(20, 3)), rng.normal(size=(21, 3)))
    with pytest.raises(ValueError, match="Unknown similarity method 'rsa'"):
        similarity(rng.normal(size=(20, 3)), rng.normal(size=(20, 3)), "rsa")
    with pytest.warns(UserWarning, match="biased upwards"):
        mean_cca(rng.normal(size=(60, 10)), rng.normal(size=(60, 10)))


def test_dead_units_do_not_add_zero_coefficients(pair):
    x, y = pair
    xd = np.concatenate([x, np.zeros((len(x), 5))], 1)
    assert np.allclose(cca_coefficients(xd, y), cca_coefficients(x, y))
