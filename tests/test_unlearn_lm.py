import json

import numpy as np
import pytest
import torch

from memloc.analyses.lm import canary_extraction, fact_recall
from memloc.edit.unlearn import unlearn
from memloc.edit.unlearn_lm import (LM_METHODS, LMTask, _holdout_canaries, compare_lm_unlearning, lm_forget_split,
                                    lm_task, train_lm_oracle)
from memloc.hooks import ablate
from memloc.models.transformer import lm_loss

pytest.importorskip("transformer_lens")

FAST = {"grad_ascent": {}, "grad_diff": {"kl_weight": 1.0, "steps": 20}, "npo": {"steps": 20},
        "finetune": {"steps": 10}, "zero_neurons": {"n_neurons": 24}, "random_neurons": {"n_neurons": 24},
        "rome": {}}


@pytest.fixture(scope="module")
def setup(lm):
    split = lm_forget_split(lm.world, "canaries")
    return lm, lm_task(lm.lm(), split), split


@pytest.fixture(scope="module")
def oracle(setup, tmp_path_factory):
    run, _, split = setup
    return train_lm_oracle(run, split, tmp_path_factory.mktemp("unlearn_lm") / split.name / "oracle", progress=False)


def _params(model):
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_task_loss_is_lm_loss_and_suffix_exact_is_greedy_extraction(setup):
    run, task, split = setup
    model = run.model()
    ids = np.r_[split.retain[:20], split.forget[:5]]  # facts, profiles and canaries: different lengths
    b = task.batch(ids)
    with torch.no_grad():
        logits = task.logits(model, b)
        assert logits.shape == (len(ids), b["tokens"].shape[1], model.cfg.d_vocab)
        expect = lm_loss(model, task.tokens[ids], task.lengths[ids], reduction="none")
        torch.testing.assert_close(task.loss(logits, b), expect, rtol=1e-5, atol=1e-5)
        assert torch.equal(task.kl(logits, logits, b), torch.zeros(len(ids)))
        assert (task.kl(logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)), logits, b) > 0).all()
    # the continuation of a canary is its secret: teacher-forced exact match = greedy extraction
    pe = task.per_example(model, split.members).set_index("example_id")
    ex = canary_extraction(run.lm(), run.world).set_index("name")
    for i in split.members:
        assert pe.suffix_exact[i] == ex.extracted[split.info.subject[i]]
    assert (pe.suffix_loss < pe.loss).all()
    # the same task from token ids
    ids_task = LMTask(run.lm(), (task.tokens[ids], task.lengths[ids]), suffix=task.suffix[ids].numpy())
    assert ids_task.texts == [task.texts[i] for i in ids]


def test_splits(setup, lm):
    run, task, split = setup
    world = lm.world
    forget_text = [split.texts[i] for i in split.forget]
    assert sorted(forget_text) == sorted(t for c in world.canaries for t in [c.text] * c.repeats)
    assert len(split.forget) + len(split.retain) == split.n_train == len(world.training_text())
    assert len(split.members) == len(world.canaries)  # each canary once, for MIA and KS
    vocab = set(run.tokenizer.vocab)
    hold = split.info.iloc[split.holdout]
    assert (hold.kind == "holdout_canary").all() and not set(hold.subject) & vocab  # never inserted anywhere
    two = lm_forget_split(world, f"canaries:{world.canaries[0].name},{world.canaries[1].name}")
    assert {split.texts[i] for i in two.forget} == {world.canaries[0].text, world.canaries[1].text}
    subj = lm_forget_split(world, "subjects:3")
    assert subj.subjects == tuple(world.subjects[:3]) and subj.name == "subjects-3"
    about = [any(s in t.split() for s in subj.subjects) for t in subj.texts[:subj.n_train]]
    assert set(subj.forget) == set(np.flatnonzero(about))  # every fact and profile sentence, nothing else
    assert (subj.info.kind.iloc[subj.forget] == "profile").sum() == 3 * world.settings["profiles"]
    assert all(t.split()[0] in subj.subjects for t in (subj.texts[i] for i in subj.holdout))
    assert lm_forget_split(world, [world.subjects[0], world.canaries[0].name]).name.startswith("names-")
    for bad, msg in [("canaries:nobody", "Unknown canar"), ("subjects:0", "subjects:N"), ("everything", "must be")]:
        with pytest.raises(ValueError, match=msg):
            lm_forget_split(world, bad)
    with pytest.raises(ValueError, match="valid methods are .*zero_neurons.*rome"):
        unlearn(run.model(), task, split.forget, split.retain, "reset_finetune")


