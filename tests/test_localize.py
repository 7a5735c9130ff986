"""Localizers behind one interface and the INJ / DEL ground-truth benchmarks (issue 17)."""
import numpy as np
import pytest
import torch

from memloc.locate.groundtruth import (deletion_benchmark, deletion_benchmark_lm, inject_units,
                                       injection_benchmark, injection_benchmark_lm, levenshtein)
from memloc.locate.localize import classifier_targets, localize, sequence_targets, top_units
from memloc.validate import ConfigError


@pytest.fixture(scope="module")
def clf(small_run):
    return small_run.model().eval(), small_run.data()


def test_injected_units_are_recovered_by_hardconcrete_and_zero_out(clf):
    model, data = clf
    res = injection_benchmark(model, data, ratio=0.1, n_examples=5, methods=["hardconcrete", "zero_out", "random"],
                              progress=False)
    r = res.set_index("method")
    assert (r.fitted >= 0.8).all()
    base = r.baseline.iloc[0]
    assert base == pytest.approx(0.1, abs=0.01)
    for m in ("hardconcrete", "zero_out"):
        assert r.loc[m, "recall"] >= 2 * base, res
    assert r.loc["random", "recall"] < 0.25


def test_injection_changes_only_the_chosen_units(clf):
    model, data = clf
    tr = np.flatnonzero(data.split == "train")
    te = np.flatnonzero(data.split == "test")[:5]
    units = {"layers.0": list(range(3, 256, 8))}
    y_new = (data.y[te] + 1) % data.num_classes
    inj, info = inject_units(model, data.x[tr], data.y[tr], data.x[te], y_new, units, max_steps=500)
    assert info["fitted"] == 1.0
    changed = {k: (v != model.state_dict()[k]) for k, v in inj.state_dict().items()}
    rows = {k: torch.nonzero(c.reshape(c.shape[0], -1).any(1)).flatten().tolist() if c.ndim else [] for k, c in
            changed.items()}
    assert {k: v for k, v in rows.items() if v} and all(set(v) <= set(units["layers.0"]) for v in rows.values())
    assert all(not c.any() for k, c in changed.items() if not k.startswith("layers.0"))


@pytest.mark.parametrize("method", ["hardconcrete", "slimming", "zero_out", "ig", "activations", "greedy"])
def test_localizers_leave_the_model_bit_for_bit(clf, method):
    model, data = clf
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    next(model.parameters()).requires_grad_(False)  # a user's frozen parameter stays frozen
    try:
        noisy = np.flatnonzero(data.group == "noisy")[:4]
        t = classifier_targets(model, data.x[noisy], data.y[noisy], ids=data.example_id[noisy].tolist())
        table = localize(t, method, max_steps=60) if method in ("hardconcrete", "slimming") else localize(t, method)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert next(model.parameters()).requires_grad is False
        assert len(table) == 4 * sum(t.sizes) and set(table.target) == set(t.ids)
        assert (table.groupby("target")["rank"].apply(lambda r: sorted(r) == list(range(len(r))))).all()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def test_batched_masks_equal_one_target_at_a_time(clf):
    model, data = clf
    noisy = np.flatnonzero(data.group == "noisy")[:3]
    t = classifier_targets(model, data.x[noisy], data.y[noisy])
    for m in ("hardconcrete", "slimming"):
        a = localize(t, m, max_steps=80)
        b = localize(t, m, max_steps=80, batched=False)
        assert np.allclose(a.score, b.score, atol=1e-5)
        assert a.attrs["steps"] == b.attrs["steps"]


def test_deletion_control_removes_as_many_units_per_layer(clf):
    model, data = clf
    res = deletion_benchmark(model, data, fractions=(0.02, 0.1), n_targets=4,
                             methods=["zero_out", "random"], progress=False)
    for (frac, target), g in res.groupby(["fraction", "target"]):
        per_layer = [tuple(sorted(d.items())) for d in g.units_per_layer]
        assert len(set(per_layer)) == 1 and len(g) == 2
    s = res.groupby(["method", "fraction"]).forgot.mean()
    assert s["zero_out", 0.1] > s["random", 0.1]
    assert res.attrs["settings"]["unablated"]["collateral"] == 1.0  # collateral set = memorized noisy examples


