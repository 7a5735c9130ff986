"""One investigation -> one folder: the run, the tables, the figures and an ``index.html`` with the findings.

``investigate(out)`` trains the memorization testbed (and the same model on clean labels, for comparison), then
runs the cheap memorization scores, layer rewinding and retraining, greedy neuron ablation on a sample of clean and
noisy examples, and the layer-wise probes. Every step writes its result atomically and is skipped when its result
is already there, so an interrupted investigation resumes where it stopped; the page is rebuilt from the saved
results each time.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .results import atomic_path, load_result, make_result, save_result

__all__ = ["investigate", "DEFAULTS"]

DEFAULTS = {"dataset": "mnist1d", "model": "cnn1d", "noise": 0.1, "seed": 0, "ablate_per_group": 100,
            "curvature_checkpoints": 10, "probe_examples": 2000, "inj_examples": 20, "inj_ratio": 0.05,
            "del_targets": 10, "membership_models": 8}


def _step(out: Path, name: str, fn: Callable[[], pd.DataFrame], log: Callable[[str], None],
          inputs: dict | None = None) -> pd.DataFrame:
    """``out/NAME.parquet``: reused when its settings hold the same ``inputs``, else (re)computed."""
    from .validate import differences

    path = out / f"{name}.parquet"
    inputs = json.loads(json.dumps(inputs or {}))
    if path.exists():
        old = load_result(path)
        settings = old.attrs.get("settings", {})
        diff = differences({k: settings.get(k) for k in inputs}, inputs)
        if not diff:
            log(f"{name}: done before, reusing {path}")
            return old
        log(f"{name}: made with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}), "
            "recomputing")
    t0 = time.perf_counter()
    df = make_result(fn(), **inputs)
    save_result(df, path)
    log(f"{name}: {time.perf_counter() - t0:.1f} s")
    return df


def investigate(out: str | Path = "reports/default", *, dataset: str | None = None, model: str | None = None,
                noise: float | None = None, seed: int | None = None, train_overrides: dict | None = None,
                ablate_per_group: int | None = None, progress: bool = True, log: Callable[[str], None] = print,
                device: str = "cpu", overwrite: bool = False) -> Path:
    """Run the whole investigation into ``out`` and return the path of its ``index.html``.

    Args default to :data:`DEFAULTS` (MNIST-1D, cnn1d, 10% flipped labels, seed 0). ``train_overrides`` are
    extra :class:`~memloc.train.TrainConfig` fields for both runs; ``device`` is where both train and every
    analysis runs.

    ``out/memloc.json`` records the training settings: a rerun with other ones is refused (naming them) unless
    ``overwrite=True``, which starts the folder afresh. A step whose own inputs changed (``ablate_per_group``) is
    recomputed; a non-empty folder memloc did not write is refused unless ``overwrite``.
    """
    import shutil

    from .train import TrainConfig
    from .validate import claim_output, number
    from . import locate
    from .analyses import plots, probes, scores
    from .train import format_summary, train

    o = dict(DEFAULTS)
    o.update({k: v for k, v in dict(dataset=dataset, model=model, noise=noise, seed=seed,
                                    ablate_per_group=ablate_per_group).items() if v is not None})
    number("ablate_per_group", o["ablate_per_group"], lo=1, integer=True)
    out = Path(out)
    base = {"dataset": o["dataset"], "model": o["model"], "noise": o["noise"], "seed": o["seed"],
            **(train_overrides or {})}
    cfg = TrainConfig.from_dict(base).validate().to_dict()  # every value checked before anything is written
    if claim_output(out, "investigation", {"train": cfg}, overwrite=overwrite):
        for p in list(out.iterdir()):  # other training settings: nothing in the folder is valid any more
            if p.name != "memloc.json":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    log(f"investigation: {base['model']} on {base['dataset']}, {base['noise']:.0%} flipped labels, seed "
        f"{base['seed']} -> {out}/")
    run = train(base, out / "run", progress=progress, device=device)
    log(format_summary(run.summary, run.path))
    clean = train({**base, "noise": 0.0}, out / "clean_run", progress=progress, device=device)

    ck = [e for e in run.epochs if e > 0]
    pick = sorted({ck[int(i)] for i in np.linspace(0, len(ck) - 1, min(o["curvature_checkpoints"], len(ck)))})

    def score_table():
        a = scores.dynamics_scores(run)
        b = scores.checkpoint_scores(run, epochs=pick, progress=progress)
        return make_result(pd.merge(a, b.drop(columns="group"), on="example_id"),
                           **a.attrs["settings"],
                           checkpoint_scores={k: v for k, v in b.attrs["settings"].items() if k != "config"})

    sc = _step(out, "scores", score_table, log)
    auc = _step(out, "auroc", lambda: scores.auroc_table(sc), log)
    rw = _step(out, "rewind", lambda: locate.rewind_layers(run, progress=progress), log)
    rt = _step(out, "retrain", lambda: locate.retrain_layers(run, progress=progress), log)
    ab = _step(out, "ablate", lambda: locate.ablate_examples(run, o["ablate_per_group"], progress=progress), log,
               {"n_per_group": o["ablate_per_group"]})
    from .locate import groundtruth as gt

    inj = _step(out, "localize_inj", lambda: gt.or_skipped(lambda: gt.injection_benchmark(run, ratio=o["inj_ratio"],
                                                                    n_examples=o["inj_examples"], seed=o["seed"],
                                                                    progress=progress)), log,
                {"n_examples": o["inj_examples"], "ratio": o["inj_ratio"]})
    dele = _step(out, "localize_del", lambda: gt.or_skipped(lambda: gt.deletion_benchmark(
        run, n_targets=o["del_targets"], seed=o["seed"], progress=progress)), log,
                 {"n_targets": o["del_targets"]})
    mem = _step(out, "membership", lambda: _membership(run, o["membership_models"], o["seed"], progress), log,
                {"n_models": o["membership_models"]})
    kw = dict(max_examples=o["probe_examples"], seed=o["seed"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        heat = _step(out, "similarity", lambda: probes.compare_layers(run, clean, "cka", progress=progress, **kw), log)
        same = _step(out, "same_layer", lambda: _concat([probes.compare_layers(run, clean, m, cross=False,
                                                                               progress=progress, **kw)
                                                         for m in ("cka", "svcca", "pwcca")]), log)
    dim = _step(out, "dimension", lambda: probes.layer_dimensions(run, **kw), log)
    knn = _step(out, "knn", lambda: probes.knn_probe(run, **kw), log)

    figs = {
        "learning_curves.png": lambda: plots.plot_learning_curves(
            run.dynamics, run.examples, title=f"{base['model']} on {base['dataset']}, {base['noise']:.0%} flipped"),
        "scores.png": lambda: plots.plot_score_histograms(sc, auroc=auc),
        "gallery.png": lambda: plots.plot_gallery(sc, run.data(), auc.score.iloc[0]),
        "rewind.png": lambda: plots.plot_rewind(rw),
        "retrain.png": lambda: plots.plot_retrain(rt),
        "ablate.png": lambda: plots.plot_ablation(ab),
        "similarity.png": lambda: plots.plot_layer_similarity(heat, same),
        "dimension.png": lambda: plots.plot_layer_dimensions(dim),
        "knn.png": lambda: plots.plot_knn_probe(knn),
        "localize_inj.png": lambda: gt.plot_groundtruth(inj),
        "localize_del.png": lambda: gt.plot_groundtruth(dele),
        "membership.png": lambda: plots.plot_membership(mem),
    }
    findings = (_findings(run, clean, auc, rw, rt, ab, same, dim, knn) + gt.groundtruth_findings(inj, dele)
                + _membership_findings(mem))
    sections = [("Training", "learning_curves.png", "Accuracy and loss per epoch; noisy accuracy is against the flipped labels."),
                ("Which examples are memorized", "scores.png", "Per-example scores, clean vs flipped, with their AUROC."),
                ("Most and least memorized examples", "gallery.png", "Red titles: flipped labels."),
                ("Layer rewinding", "rewind.png", "Each layer put back to an earlier checkpoint in the final model."),
                ("Layer retraining", "retrain.png", "One layer reset to initialisation and retrained on clean examples, all others frozen."),
                ("Greedy neuron ablation", "ablate.png", "Units zeroed until an example's prediction flips."),
                ("Do localizers find injected memorization? (INJ)", "localize_inj.png",
                 "Fresh examples with flipped labels fitted by fine-tuning only a random share of each layer's units; "
                 "recall of those units among each localizer's top k per layer (Chang et al. 2024)."),
                ("Dropping what the localizers find (DEL)", "localize_del.png",
                 "Each memorized noisy example's top units per layer zeroed: is it forgotten, are the other memorized "
                 "examples kept, what does it cost in test accuracy; dashed: as many random units."),
                ("Membership inference with few reference models", "membership.png",
                 f"RMIA (Zarifzadeh et al. 2024) and LiRA with the same k reference models of an "
                 f"{o['membership_models']}-model ensemble (the run's recipe, each on a random half of the training "
                 "set), against two of its models as targets; the loss attack needs none."),
                ("Memorizing vs clean-label model", "similarity.png", "Layer-by-layer similarity of the two models."),
                ("Intrinsic dimension", "dimension.png", "TwoNN per layer, all / clean / flipped examples."),
                ("k-NN probe", "knn.png", "Where class structure is lost for memorized examples.")]
    return _write_report(
        out, figs, findings, log, title="memloc investigation",
        heading=f"Where is memorization? {base['model']} on {base['dataset']}, {base['noise']:.0%} flipped labels",
        tables=[("AUROC of each score for the flipped labels", auc[["score", "auroc"]].round(3))],
        sections=sections, settings=run.config.to_dict(),
        footer="Tables: the <code>*.parquet</code> files next to this page (settings in their metadata); the run: "
               "<code>run/</code>.")


def _membership(run, n_models: int, seed: int, progress: bool) -> pd.DataFrame:
    """RMIA vs LiRA at 1, 2, 4 and n_models - 1 reference models of a half-subset ensemble with ``run``'s recipe."""
    from .analyses.privacy import rmia_vs_lira
    from .ensemble import train_ensemble

    if n_models < 2:
        from .validate import ConfigError
        raise ConfigError(f"membership_models must be at least 2 (a target and a reference); got {n_models}.")
    ens = train_ensemble(run, n_models, ratio=0.5, seed=seed, progress=progress)
    ks = sorted({k for k in (1, 2, 4, n_models - 1) if k <= n_models - 1})
    return rmia_vs_lira(ens, ks, n_targets=2, seed=seed)


