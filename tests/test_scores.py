from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from memloc.analyses.privacy import membership_inference, roc_summary
from memloc.analyses.scores import (DIRECTION, agreement, all_scores, auroc_table, cscore, curvature,
                                    feldman_zhang, fz_influence, input_gradient_norms,
                                    trajectory_scores)
from memloc.ensemble import Ensemble, subset_masks, train_ensemble


def test_trajectory_scores_on_hand_written_trajectories():
    c = np.array([[1, 0, 1, 0],   # learned, forgotten twice, wrong at the end
                  [0, 0, 0, 0],   # never learned: counts as 4 events
                  [0, 1, 1, 1],   # learned at epoch 2 and kept
                  [1, 1, 0, 1],   # one forgetting event, stays learned from epoch 4
                  [1, 1, 1, 1]], bool)
    loss = np.arange(20, dtype=float).reshape(5, 4)
    t = trajectory_scores(c, loss, np.full((5, 4), 0.5), np.array([1, 2, 3, 4]))
    assert t["forgetting_events"].tolist() == [2, 4, 0, 1, 0]
    assert t["first_learned_epoch"].tolist() == [5, 5, 2, 4, 1]
    assert t["learning_speed"].tolist() == [0.5, 0.0, 0.75, 0.75, 1.0]
    assert t["cumulative_loss"].tolist() == [6, 22, 38, 54, 70] and t["final_loss"].tolist() == [3, 7, 11, 15, 19]


def test_curvature_of_a_quadratic_loss_is_analytic():
    a = torch.tensor([0.5, 2.0, -1.0, 3.0], dtype=torch.float64)
    model = nn.Identity().eval()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.zeros(7, dtype=torch.long)

    def loss_fn(out, _):
        return 0.5 * (a * out * out).sum(1)  # Hessian diag(a), for every example

    sq = curvature(model, x, y, n_directions=5, h=1e-2, loss_fn=loss_fn)
    assert torch.allclose(sq, (a ** 2).sum().expand(7))  # tr(H^2), exactly for diagonal H and Rademacher v
    nm = curvature(model, x, y, n_directions=5, h=1e-2, form="norm", loss_fn=loss_fn)
    assert torch.allclose(nm, (a ** 2).sum().sqrt().expand(7))
    raw = curvature(model, x, y, n_directions=5, h=1e-2, normalize=False, loss_fn=loss_fn)
    assert torch.allclose(raw, 1e-4 * (a ** 2).sum().expand(7))
    with pytest.raises(ValueError, match="'form' parameter"):
        curvature(model, x, y, form="cubic", loss_fn=loss_fn)


def test_per_example_gradients_do_not_depend_on_the_batch(small_run):
    model, data = small_run.model(), small_run.data().train
    for p in model.parameters():
        p.requires_grad_(False)
    a = input_gradient_norms(model, data.x[:100], data.y[:100], batch_size=7)
    b = input_gradient_norms(model, data.x[:100], data.y[:100], batch_size=1000)
    assert torch.allclose(a, b, rtol=1e-5)  # a batch-mean loss would scale the 7-example batches' gradients
    c1 = curvature(model, data.x[:30], data.y[:30], batch_size=11 * 3)
    c2 = curvature(model, data.x[:30], data.y[:30], batch_size=11 * 30)
    assert torch.allclose(c1, c2, rtol=1e-4)


def test_run_scores_recover_flipped_labels(small_run):
    s = all_scores(small_run, epochs=None, n_directions=4, progress=False)
    assert len(s) == 1437 and set(s.group) == {"clean", "noisy"}
    auc = auroc_table(s).set_index("score").auroc
    assert auc["cumulative_loss"] > 0.9 and auc["curvature"] > 0.85
    assert auc["cumulative_loss"] > auc["final_loss"]
    assert set(auc.index) <= set(DIRECTION)
    ag = agreement(s, reference="cumulative_loss")
    assert (ag.set_index("score_b").pearson["learning_speed"]) > 0.5  # oriented: both say "memorized"


def _fake_ensemble(masks, correct):
    masks = np.asarray(masks, bool)
    correct = np.asarray(correct, bool)
    return Ensemble(masks=masks, train_ids=np.arange(masks.shape[1]), test_ids=np.arange(2),
                    correct_train=correct, correct_test=correct[:, :2], phi_train=correct.astype(np.float32),
                    phi_test=correct[:, :2].astype(np.float32), settings={"ratio": 0.5})


