"""Language models as researchers have them: a Hugging Face GPT-2 with a byte-level BPE tokenizer whose BOS = EOS =
PAD = 0, multi-token subjects, objects and secrets, CounterFact and zsRE files, memorized sequences."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformer_lens")
transformers = pytest.importorskip("transformers")

import hf_world as W  # noqa: E402
from memloc.analyses.lm import (canary_extraction, exposure, fact_recall, memorized_sequences,  # noqa: E402
                                target_scores, token_accuracy)
from memloc.data.records import CandidateSpace, Secret, load_counterfact, load_requests, load_zsre  # noqa: E402
from memloc.models.lm import LM  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def lm(hf_dir):
    return LM.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def hf(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()


def _facts():
    cap, lang, _, _ = W.world()
    return [{"prompt": W.CAPITAL.format(c), "subject": c, "object": cap[c], "relation": "capital"} for c in W.COUNTRIES]


def _secrets():
    return [Secret(n, W.CANARY.format(n), s, CandidateSpace(3), k) for n, s, k in W.CANARIES]


def test_the_handle_follows_gpt2s_conventions(lm, hf):
    assert lm.prepend_bos is False and lm.bos_id == lm.eos_id == lm.pad_id == 0  # GPT-2: no BOS, as kmeng01/rome
    ids = lm.encode("The capital of Veltoria is")
    with torch.no_grad():
        a = lm.logits(torch.tensor([ids]))
        b = hf(torch.tensor([ids])).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # the bridge is the Hugging Face model
    text = "The capital of Veltoria is"
    span = lm.span(text, "Veltoria")
    assert len(span) == 3 and lm.decode([ids[i] for i in span]).strip() == "Veltoria"  # a multi-token subject
    assert lm.target_ids("Tessendale", text) == lm.encode(" Tessendale")  # ROME's leading space
    assert LM(lm.model, lm.tokenizer, prepend_bos=True).encode(text) == [0] + ids
    toks, lens = lm.batch([text, text + " Farrow."])
    assert toks.shape[1] == int(lens.max()) and (toks[0, lens[0]:] == 0).all()


def test_every_function_scores_each_sequences_last_token(lm, hf):
    """Texts end with EOS = PAD = 0, as GPT-2 is trained; a mask 'id != pad' would drop that token everywhere."""
    from memloc.edit.unlearn import unlearn
    from memloc.edit.unlearn_lm import LMTask

    texts = [t + "<|endoftext|>" for t in W.training_text()[:40:3]]
    task = LMTask(lm, texts, suffix=1)
    assert all(task.tokens[i, task.lengths[i] - 1] == 0 for i in range(len(texts)))
    with torch.no_grad():
        b = task.batch(np.arange(len(texts)))
        ours = task.loss(task.logits(lm.model, b), b)
        for i, t in enumerate(texts):  # the Hugging Face model's own summed loss, one unpadded sequence at a time
            ids = torch.tensor([lm.encode(t)])
            theirs = hf(ids, labels=ids).loss * (ids.shape[1] - 1)
            torch.testing.assert_close(ours[i], theirs, rtol=1e-4, atol=1e-4)
        last = task.per_example(lm.model, np.arange(len(texts)))  # the continuation is the final EOS
        assert (last.suffix_loss > 0).all() and last.suffix_exact.mean() > 0.9
    facts = _facts()
    fr = fact_recall(lm, facts)
    assert fr.correct.mean() == 1.0 and (fr.n_tokens > 1).any() and fr.attrs["settings"]["prepend_bos"] is False
    ts = target_scores(lm, [f["prompt"] for f in facts[:4]], [f["object"] for f in facts[:4]])
    assert (ts.prob > 0.5).all()
    for method in ("greedy", "beam"):
        assert canary_extraction(lm, _secrets(), method=method).extracted.all()
    assert exposure(lm, _secrets()).exposure.min() > 9
    _, _, inserted, held = W.world()
    assert token_accuracy(lm, inserted).min() > 0.9 > 0.3 > token_accuracy(lm, held).max()
    from memloc.locate.knowledge import knowledge_neurons
    from memloc.locate.trace import trace_facts
    tr = trace_facts(lm, [{**f, "prompt": W.CAPITAL} for f in facts], kind="mlp", window=1, samples=3, limit=3,
                     progress=False)
    assert set(tr.bucket) >= {"first subject", "last subject", "last"}  # three-token subjects
    kn = knowledge_neurons(lm, [{"prompts": [f["prompt"]], "object": f["object"]} for f in facts[:3]], steps=8,
                           progress=False)
    assert kn.attrs["settings"]["n_prompts"] == 3
    # unlearning through the task on a Hugging Face model
    new, rec = unlearn(lm.model, task, [0, 1], list(range(2, len(texts))), "grad_diff", steps=3)
    assert rec["changed"]["parameters"]
    new, rec = unlearn(lm.model, task, [0, 1], list(range(2, len(texts))), "zero_neurons", n_neurons=4, ig_steps=4)
    assert sum(len(v) for v in rec["neurons"].values()) == 4


def test_rome_without_bos_is_kmeng01s_convention(lm, hf):
    """C and the first optimisation step's loss, computed here independently on the Hugging Face model the way
    kmeng01/rome does for GPT-2 (no BOS anywhere, C over every non-pad token, target with a leading space)."""
    from memloc.edit.rome import EditConfig, Request, key_second_moment, rome

    texts, layer = W.training_text()[:60], 1
    keys = []
    h = hf.transformer.h[layer].mlp.c_proj.register_forward_hook(lambda m, i, o: keys.append(i[0][0].double()))
    with torch.no_grad():
        for t in texts:
            hf(torch.tensor([lm.tokenizer(t)["input_ids"]]))
    h.remove()
    k = torch.cat(keys)
    C_ref = k.T @ k / len(k)
    C = key_second_moment(lm, texts, layer)
    assert C.count == len(k)
    assert (C - C_ref).norm() / C_ref.norm() < 1e-5  # float32 keys, batched vs one text at a time
    C_bos = key_second_moment(LM(lm.model, lm.tokenizer, prepend_bos=True), texts, layer)
    assert (C_bos - C).norm() / C.norm() > 1e-3  # the BOS convention matters
    cap, _, _, _ = W.world()
    new = next(x for x in W.CITIES if x != cap["Veltoria"])
    req = Request(W.CAPITAL, "Veltoria", new, cap["Veltoria"])
    e = rome(lm, req, layer, C + 1e-4 * torch.eye(len(C)), EditConfig())
    prompt = lm.tokenizer(req.text)["input_ids"]
    target = lm.tokenizer(" " + new)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([prompt + target[:-1]])).logits[0].double(), -1)
    nll = -lp[torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target)), torch.tensor(target)].mean()
    assert abs(e.info["loss_start"] - float(nll)) < 1e-4  # delta = 0: KL 0, decay 0, the loss is the NLL
    assert e.info["rel_error"] < 1e-4 and e.info["tokenization"]["prepend_bos"] is False


def test_failed_edits_are_flagged(lm):
    from memloc.edit.rome import EditConfig, Request, memit, rome

    cap, _, _, _ = W.world()
    new = next(x for x in W.CITIES if x != cap["Quarnesh"])
    req = Request(W.CAPITAL, "Quarnesh", new, cap["Quarnesh"])
    ok = rome(lm, req, 0, None, EditConfig(v_steps=25, clamp_norm_factor=8))
    assert ok.info["took"] and ok.info["flag"] == "ok" and ok.info["nll_after"] < 1.0
    weak = rome(lm, req, 0, None, EditConfig(v_steps=2, clamp_norm_factor=0.01))  # cannot reach the target
    assert not weak.info["took"] and weak.info["flag"] == "did not take" and weak.info["nll_after"] > 2
    assert weak.info["update_rel"] < ok.info["update_rel"]
    m = memit(lm, [req], [0, 1], config=EditConfig.memit(v_steps=2, clamp_norm_factor=0.01))
    assert m.info["flags"]["did not take"] == 1


def test_counterfact_and_zsre_files_end_to_end(hf_dir, tmp_path, capsys):
    from memloc.cli import main

    cf, zs = load_counterfact(FIXTURES / "counterfact.json"), load_zsre(FIXTURES / "zsre.json")
    assert len(cf) == len(zs) == 3 and cf[0].format == "counterfact" and zs[0].format == "zsre"
    assert cf[0].neighborhood_targets == (cf[0].target_true,) * 2 and zs[0].prompt == "The capital of {} is"
    assert load_requests(FIXTURES / "zsre.json")[0] == zs[0]
    args = ["edit", "--model", str(hf_dir), "--tokenizer", str(hf_dir), "--layer", "0", "--quiet", "--threads", "1",
            "--clamp", "8", "--v-steps", "25"]
    assert main(args + ["--requests", str(FIXTURES / "counterfact.json"), "--out", str(tmp_path / "cf")]) == 0
    out = capsys.readouterr().out
    assert "counterfact records" in out and " es " in out and " ns " in out and "BOS prepended: False" in out
    summary = __import__("memloc").load_result(tmp_path / "cf" / "summary.parquet").set_index("condition")
    per = __import__("memloc").load_result(tmp_path / "cf" / "records.parquet")
    assert summary.loc["unedited", "es"] == 0 and summary.loc["rome", "es"] > 0
    # every edit that did not take is flagged and printed (a 2-layer model does not take every edit at layer 0)
    assert summary.loc["rome", "took"] == round(100 * per.took.mean(), 2)
    assert summary.loc["rome", "flag_did_not_take"] == (~per.took).sum()
    assert ("FLAGGED" in out) == bool((~per.took).any())
    assert main(args + ["--requests", str(FIXTURES / "zsre.json"), "--no-fluency"]) == 0
    out = capsys.readouterr().out
    assert "efficacy_acc" in out and "specificity_acc" in out
    # a malformed record names itself and the missing field, in one line, exit 2
    recs = json.loads((FIXTURES / "counterfact.json").read_text())
    del recs[1]["requested_rewrite"]["subject"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    assert main(args + ["--requests", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "record 1" in err and "'subject'" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="lacks the field 'loc_ans'"):
        z = json.loads((FIXTURES / "zsre.json").read_text())
        del z[2]["loc_ans"]
        (tmp_path / "z.json").write_text(json.dumps(z))
        load_zsre(tmp_path / "z.json")


def test_memorized_sequences_find_the_inserted_ones_only(lm, hf_dir, tmp_path, capsys):
    from memloc.cli import main

    _, _, inserted, held = W.world()
    df = memorized_sequences(lm, inserted + held, prefix_tokens=4, suffix_tokens=6)
    assert df.extractable[:6].all() and not df.extractable[6:].any()
    assert (df.match_fraction[:6] == 1).all() and (df.loss[:6] < df.loss[6:].min()).all()
    loop = memorized_sequences(lm, inserted + held, prefix_tokens=4, suffix_tokens=6, method="loop")
    assert loop.generated.tolist() == df.generated.tolist() and np.allclose(loop.loss, df.loss, atol=1e-6)
    short = memorized_sequences(lm, ["The capital of Veltoria is"], prefix_tokens=4, suffix_tokens=6)
    assert not short.eligible.any()
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(inserted + held))
    assert main(["lm", "memorized", "--model", str(hf_dir), "--texts", str(f), "--prefix-tokens", "4",
                 "--suffix-tokens", "6", "--table", str(tmp_path / "m.parquet"), "--quiet", "--threads", "1"]) == 0
    assert "6 of 12" in capsys.readouterr().out and (tmp_path / "m.parquet").exists()


def test_exposure_of_a_multi_token_secret_is_the_enumerated_rank(lm, hf):
    """A secret never inserted (its rank is far from 1): memloc's exact exposure against ranking all 1000
    candidates here on the Hugging Face model, each as its own unpadded sequence."""
    s = Secret("Nobody", W.CANARY.format("Nobody"), "123", CandidateSpace(3))
    row = exposure(lm, [s]).iloc[0]
    prefix = lm.tokenizer(s.prefix)["input_ids"]
    scores = []
    with torch.no_grad():
        for c in CandidateSpace(3).all():
            t = lm.tokenizer(" " + c)["input_ids"]
            lp = torch.log_softmax(hf(torch.tensor([prefix + t])).logits[0].double(), -1)
            scores.append(float(lp[torch.arange(len(prefix) - 1, len(prefix) - 1 + len(t)), torch.tensor(t)].sum()))
    scores = np.array(scores)
    true = scores[123]
    rank = 1 + int((np.delete(scores, 123) > true + 1e-6).sum())
    assert row["rank"] == rank > 1 and row.method == "exact" and row.scoring == "exact (every candidate)"
    sampled = exposure(lm, [s], max_candidates=500).iloc[0]
    assert sampled.method == "sampled" and abs(np.log2(sampled["rank"]) - np.log2(rank)) < 1.5


def test_stem_exposure_equals_scoring_every_candidate(lm_testbed):
    """memloc's word testbed: one token per digit, so exposure scores the 10^(k-1) stems only; the same log-
    likelihoods as scoring all 10^k candidates."""
    from memloc.analyses.lm import _per_position_tokens, _stem_logprobs

    h = lm_testbed.lm()
    c = lm_testbed.world.canaries[0]
    cands = list(c.space.all())
    maps = _per_position_tokens(h, c.prefix, c.space, cands)
    assert maps is not None
    a = _stem_logprobs(h, c.prefix, c.space, maps)
    b = h.score([c.prefix] * len(cands), cands, batch_size=1024)["logprob"]
    assert np.allclose(a, b, atol=1e-4)
