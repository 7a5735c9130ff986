"""``memloc`` command line: ``memloc train``, ``memloc summary``, ``memloc investigate``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _kv(items: list[str] | None, flag: str = "--data-arg/--model-arg") -> dict:
    """Parse ``key=value`` pairs; values are read as JSON when they parse (numbers, lists), else as strings."""
    from .validate import ConfigError

    out = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"The {flag!r} parameter takes KEY=VALUE (e.g. hidden=[64]). Got {item!r} instead.")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _add_train_args(p: argparse.ArgumentParser, default_out: str | None) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, help="mnist1d | digits | cifar10 (default %(default)s)")
    p.add_argument("--data-arg", action="append", metavar="KEY=VALUE",
                   help="dataset argument, repeatable (e.g. num_samples=2000, root=data/, images=true)")
    p.add_argument("--noise", type=float, default=d.noise, help="fraction of flipped training labels (%(default)s)")
    p.add_argument("--model", default=d.model, help="mlp | cnn1d | cnn2d | resnet9 (default %(default)s)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="model argument, repeatable (e.g. hidden=[512,512], width=0.5)")
    p.add_argument("--optimizer", default=d.optimizer, help="sgd | adam | adamw (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", default=d.schedule, help="constant | cosine | triangle | step")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs, help="maximum epochs (%(default)s)")
    p.add_argument("--stop-at", type=float, default=d.stop_at_train_acc,
                   help="stop once train accuracy (noisy labels included) reaches this; 0 = train all epochs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--example-tied-dropout", action="store_true",
                   help="train with example-tied dropout (Maini et al. 2023)")
    p.add_argument("--etd-sites", default=None, help="comma-separated sites (default: the last hidden layer)")
    p.add_argument("--p-fixed", type=float, default=0.2, help="fraction of always-on units (%(default)s)")
    p.add_argument("--p-mem", type=float, default=0.1, help="keep probability of memorization units (%(default)s)")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16"],
                   help="bf16: bfloat16 autocast in the training steps (default %(default)s)")
    p.add_argument("--out", default=default_out, required=default_out is None, help="run folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_common(p: argparse.ArgumentParser, model_factory: bool = True) -> None:
    """--seed, --threads, --device, --quiet (and --model-factory): the same on every analysis command."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if model_factory:
        p.add_argument("--model-factory", default=None, metavar="PACKAGE.MODULE:NAME",
                       help="how to build the run's model when the run folder cannot say (a run of your own model "
                            "adapted from checkpoints with a factory memloc cannot import): an importable "
                            "zero-argument callable, e.g. mynets:ResNet")


def _own_out(a: argparse.Namespace, kind: str) -> None:
    """An explicit ``--out`` folder: refused when it is a file, or exists, is not empty and memloc did not write it
    (or wrote another kind of output); claimed (``memloc.json``) otherwise, so later runs of the same command may
    write there (:func:`memloc.validate.claim_output`)."""
    from .validate import claim_output

    if getattr(a, "out", None):
        claim_output(a.out, kind, {}, overwrite_hint=False)


def _train_from_args(a: argparse.Namespace):
    import torch

    from .train import format_summary, train

    if a.threads:
        torch.set_num_threads(a.threads)
    from .hooks import resolve_device
    device = resolve_device(a.device)
    run = train(
        {"dataset": a.dataset, "dataset_kwargs": _kv(a.data_arg, "--data-arg"), "noise": a.noise, "model": a.model,
         "model_kwargs": _kv(a.model_arg, "--model-arg"), "optimizer": a.optimizer, "lr": a.lr, "weight_decay": a.weight_decay,
         "schedule": a.schedule, "batch_size": a.batch_size, "epochs": a.epochs,
         "stop_at_train_acc": a.stop_at or None, "seed": a.seed, "precision": a.precision,
         "example_tied_dropout": ({"sites": a.etd_sites.split(",") if a.etd_sites else None, "p_fixed": a.p_fixed,
                                   "p_mem": a.p_mem} if a.example_tied_dropout else None)},
        a.out, overwrite=a.overwrite, progress=not a.quiet, device=device)
    print(format_summary(run.summary, run.path))
    return run


def _investigate(a: argparse.Namespace) -> None:
    """The main job: the whole investigation into OUT (see memloc.report). Re-running resumes."""
    import torch

    from .report import investigate

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.preset == "lm":
        from .report import investigate_lm

        investigate_lm(a.out if a.out != "reports/default" else "reports/lm", seed=a.seed, progress=not a.quiet)
        return
    from .hooks import resolve_device

    overrides = {"optimizer": a.optimizer, "lr": a.lr, "weight_decay": a.weight_decay, "schedule": a.schedule,
                 "batch_size": a.batch_size, "epochs": a.epochs, "stop_at_train_acc": a.stop_at or None,
                 "dataset_kwargs": _kv(a.data_arg, "--data-arg"), "model_kwargs": _kv(a.model_arg, "--model-arg"),
                 "precision": a.precision}
    investigate(a.out, dataset=a.dataset, model=a.model, noise=a.noise, seed=a.seed, train_overrides=overrides,
                ablate_per_group=a.ablate_per_group, progress=not a.quiet, device=str(resolve_device(a.device)),
                overwrite=a.overwrite)


def _finished_run(a: argparse.Namespace, path: str | None = None):
    """Set torch's thread count (if asked) and open a finished run on ``--device`` with ``--model-factory``,
    or explain how to finish it."""
    import torch

    from .train import Run

    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    run = Run(path or a.run, model=getattr(a, "model_factory", None), device=getattr(a, "device", "cpu"))
    if not run.finished:
        raise ValueError(f"{run.path} is not finished; rerun its `memloc train` command to complete it first.")
    run.factory  # fails here, in one line, when the run's model cannot be built
    return run


def _locate(a: argparse.Namespace) -> None:
    from . import locate
    from .analyses import plots
    from .results import save_result

    from .validate import int_list

    run = _finished_run(a)
    layers = a.layers.split(",") if a.layers else None
    _own_out(a, "locate")
    out = Path(a.out) if a.out else run.path / "locate"
    progress = not a.quiet
    if a.method == "rewind":
        epochs = int_list("--epochs", a.epochs, lo=0)
        df = locate.rewind_layers(run, layers, epochs, include_buffers=not a.no_buffers, progress=progress)
        fig = plots.plot_rewind(df)
        first = locate.rewind.before_memorization_epoch(run, sorted(set(df.epoch[df.layer != "none"])))
        t = df[(df.epoch == first) | (df.layer == "none")].pivot_table(index="layer", columns="group",
                                                                        values="accuracy").reindex(
            index=["none"] + df.attrs["settings"]["layers"], columns=["clean", "noisy", "test"])
        text = (f"accuracy with each layer rewound to epoch {first}, the first at which >=90% of clean examples "
                f"were fit (layer 'none' = final model):\n{t.round(3)}")
    elif a.method == "retrain":
        df = locate.retrain_layers(run, layers, max_epochs=a.max_epochs, seed=a.seed, progress=progress)
        fig = plots.plot_retrain(df)
        last = df.sort_values("epoch").groupby(["layer", "group"], sort=False).tail(1)
        t = last.pivot_table(index="layer", columns="group", values="accuracy").reindex(
            index=df.attrs["settings"]["layers"], columns=["clean", "noisy", "test"])
        text = ("accuracy after resetting each layer and retraining it on clean examples (others frozen):\n"
                f"{t.round(3)}")
    elif a.method == "ablate":
        df = locate.ablate_examples(run, a.n_per_group, seed=a.seed, layers=layers, batch_size=a.batch_size,
                                    keep_weight=a.keep_weight, noise_samples=a.noise_samples,
                                    max_units=a.max_units, progress=progress)
        fig = plots.plot_ablation(df)
        s = locate.summarize_flips(df)
        excl = df.attrs["settings"].get("unfit_excluded") or {}

        def fmt(v, spec):
            return "n/a" if v is None else format(v, spec)
        text = (f"units zeroed to flip: noisy median {s['noisy']['median_units']} (n={s['noisy']['n']}, capped "
                f"{s['noisy']['capped']}), clean median {s['clean']['median_units']} (n={s['clean']['n']}, capped "
                f"{s['clean']['capped']}); Mann-Whitney p (noisy < clean) = {fmt(s['mannwhitney_p_noisy_fewer'], '.2g')}\n"
                f"mean test-accuracy change: noisy {fmt(s['noisy']['mean_test_acc_change'], '+.4f')}, "
                f"clean {fmt(s['clean']['mean_test_acc_change'], '+.4f')}"
                + (f"\nleft out (the model does not fit them, nothing to flip): "
                   f"{', '.join(f'{n} {g}' for g, n in excl.items())}" if any(excl.values()) else ""))
    else:
        df = locate.dropout_accuracies(run)
        fig = plots.plot_dropout(df)
        text = f"example-tied dropout accuracy:\n{df.pivot(index='mode', columns='group', values='accuracy').round(3)}"
    save_result(df, out / f"{a.method}.parquet")
    plots.save_figure(fig, out / f"{a.method}.png")
    st = df.attrs["settings"]
    print(f"run: {run.path} ({run.config.model} on {run.config.dataset}, {run.config.noise:.0%} flipped, "
          f"seed {run.config.seed})")
    print("settings: " + json.dumps({k: v for k, v in st.items() if k not in ("config", "run")}))
    print(text)
    print(f"wrote {out / (a.method + '.parquet')} and {out / (a.method + '.png')}")