def test_feldman_zhang_definition_and_missing_estimates():
    masks = [[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]
    correct = [[1, 1, 0], [1, 0, 1], [0, 1, 0], [1, 0, 0]]
    fz = feldman_zhang(_fake_ensemble(masks, correct))
    # example 0 is in every subset, example 2 in none: no estimate, reported as NaN (not 0)
    assert np.isnan(fz.fz_memorization[0]) and np.isnan(fz.fz_memorization[2])
    assert fz.fz_memorization[1] == pytest.approx(1.0 - 0.0)
    assert fz.acc_in[0] == pytest.approx(0.75) and fz.n_out[0] == 0
    inf = fz_influence(_fake_ensemble(masks, correct))
    assert np.isnan(inf[0]).all() and inf[1, 0] == pytest.approx(0.5 - 1.0)
    cs = cscore([_fake_ensemble(masks, correct)])
    assert np.isnan(cs.cscore[0]) and cs.cscore[2] == pytest.approx(0.25)


def test_subset_masks():
    m = subset_masks(10, 50, 0.7, seed=1)
    assert (m.sum(1) == 35).all() and not np.array_equal(m[0], m[1])
    b = subset_masks(8, 30, 0.5, seed=1, balanced=True)
    assert (b.sum(0) == 4).all()
    with pytest.raises(ValueError, match="'ratio' parameter"):
        subset_masks(4, 10, 1.0)


def test_batched_ensemble_equals_separately_trained_models(digits):
    from memloc.data import inject_label_noise

    data = inject_label_noise(digits, 0.1, seed=0)
    data = replace(data, x=data.x.double())
    torch.set_default_dtype(torch.float64)
    try:
        kw = dict(model_kwargs={"hidden": [16]}, epochs=2, batch_size=64, progress=False, return_states=True)
        _, a = train_ensemble(data, 5, chunk=2, **kw)
        _, b = train_ensemble(data, 5, method="loop", **kw)
    finally:
        torch.set_default_dtype(torch.float32)
    for sa, sb in zip(a, b):
        for k in sa:
            assert torch.allclose(sa[k], sb[k], atol=1e-10, rtol=0), k


def test_batchnorm_ensembles_batched_equal_the_loop_in_float64(digits):
    """BatchNorm models stack: per-model running statistics, each normalised by its own minibatch; balanced
    (unequal-size) subsets too."""
    from memloc.data import inject_label_noise

    data = inject_label_noise(digits, 0.1, seed=0)
    kw = dict(model="cnn2d", model_kwargs={"channels": [4, 6]}, epochs=2, batch_size=64, progress=False,
              return_states=True, dtype=torch.float64, optimizer="sgd", lr=0.05)
    data = replace(data, x=data.x.view(-1, 1, 8, 8))
    for extra in ({}, {"balanced": True, "ratio": 0.5}):
        with pytest.warns(UserWarning, match="fit only"):
            ens_a, a = train_ensemble(data, 4, chunk=3, **kw, **extra)
        with pytest.warns(UserWarning, match="fit only"):
            ens_b, b = train_ensemble(data, 4, method="loop", **kw, **extra)
        for sa, sb in zip(a, b):
            assert any("running_mean" in k for k in sa)
            for k in sa:
                assert torch.allclose(sa[k].double(), sb[k].double(), atol=1e-10, rtol=0), k
            # each model has its own statistics, and they moved away from their initial values
            assert not torch.equal(sa["layers.0.0.bn.running_mean"], a[0]["layers.0.0.bn.running_mean"]) or sa is a[0]
        assert (ens_a.phi_train == ens_b.phi_train).all() or np.allclose(ens_a.phi_train, ens_b.phi_train, atol=1e-6)
        assert ens_a.settings["fit_own_subset"] < 0.95


@pytest.fixture(scope="module")
def ensemble(digits):
    from memloc.data import inject_label_noise

    data = inject_label_noise(digits, 0.1, seed=0)
    return data, train_ensemble(data, 24, model_kwargs={"hidden": [256]}, lr=1e-2, batch_size=32, epochs=30,
                                progress=False)


def test_feldman_zhang_and_lira_on_flipped_labels(ensemble, tmp_path):
    data, ens = ensemble
    fz = feldman_zhang(ens, data)
    assert fz[fz.group == "noisy"].fz_memorization.mean() > 0.5
    assert fz[fz.group == "clean"].fz_memorization.median() < 0.1
    assert auroc_table(fz).auroc.iloc[0] > 0.9
    mi = membership_inference(ens, data, n_targets=4).set_index(["attack", "group"])
    for attack in ("lira_online_fixed_variance", "loss"):
        assert mi.loc[(attack, "noisy"), "tpr_at_1%_fpr"] > mi.loc[(attack, "clean"), "tpr_at_1%_fpr"]
    back = Ensemble.load(ens.save(tmp_path / "e.safetensors"))
    assert np.array_equal(back.masks, ens.masks) and np.array_equal(back.phi_train, ens.phi_train)
    assert back.settings["n_models"] == 24


def test_roc_summary():
    s = roc_summary(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False]))
    assert s["auc"] == 1.0 and s["tpr_at_1%_fpr"] == 1.0
    # tensorflow/privacy's rule: the TPR of the last ROC point with FPR < 1%; with 43 non-members that is the TPR at
    # zero false positives (no interpolation towards the first false positive), and lowest_fpr says so
    rng = np.random.default_rng(0)
    members = np.r_[np.ones(40, bool), np.zeros(43, bool)]
    scores = np.r_[rng.normal(1.0, 1, 40), rng.normal(0, 1, 43)]
    s = roc_summary(scores, members)
    top_negative = scores[~members].max()
    assert s["tpr_at_1%_fpr"] == s["tpr_at_0.1%_fpr"] == (scores[members] > top_negative).mean()
    assert s["lowest_fpr"] == pytest.approx(1 / 43)


