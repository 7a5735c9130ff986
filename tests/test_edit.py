import pytest
import torch

pytest.importorskip("transformer_lens")

from memloc.edit.evaluate import (make_requests, many_edits, ngram_entropy, request_scores, single_edits,
                                  summarize)
from memloc.edit.rome import (EditConfig, Request, key_second_moment, memit, mlp_out_weight, rome,
                              subject_last_index)
from memloc.locate.knowledge import attribute, intervene_knowledge_neurons, knowledge_neurons


@pytest.fixture(scope="module")
def bed(lm_testbed):
    h, world = lm_testbed.lm(), lm_testbed.world
    C = key_second_moment(h, world.training_text(), 0)
    return h, world, C


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_request_and_positions(lm):
    h = lm.lm()
    with pytest.raises(ValueError, match="contain"):
        Request("lives in", "ada", "rome")
    s = lm.world.subjects[0]
    assert subject_last_index(h, "the home of {} is in", s) == 4  # <bos> the home of S
    assert subject_last_index(h, "{} lives in", s) == 1


def test_rome_is_exact_and_undone_bit_for_bit(bed):
    h, world, C = bed
    model = h.model
    before = _state(model)
    rec, = make_requests(world, 1, seed=3)
    req = rec.request()
    e = rome(h, req, 0, C)
    assert _same(before, _state(model))  # computing an edit leaves the model alone
    assert e.info["rel_error"] < 1e-4  # W'k = v* for the edited key
    name, w, transposed = mlp_out_weight(model, 0)
    assert list(e.deltas) == [name] and not transposed
    sv = torch.linalg.svdvals(e.deltas[name].double())
    assert sv[1] < 1e-5 * sv[0]  # rank one (up to float32 rounding)
    assert e.info["took"] and e.info["flag"] == "ok" and e.info["nll_after"] < 0.1
    with e.applied(model):
        s = request_scores(h, [rec])
        assert s.top1.item() == 1.0  # the new object is the top prediction
    assert _same(before, _state(model))
    undo = e.apply(model)
    assert not _same(before, _state(model))
    undo()
    assert _same(before, _state(model))


def test_rome_quality_and_covariance_specificity(bed):
    h, world, C = bed
    recs = make_requests(world, 30, seed=1)
    base = request_scores(h, recs)
    data = single_edits(h, recs, 0, C, progress=False)
    ident = single_edits(h, recs, 0, None, progress=False)
    assert data.took.all() and (data.flag == "ok").mean() >= 0.9
    assert data.rel_error.max() < 1e-4
    assert data.es.mean() >= 0.95 and data.ps.mean() >= 0.8
    assert base.neighbour_acc.mean() - data.neighbour_acc.mean() <= 0.05
    assert data.ns.mean() > ident.ns.mean() + 0.2  # C = I spreads the edit to other subjects
    table = summarize({"unedited": base, "data": data, "identity": ident})
    assert list(table.condition) == ["unedited", "data", "identity"] and table.loc[1, "S"] > table.loc[2, "S"]


def test_whitening_keeps_other_keys_out(bed):
    h, world, C = bed
    model = h.model
    rec, = make_requests(world, 1, seed=5)
    req = rec.request()
    others = [f"{s} lives in" for s in world.subjects if s != rec.subject]
    toks, lens = h.batch(others)
    from memloc.hooks import capture
    keys = capture(model, toks, "blocks.0.mlp.out.hook_in", reduce=lambda a: a[:, 1])["blocks.0.mlp.out.hook_in"]
    ratios = {}
    for name, cov in (("data", C), ("identity", None)):
        e = rome(h, req, 0, cov, outcomes=False)
        d = next(iter(e.deltas.values())).double()
        from memloc.edit.rome import _bare
        k_edit, _ = (t[0] for t in _bare(h, [req], 0))
        ratios[name] = float(((keys.double() @ d.T).norm(dim=1) / (d @ k_edit).norm()).median())
    assert ratios["data"] < 0.1 < ratios["identity"]


