"""r-ROME's consistent keys, kmeng01/rome's context templates, AlphaEdit's null-space projection and the sequential
editing harness, on the word testbed (shared session fixture)."""

import pytest
import torch

pytest.importorskip("transformer_lens")

from memloc.edit.evaluate import make_requests
from memloc.edit.rome import (EditConfig, alphaedit, context_templates, key_second_moment, mlp_out_weight, null_space,
                              rome)
from memloc.edit.sequential import sequential_edits, sequential_requests


@pytest.fixture(scope="module")
def bed(lm_testbed):
    h, world = lm_testbed.lm(), lm_testbed.world
    C = {l: key_second_moment(h, world.training_text(), l) for l in (0, 1)}
    return h, world, C


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _maps(h, delta, layer, key):
    """(W + delta) k + b, the MLP output of ``key`` under the edit, in float64."""
    name, w, transposed = mlp_out_weight(h.model, layer)
    W = (w.detach().double().T if transposed else w.detach().double())
    D = (delta.double().T if transposed else delta.double())
    b = dict(h.model.named_parameters())[name.replace("weight", "bias")].detach().double()
    return (W + D) @ key + b


def test_context_templates_are_kmeng01s_and_seeded(bed):
    h, _, _ = bed
    t = context_templates(h, ((5, 3), (8, 2)), seed=1)
    assert t[0] == "{}" and len(t) == 6
    assert all(x.count("{}") == 1 and x.endswith(". {}") for x in t[1:])
    assert context_templates(h, ((5, 3), (8, 2)), seed=1) == t and context_templates(h, ((5, 3), (8, 2)), seed=2) != t
    memit_style = context_templates(h, ((6, 4),), starts=["the", "a"])
    assert len(memit_style) == 1 + 4 and all(x.split()[0] in ("the", "a") for x in memit_style[1:])
    with pytest.raises(ValueError, match="'{}' once"):
        EditConfig(context_templates=("no slot",))
    with pytest.raises(ValueError, match="keys"):
        EditConfig(keys="both")


def test_r_rome_uses_one_key_everywhere_and_maps_it_to_v_star(bed):
    h, world, C = bed
    rec, = make_requests(world, 1, seed=4)
    req = rec.request()
    templates = context_templates(h, ((5, 4),), seed=0)
    out = {}
    for keys in ("original", "prefix", "prompt"):
        e = rome(h, req, 0, C[0], EditConfig(context_templates=templates, keys=keys), outcomes=False)
        it = e.intermediates
        delta = next(iter(e.deltas.values()))
        # the key behind u (C^-1 k_u) is the same one as in the residual and the denominator
        k_u = torch.linalg.solve(C[0].double(), it["c_inv_k"]) if keys != "prompt" else it["key_bare"]
        if keys == "prefix":
            assert torch.allclose(it["key"], it["k_star"]) and torch.allclose(C[0].double() @ it["c_inv_k"], it["k_star"])
            assert torch.allclose(_maps(h, delta, 0, it["k_star"]), it["v_star"], rtol=1e-4, atol=1e-4)
            # the value it starts from is the mean over the templates, W k* + b
            assert torch.allclose(it["value"], _maps(h, torch.zeros_like(delta), 0, it["k_star"]), atol=1e-4)
        elif keys == "original":  # kmeng01/rome: u from k*, residual and denominator from the bare prompt's key
            assert torch.allclose(it["key"], it["key_bare"]) and not torch.allclose(it["key"], it["k_star"])
            assert torch.allclose(C[0].double() @ it["c_inv_k"], it["k_star"])
            assert torch.allclose(_maps(h, delta, 0, it["key_bare"]), it["v_star"], rtol=1e-4, atol=1e-4)
        else:
            assert torch.allclose(C[0].double() @ it["c_inv_k"], it["key_bare"]) and torch.allclose(k_u, it["key"])
        assert e.info["keys"] == keys and e.info["rel_error"] < 1e-4
        out[keys] = e
    assert not torch.equal(next(iter(out["original"].deltas.values())), next(iter(out["prefix"].deltas.values())))
    # with the single template "{}" the three are the same edit
    same = [next(iter(rome(h, req, 0, C[0], EditConfig(keys=k), outcomes=False).deltas.values()))
            for k in ("original", "prefix", "prompt")]
    assert torch.allclose(same[0], same[1]) and torch.allclose(same[0], same[2])