def test_second_split_forgetting_and_holdout_retraining(small_run):
    from memloc.analyses.scores import holdout_retraining, second_split_forgetting

    s = second_split_forgetting(small_run, forget_epochs=6, fit_epochs=30, progress=False)
    assert s.ssft.between(1, 7).all() and len(s) == 1437
    assert s[s.group == "noisy"].ssft.median() < s[s.group == "clean"].ssft.median()
    h = holdout_retraining(small_run, epochs=2)
    assert (h.holdout_kl >= -1e-12).all()
    assert auroc_table(h).auroc.iloc[0] > 0.8


def test_scores_cli(small_run, tmp_path, capsys):
    from memloc.cli import main

    out = tmp_path / "s"
    assert main(["scores", str(small_run.path), "--score", "dynamics", "--score", "curvature", "--score", "fz",
                 "--score", "mia", "--models", "6", "--ensemble-epochs", "3", "--epochs", "1,2",
                 "--n-directions", "2", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "AUROC for recovering the 144 flipped labels" in text and "agreement with fz_memorization" in text
    for name in ("scores.parquet", "auroc.parquet", "agreement.parquet", "membership_inference.parquet",
                 "ensemble.safetensors", "histograms.png", "gallery.png"):
        assert (out / name).exists(), name


class _Ens:
    """A hand-made ensemble: 3 models, 4 training examples, probabilities of the training label given."""

    def __init__(self, p, masks):
        p = np.asarray(p, float)
        self.phi_train = np.log(p / (1 - p))
        self.masks = np.asarray(masks, bool)
        self.n_models = len(p)
        self.settings = {}


def test_rmia_by_hand():
    from scipy.stats import trim_mean

    from memloc.analyses.privacy import _trimmed_mean, rmia_scores

    ens = _Ens([[0.9, 0.8, 0.5, 0.4], [0.6, 0.5, 0.5, 0.2], [0.7, 0.4, 0.25, 0.5]],
               [[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 0]])
    # offline, a = 0.3: Pr(x) = 0.65 * p_out + 0.35 with p_out = 0.6, 0.4, 0.5, 0.5 -> ratios 1.216, 1.311, 0.741,
    # 0.593; the population is the target's non-members (examples 2, 3), each compared with the other only
    kw = dict(online=False, a=0.3, invert_in=False)
    assert np.allclose(rmia_scores(ens, 0, [1, 2], gamma=1.5, **kw), [1, 1, 0, 0])
    assert np.allclose(rmia_scores(ens, 0, [1, 2], gamma=1.2, **kw), [1, 1, 1, 0])  # 0.741 / 0.593 = 1.25
    # with IN references inverted, (p_in + a - 1) / a clipped at 0: p_out = 0.3, 0.2, 0.25, 0.25 -> ratios 1.651,
    # 1.667, 0.976, 0.780
    assert np.allclose(rmia_scores(ens, 0, [1, 2], online=False, a=0.3, gamma=2.0), [0.5, 0.5, 0, 0])
    # online: Pr(x) = the mean of both references -> ratios 1.385, 1.778, 1.333, 1.143
    assert np.allclose(rmia_scores(ens, 0, [1, 2], online=True, gamma=1.1), [0.5, 1, 1, 0])
    x = np.array([[1.0, 5.0], [2.0, np.nan], [3.0, 7.0], [4.0, np.nan], [100.0, np.nan]])
    assert np.allclose(_trimmed_mean(x), [trim_mean([1, 2, 3, 4, 100], 0.2), trim_mean([5, 7], 0.2)])
    from memloc.validate import ConfigError
    with pytest.raises(ConfigError, match="without the target"):
        rmia_scores(ens, 0, [0, 1])


def test_rmia_and_lira_with_equal_reference_models(ensemble):
    from memloc.analyses.privacy import rmia_vs_lira

    data, ens = ensemble
    t = rmia_vs_lira(ens, n_references=(1, 2, 8, 100), n_targets=2)
    assert sorted(set(t.k)) == [0, 1, 2, 8]  # 100 > 23 other models is left out
    r = t.set_index(["attack", "k"])
    assert ("rmia_online", 1) not in r.index and ("rmia_offline", 1) in r.index
    assert r.loc[("rmia_offline", 8), "auc"] > 0.55 and r.loc[("rmia_online", 8), "auc"] > 0.55
    assert r.loc[("lira_offline", 1), "coverage"] < 1.0  # one reference leaves only its non-members scorable
    assert t.attrs["settings"]["gamma"] == 1.0
    assert (r.loc[[("rmia_offline", 1), ("rmia_online", 2)], "coverage"] == 1.0).all()