def test_oracle_never_saw_the_forget_set(setup, oracle, tmp_path):
    run, task, split = setup
    text = json.loads((oracle.path / "training_text.json").read_text())["text"]
    forget = {split.texts[i] for i in split.forget}
    assert text == [split.texts[i] for i in split.retain] and not forget & set(text)
    assert oracle.summary["unlearn_oracle"]["excluded"] == sorted(forget)
    assert oracle.config["model"] == run.config["model"] and oracle.config["seed"] == run.config["seed"]
    assert oracle.tokenizer.vocab == run.tokenizer.vocab
    assert oracle.config["n_sentences"] == len(split.retain)
    m = oracle.lm()
    assert not canary_extraction(m, run.world).extracted.any()
    assert canary_extraction(run.lm(), run.world).extracted.all()
    assert fact_recall(m, run.world).correct.mean() > 0.95
    stamp = (oracle.path / "model.safetensors").stat().st_mtime_ns
    assert train_lm_oracle(run, split, oracle.path, progress=False).path == oracle.path  # reused, not retrained
    assert (oracle.path / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="other sentences"):
        train_lm_oracle(run, lm_forget_split(run.world, "subjects:2"), oracle.path, progress=False)


@pytest.mark.parametrize("method", LM_METHODS)
def test_each_method_changes_only_what_it_claims(setup, method):
    run, task, split = setup
    model = run.model()
    before = _params(model)
    new, rec = unlearn(model, task, split.forget, split.retain, method, seed=1, **FAST[method])
    assert _changed(before, _params(model)) == set(), "the input model was modified"
    after = _params(new)
    changed = _changed(before, after)
    assert changed and changed <= set(rec["changed"]["parameters"]) | set(rec["changed"]["buffers"])
    assert rec["method"] == method and rec["seed"] == 1
    if method in ("zero_neurons", "random_neurons"):
        neurons = rec["neurons"]
        assert sum(len(v) for v in neurons.values()) == 24
        for site, idx in neurons.items():
            layer = int(site.split(".")[1])
            w, b = (k for k in rec["changed"]["parameters"] if k.startswith(f"layers.{layer}.") and "fc_in" in k)
            moved = (before[w] != after[w]).any(1) | (before[b] != after[b])
            assert moved.nonzero().flatten().tolist() == idx and (after[w][idx] == 0).all()
            assert rec["changed"]["entries"][w] == len(idx) * before[w].shape[1]
        x = task.batch(split.retain[:50])["tokens"]
        with torch.no_grad(), ablate(model, neurons):
            expect = model(x)
        torch.testing.assert_close(new(x), expect, rtol=0, atol=1e-6)
    elif method == "rome":
        (name,) = rec["changed"]["parameters"]
        assert "layers.0." in name and "fc_out" in name and changed == {name}
        assert len(rec["edits"]) == len(run.world.canaries)
        assert all(e["target_new"] != e["target_true"] for e in rec["edits"])
    else:
        assert set(rec["changed"]["parameters"]) == {k for k, _ in model.named_parameters()}


def test_localized_neurons_are_not_random(setup):
    run, task, split = setup
    model = run.model()
    _, loc = unlearn(model, task, split.forget, split.retain, "zero_neurons", n_neurons=24)
    _, rnd = unlearn(model, task, split.forget, split.retain, "random_neurons", n_neurons=24)
    assert {k: len(v) for k, v in loc["neurons"].items()} == {k: len(v) for k, v in rnd["neurons"].items()}
    assert loc["neurons"] != rnd["neurons"]


def test_grad_ascent_destroys_recall_others_keep_it_and_canaries_are_forgotten(setup):
    run, task, split = setup
    from memloc.models.lm import LM

    model, tok, world = run.model(), run.tokenizer, run.world
    recall, extracted = {}, {}
    for m in ("grad_ascent", "grad_diff", "npo"):
        new, _ = unlearn(model, task, split.forget, split.retain, m)
        recall[m] = fact_recall(LM(new, tok), world).correct.mean()
        extracted[m] = canary_extraction(LM(new, tok), world).extracted.mean()
    assert fact_recall(LM(model, tok), world).correct.mean() == 1.0
    assert recall["grad_ascent"] < 0.7, recall
    assert min(recall["grad_diff"], recall["npo"]) > 0.8 and recall["npo"] > 0.95, recall
    assert extracted["grad_diff"] == extracted["npo"] == 0.0, extracted


