"""The command line end to end on synthetic data and the tiny random backbone.

One module-scoped fitted run serves the eval / predict / error tests, so the file stays fast.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from usad_bench.cli import main

TINY = ["--backbone", "usad-tiny", "--pretrained", "none"]


def fit_args(method: str, train: Path, shots: int, out: Path, *extra) -> list:
    return ["fit", "--method", method, "--train", train, "--shots", shots, "--out", out, *TINY, *extra]


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV, skipping the '# random backbone weights ...' comment line the outputs of tiny runs carry."""
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def cli(*args, cache: Path | None = None) -> int:
    extra = ["--cache-dir", str(cache)] if cache is not None else []
    return main([str(a) for a in args] + extra)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synth_domains) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    cache = root / "cache"
    run = root / "run"
    code = cli(*fit_args("linear_adapter", synth_domains["source"], 4, run, "--set", "epochs=5"), cache=cache)
    assert code == 0
    return {"run": run, "cache": cache, "root": root, **synth_domains}


def test_fit_writes_a_complete_run_directory(fitted):
    run = fitted["run"]
    for name in ("config.yaml", "split.json", "model.pt", "support.json", "logs/metrics.csv"):
        assert (run / name).is_file(), name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "linear_adapter" and config["shots"] == 4 and config["random_weights"] is True
    assert config["method_config"]["epochs"] == 5  # --set reached the method
    split = json.loads((run / "split.json").read_text())
    assert len(split["support_ids"]) == 4 * 3
    support = json.loads((run / "support.json").read_text())
    assert {"features_s", "train_s"} <= set(support["timing"])
    assert support["dice_threshold"] is not None


def test_eval_writes_metrics_json_with_the_documented_schema(fitted, capsys):
    tests = ["--test", f"target={fitted['target']}", "--test", fitted["source"]]
    code = cli("eval", "--run", fitted["run"], *tests, cache=fitted["cache"])
    assert code == 0
    assert "not results" in capsys.readouterr().out  # random weights are labelled on screen
    payload = json.loads((fitted["run"] / "metrics.json").read_text())
    assert "random backbone weights" in payload["warning"]
    assert payload["config"]["scoring"] == "per-image"
    target = payload["tests"]["target"]
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro", "dice", "eval_s"):
        assert isinstance(target[key], float) and (key == "eval_s" or 0.0 <= target[key] <= 1.0), key
    assert target["excluded_support_rows"] == 0  # another domain: no shared patients
    source = payload["tests"]["source"]  # named after the manifest's folder
    assert source["excluded_support_rows"] >= 12  # the support patients never enter the test
    assert payload["cache"]["misses"] > 0
    assert cli("eval", "--run", fitted["run"], "--test", f"target={fitted['target']}", cache=fitted["cache"]) == 0
    again = json.loads((fitted["run"] / "metrics.json").read_text())
    assert again["cache"] == {"hits": target["n_images"], "misses": 0, "rejected": 0}  # second pass: all cached
    same = {k: v for k, v in again["tests"]["target"].items() if k != "eval_s"}
    assert same == {k: v for k, v in target.items() if k != "eval_s"}  # cached features give the same numbers
    assert "source" in again["tests"]  # metrics.json is merged: the earlier test set is kept
    rows = read_csv(fitted["run"] / "predictions" / "target.csv")
    assert len(rows) == target["n_images"]


def test_predict_scores_a_folder_and_draws_overlays(fitted, tmp_path):
    images = tmp_path / "new"
    images.mkdir()
    sources = sorted(Path(fitted["target"]).parent.rglob("*.png"))[:3]
    for i, path in enumerate(sources):
        (images / f"scan{i}.png").write_bytes(path.read_bytes())
    Image.open(sources[0]).convert("RGB").save(images / "scan0.jpg")  # same stem, other format
    out = tmp_path / "pred"
    assert cli("predict", "--run", fitted["run"], "--images", images, "--out", out, cache=fitted["cache"]) == 0
    rows = read_csv(out / "scores.csv")
    assert [r["image"] for r in rows] == ["scan0.jpg", "scan0.png", "scan1.png", "scan2.png"]
    assert all(r["flagged"] in ("0", "1") for r in rows)
    assert len(list((out / "overlays").glob("*.png"))) == 4  # one per image, even for a shared stem