def _probe(a: argparse.Namespace) -> None:
    import warnings

    import numpy as np
    import pandas as pd

    from .analyses import plots, probes
    from .results import save_result

    from .validate import number

    number("--max-examples", a.max_examples, lo=20, integer=True)
    run = _finished_run(a)
    other = _finished_run(a, a.against) if a.against else None
    _own_out(a, "probe")
    out = Path(a.out) if a.out else run.path / "probe"
    kw = dict(max_examples=a.max_examples, seed=a.seed)
    progress = not a.quiet
    c = run.config
    print(f"run A: {run.path} ({c.model} on {c.dataset}, {c.noise:.0%} flipped, seed {c.seed}); "
          f"{a.max_examples} examples per analysis, seed {a.seed}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CCA small-sample warnings: the docs say when to worry
        heat = probes.compare_layers(run, other, a.method, progress=progress, **kw)
        same = None
        if other is not None:
            same = pd.concat([probes.compare_layers(run, other, m, cross=False, progress=progress, **kw)
                              for m in ("cka", "svcca", "pwcca")], ignore_index=True)
            same.attrs = heat.attrs
            save_result(same, out / "same_layer.parquet")
            t = same.pivot(index="layer_a", columns="method", values="similarity").loc[list(dict.fromkeys(same.layer_a))]
            print(f"run B: {other.path} ({other.config.noise:.0%} flipped, seed {other.config.seed})\n"
                  f"similarity of A and B at the same layer:\n{t.round(3)}")
        save_result(heat, out / "similarity.parquet")
        plots.save_figure(plots.plot_layer_similarity(heat, same), out / "similarity.png")
        epochs = run.epochs
        pick = sorted(set(np.linspace(0, len(epochs) - 1, min(10, len(epochs))).round().astype(int)))
        dyn = probes.checkpoint_similarity(run, "svcca", epochs=[epochs[i] for i in pick], progress=progress, **kw)
    save_result(dyn, out / "dynamics.parquet")
    plots.save_figure(plots.plot_checkpoint_similarity(dyn), out / "dynamics.png")
    print(f"SVCCA of each layer with its final state:\n"
          f"{dyn.pivot(index='layer', columns='epoch', values='similarity').round(3)}")
    dim = probes.layer_dimensions(run, estimator=a.estimator, **kw)
    save_result(dim, out / "dimension.parquet")
    plots.save_figure(plots.plot_layer_dimensions(dim), out / "dimension.png")
    print(f"intrinsic dimension ({a.estimator}) by layer and group:\n"
          f"{dim.pivot(index='layer', columns='group', values='dimension').round(2)}")
    knn = probes.knn_probe(run, **kw)
    save_result(knn, out / "knn.parquet")
    plots.save_figure(plots.plot_knn_probe(knn), out / "knn.png")
    print(f"10-NN probe fitted on clean examples:\n"
          f"{knn.pivot_table(index='layer', columns=['group', 'target'], values='accuracy').round(3)}")
    if (run.examples.group == "noisy").any():
        nc = probes.neural_collapse_memorization(run, epochs=[epochs[i] for i in pick])
        save_result(nc, out / "collapse.parquet")
        plots.save_figure(plots.plot_neural_collapse(nc), out / "collapse.png")
        print(f"neural-collapse memorization (penultimate features):\n{nc.round(3).to_string(index=False)}")
    if run.config.noise >= 0.5:  # mostly random labels: the setting of Anagnostidis et al.
        bm = probes.benign_memorization(run, **kw)
        save_result(bm, out / "benign.parquet")
        print("benign memorization: 10-NN accuracy on clean test data (original labels), init vs trained:\n"
              f"{bm.pivot(index='layer', columns='epoch', values='accuracy').round(3)}")
    print(f"wrote {out}/ (similarity, dynamics, dimension, knn, collapse: .parquet and .png)")


def _scores(a: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from .analyses import plots, privacy, scores
    from .ensemble import train_ensemble
    from .results import make_result, save_result

    from .validate import ConfigError, InputFileError, int_list, number

    run = _finished_run(a)
    families = a.score or ["dynamics", "curvature", "ssft", "holdout"]
    if "all" in families:
        families = ["dynamics", "curvature", "ssft", "holdout", "fz", "cscore", "mia", "rmia"]
    # every check before anything is computed or written
    epochs = int_list("--epochs", a.epochs, lo=0)
    number("--n-directions", a.n_directions, lo=1, integer=True)
    number("--h", a.h, lo=0, lo_open=True)
    number("--models", a.models, lo=2, integer=True)
    number("--ratio", a.ratio, lo=0, hi=1, lo_open=True, hi_open=True)
    number("--cscore-models", a.cscore_models, lo=1, integer=True)
    number("--ensemble-epochs", a.ensemble_epochs, lo=1, integer=True, none_ok=True)
    number("--ensemble-lr", a.ensemble_lr, lo=0, lo_open=True, none_ok=True)
    number("--ensemble-batch-size", a.ensemble_batch_size, lo=1, integer=True, none_ok=True)
    if a.ensemble_model_arg and not a.ensemble_model:
        raise ConfigError("--ensemble-model-arg goes with --ensemble-model NAME (a registered model); the run's own "
                          "model takes none.")
    if a.ensemble_model:
        from .models import MODELS, check_model_kwargs

        if a.ensemble_model not in MODELS:
            raise ConfigError(f"The '--ensemble-model' parameter must be one of {sorted(MODELS)}. Got "
                              f"{a.ensemble_model!r} instead.")
        check_model_kwargs(a.ensemble_model, _kv(a.ensemble_model_arg, "--ensemble-model-arg"), "--ensemble-model-arg")
    if not (run.examples.group == "noisy").any():
        raise ConfigError(f"{run.path} has no flipped labels (trained with noise {run.config.noise}), so there is "
                          "nothing for the scores' AUROC to recover; memloc scores needs a run with --noise > 0.")
    if not (run.path / "dynamics.parquet").exists():
        raise InputFileError(f"{run.path} has no dynamics.parquet (per-example training dynamics), which every score "
                             "family starts from; retrain the run with memloc train (or record it with Recorder).")
    _own_out(a, "scores")
    out = Path(a.out) if a.out else run.path / "scores"
    progress = not a.quiet
    c = run.config
    print(f"run: {run.path} ({c.model} on {c.dataset}, {c.noise:.0%} flipped, seed {c.seed})")
    table = scores.dynamics_scores(run)
    settings = {"dynamics": table.attrs["settings"]}
    if "curvature" in families:
        ck = scores.checkpoint_scores(run, epochs, a.n_directions, a.h, a.form, seed=a.seed, progress=progress)
        table = table.merge(ck.drop(columns="group"), on="example_id")
        settings["checkpoints"] = {k: v for k, v in ck.attrs["settings"].items() if k != "config"}
    if "ssft" in families:
        sf = scores.second_split_forgetting(run, seed=a.seed, progress=progress)
        table = table.merge(sf[["example_id", "ssft"]], on="example_id")
        settings["ssft"] = {k: v for k, v in sf.attrs["settings"].items() if k != "config"}
    if "holdout" in families:
        ho = scores.holdout_retraining(run, seed=a.seed)
        table = table.merge(ho[["example_id", "holdout_kl"]], on="example_id")
        settings["holdout"] = {k: v for k, v in ho.attrs["settings"].items() if k != "config"}
    data = run.data()
    ens_kw = dict(model=a.ensemble_model, model_kwargs=_kv(a.ensemble_model_arg, "--ensemble-model-arg") or None,
                  epochs=a.ensemble_epochs, lr=a.ensemble_lr, batch_size=a.ensemble_batch_size,
                  optimizer=a.ensemble_optimizer, seed=a.seed, progress=progress)
    mi = None
    ens = None
    rm = None
    if "fz" in families or "mia" in families or "rmia" in families:
        ens = train_ensemble(run, a.models, a.ratio, **ens_kw)
        ens.save(out / "ensemble.safetensors")
        fz = scores.feldman_zhang(ens)
        table = table.merge(fz[["example_id", "fz_memorization"]], on="example_id")
        inf = scores.fz_influence(ens)
        flat = np.nan_to_num(inf, nan=-np.inf).ravel()
        top = np.argsort(flat)[::-1][:1000]
        pairs = pd.DataFrame({"train_id": ens.train_ids[top // inf.shape[1]], "test_id": ens.test_ids[top % inf.shape[1]],
                              "influence": flat[top]})
        save_result(make_result(pairs, **ens.settings), out / "influence_top_pairs.parquet")
        settings["ensemble"] = ens.settings
        if "mia" in families:
            mi = privacy.membership_inference(ens, data)
            save_result(mi, out / "membership_inference.parquet")
        if "rmia" in families:
            rm = privacy.rmia_vs_lira(ens, n_references=(1, 2, 4, 8, 64), n_targets=4, seed=a.seed)
            save_result(rm, out / "rmia_vs_lira.parquet")
    if "cscore" in families:
        ens_list = [train_ensemble(run, a.cscore_models, r, **ens_kw) for r in np.round(np.arange(0.1, 1.0, 0.1), 1)]
        cs = scores.cscore(ens_list)
        table = table.merge(cs[["example_id", "cscore"]], on="example_id")
        settings["cscore"] = cs.attrs["settings"]
    table = make_result(table, run=str(run.path), config=c.to_dict(), **settings)
    save_result(table, out / "scores.parquet")
    auc = scores.auroc_table(table)
    save_result(auc, out / "auroc.parquet")
    plots.save_figure(plots.plot_score_histograms(table, auroc=auc), out / "histograms.png")
    best = auc.score.iloc[0]
    plots.save_figure(plots.plot_gallery(table, data, best), out / "gallery.png")
    print(f"AUROC for recovering the {int((table.group == 'noisy').sum())} flipped labels among "
          f"{len(table)} training examples:\n{auc[['score', 'auroc']].round(3).to_string(index=False)}")
    ref = "fz_memorization" if "fz_memorization" in table else "cumulative_loss"
    ag = scores.agreement(table, reference=ref)
    save_result(ag, out / "agreement.parquet")
    print(f"agreement with {ref} (scores oriented so that positive = agree on memorized):\n"
          f"{ag[['score_b', 'pearson', 'spearman', 'cosine']].round(3).to_string(index=False)}")
    if "fz_memorization" in table:
        g = table.groupby("group").fz_memorization
        es = ens.settings
        print(f"Feldman-Zhang memorization ({a.models} models, ratio {a.ratio}): mean noisy "
              f"{g.mean()['noisy']:.3f}, clean {g.mean()['clean']:.3f} (median {g.median()['clean']:.3f}); "
              f"ensemble: {es['model']}, {es['optimizer']} lr {es['lr']}, batch {es['batch_size']}, {es['epochs']} "
              f"epochs; the models fit {es['fit_own_subset']:.1%} of their own subsets"
              + (f" ({es['fit_own_subset_noisy']:.1%} of the flipped examples in them)"
                 if es.get("fit_own_subset_noisy") is not None else ""))
    if mi is not None:
        low = mi.groupby("group").lowest_fpr.max()
        print("membership inference, TPR at 1% FPR (tensorflow/privacy's rule: the last ROC point with FPR < 1%; mean "
              "over 8 target models, the rest as shadows):\n"
              f"{mi.pivot(index='attack', columns='group', values='tpr_at_1%_fpr').round(3)}\n"
              "lowest reachable FPR (1 / non-members) per group: " + ", ".join(
                  f"{g} {v:.2%}" + (" (above 1%: that column is the TPR at zero false positives)" if v >= 0.01
                                    else "") for g, v in low.items()))
    if rm is not None:
        st = rm.attrs["settings"]
        print(f"RMIA vs LiRA with the same k reference models ({st['n_models']} models in the ensemble, "
              f"{st['n_targets']} targets in turn; RMIA a {st['a']}, gamma {st['gamma']}; offline LiRA and RMIA without "
              "the IN fallback can score only examples some reference left out: coverage):\n"
              f"{rm.round(3).to_string(index=False)}")
    print(f"wrote {out}/ (scores, auroc, agreement .parquet; histograms.png, gallery.png)")


def _lm(a: argparse.Namespace) -> None:
    import torch

    from .data.facts import make_fact_world
    from .models.transformer import LMRun, train_lm

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.action == "train":
        from .validate import number

        number("--layers", a.layers, lo=1, integer=True) if a.layers is not None else None
        number("--d-model", a.d_model, lo=1, integer=True)
        if a.kind == "word":
            number("--subjects", a.subjects, lo=2, integer=True)
            run = train_lm(make_fact_world(a.subjects, seed=a.seed), a.out, n_layers=a.layers or 4,
                           d_model=a.d_model, seed=a.seed, progress=not a.quiet, overwrite=a.overwrite)
        else:
            from .data.bios import make_bio_world
            from .models.gpt2 import GPT2_DEFAULTS, train_gpt2

            number("--people", a.people, lo=2, integer=True)
            kw = {"n_layers": a.layers or GPT2_DEFAULTS["n_layers"], "d_model": a.d_model, "seed": a.seed}
            if a.train_steps is not None:
                number("--train-steps", a.train_steps, lo=1, integer=True)
                kw.update(steps=a.train_steps, warmup=min(GPT2_DEFAULTS["warmup"], a.train_steps // 10))
            run = train_gpt2(make_bio_world(a.people, seed=a.seed), a.out, progress=not a.quiet,
                             overwrite=a.overwrite, **kw)
        print(json.dumps({k: v for k, v in run.summary.items() if k != "model"}, indent=1))
        print(f"wrote {run.path}/" + (" (a Hugging Face folder: LM.from_pretrained or "
                                      "AutoModelForCausalLM.from_pretrained open it)" if a.kind == "gpt2" else ""))
        return
    if a.action == "memorized":
        return _memorized(a)
    run = LMRun(a.out)
    lm, world = run.lm(device=a.device), run.world
    out = run.path / "analysis"
    from .results import save_result
    if a.action == "metrics":
        from .analyses.lm import canary_extraction, exposure, fact_recall

        for split in ("train", "heldout"):
            print(f"fact recall ({split} templates): {fact_recall(lm, world, split).correct.mean():.3f}")
        ex = exposure(lm, world).merge(canary_extraction(lm, world)[["name", "extracted"]], on="name")
        save_result(ex, out / "exposure.parquet")
        print(ex.round(3).to_string(index=False))
        return
    if a.action == "neurons":
        _neurons(a, lm, world, out)
        return
    if a.action == "attacks":
        from .analyses.lm_attacks import lm_attack_suite

        ref = None
        if a.reference:
            ref = LMRun(a.reference).lm(device=a.device)
        t = lm_attack_suite(lm, world, reference=ref, seed=a.seed)
        save_result(t, out / "attacks.parquet")
        st = t.attrs["settings"]
        print(f"membership attacks on {run.path} (higher score = member; Min-K% k {st['k']}; inserted vs never-inserted "
              "canaries, true vs counterfactual fact statements; TPR at 1% FPR is the TPR at zero false positives where "
              f"lowest_fpr is above 1%):\n{t.round(3).to_string(index=False)}")
        print(f"wrote {out}/attacks.parquet")
        return
    from .analyses.plots import plot_trace, save_figure
    from .locate.trace import trace_facts

    for kind, window in (("resid", 1), ("mlp", 2), ("attn", 2)):
        df = trace_facts(lm, world, kind, a.samples, window, a.seed, limit=a.facts, progress=not a.quiet)
        save_result(df, out / f"trace_{kind}.parquet")
        save_figure(plot_trace(df), out / f"trace_{kind}.png")
        st = df.attrs["settings"]
        print(f"{kind} (window {window}, {st['n_facts']} facts, noise {st['noise']:.3g}, {a.samples} samples): "
              f"mean indirect effect by token bucket and layer\n"
              f"{df.groupby(['bucket', 'layer']).ie.mean().unstack().round(3)}")
    print(f"wrote {out}/trace_*.parquet and .png")


def _unlearn(a: argparse.Namespace) -> None:
    """Every unlearning method (or the chosen ones) against an oracle retrained without the forget set."""
    import pandas as pd

    from .edit.unlearn import METHODS, compare_unlearning

    if (Path(a.run) / "world.json").exists():  # a language-model run (memloc lm train)
        return _unlearn_lm(a)
    from .validate import ConfigError

    if a.requests is not None:
        raise ConfigError("--requests (sequential unlearning requests, MUSE's sustainability) is for language-model "
                          "runs (memloc lm train); this is a classifier run.")

    run = _finished_run(a)
    forget = a.forget or "noisy"
    if forget != "noisy":
        try:
            forget = [int(i) for i in forget.split(",") if i.strip()]
        except ValueError:
            forget = []
        if not forget:
            raise ConfigError(f"The '--forget' parameter must be 'noisy' or comma-separated training example ids "
                              f"(e.g. 3,17,42) for a classifier run. Got {a.forget!r} instead.")
    methods = None if a.method == "all" else [m.strip() for m in a.method.split(",") if m.strip()]
    params = _method_params(a.param, METHODS)
    relearn = _relearn_arg(a)
    _own_out(a, "unlearn")
    table = compare_unlearning(run, forget, methods, out=a.out, seed=a.seed, params=params, progress=not a.quiet,
                               relearn=relearn)
    s = table.attrs["settings"]
    c = run.config
    print(f"run: {run.path} ({c.model} on {c.dataset}, {c.noise:.0%} flipped, seed {c.seed}); forget set "
          f"{s['forget']!r}: {s['n_forget']} examples, retain {s['n_retain']}, held-out (test) {s['n_holdout']}")
    print(f"oracle: {s['oracle']} (the same config retrained without the forget set, {s['oracle_epochs']} epochs)")
    print(f"method seed {s['seed']}; parameters (memloc.edit.unlearn.DEFAULTS unless --param):")
    for m, p in s["params"].items():
        print(f"  {m}: {json.dumps(p)}")
    print(f"forget quality = KS test of per-example forget losses vs the oracle's; power check (original vs "
          f"oracle): p = {s['ks_power_p']:.2g} -> " + ("the test can tell them apart" if s["ks_can_tell"] else
                                                      "the test CANNOT tell (ks_p means nothing here)"))
    print(f"mia_auc: {s['mia']}; forget_acc against the flipped (training) labels, forget_acc_original against "
          "the true ones; steps = optimiser steps (oracle: its training)")
    if s.get("relearn"):
        print(f"relearning attack {json.dumps(s['relearn'])}: relearn_forget_acc_held = forget accuracy on the "
              "forget examples not relearned, after relearning the others; retain_relearn_forget_acc = after "
              "fine-tuning on as many retain examples")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=["ks_can_tell", "forget_loss"]).round(3).to_string(index=False))
    folder = Path(s["oracle"]).parent
    print(f"wrote {folder}/table.parquet, {folder}/tradeoff.png and rows/<method>.parquet")


def _relearn_arg(a: argparse.Namespace) -> dict | None:
    """--relearn-steps / --relearn-lr / --relearn-fraction -> the relearning attack's settings (None: no attack)."""
    from .validate import ConfigError, number

    if a.relearn_steps is None:
        if a.relearn_lr is not None or a.relearn_fraction is not None:
            raise ConfigError("--relearn-lr and --relearn-fraction go with --relearn-steps K.")
        return None
    number("--relearn-steps", a.relearn_steps, lo=1, integer=True)
    out = {"steps": a.relearn_steps}
    if a.relearn_lr is not None:
        out["lr"] = number("--relearn-lr", a.relearn_lr, lo=0.0, lo_open=True)
    if a.relearn_fraction is not None:
        out["fraction"] = number("--relearn-fraction", a.relearn_fraction, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    return out


def _method_params(items: list[str] | None, methods) -> dict:
    """``--param METHOD.KEY=VALUE`` -> ``{method: {key: value}}``."""
    params: dict = {}
    for key, value in _kv(items, "--param").items():
        if "." not in key:
            raise ValueError(f"--param takes METHOD.KEY=VALUE (e.g. npo.steps=200); got {key!r}. Methods: "
                             f"{list(methods)}.")
        m, k = key.split(".", 1)
        params.setdefault(m, {})[k] = value
    return params


def _unlearn_lm(a: argparse.Namespace) -> None:
    """`memloc unlearn` on a language-model run: forget canaries or subjects, compare with the retrained oracle."""
    import pandas as pd
    import torch

    from .edit.unlearn_lm import LM_METHODS, compare_lm_unlearning
    from .models.transformer import LMRun

    if a.threads:
        torch.set_num_threads(a.threads)
    run = LMRun(a.run)
    methods = None if a.method == "all" else [m.strip() for m in a.method.split(",") if m.strip()]
    relearn = _relearn_arg(a)
    params = _method_params(a.param, LM_METHODS)
    if a.requests is not None:
        return _unlearn_lm_sequential(a, run, methods, params, relearn)
    _own_out(a, "unlearn")
    table = compare_lm_unlearning(run, a.forget or "canaries", methods, out=a.out, seed=a.seed,
                                  params=params, progress=not a.quiet, relearn=relearn)
    s = table.attrs["settings"]
    c = run.config
    mc = c.get("model", c)  # the word testbed nests its architecture; a GPT-2 testbed's config is flat
    print(f"run: {run.path} ({mc['n_layers']} layers, d_model {mc['d_model']}, d_mlp {mc['d_mlp']}, seed {c['seed']}, "
          f"lr {c['lr']}, batch {c['batch_size']}); forget set {s['forget']!r}: {s['n_forget']} sentences "
          f"(canaries {s['forget_canaries']}, subjects {len(s['forget_subjects'])}), {s['n_members']} distinct items, "
          f"retain {s['n_retain']}, holdout {s['n_holdout']}")
    length = f"{s['oracle_epochs']} epochs" if s.get("oracle_epochs") is not None else f"{s['oracle_steps']} steps"
    print(f"oracle: {s['oracle']} (the run's trainer and settings on the retain sentences, {length})")
    print(f"method seed {s['seed']}; parameters (memloc.edit.unlearn_lm.LM_DEFAULTS unless --param):")
    for m, p in s["params"].items():
        print(f"  {m}: {json.dumps(p)}")
    print(f"forget quality = {s['forget_quality']}; power check (original vs oracle): p = {s['ks_power_p']:.2g} -> "
          + ("the test can tell them apart" if s["ks_can_tell"] else "the test CANNOT tell (ks_p means nothing here)"))
    print(f"mia_auc: {s['mia']}; forget_exact: greedy exact match of the forget canaries' secrets / the forgotten "
          "subjects' objects; forget_exposure in bits; recall_*: retained facts from training / held-out templates; "
          "steps = optimiser steps (oracle: its training)")
    print(f"privleak: {s['privleak']} (0 = like the oracle, negative = leaking); truth_ratio: {s['truth_ratio']} "
          "(mean min(tr, 1/tr); truth_ratio_fq = KS p-value against the oracle's)")
    print(f"verbmem_forget: {s['verbmem']}; knowmem_*: {s['knowmem']}")
    if s.get("relearn"):
        print(f"relearning attack {json.dumps(s['relearn'])}: relearn_forget_exact_held = extraction / recall of the "
              "forget items not relearned, after relearning the others; retain_relearn_forget_exact = all forget "
              "items after fine-tuning on as many retain texts")
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table.drop(columns=["ks_can_tell"]).round(3).to_string(index=False))
    folder = Path(s["oracle"]).parent
    print(f"wrote {folder}/table.parquet, {folder}/tradeoff.png and rows/<method>.parquet")


def _unlearn_lm_sequential(a: argparse.Namespace, run, methods, params, relearn) -> None:
    """`memloc unlearn RUN --requests K`: the forget set as K unlearning requests in sequence (MUSE's
    sustainability)."""
    import pandas as pd

    from .edit.unlearn_lm import sequential_lm_unlearning
    from .validate import ConfigError, number

    if relearn is not None:
        raise ConfigError("--relearn-steps goes with the oracle comparison, not with --requests; run them separately.")
    number("--requests", a.requests, lo=2, integer=True)
    _own_out(a, "unlearn")
    table = sequential_lm_unlearning(run, a.forget or "canaries", methods, a.requests, out=a.out, seed=a.seed,
                                     params=params, progress=not a.quiet)
    s = table.attrs["settings"]
    print(f"run: {run.path}; forget set {s['forget']!r} as {s['requests']} requests, unlearned one after another "
          f"from the previous model (method seed {s['seed']} + request): " + "; ".join(
              f"{i + 1}: {', '.join(f)}" for i, f in enumerate(s["folds"])))
    print("parameters (memloc.edit.unlearn_lm.LM_DEFAULTS unless --param):")
    for m, p in s["params"].items():
        print(f"  {m}: {json.dumps(p)}")
    print("forget_exact / verbmem_forget / knowmem_forget: items requested so far; pending_exact: items not yet "
          f"requested; recall_train, knowmem_retain ({len(s['knowmem_retain_subjects'])} retained subjects): utility. "
          "Request 0 = the original model.")
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table.round(3).to_string(index=False))
    print(f"wrote {Path(a.out or Path(run.path) / 'unlearn') / s['forget'] / ('sequential_' + str(s['requests']))}"
          "/table.parquet and sequential.png")


def _memorized(a: argparse.Namespace) -> None:
    """`memloc lm memorized`: k-extractable sequences of a model on a set of texts."""
    import torch

    from .analyses.lm import memorized_sequences
    from .data.records import load_texts
    from .models.lm import LM
    from .results import save_result

    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.model or not a.texts:
        raise ValueError("memloc lm memorized needs --model DIR (a local Hugging Face folder or a memloc LM run) "
                         "and --texts FILE (.txt, .jsonl or a saved dataset folder).")
    lm = LM.from_pretrained(a.model, a.tokenizer, prepend_bos=_bos_arg(a), device=a.device)
    texts = load_texts(a.texts)
    out = Path(a.out_table) if a.out_table else None
    if out is not None and out.exists():
        raise FileExistsError(f"{out} exists; choose another --out (memloc does not overwrite tables it did not write).")
    df = memorized_sequences(lm, texts, a.prefix_tokens, a.suffix_tokens, progress=not a.quiet)
    el = df[df.eligible]
    print(f"model: {lm.name}; BOS prepended: {lm.prepend_bos}; {len(texts)} texts, {len(el)} with at least "
          f"{a.prefix_tokens}+{a.suffix_tokens} tokens")
    print(f"k-extractable (greedy, prefix {a.prefix_tokens} tokens, continuation {a.suffix_tokens}): "
          f"{int(el.extractable.sum())} of {len(el)} ({el.extractable.mean():.1%}); mean match fraction "
          f"{el.match_fraction.mean():.3f}, mean continuation NLL {el.loss.mean():.3f}")
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_colwidth", 40):
        print(el.sort_values(["extractable", "match_fraction"], ascending=False)[
            ["text_id", "extractable", "match_fraction", "loss", "suffix"]].head(20).to_string(index=False))
    if out is not None:
        save_result(df, out)
        print(f"wrote {out}")


def _bos_arg(a) -> bool | None:
    v = getattr(a, "prepend_bos", "auto")
    return None if v in (None, "auto") else v == "yes"


def _neurons(a, lm, world, out) -> None:
    from .analyses.plots import plot_knowledge_neurons, save_figure
    from .locate.knowledge import intervene_knowledge_neurons, knowledge_neurons
    from .results import save_result

    kn = knowledge_neurons(lm, world, steps=a.steps, limit=a.facts, progress=not a.quiet)
    st = kn.attrs["settings"]
    save_result(kn, out / "knowledge_neurons.parquet")
    effects = {}
    for name, factor in (("suppress", 0.0), ("amplify", 2.0)):
        for split in ("train", "heldout"):
            effects[(name, split)] = intervene_knowledge_neurons(lm, world, kn, factor, split=split, seed=a.seed)
            save_result(effects[(name, split)], out / f"knowledge_{name}_{split}.parquet")
    save_figure(plot_knowledge_neurons(kn, effects), out / "knowledge_neurons.png")
    print(f"knowledge neurons: {st['n_facts']} facts, {st['steps']} IG steps ({st['method']}), threshold "
          f"{st['threshold']} x max, shared by >= {st['share']} of {st['n_prompts'] // st['n_facts']} prompts; "
          f"{st['neurons_per_fact']:.1f} neurons per fact; completeness error {st['completeness_rel_error']:.1e}")
    print(f"neurons per layer: {kn.groupby('layer').size().to_dict()}")
    for (name, split), df in effects.items():
        print(f"{name:8s} ({split:7s} prompts): P(object) change {df.change.mean():+.1%} vs {df.random_change.mean():+.1%} "
              f"with as many random neurons; unrelated facts {df.unrelated_change.mean():+.1%}")
    print(f"wrote {out}/knowledge_*.parquet and knowledge_neurons.png")


def _edit(a: argparse.Namespace) -> None:
    """ROME / MEMIT: on a language-model run (one edit, or the edit benchmark), or on a user's model and a
    CounterFact / zsRE file (--model, --requests)."""
    import torch

    from .edit.evaluate import compare_editors, request_scores
    from .edit.rome import EditConfig, key_second_moment, rome
    from .models.transformer import LMRun

    from .validate import ConfigError, int_list, number

    number("--v-steps", a.v_steps, lo=1, integer=True)
    number("--clamp", a.clamp, lo=0, lo_open=True)
    number("--n", a.n, lo=1, integer=True)
    number("--layer", a.layer, lo=0, integer=True, none_ok=True)
    number("--limit", a.limit, lo=1, integer=True, none_ok=True)
    number("--sequential", a.sequential, lo=1, integer=True, none_ok=True)
    number("--batch", a.batch, lo=1, integer=True, none_ok=True)
    number("--every", a.every, lo=1, integer=True, none_ok=True)
    number("--threshold", a.threshold, lo=0)
    if a.sequential is None and (a.batch is not None or a.every is not None):
        raise ConfigError("--batch and --every go with --sequential N.")
    if a.sequential is not None and a.method in ("rome", "r-rome") and a.batch not in (None, 1):
        raise ConfigError(f"--method {a.method} edits one fact at a time; --batch must be 1. Use memit or alphaedit "
                          "for batches.")
    if a.memit_layers is not None:
        int_list("--memit-layers", a.memit_layers, lo=0)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model or a.requests:
        a.layer = 0 if a.layer is None else a.layer
        a.memit_layers = "0" if a.memit_layers is None else a.memit_layers
        return _edit_requests(a)
    if a.run is None:
        raise ValueError("memloc edit needs a language-model run (memloc edit RUN ...) or --model DIR --requests FILE.")
    run = LMRun(a.run)
    lm, world = run.lm(device=a.device), run.world
    memit_config = None  # the word testbed's TESTBED_MEMIT
    if run.kind == "gpt2":
        from .models.gpt2 import EDIT_LAYERS, GPT2_MEMIT
        memit_config = EditConfig.memit(**GPT2_MEMIT)
        a.layer = EDIT_LAYERS["rome"] if a.layer is None else a.layer
        a.memit_layers = ",".join(map(str, EDIT_LAYERS["memit"])) if a.memit_layers is None else a.memit_layers
    a.layer = 0 if a.layer is None else a.layer
    a.memit_layers = "0" if a.memit_layers is None else a.memit_layers
    _check_layers = [a.layer] + int_list("--memit-layers", a.memit_layers, lo=0)
    if max(_check_layers) >= lm.cfg.n_layers:
        raise ConfigError(f"The '--layer' / '--memit-layers' parameters must be layers of the model, 0 to "
                          f"{lm.cfg.n_layers - 1}. Got {_check_layers} instead.")
    if a.sequential is not None:
        return _edit_sequential(a, run, lm, world)
    if a.subject is None:
        _own_out(a, "edit")
        out = Path(a.out or run.path / "edit")
        table = compare_editors(lm, world, out, n=a.n, layer=a.layer,
                                memit_layers=[int(x) for x in a.memit_layers.split(",")], seed=a.seed,
                                memit_config=memit_config, progress=not a.quiet)
        st = table.attrs["settings"]
        print(f"edits on {run.path}: {st['n']} requests (seed {st['seed']}, distinct subjects), ROME at layer "
              f"{st['layer']} (v: {st['rome_config']['v_steps']} Adam steps, lr {st['rome_config']['v_lr']}, "
              f"KL {st['rome_config']['kl_factor']}, clamp {st['rome_config']['clamp_norm_factor']}), MEMIT at "
              f"layers {st['memit_layers']} (lambda {st['memit_config']['mom2_update_weight']}, clamp "
              f"{st['memit_config']['clamp_norm_factor']}); C from the {st['key_statistics']}; BOS prepended: "
              f"{st['prepend_bos']}. Percent:")
        cols = [c for c in ("condition", "n", "es", "top1", "ps", "ns", "neighbour_acc", "other_acc", "unedited_acc",
                            "fluency", "S", "took", "flag_did_not_take", "flag_collapse") if c in table]
        import pandas as pd

        with pd.option_context("display.width", 220, "display.max_columns", 30):
            print(table[cols].to_string(index=False))
        print(f"wrote {out}/ (one parquet per condition, summary.parquet, summary.png)")
        return
    if a.relation is None or a.new is None:
        raise ValueError("A single edit needs --subject, --relation and --new (leave all three out for the "
                         "edit benchmark).")
    if a.relation not in world.relations:
        raise ValueError(f"Unknown relation {a.relation!r}; this world has {sorted(world.relations)}.")
    fact = next((f for f in world.facts if f.subject == a.subject and f.relation == a.relation), None)
    if fact is None:
        raise ValueError(f"No fact ({a.subject!r}, {a.relation!r}) in this world; subjects are e.g. "
                         f"{world.subjects[:5]}.")
    objects = world.relations[a.relation][0]
    if a.new not in objects:
        raise ValueError(f"{a.new!r} is not an object of the relation {a.relation!r}; its objects are {objects}.")
    template = world.relations[a.relation][1][0].replace("{s}", "{}")
    from .data.records import EditRecord
    others = [g for g in world.facts if g.subject == fact.subject and g.relation != fact.relation]
    neighbours = world.neighbours(fact)
    rec = EditRecord(template, a.subject, a.new, fact.object, paraphrase_prompts=tuple(world.prompts(fact, "heldout")),
                     neighborhood_prompts=tuple(world.prompts(g)[0] for g in neighbours),
                     neighborhood_targets=tuple(g.object for g in neighbours),
                     other_prompts=tuple(world.prompts(g)[0] for g in others),
                     other_targets=tuple(g.object for g in others), case_id=f"{a.subject}/{a.relation}")
    C = key_second_moment(lm, world.training_text(), a.layer) if a.covariance == "data" else None
    edit = rome(lm, rec.request(), a.layer, C, EditConfig(v_steps=a.v_steps, clamp_norm_factor=a.clamp))
    prompts = world.prompts(fact, "train") + world.prompts(fact, "heldout")
    before = request_scores(lm, [rec])
    pred_before = [lm.decode(g) for g in lm.generate(prompts, 1)]
    with edit.applied(lm.model):
        after = request_scores(lm, [rec])
        pred_after = [lm.decode(g) for g in lm.generate(prompts, 1)]
    info = edit.info
    print(f"ROME at layer {a.layer} (C {a.covariance}): {a.subject} {a.relation} {fact.object} -> {a.new}; "
          f"|W'k - v*| / |v*| = {info['rel_error']:.1e}; flag: {info['flag']}")
    for p, b, c in zip(prompts, pred_before, pred_after):
        print(f"  {p!r:40s} {b:>8s} -> {c}")
    if info["flag"] != "ok":
        print(f"note: the edit {'did not take' if not info['took'] else 'collapsed the continuation'}: target NLL "
              f"{info['nll_after']:.2f} per token after the edit (value optimisation stopped at {info['nll_end']:.2f} "
              f"after {info['steps']} steps, |delta| = {info['delta_norm']:.1f}, clamp "
              f"{info['config']['clamp_norm_factor']} x |h| = {info['config']['clamp_norm_factor'] * info['h_norm']:.1f});"
              " try --v-steps 50 or --clamp 8")
    cols = ["es", "ps", "ns", "neighbour_acc", "other_acc"]
    print("before:", before[cols].round(2).to_dict("records")[0])
    print("after: ", after[cols].round(2).to_dict("records")[0])
    if a.save:
        import shutil

        from .models.transformer import _save_model
        dest = Path(a.save)
        if dest.exists() and any(dest.iterdir()):
            raise FileExistsError(f"{dest} exists and is not empty; choose another --save folder.")
        dest.mkdir(parents=True, exist_ok=True)
        undo = edit.apply(lm.model)
        try:
            if run.kind == "gpt2":  # a Hugging Face folder again: the edited model, its tokenizer, memloc's files
                lm.hf_model.save_pretrained(str(dest), safe_serialization=True)
                lm.tokenizer.save_pretrained(str(dest))
                for name in ("testbed.json", "world.json"):
                    shutil.copy(run.path / name, dest / name)
            else:
                for name in ("config.json", "world.json", "tokenizer.json"):
                    shutil.copy(run.path / name, dest / name)
                _save_model(lm.model, dest / "model.safetensors")
        finally:
            undo()
        from .results import write_json
        write_json({**(run.summary or {}), "edit": {k: v for k, v in edit.info.items()}}, dest / "summary.json")
        print(f"wrote the edited model to {dest}/ (open it with memloc.models.transformer.LMRun)")


def _edit_sequential(a: argparse.Namespace, run, lm, world) -> None:
    """`memloc edit RUN --sequential N --method M [--batch B]`: the sequential-editing harness on the run's world."""
    import dataclasses

    from .edit.rome import EditConfig, key_second_moment
    from .edit.sequential import reference_templates, sequential_edits, sequential_requests

    single = a.method in ("rome", "r-rome")
    layers = [a.layer] if single else [int(x) for x in a.memit_layers.split(",")]
    records, preserved = sequential_requests(world, a.sequential, seed=a.seed)
    text = world.training_text()
    C = {l: key_second_moment(lm, text, l) for l in layers}
    if single:
        cfg = EditConfig(v_steps=a.v_steps, clamp_norm_factor=a.clamp)
    else:
        from .models.gpt2 import GPT2_MEMIT
        cfg = EditConfig.memit(**(GPT2_MEMIT if run.kind == "gpt2" else {}))
    if a.prefixes == "generated":
        cfg = dataclasses.replace(cfg, context_templates=reference_templates(lm, a.method, a.seed))
    out = Path(a.out or run.path / f"sequential_{a.method}")
    table = sequential_edits(lm, records, a.method, batch=a.batch, every=a.every, layers=layers, C=C, config=cfg,
                             preserved=preserved, threshold=a.threshold, out=out, overwrite=a.overwrite,
                             progress=not a.quiet)
    st = table.attrs["settings"]
    extra = (f", null space threshold {a.threshold} ({st.get('nullspace_dims')} free directions)"
             if a.method == "alphaedit" else f", lambda {cfg.mom2_update_weight}" if a.method == "memit" else "")
    print(f"sequential {a.method} on {run.path}: {st['n']} edits (seed {a.seed}; 20% of the subjects never edited: "
          f"{len(preserved)} preserved facts), batch {st['batch']}, layers {st['layers']}, clamp "
          f"{cfg.clamp_norm_factor}, {len(cfg.context_templates)} context templates ({a.prefixes}){extra}; C from the "
          f"training text. Percent; specificity against the unedited model:")
    cols = [c for c in ("n_edits", "es", "ps", "ns", "specificity", "preserved_acc", "fluency", "consistency",
                        "update_rel", "collapsed", "seconds_editing") if c in table]
    import pandas as pd

    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(table[cols].round(2).to_string(index=False))
    print(f"wrote {out}/ (checkpoints.parquet, edits.parquet, sequential.png)")


def _edit_requests(a: argparse.Namespace) -> None:
    """`memloc edit --model DIR --requests FILE`: edit a user's model with CounterFact / zsRE records."""
    from .validate import ConfigError, OutputExistsError

    if a.method not in ("rome", "memit"):
        raise ConfigError(f"With --requests, --method must be rome or memit (got {a.method}); r-rome and alphaedit "
                          "run with --sequential on a language-model run.")
    if a.sequential is not None:
        raise ConfigError("--sequential runs on a language-model run (memloc edit RUN --sequential N), not with "
                          "--requests.")
    if a.out and Path(a.out).exists() and (not Path(a.out).is_dir() or any(Path(a.out).iterdir())):
        raise OutputExistsError(f"--out {a.out} exists and is not an empty folder; choose a new --out folder (checked "
                                "before any edit is computed).")
    import pandas as pd

    from .data.records import load_requests, load_texts
    from .edit.evaluate import evaluate_requests
    from .edit.rome import EditConfig, key_second_moment
    from .models.lm import LM
    from .results import save_result

    if not a.model or not a.requests:
        raise ValueError("Editing your own model needs both --model DIR (a local Hugging Face folder) and "
                         "--requests FILE (CounterFact or zsRE JSON).")
    records = load_requests(a.requests, limit=a.limit)
    lm = LM.from_pretrained(a.model, a.tokenizer, prepend_bos=_bos_arg(a), device=a.device)
    layers = [int(x) for x in (a.memit_layers.split(",") if a.method == "memit" else [a.layer])]
    C = None
    if a.stats:
        texts = load_texts(a.stats)
        C = {l: key_second_moment(lm, texts, l) for l in layers}
        C = C if a.method == "memit" else C[layers[0]]
    cfg = EditConfig(v_steps=a.v_steps, clamp_norm_factor=a.clamp) if a.method == "rome" else EditConfig.memit()
    per, table = evaluate_requests(lm, records, a.method, layers[0], layers, C, cfg, fluency=not a.no_fluency,
                                   progress=not a.quiet)
    st = table.attrs["settings"]
    print(f"model: {lm.name}; BOS prepended: {lm.prepend_bos} ({lm.bos_rule}); {len(records)} {'/'.join(st['formats'])} "
          f"records from {a.requests}; {a.method.upper()} at layer(s) {layers}; C: "
          + (f"key second moment over {a.stats}" if C is not None else "identity (no --stats texts: EasyEdit's "
             "default; it hurts specificity)"))
    cols = ["condition", "n"] + [c for c in st["usual"] if c in table] + [c for c in ("took", "flag_did_not_take",
                                                                                      "flag_collapse") if c in table]
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print("percent (fluency: generation entropy x100):")
        print(table[cols].to_string(index=False))
    bad = per[per.flag != "ok"] if "flag" in per else per.iloc[:0]
    if len(bad):
        print(f"FLAGGED {len(bad)} of {len(per)} edits:")
        print(bad[["case_id", "subject", "new", "flag", "nll_after"]].to_string(index=False))
    if a.out:
        out = Path(a.out)
        save_result(per, out / "records.parquet")
        save_result(table, out / "summary.parquet")
        print(f"wrote {out}/records.parquet and summary.parquet")


def main(argv: list[str] | None = None) -> int:
    """Run one ``memloc`` command. A user error (a bad value, file or folder; a full disk) is one line on stderr
    and exit status 2; any other exception is a bug and keeps its traceback. ``--debug`` (anywhere on the line)
    shows the traceback of user errors too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [x for x in argv if x != "--debug"]
    parser = argparse.ArgumentParser(prog="memloc", description="Locate memorization in neural networks.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error (may also "
                                                             "follow the command)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on noisy labels, with checkpoints and per-example dynamics")
    _add_train_args(p, default_out=None)

    p = sub.add_parser("investigate", help="the main job: train the testbed, score, locate, probe, write a report")
    _add_train_args(p, default_out="reports/default")
    p.add_argument("--ablate-per-group", type=int, default=100, help="clean and noisy examples to flip (%(default)s)")
    p.add_argument("--preset", default="classifier", choices=["classifier", "lm"],
                   help="classifier (default): the flipped-label testbed; lm: the language-model testbed (tracing, "
                        "knowledge neurons, edits, unlearning) into reports/lm unless --out is given")

    p = sub.add_parser("locate", help="where is memorization stored? rewind | retrain | ablate | dropout")
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--method", required=True, choices=["rewind", "retrain", "ablate", "dropout"])
    p.add_argument("--out", default=None, help="folder for the parquet table and figure (default RUN/locate)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all of layer_names)")
    p.add_argument("--epochs", default=None, help="rewind: comma-separated checkpoint epochs")
    p.add_argument("--no-buffers", action="store_true", help="rewind: keep final BatchNorm statistics")
    p.add_argument("--max-epochs", type=int, default=20, help="retrain: epochs per layer at most")
    p.add_argument("--n-per-group", type=int, default=100, help="ablate: clean and noisy examples each")
    p.add_argument("--batch-size", type=int, default=64, help="ablate: target + other examples per objective")
    p.add_argument("--keep-weight", type=float, default=1.0, help="ablate: weight of the keep-the-batch term")
    p.add_argument("--noise-samples", type=int, default=0, help="ablate: Gaussian input samples averaged")
    p.add_argument("--max-units", type=int, default=64, help="ablate: cap on zeroed units per example")
    _add_common(p)

    p = sub.add_parser("localize-bench", help="does a localizer find memorization where it is? INJ (injected units) "
                                              "and DEL (drop the top units) benchmarks, Chang et al. 2024")
    p.add_argument("run", help="a finished classifier run or language-model run folder")
    p.add_argument("--kind", required=True, choices=["inj", "del"])
    p.add_argument("--methods", default=None, help="comma-separated localizers (default: all that apply; "
                   "hardconcrete, slimming, zero_out, ig, activations, greedy (classifiers), random)")
    p.add_argument("--fractions", default=None, help="DEL: comma-separated fractions of each layer's units removed")
    p.add_argument("--ratio", type=float, default=None, help="INJ: share of each layer's units injected "
                   "(classifiers 0.05, language models 0.02)")
    p.add_argument("--n", type=int, default=None, help="INJ: fresh examples / texts (20 / 5); DEL: targets (20 / 10)")
    p.add_argument("--out", default=None, help="folder for the table and plot (default RUN/localize_bench_KIND)")
    p.add_argument("--overwrite", action="store_true", help="recompute into an output folder made with other settings")
    _add_common(p, model_factory=False)

    p = sub.add_parser("probe", help="what memorizing layers look like: similarity, dimension, k-NN probes")
    p.add_argument("run", help="a finished run folder (model A)")
    p.add_argument("--against", default=None,
                   help="a second run on the same data (model B, e.g. trained with --noise 0 and the same seed)")
    p.add_argument("--method", default="cka", choices=["cka", "cca", "svcca", "pwcca"],
                   help="similarity for the layer x layer heatmap (default cka)")
    p.add_argument("--max-examples", type=int, default=2000, help="examples sampled per analysis (%(default)s)")
    p.add_argument("--estimator", default="twonn", choices=["twonn", "mle"])
    p.add_argument("--out", default=None, help="folder for tables and figures (default RUN/probe)")
    _add_common(p)

    p = sub.add_parser("scores", help="which examples are memorized: per-example scores and their AUROC")
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--score", action="append",
                   choices=["dynamics", "curvature", "ssft", "holdout", "fz", "cscore", "mia", "rmia", "all"],
                   help="score families (repeatable; default: dynamics, curvature, ssft, holdout; 'all' adds the "
                        "ensemble ones: fz, cscore, mia, rmia (RMIA vs LiRA at 1, 2, 4, 8, 64 reference models))")
    p.add_argument("--epochs", default=None, help="checkpoints for curvature/gradients (comma list; default all)")
    p.add_argument("--n-directions", type=int, default=10, help="curvature: Rademacher directions (%(default)s)")
    p.add_argument("--h", type=float, default=1e-3, help="curvature: step (%(default)s)")
    p.add_argument("--form", default="squared", choices=["squared", "norm"],
                   help="curvature: the paper's squared norm or the released code's norm")
    p.add_argument("--models", type=int, default=128, help="fz/mia: models in the ensemble (%(default)s)")
    p.add_argument("--ratio", type=float, default=0.7, help="fz/mia: subset ratio (%(default)s)")
    p.add_argument("--cscore-models", type=int, default=16, help="cscore: models per ratio 0.1..0.9 (%(default)s)")
    p.add_argument("--ensemble-model", default=None,
                   help="fz/cscore/mia: a registered model to train instead of the run's own (default: the run's own "
                        "model, e.g. your class, with the run's recipe)")
    p.add_argument("--ensemble-model-arg", action="append", metavar="KEY=VALUE",
                   help="arguments of --ensemble-model, repeatable (e.g. hidden=[256])")
    p.add_argument("--ensemble-epochs", type=int, default=None, help="default: as many as the run trained")
    p.add_argument("--ensemble-lr", type=float, default=None, help="default: the run's")
    p.add_argument("--ensemble-batch-size", type=int, default=None, help="default: the run's")
    p.add_argument("--ensemble-optimizer", default=None, choices=["sgd", "adam", "adamw"],
                   help="default: the run's")
    p.add_argument("--out", default=None, help="folder for tables and figures (default RUN/scores)")
    _add_common(p)

    p = sub.add_parser("sweep", help="run a declarative sweep (TOML spec) locally or on Ray; resumable")
    p.add_argument("spec", help="a TOML sweep spec (see memloc.sweep)")
    p.add_argument("--out", default=None, help="result store folder (default sweeps/<name>)")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--workers", type=int, default=1, help="local process pool size / local Ray CPUs")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto: where each cell trains")
    p.add_argument("--overwrite", action="store_true",
                   help="the spec's [train] or [methods] changed: recompute the cells they affect (default: refuse)")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("lm", help="language models: train / trace / measure the testbed; find memorized sequences "
                                  "of any model")
    p.add_argument("action", choices=["train", "trace", "metrics", "neurons", "memorized", "attacks"])
    p.add_argument("--out", default="runs/lm", help="the language-model run folder (%(default)s)")
    p.add_argument("--model", default=None, help="memorized: a local Hugging Face model folder (or a memloc LM run)")
    p.add_argument("--tokenizer", default=None, help="memorized: tokenizer folder (default: the model's)")
    p.add_argument("--texts", default=None, help="memorized: .txt (one text a line), .jsonl ('text') or a saved dataset")
    p.add_argument("--prefix-tokens", type=int, default=32, help="memorized: k, the prompt's tokens (%(default)s)")
    p.add_argument("--suffix-tokens", type=int, default=32, help="memorized: n, the continuation (%(default)s)")
    p.add_argument("--table", dest="out_table", default=None, help="memorized: write the table to this .parquet")
    p.add_argument("--prepend-bos", default="auto", choices=["auto", "yes", "no"],
                   help="BOS before every text: auto = the tokenizer's convention (GPT-2: no)")
    p.add_argument("--kind", default="gpt2", choices=["gpt2", "word"],
                   help="train: gpt2 (default: a Hugging Face GPT-2 with a BPE tokenizer trained here on permuted "
                        "biographies, memloc.models.gpt2) | word (the fast word-level TransformerLens testbed)")
    p.add_argument("--people", type=int, default=200, help="train --kind gpt2: people in the biography world")
    p.add_argument("--subjects", type=int, default=120, help="train --kind word: subjects of the fact world")
    p.add_argument("--layers", type=int, default=None, help="train: blocks (gpt2 6, word 4)")
    p.add_argument("--d-model", type=int, default=128, help="train: width (%(default)s)")
    p.add_argument("--train-steps", type=int, default=None, help="train --kind gpt2: optimiser steps (300)")
    p.add_argument("--overwrite", action="store_true", help="train: retrain a run of other settings in --out")
    p.add_argument("--samples", type=int, default=10, help="trace: noise samples (%(default)s)")
    p.add_argument("--facts", type=int, default=90, help="trace / neurons: facts analysed (%(default)s)")
    p.add_argument("--steps", type=int, default=20, help="neurons: integrated-gradient steps (%(default)s)")
    p.add_argument("--reference", default=None, help="attacks: a second LM run with the same tokenizer (reference "
                                                    "attack)")
    _add_common(p, model_factory=False)

    p = sub.add_parser("unlearn", help="remove the forget set with each unlearning method; compare with an oracle "
                                       "retrained without it")
    p.add_argument("run", help="a finished run folder (classifier, or language model from `memloc lm train`)")
    p.add_argument("--forget", default=None,
                   help="classifier: 'noisy' (the flipped examples, default) or comma-separated training example ids; "
                        "language model: 'canaries' (default), 'canaries:NAME,...', 'subjects:N', 'subjects:NAME,...'")
    p.add_argument("--method", default="all", help="all | comma-separated names among zero_units, grad_ascent, "
                                                   "grad_diff, npo, finetune, reset_finetune, random_reset "
                                                   "(language model: grad_ascent, grad_diff, npo, finetune, "
                                                   "zero_neurons, random_neurons, rome)")
    p.add_argument("--param", action="append", metavar="METHOD.KEY=VALUE",
                   help="override a method default, repeatable (e.g. npo.steps=200, reset_finetune.fraction=0.1)")
    p.add_argument("--out", default=None, help="folder (default RUN/unlearn; results go to OUT/<forget set>/)")
    p.add_argument("--relearn-steps", type=int, default=None,
                   help="run the relearning attack on every row: K Adam steps on half of the forget set (held-out "
                        "half measured) and, separately, on as many retain examples")
    p.add_argument("--relearn-lr", type=float, default=None, help="relearning attack learning rate (1e-3)")
    p.add_argument("--relearn-fraction", type=float, default=None, help="share of the forget set relearned (0.5)")
    p.add_argument("--requests", type=int, default=None, metavar="K",
                   help="language model: instead of the oracle comparison, unlearn the forget set as K requests one "
                        "after another and measure forgetting and utility after each (MUSE's sustainability)")
    _add_common(p)

    p = sub.add_parser("edit", help="ROME / MEMIT: on a language-model run (one edit, or the benchmark), or on your "
                                    "model with CounterFact / zsRE records")
    p.add_argument("run", nargs="?", default=None, help="a language-model run folder (memloc lm train)")
    p.add_argument("--model", default=None, help="your model: a local Hugging Face folder (with --requests)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--requests", default=None, help="CounterFact or zsRE JSON / JSON lines")
    p.add_argument("--method", default="rome", choices=["rome", "r-rome", "memit", "alphaedit"],
                   help="with --requests: rome or memit; with --sequential: any (%(default)s)")
    p.add_argument("--sequential", type=int, default=None, metavar="N",
                   help="sequential editing: N edits one after another (rome, r-rome) or in batches (memit, "
                        "alphaedit), evaluated every --every edits; output RUN/sequential_METHOD (or --out)")
    p.add_argument("--batch", type=int, default=None, help="with --sequential: edits per batch (memit / alphaedit; 100)")
    p.add_argument("--every", type=int, default=None, help="with --sequential: edits between evaluations (N/10)")
    p.add_argument("--threshold", type=float, default=2e-2,
                   help="with --sequential --method alphaedit: null-space eigenvalue threshold (%(default)s)")
    p.add_argument("--prefixes", default="generated", choices=["generated", "none"],
                   help="with --sequential: context prefixes sampled from the model (kmeng01/rome's 20 for ROME, "
                        "MEMIT's 5 for batches) or the bare prompt only (%(default)s)")
    p.add_argument("--overwrite", action="store_true", help="with --sequential: recompute a folder made with other "
                                                            "settings")
    p.add_argument("--stats", default=None, help="with --requests: texts for C = E[kk^T] (.txt / .jsonl / dataset); "
                                                 "default identity")
    p.add_argument("--limit", type=int, default=None, help="with --requests: the first N records")
    p.add_argument("--no-fluency", action="store_true", help="with --requests: skip generation entropy")
    p.add_argument("--prepend-bos", default="auto", choices=["auto", "yes", "no"],
                   help="BOS before every prompt: auto = the tokenizer's convention (GPT-2: no, as kmeng01/rome)")
    p.add_argument("--subject", default=None, help="edit one fact: its subject (with --relation and --new)")
    p.add_argument("--relation", default=None)
    p.add_argument("--new", default=None, help="the new object")
    p.add_argument("--covariance", default="data", choices=["data", "identity"], help="C for a single edit")
    p.add_argument("--save", default=None, help="single edit: write the edited model to this folder")
    p.add_argument("--v-steps", type=int, default=20, help="single edit: value optimisation steps (%(default)s)")
    p.add_argument("--clamp", type=float, default=4.0, help="single edit: |delta| <= CLAMP x |h| (%(default)s)")
    p.add_argument("--n", type=int, default=100, help="benchmark: number of requests (%(default)s)")
    p.add_argument("--layer", type=int, default=None,
                   help="ROME layer (default: the testbed's, memloc.models.gpt2.EDIT_LAYERS; 0 for the word testbed "
                        "and with --requests)")
    p.add_argument("--memit-layers", default=None,
                   help="benchmark: MEMIT layers, comma-separated (default: the testbed's; 0 for the word testbed)")
    p.add_argument("--out", default=None, help="benchmark folder (default RUN/edit); with --requests: a new folder "
                                               "for records.parquet and summary.parquet")
    _add_common(p, model_factory=False)

    p = sub.add_parser("summary", help="print the summary of a run folder")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="print summary.json as is")

    a = parser.parse_args(argv)
    commands = {"train": _train_from_args, "investigate": _investigate, "locate": _locate, "probe": _probe,
                "scores": _scores, "sweep": _sweep, "localize-bench": _localize_bench, "lm": _lm, "edit": _edit, "unlearn": _unlearn,
                "summary": _summary}
    try:
        _check_common(a)
        rc = commands[a.command](a)
        return rc if isinstance(rc, int) else 0
    except Exception as e:
        msg = _user_error(e)
        if msg is None or debug:
            raise
        print(f"memloc: error: {msg}", file=sys.stderr)
        return 2


# what a user can cause and fix; anything else is a bug and keeps its traceback
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError, FloatingPointError)


def _user_error(e: BaseException) -> str | None:
    """The one-line message of a user error, or ``None`` for a bug."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {e.filename}" if e.filename else ""
        return (f"disk full{where} (no space left on device). Free some space and rerun the same command: "
                "everything finished so far is kept.")
    if isinstance(e, _USER_ERRORS):
        return " ".join(str(e).split())
    return None


def _check_common(a: argparse.Namespace) -> None:
    """Checks shared by every command: --threads, and --out / --save must not name a file."""
    from .validate import OutputExistsError, number

    if getattr(a, "threads", None) is not None:
        number("--threads", a.threads, lo=1, integer=True)
        import torch
        torch.set_num_threads(a.threads)
    for flag in ("out", "save"):
        value = getattr(a, flag, None)
        if value and Path(value).exists() and not Path(value).is_dir():
            raise OutputExistsError(f"The '--{flag}' parameter must be a folder; {value} is a file.")


def _localize_bench(a: argparse.Namespace) -> None:
    """INJ / DEL on a run folder (memloc.locate.groundtruth): table, plot and the printed summary."""
    from .locate.groundtruth import METHODS, describe_groundtruth, plot_groundtruth, run_groundtruth
    from .results import save_result
    from .validate import choice, claim_output, number

    run = Path(a.run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a run folder.")
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else None
    for m in methods or []:
        choice("--methods", m, METHODS)
    if (run / "world.json").exists() and "greedy" in (methods or []):
        raise ValueError("--methods greedy localizes classifier examples; this is a language-model run (use "
                         "hardconcrete, slimming, zero_out, ig, activations, random).")
    if not (run / "world.json").exists() and not (run / "config.json").exists():
        raise FileNotFoundError(f"{run} is not a memloc run (no config.json).")
    fractions = None
    if a.fractions:
        try:
            fractions = [float(f) for f in a.fractions.split(",")]
        except ValueError:
            raise ValueError(f"--fractions must be comma-separated numbers in (0, 1]; got {a.fractions!r}.") from None
        for f in fractions:
            number("--fractions", f, lo=0.0, hi=1.0, lo_open=True)
    if a.ratio is not None:
        number("--ratio", a.ratio, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    if a.n is not None:
        number("--n", a.n, lo=1, integer=True)
    out = Path(a.out) if a.out else run / f"localize_bench_{a.kind}"
    settings = {"kind": a.kind, "methods": methods, "fractions": fractions, "ratio": a.ratio, "n": a.n,
                "seed": a.seed}
    claim_output(out, "localize-bench", settings, overwrite=a.overwrite)
    from .hooks import resolve_device

    table = run_groundtruth(run, a.kind, methods, fractions, a.ratio, a.n, seed=a.seed, progress=not a.quiet,
                            device=str(resolve_device(a.device)))
    save_result(table, out / f"{a.kind}.parquet")
    fig = plot_groundtruth(table)
    fig.savefig(out / f"{a.kind}.png", dpi=120)
    print(describe_groundtruth(table))
    print(f"wrote {out}/{a.kind}.parquet and {a.kind}.png")


def _sweep(a: argparse.Namespace) -> None:
    from .sweep import load_spec, run_sweep
    from .validate import number

    spec = load_spec(a.spec)
    number("--workers", a.workers, lo=1, integer=True)
    out = a.out or f"sweeps/{spec['name']}"
    from .hooks import resolve_device

    if a.executor == "local":
        resolve_device(a.device)  # fail fast here; Ray workers resolve it on their own machines
    table = run_sweep(spec, out, a.executor, a.workers, a.address, progress=not a.quiet, device=a.device,
                      overwrite=a.overwrite)
    print(f"sweep {spec['name']}: {table['cell'].nunique()} cells, {len(table)} rows -> "
          f"{out}/results.parquet, {out}/summary.png")


def _summary(a: argparse.Namespace) -> int:
    from .train import Run, format_summary

    run = Run(a.run)
    if run.summary is None:
        print(f"{run!r}: not finished; rerun the same `memloc train` command to resume it.")
        return 1
    print(json.dumps(run.summary, indent=2) if a.json else format_summary(run.summary, run.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
