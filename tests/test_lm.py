import numpy as np
import pytest
import torch

pytest.importorskip("transformer_lens")

from memloc.analyses.lm import canary_extraction, exposure
from memloc.data.facts import WordTokenizer, make_fact_world
from memloc.locate.trace import bucket_positions, trace, trace_facts
from memloc.models.transformer import LMRun


def test_fact_world_is_seeded_and_holds_out_paraphrases():
    a, b, c = make_fact_world(30, seed=1), make_fact_world(30, seed=1), make_fact_world(30, seed=2)
    assert a.facts == b.facts and a.facts != c.facts
    assert len(a.facts) == 30 * 3 and len(set(a.subjects)) == 30
    text = " | ".join(a.training_text())
    for f in a.facts[:10]:
        for p in a.prompts(f, "heldout"):
            assert p not in text  # paraphrases never seen in training
    reps = [c.repeats for c in a.canaries]
    assert sum(t.startswith("the code of") for t in a.training_text()) == sum(reps)
    assert len(make_fact_world(30, seed=1, profiles=0).training_text()) == len(a.training_text()) - 3 * 30
    objects = {f.object for f in a.facts}
    profile = [t for t in a.training_text() if t.split()[0] in a.subjects and set(t.split()[1:]) <= objects]
    assert len(profile) == 90 and all(set(t.split()[1:]) == {f.object for f in a.facts if f.subject == t.split()[0]}
                                      for t in profile)
    with pytest.raises(ValueError, match="Unknown relation"):
        make_fact_world(5, relations=["spouse"])


def test_tokenizer_round_trip():
    w = make_fact_world(10, seed=0)
    tok = WordTokenizer(w.words())
    s = w.training_text()[0]
    assert tok.decode(tok.encode(s)) == s and tok.encode(s)[0] == tok.bos_id
    assert all(len(tok.encode(x, bos=False)) == len(x.split()) for x in w.training_text())
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.id("zebra")


def test_testbed_memorizes_facts_and_repeated_canaries(lm):
    s = lm.summary
    assert s["fact_recall_train_templates"] >= 0.95
    model, world = lm.model(), lm.world
    assert not model.training
    h = lm.lm()
    assert canary_extraction(h, world).query("repeats > 1").extracted.all()
    ex = exposure(h, world)
    assert (ex.method == "exact").all() and (ex.scoring == "exact (stems)").all()
    rep = ex[ex.repeats > 1]
    assert (rep["rank"] == 1).all() and (rep.exposure == rep.max_exposure).all()
    # exposure saturates over 10^3 candidates; the canaries inserted once are still less likely
    assert ex[ex.repeats == 1].log_perplexity.min() > rep.log_perplexity.max()


def test_causal_tracing_sanity(lm):
    model, tok, world = lm.model(), lm.tokenizer, lm.world
    fact = next(f for f in world.facts if f.relation == "city")
    prompt = world.prompts(fact, "train")[2]  # "the home of {s} is in": tokens before the subject exist
    ids = tok.encode(prompt)
    pos = [ids.index(tok.id(fact.subject))]
    df = trace(model, ids, pos, tok.id(fact.object), kind="resid", samples=6)
    st = df.attrs["settings"]
    before = df[df.position < pos[0]]
    assert len(before) and np.abs(before.ie).max() < 1e-6  # causal attention: nothing there was corrupted (float32)
    last = df[(df.layer == st["n_layers"] - 1) & (df.position == len(ids) - 1)].ie.iloc[0]
    assert abs(last - st["te"]) < 1e-6  # restoring the final state restores the clean output
    assert st["te"] > 0
    mlp = trace(model, ids, pos, tok.id(fact.object), kind="mlp", samples=6, window=2)
    assert mlp.ie.abs().max() > 0 and len(mlp) == st["n_layers"] * len(ids)
    assert bucket_positions(6, [3]) == ["before subject"] * 3 + ["last subject", "first subsequent", "last"]


def test_trace_facts_finds_the_fact_at_the_subject(lm):
    world = lm.world
    df = trace_facts(lm.lm(), world, kind="resid", samples=5, limit=12, progress=False)
    assert df.attrs["settings"]["n_facts"] >= 6
    early = df[df.layer == 0].groupby("bucket").ie.mean()
    assert early["last subject"] > early.get("before subject", 0.0)
    assert (df.groupby("subject").te.first() > 0).mean() >= 0.9


def test_lm_run_round_trip(lm):
    again = LMRun(lm.path)
    m1, m2 = lm.model(), again.model()
    x = torch.tensor([lm.tokenizer.encode(lm.world.training_text()[0])])
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))
    with pytest.raises(FileNotFoundError, match="not a memloc language-model run"):
        LMRun(lm.path.parent / "nothing")


def test_edit_and_neurons_cli(lm, tmp_path, capsys):
    import shutil

    from memloc.cli import main

    run = tmp_path / "lm"
    shutil.copytree(lm.path, run)
    s, fact = lm.world.subjects[0], lm.world.facts[0]
    new = next(o for o in lm.world.relations[fact.relation][0] if o != fact.object)
    assert main(["edit", str(run), "--subject", s, "--relation", fact.relation, "--new", new, "--save",
                 str(tmp_path / "edited"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{fact.object} -> {new}" in out and "W'k - v*" in out
    edited = LMRun(tmp_path / "edited")
    assert edited.summary["edit"]["request"]["target_new"] == new
    x = torch.tensor([lm.tokenizer.encode(lm.world.training_text()[0])])
    with torch.no_grad():  # the saved model differs from the original; the original run is untouched
        assert not torch.equal(edited.model()(x), lm.model()(x))
    assert main(["edit", str(run), "--subject", s, "--relation", "spouse", "--new", new]) == 2
    assert "Unknown relation" in capsys.readouterr().err
    assert main(["edit", str(run), "--subject", s, "--relation", fact.relation, "--new", new, "--save",
                 str(tmp_path / "edited")]) == 2  # never overwrites a folder
    assert "not empty" in capsys.readouterr().err
    assert main(["lm", "neurons", "--out", str(run), "--facts", "6", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "neurons per fact" in out and "suppress" in out
    assert (run / "analysis" / "knowledge_neurons.png").read_bytes()[:4] == b"\x89PNG"


def test_counterfactual_memorization_ranks_canaries_above_facts():
    from memloc.analyses.lm import counterfactual_memorization

    w = make_fact_world(20, n_canaries=6, canary_digits=3, canary_repeats=(1, 4), seed=0)
    df = counterfactual_memorization(w, n_models=4, epochs=30, d_model=32, d_mlp=128, progress=False)
    assert len(df) == len(set(w.training_text())) and df.mem.between(-1, 1).all()
    m = df.groupby("kind").mem.mean()
    # a canary cannot be predicted without seeing it; a fact sentence mostly can, from the fact's other sentences
    assert m["canary"] > m["fact"] + 0.1
    assert (df.acc_in >= df.acc_out - 0.2).all()
    with pytest.raises(ValueError, match="n_models"):
        counterfactual_memorization(w, n_models=1)