def _membership_findings(mem: pd.DataFrame) -> list[str]:
    t = mem.set_index(["attack", "k"])
    s = mem.attrs.get("settings", {})
    ks = sorted(k for k in mem.k.unique() if k > 0)
    if not ks:
        return []

    def at(attack, k, col="auc"):
        return t[col].get((attack, k), float("nan"))

    k0, k1 = ks[0], ks[-1]
    return [f"Membership inference ({s.get('n_models', '?')}-model ensemble, half the training set each, "
            f"{s.get('n_targets', '?')} targets, RMIA a {s.get('a', '?')} gamma {s.get('gamma', '?')}): with {k0} "
            f"reference model RMIA offline reaches AUC {at('rmia_offline', k0):.3f} vs offline LiRA "
            f"{at('lira_offline', k0):.3f} (on the {at('lira_offline', k0, 'coverage'):.0%} of examples it can score) "
            f"and the loss attack {at('loss', 0):.3f}; with {k1}: RMIA offline {at('rmia_offline', k1):.3f}, "
            f"online {at('rmia_online', k1):.3f}, LiRA offline {at('lira_offline', k1):.3f}, online "
            f"{at('lira_online', k1):.3f}. TPR at 1% FPR (RMIA offline, k = {k1}): "
            f"{at('rmia_offline', k1, 'tpr_at_1%_fpr'):.3f}."]


