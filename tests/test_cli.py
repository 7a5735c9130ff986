import json

import pytest

from memloc.cli import main

TINY = ["--dataset", "digits", "--model", "mlp", "--model-arg", "hidden=[64]", "--epochs", "3", "--stop-at", "0",
        "--quiet"]


def test_train_and_summary(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "noisy examples vs their flipped labels (144)" in out and "seed=2" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["config"]["model_kwargs"] == {"hidden": [64]}
    assert main(["summary", str(tmp_path / "r"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 2


def test_investigate_writes_a_report_and_resumes(tmp_path, capsys):
    args = ["investigate", *TINY, "--epochs", "6", "--ablate-per-group", "8", "--out", str(tmp_path / "rep")]
    assert main(args) == 0
    rep = tmp_path / "rep"
    for name in ("run/summary.json", "clean_run/summary.json", "scores.parquet", "rewind.parquet", "ablate.parquet",
                 "same_layer.parquet", "knn.parquet", "membership.parquet", "findings.txt"):
        assert (rep / name).exists(), name
    page = (rep / "index.html").read_text()
    for img in ("learning_curves.png", "scores.png", "rewind.png", "retrain.png", "ablate.png", "similarity.png",
                "membership.png"):
        assert f"src='{img}'" in page and (rep / img).read_bytes()[:4] == b"\x89PNG"
    # 6 epochs fit none of the flipped labels: the report says so instead of "median 0 units" from unfit examples
    findings = (rep / "findings.txt").read_text()
    assert "Greedy ablation has no finding: the model fits none of the noisy examples" in findings
    assert "144 noisy examples the model does not fit were left out" in findings
    assert "with 1 reference model RMIA offline reaches AUC" in findings
    capsys.readouterr()
    stamp = (rep / "ablate.parquet").stat().st_mtime_ns
    assert main(args) == 0  # resumes: finished steps are reused, not recomputed
    assert "ablate: done before" in capsys.readouterr().out
    assert (rep / "ablate.parquet").stat().st_mtime_ns == stamp
    # another ablation size is recomputed, never the old table reused; other training settings are refused
    assert main([*args[:-4], "--ablate-per-group", "4", "--out", str(rep)]) == 0
    assert "ablate: made with other settings (n_per_group: 8 -> 4), recomputing" in capsys.readouterr().out
    from memloc.results import load_result
    assert load_result(rep / "ablate.parquet").attrs["settings"]["n_per_group"] == 4
    assert main([*args, "--lr", "0.01"]) == 2
    assert "train.lr: 0.003 -> 0.01" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [(["--dataset", "imagenet"], "'dataset' parameter must be one of"),
                                      (["--noise", "1.2"], r"'noise' parameter must be a finite number in \[0, 1\)"),
                                      (["--dataset", "cifar10", "--data-arg", "root=/nonexistent"],
                                       "No CIFAR-10 batches found")])
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, msg):
    import re

    assert main(["train", *TINY, *args, "--out", str(tmp_path / "x")]) == 2
    assert re.search(msg, capsys.readouterr().err)


def test_summary_of_a_non_run(tmp_path, capsys):
    assert main(["summary", str(tmp_path)]) == 2
    assert "is not a memloc run" in capsys.readouterr().err


def test_locate_cli_writes_tables_and_figures(tmp_path, capsys):
    run = str(tmp_path / "r")
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--model-arg", "hidden=[64]", "--epochs", "4",
                 "--stop-at", "0", "--quiet", "--example-tied-dropout", "--out", run]) == 0
    for method, extra in [("rewind", ["--epochs", "0,2"]), ("retrain", ["--max-epochs", "1"]),
                          ("ablate", ["--n-per-group", "4"]), ("dropout", [])]:
        assert main(["locate", run, "--method", method, "--quiet", *extra]) == 0, method
        out = capsys.readouterr().out
        assert "settings:" in out and "seed" in out
        assert (tmp_path / "r" / "locate" / f"{method}.parquet").exists()
        assert (tmp_path / "r" / "locate" / f"{method}.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["locate", run, "--method", "rewind", "--layers", "layers.9", "--quiet"]) == 2
    assert "no layer 'layers.9'" in capsys.readouterr().err


def test_localize_bench_cli(small_run, tmp_path, capsys):
    out = str(tmp_path / "inj")
    assert main(["localize-bench", str(small_run.path), "--kind", "inj", "--methods", "zero_out,random", "--n", "5",
                 "--ratio", "0.1", "--out", out, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "recall" in text and "'ratio': 0.1" in text and "zero_out" in text
    assert (tmp_path / "inj" / "inj.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["localize-bench", str(small_run.path), "--kind", "inj", "--methods", "zero_out", "--n", "5",
                 "--out", out, "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err
    out = str(tmp_path / "del")
    assert main(["localize-bench", str(small_run.path), "--kind", "del", "--methods", "activations,random", "--n", "3",
                 "--fractions", "0.05", "--out", out, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "forgot" in text and "collateral" in text and "unablated" in text
    from memloc.results import load_result
    t = load_result(tmp_path / "del" / "del.parquet")
    assert set(t.method) == {"activations", "random"} and len(t) == 6