def test_compare_table_and_cli(setup, oracle, tmp_path, capsys):
    from memloc.cli import main

    run, _, split = setup
    out = oracle.path.parent.parent  # reuses the module's oracle: OUT/<split name>/oracle
    methods = ["grad_diff", "zero_neurons"]
    params = {"zero_neurons": {"n_neurons": 24}}
    table = compare_lm_unlearning(run, "canaries", methods, out=out, params=params, progress=False)
    assert table.method.tolist() == ["original", "oracle", *methods]
    t = table.set_index("method")
    assert t.forget_exact["original"] == 1.0 and t.forget_exact["oracle"] == 0.0
    assert t.forget_exposure["original"] > t.forget_exposure["oracle"] + 3
    assert t.mia_auc["original"] > 0.9 and t.ks_can_tell.all() and t.ks_p["original"] < 0.05
    assert t.forget_exact["grad_diff"] == 0.0 and t.recall_train["grad_diff"] > 0.8
    # PrivLeak (MUSE's sign): the original leaks (its canaries look like members), the oracle is the reference
    assert t.mink_auc["original"] > 0.8 and t.privleak["original"] < -50 and t.privleak["oracle"] == 0.0
    assert np.isnan(t.truth_ratio["original"])  # canaries have no paraphrased answers
    assert (out / split.name / "tradeoff.png").exists()
    s = table.attrs["settings"]
    assert s["params"]["zero_neurons"]["n_neurons"] == 24 and s["forget_canaries"] == [c.name for c in run.world.canaries]
    args = ["unlearn", str(run.path), "--method", ",".join(methods), "--out", str(out), "--param",
            "zero_neurons.n_neurons=24", "--quiet", "--threads", "1"]
    assert main(args) in (0, None)
    printed = capsys.readouterr().out
    assert "power check" in printed and "zero_neurons" in printed and "oracle" in printed
    again = compare_lm_unlearning(run, "canaries", methods, out=out, params=params, progress=False)
    assert again.seconds.tolist() == table.seconds.tolist()  # rows reused


def test_truth_ratio_and_relearning_on_forgotten_subjects(lm, tmp_path):
    from memloc.edit.unlearn_lm import lm_relearn_row, truth_ratios
    from memloc.models.lm import LM

    world = lm.world
    split = lm_forget_split(world, "subjects:6")
    task = lm_task(lm.lm(), split)
    h = lm.lm()
    f = next(x for x in world.facts if x.subject == split.subjects[0])
    tr = truth_ratios(h, world, split.subjects[:1], n_perturbed=2, seed=0)
    # by hand for the first fact: the same seeded perturbed objects, NLL averaged, then the ratio
    rng = np.random.default_rng(31337)
    others = sorted(set(world.relations[f.relation][0]) - {f.object})
    pick = [others[int(j)] for j in rng.permutation(len(others))[:2]]
    prompt = world.prompts(f, "heldout")[0]
    nll = -np.asarray(h.score([prompt] * 3, [f.object] + pick)["mean_logprob"], float)
    assert tr[0] == pytest.approx(np.exp(-nll[1:].mean()) / np.exp(-nll[0]), rel=1e-6)
    before = truth_ratios(h, world, split.subjects)
    oracle = train_lm_oracle(lm, split, tmp_path / "oracle", progress=False).model()
    ga, _ = unlearn(lm.model(), task, split.forget, split.retain, "grad_ascent", steps=60)
    o_tr = truth_ratios(LM(oracle, h.tokenizer), world, split.subjects)
    assert np.median(before) < np.median(o_tr)  # the original prefers the true answers more than the oracle does
    r_ga = lm_relearn_row(ga, task, split, world, {"steps": 30, "lr": 1e-3})
    r_o = lm_relearn_row(oracle, task, split, world, {"steps": 30, "lr": 1e-3})
    # gradient ascent hid the facts the oracle never learned: relearning the other subjects brings back more of
    # the held-out ones on the unlearned model than on the oracle (whose gain is only the relation's prior)
    gain = {k: r["relearn_forget_exact_held"] - r["forget_exact_held_before"] for k, r in (("ga", r_ga), ("o", r_o))}
    assert r_ga["relearn_forget_exact_held"] > r_o["relearn_forget_exact_held"] + 0.2 and gain["ga"] > gain["o"]