def test_language_model_localizers_and_benchmarks(lm):
    from memloc.analyses.lm import memorized_sequences
    from memloc.data.facts import counterfactual_texts

    h = lm.lm()
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    texts = counterfactual_texts(lm.world, 1, seed=0)
    assert not set(texts) & set(lm.world.training_text())
    inj = injection_benchmark_lm(h, texts, ratio=0.05, methods=["hardconcrete", "zero_out", "random"], progress=False)
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())
    r = inj.groupby("method").recall.mean()
    assert (inj.final_loss < 0.05).all() and inj.extractable.all()
    assert r["zero_out"] >= 4 * inj.baseline.mean() and r["hardconcrete"] >= 4 * inj.baseline.mean()
    mem = memorized_sequences(h, lm.world.training_text(), prefix_tokens=3, suffix_tokens=2)
    held = [f"{p} {f.object}" for f in lm.world.facts for p in lm.world.prompts(f, "heldout")][:30]
    de = deletion_benchmark_lm(h, mem, held, fractions=(0.05,), n_targets=2, methods=["zero_out", "random"],
                               progress=False)
    assert all(torch.equal(v, before[k]) for k, v in h.model.state_dict().items())
    g = de.groupby("method")
    assert g.exact_after.mean()["zero_out"] <= g.exact_after.mean()["random"]
    assert (de.groupby("target").units.nunique() == 1).all()
    t = sequence_targets(h, mem[mem.extractable.fillna(False).astype(bool)].head(2))
    table = localize(t, "activations")
    assert set(table.layer) == {f"blocks.{l}.mlp.hook_post" for l in range(h.cfg.n_layers)}
    top = top_units(table, fraction=0.01, target=table.target.iloc[0])
    assert all(len(v) == max(1, round(0.01 * h.cfg.d_mlp)) for v in top.values())


def test_bad_input_is_refused(clf, lm):
    model, data = clf
    t = classifier_targets(model, data.x[:2], data.y[:2])
    with pytest.raises(ConfigError, match="method"):
        localize(t, "hard_concrete")
    with pytest.raises(ConfigError, match="Unknown option"):
        localize(t, "zero_out", lam=3)
    with pytest.raises(ConfigError, match="stop"):
        localize(t, "slimming", stop=2)
    with pytest.raises(ConfigError, match="prefix_tokens"):
        sequence_targets(lm.lm(), ["a text"])
    with pytest.raises(ConfigError, match="Greedy"):
        injection_benchmark_lm(lm.lm(), ["x"], methods=["greedy"])
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "ab") == 2


def test_sequences_are_cut_by_token_position(hf_dir):
    """A BPE name split mid-word stays one word: plain texts and memorized-sequence rows are cut by token position,
    never re-joined from decoded strings (which would put a space inside the word)."""
    from memloc.analyses.lm import memorized_sequences
    from memloc.models.lm import LM

    h = LM.from_pretrained(hf_dir)
    text = "Quarnesh is a country whose capital is Kalbor"
    ids = h.encode(text, bos=False)
    for k in range(1, 4):
        t = sequence_targets(h, [text], prefix_tokens=k)
        bos = [h.bos_id] if h.prepend_bos else []
        assert t.extra["tokens"][0, :int(t.extra["lengths"][0])].tolist() == bos + ids
        assert int(t.extra["starts"][0]) == len(bos) + k
    mem = memorized_sequences(h, [text], prefix_tokens=2, suffix_tokens=3)
    t = sequence_targets(h, mem)
    assert t.extra["tokens"][0, :int(t.extra["lengths"][0])].tolist() == bos + ids[:5]
