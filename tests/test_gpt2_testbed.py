"""The default language testbed: a Hugging Face GPT-2 with a BPE tokenizer trained here on a biography world."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memloc.data.bios import BIO_RELATIONS, BioWorld, make_bio_world
from memloc.data.facts import FactWorld


def small_world(**kw):
    return make_bio_world(**{"n_people": 24, "n_first": 8, "n_last": 8, "n_canaries": 3, "seed": 0, **kw})


def test_bio_world_texts_follow_the_design():
    w = small_world()
    text = w.training_text()
    bios = [t for t in text if not t.startswith("the code of")]
    assert len(bios) == 24 * 5 and len(text) == len(bios) + sum(c.repeats for c in w.canaries)
    for s in w.subjects:  # every bio starts with the person's name; later sentences mostly say He / She
        mine = [t for t in bios if t.startswith(s + " ")]
        assert len(mine) == 5
        pron = w.settings["pronouns"][s]
        assert sum(t.count(f". {pron} ") for t in mine) >= 5 * 4 * 0.6
        # every attribute is in every bio, in some order
        for f in (f for f in w.facts if f.subject == s):
            assert all(f" {f.object}." in t for t in mine)
    held = [h.replace("{s}", "").strip() for r in BIO_RELATIONS.values() for h in r[2]]
    assert not any(h in t for h in held for t in text)  # held-out paraphrases never in the training text
    assert len({t for t in bios}) == len(bios)
    again = FactWorld.from_json(json.loads(json.dumps(w.to_json())))
    assert isinstance(again, BioWorld) and again.training_text() == text
    assert make_bio_world(n_people=24, n_first=8, n_last=8, n_canaries=3, seed=1).subjects != w.subjects
    names = w.new_names(5, np.random.default_rng(0))
    assert len(set(names)) == 5 and not set(names) & set(w.subjects + [c.name for c in w.canaries])
    with pytest.raises(ValueError, match="n_first"):
        make_bio_world(n_people=70, n_first=8, n_last=8)
    with pytest.raises(ValueError, match="name_prob"):
        make_bio_world(name_prob=1.5)


def test_tokenizer_prepends_bos_and_keeps_names_whole():
    from memloc.models.gpt2 import train_bpe_tokenizer

    w = small_world()
    tok = train_bpe_tokenizer(w.training_text(), 1024)
    ids = tok("Hello there")["input_ids"]
    assert ids[0] == tok.bos_token_id == 0 and tok("Hello there", add_special_tokens=False)["input_ids"] == ids[1:]
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["a b"], 10)


def test_split_names_tokenizer_never_saw_the_names():
    from memloc.models.gpt2 import tokenizer_texts, train_bpe_tokenizer

    w = make_bio_world(n_people=60, n_first=12, n_last=12, n_canaries=3, seed=0)
    text = w.training_text()
    renamed = tokenizer_texts(text, w)
    parts = {p for n in w.subjects + [c.name for c in w.canaries] for p in n.split()}
    assert len(renamed) == len(text) and not any(p in t.split() for p in parts for t in renamed)
    # only the names changed: the same words once names are taken out
    for a, b in zip(text, renamed):
        wa, wb = a.split(), b.split()
        assert len(wa) == len(wb) and all(x == y or x.rstrip(".") in parts for x, y in zip(wa, wb))
    whole, split = train_bpe_tokenizer(text, 1024), train_bpe_tokenizer(renamed, 1024)
    n_whole = [len(whole.tokenize(" " + s)) for s in w.subjects]
    n_split = [len(split.tokenize(" " + s)) for s in w.subjects]
    assert np.mean(n_whole) < 2.5 and min(n_split) >= 3 and np.mean(n_split) > np.mean(n_whole) + 2


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    from memloc.models.gpt2 import train_gpt2

    torch.set_num_threads(1)
    return train_gpt2(small_world(), tmp_path_factory.mktemp("gpt2") / "tb", n_layers=2, d_model=64, d_mlp=256,
                      steps=300, warmup=20, batch_size=32, lr=3e-3, vocab_size=1024, progress=False)


def test_testbed_is_a_hugging_face_folder_that_learned(gpt2_run):
    import transformers

    from memloc.models.lm import LM

    run = gpt2_run
    assert run.kind == "gpt2" and isinstance(run.world, BioWorld)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(run.path), local_files_only=True)
    assert hf.config.n_layer == 2 and hf.config.n_embd == 64
    lm = LM.from_pretrained(run.path)  # the path users take: BOS from the tokenizer's own convention
    assert lm.prepend_bos and lm.bos_rule == "tokenizer convention"
    s = run.summary
    assert s["steps"] == 300 and s["final_loss"] < 1.5  # from ~ln(vocab) = 6.9
    # the 16x canary is memorized, the model decodes multi-token objects of the training templates
    assert s["canaries_extracted"]["16"] == 1.0
    assert s["fact_recall_train_templates"] > 0.3
    from memloc.analyses.lm import fact_recall
    fr = fact_recall(run.lm(), run.world)
    assert (fr.n_tokens > 1).any() and fr.correct.mean() == pytest.approx(s["fact_recall_train_templates"])


def test_rerun_reuses_refuses_and_never_writes_into_foreign_folders(gpt2_run, tmp_path):
    from memloc.models.gpt2 import train_gpt2
    from memloc.validate import ConfigError, OutputExistsError

    kw = dict(n_layers=2, d_model=64, d_mlp=256, steps=300, warmup=20, batch_size=32, lr=3e-3, vocab_size=1024,
              progress=False)
    stamp = (gpt2_run.path / "model.safetensors").stat().st_mtime_ns
    assert train_gpt2(small_world(), gpt2_run.path, **kw).path == gpt2_run.path
    assert (gpt2_run.path / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    with pytest.raises(OutputExistsError, match="steps"):
        train_gpt2(small_world(), gpt2_run.path, **{**kw, "steps": 301})
    with pytest.raises(OutputExistsError, match="texts_sha1"):
        train_gpt2(small_world(seed=3), gpt2_run.path, **kw)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.json").write_text("keep")
    with pytest.raises(OutputExistsError, match="not a memloc GPT-2 testbed"):
        train_gpt2(small_world(), foreign, **kw)
    assert (foreign / "config.json").read_text() == "keep" and len(list(foreign.iterdir())) == 1
    for bad, match in (({"d_model": 3}, "d_model"), ({"n_layers": 0}, "n_layers"), ({"lr": float("nan")}, "lr"),
                       ({"warmup": 400}, "warmup"), ({"heads": 2}, "Unknown")):
        with pytest.raises(ConfigError, match=match):
            train_gpt2(small_world(), tmp_path / "new", **{**kw, **bad})
        assert not (tmp_path / "new").exists()


def test_lm_train_cli_refuses_bad_input_with_one_line(tmp_path, capsys):
    from memloc.cli import main

    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text("keep")
    for argv, msg in ((["lm", "train", "--out", str(d), "--people", "10", "--layers", "1", "--d-model", "16"],
                       "not a memloc GPT-2 testbed"),
                      (["lm", "train", "--kind", "word", "--out", str(d), "--subjects", "10", "--layers", "1",
                        "--d-model", "16"], "not a memloc word-testbed run"),
                      (["lm", "train", "--out", str(tmp_path / "x"), "--d-model", "3"], "d_model"),
                      (["lm", "train", "--kind", "word", "--out", str(tmp_path / "x"), "--d-model", "3"], "d_model"),
                      (["lm", "train", "--out", str(tmp_path / "x"), "--layers", "0"], "--layers")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (d / "config.json").read_text() == "keep" and not (tmp_path / "x").exists()


def test_word_testbed_rerun_with_other_settings_is_refused(lm, tmp_path):
    import shutil

    from memloc.models.transformer import train_lm
    from memloc.validate import OutputExistsError

    run = tmp_path / "w"
    shutil.copytree(lm.path, run)
    c = lm.config
    with pytest.raises(OutputExistsError, match="other settings"):
        train_lm(lm.world, run, n_layers=c["model"]["n_layers"] + 1, progress=False)


def test_unlearning_split_and_oracle_on_the_gpt2_testbed(gpt2_run, tmp_path):
    from memloc.analyses.lm import canary_extraction
    from memloc.edit.unlearn_lm import lm_forget_split, train_lm_oracle

    w = gpt2_run.world
    split = lm_forget_split(w, "canaries", n_holdout=4)
    info = split.info.iloc[:split.n_train]
    assert set(info.kind) == {"bio", "canary"} and (info.kind == "bio").sum() == 24 * 5
    assert sorted(split.texts[i] for i in split.forget) == sorted(c.text for c in w.canaries for _ in range(c.repeats))
    held = split.info.iloc[split.n_train:]
    assert len(held) == 4 and not set(held.subject) & set(w.subjects + [c.name for c in w.canaries])
    sub = lm_forget_split(w, "subjects:2")
    gone = {split.texts[i] for i in sub.forget}
    assert gone == {t for t in w.training_text() if t.startswith(tuple(s + " " for s in sub.subjects))}
    # rome on biographies: one request per forgotten fact, a multi-word object of the same relation as the new target
    from memloc.edit.unlearn_lm import _rome_requests, lm_task

    reqs = _rome_requests(lm_task(gpt2_run.lm(), sub), sub.forget, seed=0)
    facts = {(f.subject, f.relation): f for f in w.facts if f.subject in sub.subjects}
    assert len(reqs) == len(facts) == 2 * len(w.relations)
    for r in reqs:
        rel = next(k for k, v in w.relations.items() if v[1][0].replace("{s}", "{}") == r["prompt"])
        assert r["target_true"] == facts[(r["subject"], rel)].object != r["target_new"] in w.relations[rel][0]
    from memloc.cli import main

    # the command line on a GPT-2 run (flat config, oracle counted in steps)
    assert main(["unlearn", str(gpt2_run.path), "--forget", "subjects:2", "--method", "grad_ascent", "--out",
                 str(tmp_path / "ul"), "--quiet", "--threads", "1"]) in (0, None)
    assert (tmp_path / "ul" / "subjects-2" / "table.parquet").exists()
    oracle = train_lm_oracle(gpt2_run, split, tmp_path / "oracle", progress=False)
    assert oracle.kind == "gpt2" and oracle.config["n_texts"] == len(split.retain)
    assert oracle.tokenizer.get_vocab() == gpt2_run.tokenizer.get_vocab()  # the run's token ids
    assert not canary_extraction(oracle.lm(), w).extracted.any()


def test_trace_vs_edit_finds_perfect_agreement_when_edits_follow_tracing(gpt2_run):
    from memloc.edit.evaluate import make_requests, rome_by_layer, trace_vs_edit

    lm = gpt2_run.lm()
    recs = make_requests(gpt2_run.world, 3, seed=0)
    edits = rome_by_layer(lm, recs, C="data", texts=gpt2_run.world.training_text(), progress=False)
    assert len(edits) == 3 * 2 and set(edits.layer) == {0, 1} and edits.es.between(0, 1).all()
    per, summary = trace_vs_edit(lm, recs, edits, samples=3, progress=False)
    assert len(per) == 3 * 2 and 0 <= summary["agree"] <= 1
    # edits whose success is exactly the tracing effect: the peaks agree and the correlation is 1
    fake = per[["case_id", "layer"]].assign(es=1.0, ps=1.0, ns=1.0, em=per.trace_ie.values, pm=per.trace_ie.values)
    _, s2 = trace_vs_edit(lm, recs, fake, samples=3, progress=False)
    assert s2["agree"] == 1.0 and s2["pearson_all"] == pytest.approx(1.0)
    # and reversed success: the peaks never agree (2 layers) and the correlation is -1
    rev = fake.assign(em=-fake.em, pm=-fake.pm)
    _, s3 = trace_vs_edit(lm, recs, rev, samples=3, progress=False)
    assert s3["pearson_all"] == pytest.approx(-1.0) and s3["agree"] == 0.0


def test_digits_are_single_tokens_so_exposure_takes_one_pass(gpt2_run):
    from memloc.analyses.lm import exposure

    tok = gpt2_run.tokenizer
    assert all(len(tok(" " + d, add_special_tokens=False)["input_ids"]) == 1 for d in "0123456789")
    ex = exposure(gpt2_run.lm(), gpt2_run.world)
    assert (ex.method == "exact").all() and ex.scoring.str.contains("stems").all()