def _write_report(out: Path, figs: dict, findings: list[str], log, **page) -> Path:
    """Save every figure, ``findings.txt`` and ``index.html`` (see :func:`_page`) atomically; log the findings."""
    from .analyses import plots

    for name, make in figs.items():
        plots.save_figure(make(), out / name)
    with atomic_path(out / "findings.txt") as tmp:
        tmp.write_text("\n".join(f"- {f}" for f in findings) + "\n")
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(_page(findings=findings, **page))
    log("findings:\n" + "\n".join(f"- {f}" for f in findings))
    log(f"report: {out / 'index.html'}")
    return out / "index.html"


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(frames, ignore_index=True)
    df.attrs = frames[0].attrs
    return df


def _findings(run, clean, auc, rw, rt, ab, same, dim, knn) -> list[str]:
    from .locate import summarize_flips
    from .locate.rewind import before_memorization_epoch

    s = run.summary
    f = [f"The model fits all {s['n']['noisy']} flipped labels (train accuracy on them "
         f"{s['train_acc_noisy']:.3f}, clean {s['train_acc_clean']:.3f}) after {s['epochs']} epochs, with test "
         f"accuracy {s['test_acc']:.3f} (the same model on clean labels: {clean.summary['test_acc']:.3f})."]
    a = auc.set_index("score").auroc
    f.append("Memorization scores recover the flipped labels: AUROC " +
             ", ".join(f"{k} {a[k]:.3f}" for k in a.index[:4]) + f"; final-epoch loss alone {a.get('final_loss', float('nan')):.3f}.")
    e = before_memorization_epoch(run, sorted(set(rw.epoch[rw.layer != "none"])))
    t = rw[rw.epoch == e].pivot_table(index="layer", columns="group", values="accuracy")
    from .models import layer_names
    head = layer_names(run.model(), head=True)[-1]
    if head in t.index:
        f.append(f"Rewinding only the last layer ({head}) to epoch {e} (before memorization) leaves "
                 f"{t.loc[head, 'noisy']:.0%} of the flipped labels predicted (clean accuracy {t.loc[head, 'clean']:.0%}): "
                 "memorization is not confined to the last layer.")
    last = rt.sort_values("epoch").groupby(["layer", "group"]).tail(1).pivot_table(index="layer", columns="group",
                                                                                  values="accuracy")
    f.append("Resetting one layer and retraining it on clean examples (others frozen) brings flipped-label accuracy "
             "back to " + ", ".join(f"{l} {last.loc[l, 'noisy']:.0%}" for l in last.index) + ".")
    fl = summarize_flips(ab)
    excl = ab.attrs.get("settings", {}).get("unfit_excluded") or {}
    left_out = (f" ({' and '.join(f'{n} {g}' for g, n in excl.items() if n)} examples the model does not fit were "
                "left out: they have nothing to flip)") if any(excl.values()) else ""
    if fl["noisy"]["n"] and fl["clean"]["n"]:
        f.append(f"Greedy ablation flips a noisy example after a median of {fl['noisy']['median_units']:g} units vs "
                 f"{fl['clean']['median_units']:g} for clean ones (Mann-Whitney p = {fl['mannwhitney_p_noisy_fewer']:.1e}); "
                 f"the flip costs {-fl['noisy']['mean_test_acc_change']:.1%} test accuracy for noisy vs "
                 f"{-fl['clean']['mean_test_acc_change']:.1%} for clean examples{left_out}.")
    else:
        missing = "noisy" if not fl["noisy"]["n"] else "clean"
        f.append(f"Greedy ablation has no finding: the model fits none of the {missing} examples, so there is nothing to "
                 f"flip and nothing to compare{left_out}.")
    cka = same[same.method == "cka"]
    f.append("The memorizing and clean-label models agree less with depth (CKA per layer: " +
             ", ".join(f"{r.layer_a} {r.similarity:.2f}" for r in cka.itertuples()) + ").")
    k = knn[(knn.group == "noisy")].pivot(index="layer", columns="target", values="accuracy")
    f.append("A 10-NN probe on clean examples still assigns flipped examples their original class in " +
             ", ".join(f"{l} {k.loc[l, 'original']:.0%}" for l in k.index) + " of cases.")
    d = dim[dim.group == "all"]
    f.append("Intrinsic dimension (TwoNN) by layer: " + ", ".join(f"{r.layer} {r.dimension:.1f}" for r in d.itertuples()) + ".")
    return f