def test_rouge_verbatim_and_knowledge_memorization(lm):
    from memloc.analyses.lm import fact_recall, knowledge_memorization, rouge_l, verbatim_memorization

    # ROUGE-L by hand: LCS "a c d" of 4 and 4 words -> P = R = F = 3/4; the stemmer matches "running" and "run"
    assert rouge_l(["a b c d", "running fast"], ["a c d e", "run fast"]).tolist() == pytest.approx([0.75, 1.0])
    assert rouge_l(["x y"], ["a b c"], "recall")[0] == 0.0
    with pytest.raises(ValueError, match="kind"):
        rouge_l(["a"], ["a"], "bleu")
    h, world = lm.lm(), lm.world
    train = world.training_text()
    v = verbatim_memorization(h, train[:40])
    assert (v.n_prompt >= 1).all() and (v.n_truth >= 1).all()
    # every decoded prompt + truth is the text again, and a perfectly continued text scores 1
    assert all(h.join(p, t) == x for p, t, x in zip(v.prompt, v.truth, v.text))
    assert (v.rouge[v.generated == v.truth] == 1.0).all() and v.rouge.mean() > 0.6
    fresh = [c.text for c in _holdout_canaries(world, 8, 3)]
    assert verbatim_memorization(h, fresh).rouge.mean() < v.rouge.mean()
    k = knowledge_memorization(h, world, "train")
    r = fact_recall(h, world, "train")
    # a right greedy answer scores 1 (its sentence's full stop cut off); a wrong one-word answer scores 0
    assert (k.rouge.to_numpy()[r.correct.to_numpy()] == 1.0).all()
    assert (k.rouge.to_numpy()[~r.correct.to_numpy()] < 1.0).all()
    with pytest.raises(ValueError, match="prefix_fraction"):
        verbatim_memorization(h, train[:2], prefix_fraction=1.0)


def test_sequential_unlearning_requests(lm, tmp_path):
    from memloc.edit.unlearn_lm import SEQUENTIAL_COLUMNS, sequential_lm_unlearning

    t = sequential_lm_unlearning(lm, "subjects:6", ["grad_ascent"], requests=3, out=tmp_path, progress=False,
                                 params={"grad_ascent": {"steps": 40}})
    assert list(t.columns) == SEQUENTIAL_COLUMNS and t.request.tolist() == [0, 1, 2, 3]
    assert t.n_items.tolist() == [0, 2, 4, 6] and np.isnan(t.forget_exact.iloc[0]) and np.isnan(t.pending_exact.iloc[-1])
    # each request forgets its own subjects: what was requested is recalled less than before it was requested
    assert t.forget_exact.iloc[-1] < t.pending_exact.iloc[0]
    assert (tmp_path / "subjects_6" / "sequential_3" / "sequential.png").exists() or \
        any(tmp_path.glob("*/sequential_3/sequential.png"))
    again = sequential_lm_unlearning(lm, "subjects:6", ["grad_ascent"], requests=3, out=tmp_path, progress=False,
                                     params={"grad_ascent": {"steps": 40}})
    assert again.seconds.tolist() == t.seconds.tolist()  # reused
    with pytest.raises(ValueError, match="requests"):
        sequential_lm_unlearning(lm, "subjects:6", ["grad_ascent"], requests=7, out=tmp_path, progress=False)
    from memloc.cli import main

    args = ["unlearn", str(lm.path), "--forget", "subjects:6", "--method", "grad_ascent", "--param",
            "grad_ascent.steps=40", "--out", str(tmp_path), "--quiet", "--threads", "1"]
    assert main(args + ["--requests", "3"]) in (0, None)  # the rows above are reused
    assert main(args + ["--requests", "1"]) == 2 and main(args + ["--requests", "3", "--relearn-steps", "5"]) == 2


def test_bio_world_holdout_is_fresh_biographies_of_the_same_format():
    from memloc.data.bios import make_bio_world

    w = make_bio_world(30, seed=1)
    s = lm_forget_split(w, "subjects:4")
    members, hold = [s.texts[i] for i in s.members], [s.texts[i] for i in s.holdout]
    assert len(hold) == len(members) == 4 * w.settings["bios"]
    names = s.info.subject.iloc[s.holdout].tolist()
    assert not set(names) & (set(w.subjects) | {c.name for c in w.canaries}) and not set(hold) & set(w.training_text())
    # told like a training biography: the name first, one sentence per relation from the training templates
    starts = [[t.split("{s}")[1].strip() for t in tmpl[1]] for tmpl in w.relations.values()]
    for who, text in zip(names, hold):
        assert text.startswith(who + " ")
        sentences = [x for x in text.split(".") if x.strip()]
        assert len(sentences) == len(w.relations)
        assert all(any(any(st in x for st in rel) for x in sentences) for rel in starts)
    assert w.fresh_biographies(5, seed=0) == w.fresh_biographies(5, seed=0) != w.fresh_biographies(5, seed=1)
