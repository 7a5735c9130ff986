"""The language-model membership attacks and PrivLeak on hand-computed cases (issue 19)."""
import math
import zlib

import numpy as np
import pytest
import torch

from memloc.analyses.lm_attacks import (attack_scores, mink_score, minkpp_score, privleak, sequence_attacks,
                                        token_statistics)
from memloc.validate import ConfigError


def test_statistics_by_hand():
    assert mink_score([-1.0, -3.0, -2.0, -0.5], 0.5) == pytest.approx(-2.5)
    assert mink_score([-1.0, -3.0, -2.0, -0.5], 0.1) == pytest.approx(-3.0)  # at least one token
    lp, mu, sd = np.array([-1.0, -4.0, -2.0]), np.array([-2.0, -2.0, -1.0]), np.array([1.0, 2.0, 0.5])
    # z = (1, -1, -2): the lowest third is -2, the lowest two-thirds average -1.5
    assert minkpp_score(lp, mu, sd, 0.34) == pytest.approx(-2.0)
    assert minkpp_score(lp, mu, sd, 0.67) == pytest.approx(-1.5)
    # MUSE's sign: a model whose forget set still looks like members (AUC 0.6 vs the retain model's 0.5) leaks:
    # ((1 - 0.6) - (1 - 0.5)) / (1 - 0.5) x 100 = -20
    assert privleak(0.6, 0.5) == pytest.approx(-20.0)
    assert privleak(0.5, 0.5) == 0.0 and privleak(0.45, 0.5) == pytest.approx(10.0)
    assert privleak(1.0, 0.6) == pytest.approx(-100.0)
    with pytest.raises(ConfigError):
        privleak(0.5, 1.0)


def test_token_statistics_match_the_model(lm):
    h = lm.lm()
    text = lm.world.training_text()[0]
    st, = token_statistics(h, [text])
    tokens, lengths = h.batch([text])
    with torch.no_grad():
        logp = h.logits(tokens)[0, :-1].double().log_softmax(-1)
    ids = tokens[0, 1:]
    assert np.allclose(st["logprobs"], logp.gather(-1, ids[:, None])[:, 0].numpy(), atol=1e-5)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sd = ((p * (logp - mu[:, None]) ** 2).sum(-1)).sqrt()
    assert np.allclose(st["mu"], mu.numpy(), atol=1e-4) and np.allclose(st["sigma"], sd.numpy(), atol=1e-3)
    assert st["nll"] == pytest.approx(-st["logprobs"].mean())


def test_attack_scores_and_auc(lm):
    from memloc.data.facts import counterfactual_texts
    from memloc.models.transformer import lm_loss

    h = lm.lm()
    members = lm.world.training_text()[:40]
    non = counterfactual_texts(lm.world, 40, seed=1)
    sc = attack_scores(h, members[:3], ["loss", "zlib", "mink", "minkpp", "gradnorm"], k=0.5)
    st = token_statistics(h, members[:3])
    for i, t in enumerate(members[:3]):
        assert sc.loss[i] == pytest.approx(-st[i]["nll"])
        assert sc.zlib[i] == pytest.approx(-st[i]["nll"] / len(zlib.compress(t.encode())))
        assert sc.mink[i] == pytest.approx(np.sort(st[i]["logprobs"])[:max(1, int(0.5 * st[i]["n"]))].mean())
    tokens, lengths = h.batch([members[0]])
    loss = lm_loss(h.model, tokens, lengths)
    g = torch.autograd.grad(loss, [p for p in h.model.parameters() if p.requires_grad], allow_unused=True)
    assert sc.gradnorm[0] == pytest.approx(-math.sqrt(sum(float((x.double() ** 2).sum()) for x in g if x is not None)),
                                           rel=1e-4)
    res = sequence_attacks(h, members, non, attacks=["loss", "zlib", "mink", "minkpp"])
    r = res.set_index("attack")
    assert (r.auc > 0.7).all(), res  # the model memorized its training texts; the fresh ones are counterfactual
    assert r.lowest_fpr.iloc[0] == pytest.approx(1 / 40)
    per = attack_scores(h, members[:1], ["gradnorm"], gradnorm="per_tensor").gradnorm[0]
    assert per == pytest.approx(-np.mean([float(x.double().norm()) for x in g if x is not None]), rel=1e-4)
    with pytest.raises(ConfigError, match="reference"):
        attack_scores(h, members[:2], ["reference"])


def test_membership_sets_and_suite(lm):
    from memloc.analyses.lm_attacks import lm_attack_suite, membership_sets

    sets = membership_sets(lm.world, n_facts=30, n_canaries=8)
    train = set(lm.world.training_text())
    mem, non = sets["canaries"]
    assert set(mem) <= train and not set(non) & train and len(non) == 8
    assert all(t.startswith("the code of ") for t in mem + non)
    mem, non = sets["facts"]
    assert len(mem) == len(non) == 30 and not set(non) & train
    t = lm_attack_suite(lm.lm(), lm.world, attacks=["loss", "mink"], n_facts=30)
    assert set(t.set) == {"canaries", "facts"} and len(t) == 4
    assert (t.auc > 0.5).all()