def _page(title: str, heading: str, findings: list[str], tables: list[tuple[str, pd.DataFrame]],
          sections: list[tuple[str, str, str]], settings: dict, footer: str) -> str:
    """The report page: findings, tables, one (heading, image, caption) section per figure, the settings."""
    esc = html.escape
    body = "\n".join(f"<h2>{esc(t)}</h2><p>{esc(c)}</p><img src='{esc(img)}' alt='{esc(t)}'>" for t, img, c in sections)
    tables_html = "\n".join(f"<h2>{esc(t)}</h2>{df.to_html(index=False, border=0)}" for t, df in tables)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
img{{max-width:100%;border:1px solid #ddd;margin:0.5em 0 1.5em}} table{{border-collapse:collapse}}
td,th{{padding:2px 10px;text-align:left}} pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>{esc(heading)}</h1>
<h2>Findings</h2><ul>{''.join(f'<li>{esc(x)}</li>' for x in findings)}</ul>
{tables_html}
{body}
<h2>Settings</h2><pre>{esc(json.dumps(settings, indent=1))}</pre>
<p>{footer}</p>
</body></html>
"""


LM_DEFAULTS = {"kind": "gpt2", "n_people": 200, "n_subjects": 120, "seed": 0, "trace_facts": 30, "kn_facts": 30,
               "edits": 50, "hase_facts": 20, "sequential": 40, "inj_texts": 3, "del_targets": 5}
"""``investigate --preset lm``: the GPT-2 testbed (``kind="word"``: the word-level one) and how much of it to analyse."""


def investigate_lm(out: str | Path = "reports/lm", *, kind: str | None = None, seed: int | None = None,
                   edits: int | None = None, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """The language-model investigation (``memloc investigate --preset lm``): train the testbed (the GPT-2 with a
    BPE tokenizer on biographies, :mod:`memloc.models.gpt2`; ``kind="word"``: the word-level fact world), measure
    fact recall and canary exposure, trace facts (residual stream, MLP, attention), find knowledge neurons and
    suppress/amplify them, benchmark ROME / MEMIT edits, compare the layer where tracing peaks with the layer where
    ROME works best for each fact (Hase et al. 2023), and compare unlearning methods on the canaries (with an oracle
    retrained without them); one folder with ``index.html``. Resumable like :func:`investigate`."""
    from .analyses import plots
    from .analyses.lm import canary_extraction, exposure
    from .edit.evaluate import TESTBED_MEMIT, compare_editors, make_requests, rome_by_layer, trace_vs_edit
    from .edit.rome import EditConfig
    from .locate.knowledge import intervene_knowledge_neurons, knowledge_neurons
    from .locate.trace import trace_facts

    o = dict(LM_DEFAULTS)
    o.update({k: v for k, v in dict(kind=kind, seed=seed, edits=edits).items() if v is not None})
    if o["kind"] not in ("gpt2", "word"):
        from .validate import ConfigError
        raise ConfigError(f"The 'kind' parameter must be 'gpt2' or 'word'. Got {o['kind']!r} instead.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if o["kind"] == "gpt2":
        from .data.bios import make_bio_world
        from .models.gpt2 import EDIT_LAYERS, train_gpt2

        log(f"language-model investigation: GPT-2 testbed on a biography world ({o['n_people']} people, seed "
            f"{o['seed']}) -> {out}/")
        run = train_gpt2(make_bio_world(o["n_people"], seed=o["seed"]), out / "run", seed=o["seed"],
                         progress=progress)
        rome_layer, memit_layers = EDIT_LAYERS["rome"], EDIT_LAYERS["memit"]
        memit_config = EditConfig.memit()
    else:
        from .data.facts import make_fact_world
        from .models.transformer import train_lm

        log(f"language-model investigation: word-level fact world ({o['n_subjects']} subjects, seed {o['seed']}) "
            f"-> {out}/")
        run = train_lm(make_fact_world(o["n_subjects"], seed=o["seed"]), out / "run", seed=o["seed"],
                       progress=progress)
        rome_layer, memit_layers, memit_config = 0, [0], EditConfig.memit(**TESTBED_MEMIT)
    s = run.summary
    length = f"{s['steps']} steps" if "steps" in s else f"{s['epochs']} epochs"
    log(f"trained {length} in {s['seconds']} s: recall {s['fact_recall_train_templates']:.3f} (training templates), "
        f"{s['fact_recall_heldout_templates']:.3f} (held-out)")
    lm, world = run.lm(), run.world

    def metrics():
        ex = exposure(lm, world).merge(canary_extraction(lm, world)[["name", "extracted"]], on="name")
        return ex
    ex = _step(out, "exposure", metrics, log)
    from .analyses.lm_attacks import lm_attack_suite

    attacks = _step(out, "attacks", lambda: lm_attack_suite(lm, world, seed=o["seed"]), log, {"seed": o["seed"]})
    windows = {"resid": 1, "mlp": 1 if o["kind"] == "gpt2" else 2, "attn": 1 if o["kind"] == "gpt2" else 2}
    traces = {k: _step(out, f"trace_{k}", lambda k=k: trace_facts(
        lm, world, k, window=windows[k], seed=o["seed"], limit=o["trace_facts"], progress=progress), log,
        inputs={"window": windows[k], "limit": o["trace_facts"]}) for k in ("resid", "mlp", "attn")}
    kn = _step(out, "knowledge_neurons", lambda: knowledge_neurons(lm, world, limit=o["kn_facts"], progress=progress),
               log)
    effects = {(name, split): _step(out, f"knowledge_{name}_{split}", lambda f=factor, sp=split:
                                    intervene_knowledge_neurons(lm, world, kn, f, split=sp, seed=o["seed"]), log)
               for name, factor in (("suppress", 0.0), ("amplify", 2.0)) for split in ("train", "heldout")}
    t0 = time.perf_counter()
    edits_table = compare_editors(lm, world, out / "edit", n=o["edits"], layer=rome_layer, memit_layers=memit_layers,
                                  memit_config=memit_config, seed=o["seed"], progress=progress)
    log(f"edits: {time.perf_counter() - t0:.1f} s")
    hase_recs = make_requests(world, o["hase_facts"], o["seed"])
    by_layer = _step(out, "rome_by_layer", lambda: rome_by_layer(lm, hase_recs, C="data", texts=world.training_text(),
                                                                 progress=progress), log,
                     inputs={"n": o["hase_facts"], "seed": o["seed"]})
    hase = _step(out, "trace_vs_edit", lambda: trace_vs_edit(lm, hase_recs, by_layer, "mlp", 1, seed=o["seed"],
                                                             progress=progress)[0], log,
                 inputs={"n": o["hase_facts"], "seed": o["seed"]})
    seq = _sequential_section(out, lm, world, o, rome_layer, memit_layers, memit_config, progress, log)
    from .locate import groundtruth as gt

    inj = _step(out, "localize_inj", lambda: gt.or_skipped(lambda: gt.run_groundtruth(
        run, "inj", n=o["inj_texts"], seed=o["seed"], progress=progress)), log, {"n": o["inj_texts"]})
    dele = _step(out, "localize_del", lambda: gt.or_skipped(lambda: gt.run_groundtruth(
        run, "del", n=o["del_targets"], seed=o["seed"], progress=progress)), log, {"n": o["del_targets"]})
    from .edit.unlearn_lm import compare_lm_unlearning, plot_lm_tradeoff

    t0 = time.perf_counter()
    unlearn_table = compare_lm_unlearning(run, "canaries", out=out / "unlearn", seed=o["seed"], progress=progress)
    log(f"unlearning: {time.perf_counter() - t0:.1f} s")

    figs = {f"trace_{k}.png": (lambda df=df: plots.plot_trace(df)) for k, df in traces.items()}
    figs["knowledge_neurons.png"] = lambda: plots.plot_knowledge_neurons(kn, effects)
    figs["edits.png"] = lambda: plots.plot_edits(edits_table)
    figs["trace_vs_edit.png"] = lambda: plots.plot_trace_vs_edit(hase, by_layer)
    figs["unlearning.png"] = lambda: plot_lm_tradeoff(unlearn_table)
    from .edit.sequential import plot_sequential
    figs["sequential.png"] = lambda: plot_sequential(seq)
    figs["localize_inj.png"] = lambda: gt.plot_groundtruth(inj)
    figs["localize_del.png"] = lambda: gt.plot_groundtruth(dele)
    figs["attacks.png"] = lambda: plots.plot_lm_attacks(attacks)
    findings = _lm_findings(s, ex, traces, kn, effects, edits_table, unlearn_table, hase, attacks)
    findings += gt.groundtruth_findings(inj, dele)
    last = pd.DataFrame([t.iloc[-1] for t in seq.values()])
    findings.append(f"Sequential editing ({o['sequential']} edits; ROME and r-ROME one at a time at layer {rome_layer} "
                    f"with 20 generated prefixes, MEMIT and AlphaEdit in batches of {max(1, o['sequential'] // 4)} at "
                    f"layers {memit_layers}): efficacy of all edits / specificity against the unedited model: " + "; ".join(
                        f"{r.method} {r.es:.0f}% / {getattr(r, 'specificity', float('nan')):.0f}%" for r in last.itertuples())
                    + ".")
    sections = [("Membership attacks on sequences", "attacks.png",
                 "LOSS, ZLib, Min-K%, Min-K%++ and GradNorm (higher score = member; OpenUnlearning's attack suite) "
                 "on inserted vs never-inserted canaries and on true vs counterfactual fact statements."),
                ("Causal tracing: residual stream", "trace_resid.png", "Indirect effect of restoring one state."),
                ("Causal tracing: MLP outputs", "trace_mlp.png", f"Windows of {windows['mlp']} layer(s)."),
                ("Causal tracing: attention outputs", "trace_attn.png", f"Windows of {windows['attn']} layer(s)."),
                ("Does localization inform editing? (Hase et al. 2023)", "trace_vs_edit.png",
                 "Per edited fact: tracing's MLP effect at the last subject token (window 1) against ROME's success "
                 "(rewrite + paraphrase margin) at the same layer; per-layer means."),
                ("Knowledge neurons", "knowledge_neurons.png", "Suppress (x0) and amplify (x2) vs random neurons."),
                ("Do localizers find injected memorization? (INJ)", "localize_inj.png",
                 "Unseen texts fitted by fine-tuning only the value vectors of a random 2% of each layer's FFN units; "
                 "recall of those units among each localizer's top k per layer (Chang et al. 2024)."),
                ("Dropping what the localizers find (DEL)", "localize_del.png",
                 "Each memorized training sequence's top FFN units per layer zeroed: its suffix, the other memorized "
                 "sequences, held-out perplexity; dashed: as many random units."),
                ("Edits", "edits.png", "ROME single edits (C from data vs identity); MEMIT vs sequential ROME."),
                ("Sequential editing", "sequential.png", "ROME, r-ROME, MEMIT and AlphaEdit, each edit on the model "
                 "edited so far; specificity of never-edited subjects' facts against the unedited model."),
                ("Unlearning the canaries", "unlearning.png", "Forget vs retain for every method, with the oracle.")]
    tables = [("Canaries", ex.round(3)), ("Membership attacks", attacks.round(3)), ("Edit benchmark (percent)", edits_table),
              ("Sequential editing (percent)", pd.concat(list(seq.values()), ignore_index=True)[
                  [c for c in ("method", "n_edits", "es", "ps", "ns", "specificity", "fluency", "update_rel",
                               "collapsed") if c in next(iter(seq.values()))]].round(2)),
              ("Unlearning the canaries", unlearn_table.drop(columns=[c for c in ("seconds",) if c in unlearn_table])
               .round(3))]
    return _write_report(
        out, figs, findings, log, title="memloc language-model investigation",
        heading="Where does a tiny transformer keep facts and secrets?", tables=tables, sections=sections,
        settings={**run.config, "investigation": o},
        footer="Tables: the <code>*.parquet</code> files next to this page and in <code>edit/</code>; the model: "
               "<code>run/</code>.")


def _sequential_section(out, lm, world, o, rome_layer, memit_layers, memit_config, progress, log) -> dict:
    """ROME, r-ROME, MEMIT and AlphaEdit on ``o["sequential"]`` edits each (resumable under ``out/sequential/``)."""
    import dataclasses

    from .edit.rome import EditConfig, key_second_moment
    from .edit.sequential import reference_templates, sequential_edits, sequential_requests

    n = o["sequential"]
    records, preserved = sequential_requests(world, n, seed=o["seed"])
    text = world.training_text()
    C = {l: key_second_moment(lm, text, l) for l in sorted({rome_layer, *memit_layers})}
    rome_cfg = EditConfig(context_templates=reference_templates(lm, "rome", o["seed"]))
    batch_cfg = dataclasses.replace(memit_config, context_templates=reference_templates(lm, "memit", o["seed"]))
    batch = max(1, n // 4)
    t0 = time.perf_counter()
    tables = {}
    for m in ("rome", "r-rome", "memit", "alphaedit"):
        single = m in ("rome", "r-rome")
        layers = [rome_layer] if single else list(memit_layers)
        tables[m] = sequential_edits(lm, records, m, batch=None if single else batch, every=batch, layers=layers,
                                     C={l: C[l] for l in layers}, config=rome_cfg if single else batch_cfg,
                                     preserved=preserved, out=out / "sequential" / m, progress=progress)
    log(f"sequential editing: {time.perf_counter() - t0:.1f} s")
    return tables


def _lm_findings(s, ex, traces, kn, effects, edits, unlearn, hase=None, attacks=None) -> list[str]:
    n_layers = s["n_layers"] if "n_layers" in s else s["model"]["n_layers"]
    f = [f"The {n_layers}-layer testbed recalls {s['fact_recall_train_templates']:.0%} of the facts on "
         f"training templates and {s['fact_recall_heldout_templates']:.0%} on held-out paraphrases."]
    g = ex.groupby("repeats").agg(extracted=("extracted", "mean"), exposure=("exposure", "mean"),
                                  max_exposure=("max_exposure", "first"))
    f.append("Canaries extracted by greedy decoding, by repeat count: " + ", ".join(
        f"{r}x {row.extracted:.0%} (exposure {row.exposure:.1f} of {row.max_exposure:.1f} bits)"
        for r, row in g.iterrows()) + ".")
    for kind, df in traces.items():
        st = df.attrs["settings"]
        b = df.groupby(["bucket", "layer"]).ie.mean()
        best = b.idxmax()
        subj = b.loc["last subject"] if "last subject" in b.index.get_level_values(0) else None
        at_subject = (f"; at the last subject token it peaks at layer {subj.idxmax()} ({subj.max():.2f})"
                      if subj is not None else "")
        f.append(f"Causal tracing ({kind}, window {st['window']}, {st['n_facts']} facts, mean total effect "
                 f"{df.drop_duplicates('subject').te.mean():.2f}): the largest mean indirect effect, {b.max():.2f}, is at "
                 f"the {best[0]} token, layer {best[1]}{at_subject}.")
    st = kn.attrs["settings"]
    sup, amp = effects[("suppress", "heldout")], effects[("amplify", "heldout")]
    f.append(f"Knowledge neurons ({st['steps']} IG steps, {st['neurons_per_fact']:.1f} per fact, mostly in layer "
             f"{kn.groupby('layer').size().idxmax()}): suppressing them changes P(object) by "
             f"{effects[('suppress', 'train')].change.mean():+.0%} on training prompts and {sup.change.mean():+.0%} on "
             f"held-out ones (random neurons {sup.random_change.mean():+.0%}); amplifying them "
             f"{amp.change.mean():+.0%} on held-out prompts.")
    e = edits.set_index("condition")
    rome_rows = [c for c in e.index if c.startswith("rome_") and c.endswith("data")]
    id_rows = [c for c in e.index if c.startswith("rome_") and c.endswith("identity")]
    memit = [c for c in e.index if c.startswith("memit")]
    seq = [c for c in e.index if c.startswith("sequential")]
    if rome_rows and id_rows:
        r, i = e.loc[rome_rows[0]], e.loc[id_rows[0]]
        f.append(f"ROME ({rome_rows[0]}, {int(r.n)} single edits): efficacy {r.es:.0f}%, paraphrase {r.ps:.0f}%, "
                 f"neighbourhood {r.ns:.0f}% (unedited {e.loc['unedited'].ns:.0f}%); with C = I neighbourhood falls "
                 f"to {i.ns:.0f}%.")
    if memit and seq:
        m, q = e.loc[memit[0]], e.loc[seq[0]]
        f.append(f"{int(m.n)} edits at once: MEMIT keeps {m.unedited_acc:.0f}% of unedited subjects' facts "
                 f"(efficacy {m.es:.0f}%), sequential ROME {q.unedited_acc:.0f}% (efficacy {q.es:.0f}%).")
    if hase is not None:
        h = hase.attrs["settings"]
        fmt = lambda d: ", ".join(f"layer {k}: {v}" for k, v in d.items())
        f.append(f"Does localization inform editing (Hase et al.; {h['n_facts']} facts, MLP tracing window "
                 f"{h['window']}, ROME at every layer)? Tracing's effect at the last subject token peaks at "
                 f"{fmt(h['trace_peak_counts'])}; ROME works best (rewrite + paraphrase margin) at "
                 f"{fmt(h['best_edit_counts'])}; the two layers agree for {h['agree']:.0%} of facts. Correlation of "
                 f"tracing effect with edit success over (fact, layer) pairs: Pearson {h['pearson_all']:.2f} "
                 f"(Spearman {h['spearman_all']:.2f}; within facts {h['pearson_within_fact']:.2f}).")
    u = unlearn.set_index("method")
    row = lambda m: (f"{m}: extraction {u.loc[m, 'forget_exact']:.0%}, exposure {u.loc[m, 'forget_exposure']:.1f} "
                     f"bits, fact recall {u.loc[m, 'recall_train']:.0%}")
    f.append("Unlearning the canaries (" + "; ".join(row(m) for m in ("original", "oracle", "grad_ascent", "grad_diff")
                                                    if m in u.index) + ").")
    if "privleak" in u:
        f.append("PrivLeak against the oracle (Min-K% AUC of the forget canaries vs never-inserted ones; MUSE's sign: "
                 "0 = like the oracle, negative = still leaking, positive = over-unlearned): " + ", ".join(
                     f"{m} {u.loc[m, 'privleak']:+.1f}" for m in u.index if m != "oracle") + ".")
    if attacks is not None and len(attacks):
        for name, g in attacks.groupby("set", sort=False):
            g = g.sort_values("auc", ascending=False)
            f.append(f"Membership attacks on {name} ({int(g.n_members.iloc[0])} members vs "
                     f"{int(g.n_nonmembers.iloc[0])} non-members of the same format): AUC " + ", ".join(
                         f"{r.attack} {r.auc:.3f}" for r in g.itertuples()) + ".")
    return f