def test_alphaedit_leaves_preserved_keys_and_earlier_edits_alone(bed):
    h, world, C = bed
    model = h.model
    before = _state(model)
    evals = torch.linalg.eigvalsh(C[0])
    thr = float(evals[int(0.6 * len(evals))])  # 60% of the directions free: an absolute threshold is model-specific
    space = null_space({0: C[0]}, thr)
    assert space.dims[0] == int((evals < thr).sum()) and space.nbytes() == 2 * C[0].numel() * 8
    P = space.P[0]
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T)
    recs = make_requests(world, 40, seed=6, distinct_subjects=True, exclude_edited=True)
    first, second = [r.request() for r in recs[:20]], [r.request() for r in recs[20:]]
    cfg = EditConfig.memit(clamp_norm_factor=4.0)
    e1 = alphaedit(h, first, [0], space, cfg)
    assert _same(before, _state(model))
    name = next(iter(e1.deltas))
    d1 = e1.deltas[name].double()
    # Delta lies in P's range: preserved directions (eigenvalue >= threshold) map to exactly what they did
    _, U = torch.linalg.eigh(C[0])
    kept = U[:, evals >= thr]
    assert (d1 @ kept).norm() < 1e-6 * d1.norm()
    # up to the threshold: the mean squared change of the text's keys' outputs, tr(Delta C Delta^T), is below
    # threshold x |Delta|_F^2 (Delta C Delta^T = Delta P C P Delta^T, and P C P has eigenvalues < threshold)
    D = d1 if d1.shape[1] == C[0].shape[0] else d1.T
    assert float(torch.trace(D @ C[0] @ D.T)) <= thr * float(D.norm() ** 2) * (1 + 1e-9)
    K1 = e1.intermediates["keys"][0]
    assert float((K1 @ D.T).norm(dim=1).mean()) > 2 * float(torch.trace(D @ C[0] @ D.T)) ** 0.5
    free = alphaedit(h, first, [0], null_space({0: C[0]}, 2 * float(evals.max())), cfg, outcomes=False)  # P = I
    F = free.deltas[name].double()
    F = F if F.shape[1] == C[0].shape[0] else F.T

    def spill(X):
        return float(torch.trace(X @ C[0] @ X.T) / X.norm() ** 2)
    assert spill(D) < 0.5 * spill(F)  # without the projection the update lands on the text's keys
    assert sum(x["took"] for x in e1.info["edits"]) >= 10  # most edits take with 60% of the directions free
    # the second batch keeps the first batch's keys where they were mapped
    undo = e1.apply(model)
    try:
        space.remember(e1)
        assert space.n_previous == 20
        e2 = alphaedit(h, second, [0], space, cfg, outcomes=False)
        d2 = e2.deltas[name].double()
        K1_now = e1.intermediates["keys_after"][0]
        K2 = e2.intermediates["keys"][0]
        assert (K1_now @ d2.T).norm(dim=1).mean() < 0.35 * (K2 @ d2.T).norm(dim=1).mean()  # a soft penalty, not a constraint
        fresh = null_space({0: C[0]}, thr)  # the same batch without the earlier keys moves them more
        e2_fresh = alphaedit(h, second, [0], fresh, cfg, outcomes=False)
        assert (K1_now @ d2.T).norm() < (K1_now @ e2_fresh.deltas[name].double().T).norm()
    finally:
        undo()
    assert _same(before, _state(model))
    with pytest.raises(ValueError, match="null space covers"):
        alphaedit(h, first, [1], space)