def test_memit_batch_beats_sequential_rome(bed):
    h, world, C = bed
    model = h.model
    before = _state(model)
    recs = make_requests(world, 60, seed=2, exclude_edited=True)
    from memloc.edit.evaluate import TESTBED_MEMIT, world_facts_outside
    rest = world_facts_outside(world, recs)
    m = many_edits(h, recs, "memit", [0], {0: C}, EditConfig.memit(**TESTBED_MEMIT), rest, progress=False)
    s = many_edits(h, recs, "sequential", [0], {0: C}, None, rest, progress=False)
    assert _same(before, _state(model))
    assert m.es.mean() >= 0.85
    assert m.unedited_acc.iloc[0] >= 0.95 and m.unedited_acc.iloc[0] > s.unedited_acc.iloc[0] + 0.1
    with pytest.raises(ValueError, match="at least one"):
        memit(h, [], [0])


def test_ngram_entropy():
    assert ngram_entropy(["a"] * 10) == 0.0
    assert ngram_entropy(list("abcdefgh")) > ngram_entropy(list("abababab"))


def test_integrated_gradients_completeness(lm):
    model, tok, world = lm.model(), lm.tokenizer, lm.world
    facts = world.facts[:6]
    prompts = [world.prompts(f)[0] for f in facts]
    toks, lens = lm.lm().batch(prompts)
    targets = [tok.id(f.object) for f in facts]
    attr, delta = attribute(model, toks, lens, targets, layer=1, steps=50, batch_size=4)
    # output change P(a) - P(a = 0 at the position), computed independently of captum
    from memloc.hooks import hooks
    rows = torch.arange(len(facts))
    with torch.no_grad():
        p1 = torch.softmax(model(toks)[rows, lens - 1], -1)[rows, targets]

        def zero(out):
            out = out.clone()
            out[rows, lens - 1] = 0
            return out
        with hooks(model, {"blocks.1.mlp.hook_post": zero}):
            p0 = torch.softmax(model(toks)[rows, lens - 1], -1)[rows, targets]
    change = (p1 - p0).double()
    assert torch.allclose(attr.sum(1).double(), change, rtol=0.05, atol=1e-4)
    # batching prompts does not change the attributions
    one, _ = attribute(model, toks[:1], lens[:1], targets[:1], layer=1, steps=50)
    assert torch.allclose(one, attr[:1], atol=1e-5)


def test_suppressing_knowledge_neurons_beats_random(lm):
    h, world = lm.lm(), lm.world
    kn = knowledge_neurons(h, world, limit=12, progress=False)
    assert len(kn) and set(kn.columns) >= {"subject", "layer", "neuron", "share"}
    assert kn.attrs["settings"]["steps"] == 20
    sup = intervene_knowledge_neurons(h, world, kn, 0.0)
    assert sup.change.mean() < sup.random_change.mean() - 0.1
    assert abs(sup.random_change.mean()) < 0.05
    with pytest.raises(ValueError, match="layers"):
        knowledge_neurons(h, world, layers=[7], limit=1, progress=False)


def test_rome_on_a_hugging_face_gpt2_bridge(tmp_path):
    """The Hugging Face path (TransformerBridge.boot_transformers with a local model and tokenizer): GPT-2 keeps
    its MLP output in a Conv1D stored [in, out]; the edit must come out in that orientation and be exact."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.transformers  # noqa: F401

    words = ["<pad>", "<bos>", "<unk>", "ada", "bob", "lives", "in", "paris", "rome", "is", "a"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>",
                                        unk_token="<unk>", eos_token="<bos>").save_pretrained(tmp_path)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)  # as from a local cache
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(words), n_positions=16, n_embd=32,
                                                              n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1))
    model = TransformerBridge.boot_transformers("gpt2", hf_model=hf.eval(), tokenizer=hf_tok).eval()
    from memloc.models.lm import LM
    h = LM(model, hf_tok, prepend_bos=True)
    assert LM(model, hf_tok).prepend_bos is False  # this tokenizer does not add BOS itself
    name, w, transposed = mlp_out_weight(model, 1)
    assert transposed and tuple(w.shape) == (model.cfg.d_mlp, model.cfg.d_model)
    assert subject_last_index(h, "{} lives in", "ada") == 1
    C = key_second_moment(h, ["ada lives in paris", "bob lives in rome", "bob is a"], 1)
    before = _state(model)
    e = rome(h, Request("{} lives in", "ada", "rome"), 1, C + 1e-3 * torch.eye(len(C)))
    assert e.info["rel_error"] < 1e-4 and e.deltas[name].shape == w.shape
    with e.applied(model):
        assert not _same(before, _state(model))
    assert _same(before, _state(model))
