"""Declarative sweeps: a grid over datasets, models, noise rates, seeds and methods, run once per cell, resumable.

A spec is a TOML file (or dict)::

    name = "noise"
    [grid]                      # every combination is a cell
    dataset = ["digits"]
    model = ["mlp"]
    noise = [0.1, 0.2]
    seed = [0, 1, 2]
    method = ["summary", "rewind"]
    [train]                     # TrainConfig fields for every run
    epochs = 20
    stop_at_train_acc = 0       # 0 / false: train all epochs
    model_kwargs = { hidden = [64] }
    [methods.rewind]            # keyword arguments of each method
    epochs = [0, 2]

Methods: ``summary`` (accuracies of the trained run), ``rewind``, ``retrain``, ``ablate`` (summary of greedy
flips), ``scores`` (AUROC of the dynamics scores). Cells that share a run (same dataset, model, noise, seed) are
one task, so a run is trained once and never by two workers at a time. Each cell's result is written atomically to
``OUT/cells/<cell>.parquet`` the moment it is done; a cell whose file exists is skipped, so a killed sweep loses
nothing. ``OUT/results.parquet`` collects all cells into one tidy table (the cell's grid values as columns) and
``OUT/summary.png`` plots one headline number per method against the noise rate.

Executors: ``local`` (sequential, or a process pool with ``workers > 1``) and ``ray`` (``address=None`` starts a
local Ray instance; ``address="auto"`` or ``"ray://host:10001"`` joins a cluster). The same spec runs unchanged on
each.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .results import load_result, make_result, save_result, write_json

__all__ = ["load_spec", "expand", "run_sweep", "collect", "METHODS", "GRID_KEYS"]

GRID_KEYS = ("dataset", "model", "noise", "seed", "method")
METHODS = ("summary", "rewind", "retrain", "ablate", "scores")


SECTIONS = ("name", "grid", "train", "methods")


def _method_functions() -> dict[str, list]:
    """The functions whose keyword arguments each method's ``[methods.NAME]`` table may set."""
    from .locate import ablate, retrain, rewind

    return {"summary": [], "scores": [], "rewind": [rewind.rewind_layers], "retrain": [retrain.retrain_layers],
            "ablate": [ablate.ablate_examples, ablate.greedy_flip]}


def load_spec(spec: str | Path | dict) -> dict:
    """Read and validate a spec (TOML path or dict) against the schema: the sections ``name``, ``[grid]``,
    ``[train]`` and ``[methods.NAME]`` only; grid values of known datasets, models and methods; ``[train]`` fields
    that make a valid :class:`~memloc.train.TrainConfig` with every grid value; method keywords the method
    takes; a name that is a plain file name. Raises :class:`~memloc.validate.ConfigError` naming the entry."""
    import inspect

    from .data import DATASETS
    from .models import MODELS
    from .train import TrainConfig
    from .validate import ConfigError, InputFileError, known_keys, number, safe_name

    if not isinstance(spec, dict):
        import tomllib

        path = Path(spec)
        if not path.is_file():
            raise InputFileError(f"No sweep spec at {path}" + (" (it is a folder; give the .toml file)."
                                                                if path.is_dir() else "."))
        try:
            spec = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputFileError(f"The sweep spec {path} is not valid TOML: {e}.") from None
    spec = dict(spec)
    known_keys("spec", spec, SECTIONS, "top-level sections of a sweep spec")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("A sweep spec needs a [grid] table naming lists of values for "
                          f"{list(GRID_KEYS)}.")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"Unknown grid key(s) {unknown} in the 'grid' parameter; valid keys are {list(GRID_KEYS)}.")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"The 'grid.{k}' parameter must be a non-empty list. Got {v!r} instead.")
    for k, valid in (("dataset", sorted(DATASETS)), ("model", sorted(MODELS)), ("method", list(METHODS))):
        bad = [v for v in grid.get(k, []) if v not in valid]
        if bad:
            raise ConfigError(f"Unknown {k}(s) {bad} in the 'grid.{k}' parameter; valid values are {valid}.")
    for v in grid.get("noise", []):
        number("grid.noise", v, lo=0, hi=1, hi_open=True)
    for v in grid.get("seed", []):
        number("grid.seed", v, integer=True)
    spec["name"] = safe_name("name", spec.get("name", "sweep"))
    train = spec.setdefault("train", {})
    if not isinstance(train, dict):
        raise ConfigError(f"The 'train' section must be a table of TrainConfig fields. Got {train!r} instead.")
    fields = [f for f in TrainConfig.__dataclass_fields__ if f not in ("dataset", "model", "noise", "seed")]
    known_keys("train", train, fields, "TrainConfig fields; dataset, model, noise and seed go in [grid]")
    for dataset in grid.get("dataset", ["mnist1d"]):
        for model in grid.get("model", ["mlp"]):
            TrainConfig.from_dict(_train_config(spec, {"dataset": dataset, "model": model, "noise": 0.0,
                                                       "seed": 0})).validate()
    methods = spec.setdefault("methods", {})
    if not isinstance(methods, dict):
        raise ConfigError(f"The 'methods' section must hold [methods.NAME] tables. Got {methods!r} instead.")
    known_keys("methods", methods, METHODS, "methods with arguments")
    for m, kwargs in methods.items():
        if not isinstance(kwargs, dict):
            raise ConfigError(f"[methods.{m}] must be a table of keyword arguments. Got {kwargs!r} instead.")
        valid = {k for fn in _method_functions()[m] for k, p in inspect.signature(fn).parameters.items()
                 if p.kind is not p.VAR_KEYWORD and k not in ("run", "model", "data", "example_ids", "progress")}
        known_keys(f"methods.{m}", kwargs, valid, f"keyword arguments of the {m!r} method")
    return spec


