import pandas as pd
import pytest

from memloc.sweep import collect, expand, load_spec, run_sweep

SPEC = {"name": "t", "grid": {"dataset": ["digits"], "model": ["mlp"], "noise": [0.1, 0.2], "seed": [0, 1, 2],
                              "method": ["summary", "rewind"]},
        "train": {"epochs": 2, "stop_at_train_acc": 0, "model_kwargs": {"hidden": [16]}},
        "methods": {"rewind": {"epochs": [0, 1]}}}


def _table(out):
    t = collect(out)
    cols = [c for c in t.columns if c != "seconds"]
    return t[cols].sort_values(["cell", "layer", "epoch", "group"]).reset_index(drop=True)


def test_expand_and_validation(tmp_path):
    assert len(expand(SPEC)) == 12
    with pytest.raises(ValueError, match="Unknown grid key"):
        load_spec({"grid": {"datasets": ["digits"]}})
    with pytest.raises(ValueError, match="Unknown method"):
        load_spec({"grid": {"method": ["rewnid"]}})
    (tmp_path / "s.toml").write_text('name = "x"\n[grid]\nnoise = [0.1]\nseed = [0, 1]\n')
    assert len(expand(load_spec(tmp_path / "s.toml"))) == 2


def test_killed_sweep_resumes_without_recomputing(tmp_path):
    full = run_sweep(SPEC, tmp_path / "full", progress=False)
    assert full["cell"].nunique() == 12

    class Killed(Exception):
        pass

    seen = []

    def kill_after_five(record):
        seen.append(record["cell"])
        if len(seen) == 5:
            raise Killed

    with pytest.raises(Killed):
        run_sweep(SPEC, tmp_path / "cut", progress=False, on_cell_done=kill_after_five)
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut" / "cells").glob("*.parquet")}
    assert 5 <= len(done) < 12
    again = []
    run_sweep(SPEC, tmp_path / "cut", progress=False, on_cell_done=lambda r: again.append(r["cell"]))
    assert len(again) == 12 - len(done) and not set(again) & {n[:-8] for n in done}
    for name, stamp in done.items():
        assert (tmp_path / "cut" / "cells" / name).stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(_table(tmp_path / "cut"), _table(tmp_path / "full"))
    assert (tmp_path / "full" / "summary.png").exists() and (tmp_path / "full" / "index.parquet").exists()


def test_process_pool_and_local_ray_give_the_same_table(tmp_path):
    pytest.importorskip("ray")
    spec = {**SPEC, "grid": {**SPEC["grid"], "noise": [0.1], "seed": [0, 1]}}  # 4 cells: the executors, not the grid
    run_sweep(spec, tmp_path / "seq", progress=False)
    run_sweep(spec, tmp_path / "pool", workers=2, progress=False)
    run_sweep(spec, tmp_path / "ray", executor="ray", workers=2, progress=False)
    ref = _table(tmp_path / "seq")
    pd.testing.assert_frame_equal(_table(tmp_path / "pool"), ref)
    pd.testing.assert_frame_equal(_table(tmp_path / "ray"), ref)


def test_a_changed_spec_is_refused_or_recomputed_never_reused(tmp_path):
    from memloc.validate import OutputExistsError

    spec = {"name": "c", "grid": {"dataset": ["digits"], "method": ["summary", "rewind"]},
            "train": {"epochs": 2, "stop_at_train_acc": 0, "model_kwargs": {"hidden": [16]}},
            "methods": {"rewind": {"epochs": [0, 1]}}}
    out = tmp_path / "s"
    run_sweep(spec, out, progress=False)
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.parquet")}
    changed = {**spec, "methods": {"rewind": {"epochs": [0]}}}
    with pytest.raises(OutputExistsError, match=r"methods.rewind.epochs: \[0, 1\] -> \[0\]"):
        run_sweep(changed, out, progress=False)
    with pytest.raises(OutputExistsError, match="train.epochs: 2 -> 3"):
        run_sweep({**spec, "train": {**spec["train"], "epochs": 3}}, out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.parquet")} == cells  # untouched
    table = run_sweep(changed, out, progress=False, overwrite=True)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.parquet")}
    summary = next(n for n in cells if n.endswith("-summary.parquet"))
    rewind = next(n for n in cells if n.endswith("-rewind.parquet"))
    assert after[summary] == cells[summary] and after[rewind] != cells[rewind]  # only the affected cell recomputed
    assert sorted(table[(table.method == "rewind") & (table.layer != "none")].epoch.unique()) == [0]