def test_sequential_harness_checkpoints_resumes_and_restores(bed, tmp_path, monkeypatch):
    h, world, C = bed
    model = h.model
    before = _state(model)
    recs, preserved = sequential_requests(world, 8, seed=0, hold_out=0.25)
    held = {p.split(" ")[0] for p, _ in preserved}
    assert not {r.subject for r in recs} & {s for s in world.subjects if any(p.startswith(s + " ") for p, _ in preserved)}
    assert held and all(nb.split(" ")[0] not in {r.subject for r in recs} for r in recs for nb in r.neighborhood_prompts)
    cfg = EditConfig.memit(clamp_norm_factor=4.0, mom2_update_weight=1000.0)
    full = sequential_edits(h, recs, "memit", batch=4, every=4, layers=[0], C={0: C[0]}, config=cfg,
                            preserved=preserved, fluency_n=4, progress=False)
    assert _same(before, _state(model))
    assert list(full.n_edits) == [4, 8] and full.es.iloc[-1] >= 75 and (full.update_rel > 0).all()
    assert full.specificity.iloc[-1] <= 100 and len(full.attrs["edits"]) == 8
    # killed after the first checkpoint, a rerun continues from it and ends where the uninterrupted run ended
    import memloc.edit.sequential as seq
    real = seq._save
    calls = []

    def dying_save(*a, **k):
        real(*a, **k)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(seq, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        sequential_edits(h, recs, "memit", batch=4, every=4, layers=[0], C={0: C[0]}, config=cfg,
                         preserved=preserved, fluency_n=4, out=tmp_path / "seq", progress=False)
    assert _same(before, _state(model))  # restored even when killed
    monkeypatch.setattr(seq, "_save", real)
    resumed = sequential_edits(h, recs, "memit", batch=4, every=4, layers=[0], C={0: C[0]}, config=cfg,
                               preserved=preserved, fluency_n=4, out=tmp_path / "seq", progress=False)
    cols = ["n_edits", "es", "ps", "ns", "specificity", "update_rel"]
    assert resumed[cols].equals(full[cols])
    assert sorted(p.name for p in (tmp_path / "seq").glob("state_*")) == ["state_8.safetensors"]
    from memloc.validate import OutputExistsError
    with pytest.raises(OutputExistsError, match="other settings"):
        sequential_edits(h, recs, "memit", batch=2, every=4, layers=[0], C={0: C[0]}, config=cfg,
                         out=tmp_path / "seq", progress=False)
    # ROME and r-ROME one at a time
    r = sequential_edits(h, recs[:3], "r-rome", every=3, layers=[0], C={0: C[0]},
                         config=EditConfig(context_templates=context_templates(h, ((5, 2),))), progress=False)
    assert r.attrs["settings"]["config"]["keys"] == "prefix" and len(r.attrs["settings"]["config"]["context_templates"]) == 3
    assert len(r.attrs["edits"]) == 3 and r.attrs["edits"].denominator.notna().all()
    plain = sequential_edits(h, recs[:3], "rome", every=3, layers=[0], C={0: C[0]}, progress=False)
    assert plain.es.iloc[-1] > 60 and list(plain.attrs["edits"].edit) == [0, 1, 2]
    part = sequential_edits(h, recs, "memit", batch=2, every=4, layers=[0], C={0: C[0]}, config=cfg, until=3,
                            progress=False)
    assert list(part.n_edits) == [4] and len(part.attrs["edits"]) == 4  # until stops at a checkpoint, not between
    with pytest.raises(ValueError, match="batch must be 1"):
        sequential_edits(h, recs, "rome", batch=2, layers=[0])
    with pytest.raises(ValueError, match="needs C"):
        sequential_edits(h, recs, "alphaedit", layers=[0])
    assert _same(before, _state(model))


def test_sequential_cli_prints_the_table_and_refuses_other_settings(lm_testbed, tmp_path, capsys):
    from memloc.cli import main

    args = ["edit", str(lm_testbed.path), "--sequential", "4", "--method", "memit", "--batch", "2",
            "--memit-layers", "0", "--prefixes", "none", "--out", str(tmp_path / "seq"), "--quiet"]
    main(args)
    text = capsys.readouterr().out
    assert "sequential memit" in text and "specificity" in text and "n_edits" in text
    assert (tmp_path / "seq" / "checkpoints.parquet").exists() and (tmp_path / "seq" / "sequential.png").exists()
    assert main(args[:6] + ["--batch", "4"] + args[8:]) == 2  # a user error: one line, exit status 2
    assert "other settings" in capsys.readouterr().err