def _train_config(spec: dict, cell: dict) -> dict:
    """The TrainConfig fields of a cell's run (``stop_at_train_acc = 0`` / ``false`` in the spec: train all epochs)."""
    cfg = {**spec["train"], "dataset": cell["dataset"], "model": cell["model"], "noise": cell["noise"],
           "seed": cell["seed"]}
    if cfg.get("stop_at_train_acc") in (0, False):
        cfg["stop_at_train_acc"] = None
    return cfg


def _cell_id(cell: dict) -> str:
    return (f"{cell['dataset']}-{cell['model']}-noise{cell['noise']}-seed{cell['seed']}-{cell['method']}"
            .replace("/", "_"))


def _run_id(cell: dict) -> str:
    return f"{cell['dataset']}-{cell['model']}-noise{cell['noise']}-seed{cell['seed']}".replace("/", "_")


def expand(spec: dict) -> list[dict]:
    """All cells of the grid (defaults: mnist1d, mlp, noise 0.1, seed 0, method summary)."""
    spec = load_spec(spec)
    g = {"dataset": ["mnist1d"], "model": ["mlp"], "noise": [0.1], "seed": [0], "method": ["summary"],
         **spec["grid"]}
    return [dict(zip(GRID_KEYS, values)) for values in itertools.product(*(g[k] for k in GRID_KEYS))]


def _method_result(method: str, run, kwargs: dict) -> pd.DataFrame:
    from . import locate
    from .analyses import scores

    if method == "summary":
        s = run.summary
        return pd.DataFrame([{k: s[k] for k in ("train_acc_clean", "train_acc_noisy", "test_acc", "epochs",
                                                "seconds")}])
    if method == "rewind":
        return locate.rewind_layers(run, progress=False, **kwargs)
    if method == "retrain":
        df = locate.retrain_layers(run, progress=False, **kwargs)
        return df.sort_values("epoch").groupby(["layer", "group"], sort=False).tail(1).reset_index(drop=True)
    if method == "ablate":
        df = locate.ablate_examples(run, progress=False, **{"n_per_group": 20, **kwargs})
        s = locate.summarize_flips(df)
        return pd.DataFrame([{"group": g, "median_units": s[g]["median_units"], "capped": s[g]["capped"],
                              "mean_test_acc_change": s[g]["mean_test_acc_change"],
                              "mannwhitney_p": s["mannwhitney_p_noisy_fewer"]} for g in ("clean", "noisy")])
    if method == "scores":
        return scores.auroc_table(scores.dynamics_scores(run))[["score", "auroc"]]
    raise ValueError(f"Unknown method {method!r}; valid methods are {list(METHODS)}.")


def _run_group(spec: dict, cells: list[dict], out: str, threads: int = 1, device: str = "cpu") -> list[dict]:
    """Train the shared run (resumable) and compute each of its cells not yet on disk. Returns cell records."""
    import torch

    from .train import train

    torch.set_num_threads(threads)
    out = Path(out)
    train_cfg = _train_config(spec, cells[0])
    records = []
    run = None
    for cell in cells:
        path = out / "cells" / f"{_cell_id(cell)}.parquet"
        if path.exists():
            continue
        t0 = time.perf_counter()
        if run is None:
            run = train(train_cfg, out / "runs" / _run_id(cell), progress=False, device=device)
        df = _method_result(cell["method"], run, dict(spec["methods"].get(cell["method"], {})))
        for k in reversed(GRID_KEYS):
            df.insert(0, k, cell[k])
        df.insert(0, "cell", _cell_id(cell))
        save_result(make_result(df, cell=cell, train=train_cfg, method_kwargs=spec["methods"].get(cell["method"], {}),
                                sweep=spec["name"]), path)
        records.append({"cell": _cell_id(cell), **cell, "seconds": time.perf_counter() - t0})
    return records