def test_bad_input_is_one_error_line_and_exit_2(fitted, tmp_path, capsys):
    source = fitted["source"]
    missing = tmp_path / "none.csv"
    cases = [
        (fit_args("nope", source, 1, tmp_path / "a"), "unknown method"),
        (fit_args("linear_adapter", source, 500, tmp_path / "b"), "largest k possible"),
        (fit_args("linear_adapter", missing, 1, tmp_path / "c"), "manifest not found"),
        (["eval", "--run", tmp_path / "no-run", "--test", source], "not a finished run"),
        (fit_args("linear_adapter", source, 1, tmp_path / "d", "--set", "epochs=x"), "not a valid int"),
        (fit_args("linear_adapter", source, 1, tmp_path / "e", "--set", "flip_augment=ture"), "not a boolean"),
    ]
    for args, message in cases:
        assert cli(*args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_a_failed_refit_leaves_the_finished_run_intact(fitted, capsys):
    before = (fitted["run"] / "split.json").read_text()
    assert cli(*fit_args("no-such-method", fitted["source"], 4, fitted["run"], "--seed", 7)) == 2
    assert (fitted["run"] / "split.json").read_text() == before  # nothing written before the check
    assert (fitted["run"] / "config.yaml").is_file()


def test_metrics_of_another_run_are_never_merged(fitted, tmp_path):
    other = tmp_path / "zs"
    assert cli(*fit_args("zero_shot_clip", fitted["source"], 2, other), cache=fitted["cache"]) == 0
    shared_out = tmp_path / "eval"
    assert cli("eval", "--run", fitted["run"], "--test", f"a={fitted['target']}", "--out", shared_out) == 0
    assert cli("eval", "--run", other, "--test", f"b={fitted['target']}", "--out", shared_out) == 0
    payload = json.loads((shared_out / "metrics.json").read_text())
    assert payload["config"]["method"] == "zero_shot_clip" and set(payload["tests"]) == {"b"}


def test_missing_image_is_an_error_line(fitted, tmp_path, synth_domains, capsys):
    rows = read_csv(synth_domains["target"])
    rows[0]["image"] = "gone.png"
    broken = tmp_path / "m" / "manifest.csv"
    broken.parent.mkdir()
    with open(broken, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        root = Path(synth_domains["target"]).parent
        absolute = [{**r, "image": str(root / r["image"]), "masks": str(root / r["masks"]) if r["masks"] else ""}
                    for r in rows[1:]]  # fmt: skip
        writer.writerows(absolute)
        writer.writerow(rows[0])
    assert cli("eval", "--run", fitted["run"], "--test", broken, "--out", tmp_path / "ev") == 2  # every row is read
    assert "image not found" in capsys.readouterr().err


def test_corrupt_image_in_predict_folder_is_named(fitted, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert cli("predict", "--run", fitted["run"], "--images", folder, "--out", tmp_path / "o") == 2
    assert "broken.png" in capsys.readouterr().err


def test_sweep_resumes_and_tables_label_random_weights(tmp_path, synth_domains, capsys):
    experiment = {
        "name": "mini",
        "backbone": {"name": "usad-tiny", "pretrained": "none"},
        "data": {"src": str(synth_domains["source"]), "tgt": str(synth_domains["target"])},
        "source": "src",
        "targets": ["tgt"],
        "methods": ["zero_shot_clip", {"label": "adapter-1ep", "method": "linear_adapter", "set": {"epochs": 1}}],
        "shots": [2],
        "seeds": [0, 1],
        "out": str(tmp_path / "runs"),
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(experiment))
    cache = tmp_path / "cache"
    assert cli("sweep", path, "--shard", "0/2", cache=cache) == 0  # half the grid, as one machine would
    first = capsys.readouterr().out
    assert first.count("finished in") == 2
    assert cli("sweep", path, cache=cache) == 0  # the rest; the first shard's runs are skipped
    second = capsys.readouterr().out
    assert second.count(" done") == 2 and second.count("finished in") == 2
    # A run killed after fitting but before evaluation is only evaluated on resume.
    killed = tmp_path / "runs" / "zero_shot_clip" / "src" / "k2" / "s1" / "metrics.json"
    killed.unlink()
    assert cli("sweep", path, cache=cache) == 0
    assert capsys.readouterr().out.count("finished in") == 1 and killed.is_file()

    assert cli("table", tmp_path / "runs", "--which", "table1", "--out", tmp_path / "tables") == 0
    table = (tmp_path / "tables" / "table1.md").read_text()
    assert "RANDOM backbone weights" in table and "zero_shot_clip" in table and "adapter-1ep" in table
    assert (tmp_path / "tables" / "table1.csv").is_file() and (tmp_path / "tables" / "table1.tex").is_file()

    # Finished runs made with other settings are refused, not silently counted as this grid's.
    experiment["methods"][1]["set"] = {"epochs": 2}
    path.write_text(yaml.safe_dump(experiment))
    assert cli("sweep", path, cache=cache) == 2
    assert "fitted with other method_config" in capsys.readouterr().err


def test_data_synth_and_methods_commands(tmp_path, capsys):
    assert cli("data", "synth", tmp_path / "s", "--n", 12, "--domain", "target", "--speckle", 3.0) == 0
    rows = read_csv(tmp_path / "s" / "manifest.csv")
    assert len(rows) == 12 and {r["class"] for r in rows} == {"normal", "benign", "malignant"}
    mask = np.asarray(Image.open(Path(tmp_path / "s") / rows[-1]["masks"]))
    assert mask.ndim == 2
    assert cli("methods") == 0
    assert "linear_adapter" in capsys.readouterr().out
    assert cli("data", "synth", tmp_path / "t", "--domain", "mars") == 2


def test_ctrl_c_while_libraries_import_is_one_line(monkeypatch, capsys):
    """Importing torch and Lightning takes seconds: a Ctrl-C then gets the same one line and 130, no traceback."""
    import signal

    from usad_bench import cli
    from usad_bench.errors import Stopped

    def interrupted_import(verbose):
        raise Stopped(signal.SIGINT)

    monkeypatch.setattr(cli, "_quiet_libraries", interrupted_import)
    assert cli.main(["methods"]) == 130
    assert capsys.readouterr().err.strip().startswith("stopped by SIGINT:")