def run_sweep(spec: str | Path | dict, out: str | Path, executor: str = "local", workers: int = 1,
              address: str | None = None, progress: bool = True,
              on_cell_done: Callable[[dict], Any] | None = None, device: str = "cpu",
              overwrite: bool = False) -> pd.DataFrame:
    """Run every cell of ``spec`` not yet in ``out`` and return the collected table (see :func:`collect`).

    ``executor="local"`` runs the run-groups one after another (``workers=1``) or in a process pool;
    ``executor="ray"`` submits one Ray task per run-group (``address`` as for ``ray.init``). ``on_cell_done``
    is called in the coordinating process after each group with each finished cell's record. ``device``
    (``cpu``, ``cuda``, ``auto``) is where each worker trains and analyses; it is resolved in the worker.

    ``out/spec.json`` records the spec. A rerun may add grid values (new cells); if ``[train]`` or ``[methods]``
    changed, the finished cells no longer match, so the rerun is refused naming the changed keys, or with
    ``overwrite=True`` the cells (and runs) they affect are deleted and recomputed. A non-empty ``out`` that is
    not a sweep is refused unless ``overwrite``.
    """
    from tqdm.auto import tqdm

    from .validate import choice, number

    spec = load_spec(spec)
    choice("executor", executor, ["local", "ray"])
    number("workers", workers, lo=1, integer=True)
    out = Path(out)
    _claim_store(out, spec, overwrite)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    write_json(spec, out / "spec.json")
    cells = expand(spec)
    todo = [c for c in cells if not (out / "cells" / f"{_cell_id(c)}.parquet").exists()]
    groups: dict[str, list[dict]] = {}
    for c in todo:
        groups.setdefault(_run_id(c), []).append(c)
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"sweep {spec['name']}", unit="cell",
               disable=not progress)

    def done(records):
        for r in records:
            bar.update(1)
            if on_cell_done is not None:
                on_cell_done(r)

    if executor == "local":
        if workers <= 1:
            for g in groups.values():
                done(_run_group(spec, g, str(out), device=device))
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for f in as_completed([pool.submit(_run_group, spec, g, str(out), 1, device)
                                       for g in groups.values()]):
                    done(f.result())
    elif executor == "ray":
        import ray

        started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": max(1, workers)}))
            started = True
        try:
            task = ray.remote(num_cpus=1, num_gpus=1 if device.startswith("cuda") else 0)(_run_group)
            pending = [task.remote(spec, g, str(out.resolve()), 1, device) for g in groups.values()]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                done(ray.get(ready[0]))
        finally:
            if started:
                ray.shutdown()
    else:
        raise ValueError(f"The 'executor' parameter must be 'local' or 'ray'. Got {executor!r} instead.")
    bar.close()
    return collect(out)


def _claim_store(out: Path, spec: dict, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, clear) what in ``out`` was made with another ``[train]`` / ``[methods]``."""
    import shutil

    from .results import read_json
    from .validate import OutputExistsError, differences

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"The sweep output {out} is a file, not a folder.")
    if not (out / "spec.json").exists():
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise OutputExistsError(f"{out} exists, is not empty and holds no sweep (no spec.json); refusing to write "
                                    "into it. Choose another folder, or pass overwrite=True (--overwrite).")
        return
    old = read_json(out / "spec.json")
    diff = differences({"train": old.get("train", {}), "methods": old.get("methods", {})},
                       {"train": spec["train"], "methods": spec["methods"]})
    if not diff:
        return
    if not overwrite:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise OutputExistsError(f"{out} holds a sweep made with other settings ({shown}); its finished cells would "
                                "not match. Choose another folder, or pass overwrite=True (--overwrite) to recompute "
                                "the cells they affect.")
    if any(k.startswith("train") for k in diff):
        for sub in ("cells", "runs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    else:
        changed = {k.split(".")[1] for k in diff}
        for f in (out / "cells").glob("*.parquet"):
            if f.stem.rsplit("-", 1)[-1] in changed:
                f.unlink()


def collect(out: str | Path) -> pd.DataFrame:
    """One tidy table of every finished cell (``OUT/results.parquet``), an index and a summary plot."""
    out = Path(out)
    files = sorted((out / "cells").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"No finished cells in {out / 'cells'}.")
    frames = [load_result(f) for f in files]
    table = pd.concat(frames, ignore_index=True)
    spec = json.loads((out / "spec.json").read_text()) if (out / "spec.json").exists() else {}
    table = make_result(table, sweep=spec.get("name"), spec=spec, n_cells=len(files))
    save_result(table, out / "results.parquet")
    index = pd.DataFrame([{**f.attrs["settings"]["cell"], "cell": f["cell"].iloc[0], "rows": len(f)} for f in frames])
    save_result(index, out / "index.parquet")
    try:
        from .analyses.plots import plot_sweep, save_figure

        save_figure(plot_sweep(table), out / "summary.png")
    except Exception as e:  # a plot must never lose the table
        print(f"memloc sweep: summary plot skipped ({e})")
    return table
