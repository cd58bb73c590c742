"""wandb logging, offline: the files a fit + eval and a sweep summary write, and what they contain.

wandb 0.2x+ keeps an offline run's records in one binary ``run-<id>.wandb`` file (protobuf records;
keys, names and JSON values are stored as plain bytes), tables and images under ``files/media``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("wandb")

from usad_bench import tracking
from usad_bench.cli import main
from usad_bench.sweep import load_experiment

TINY = ["--backbone", "usad-tiny", "--pretrained", "none"]


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """No key, no mode: the code must choose offline itself. wandb's own folders stay inside tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def records(run_dir: Path) -> dict[str, bytes]:
    """Offline run folder name -> the bytes of its .wandb record file."""
    return {p.parent.name: p.read_bytes() for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))}


@pytest.mark.slow
def test_fit_and_eval_log_one_offline_run_with_config_curves_metrics_overlays(tmp_path, synth_domains):
    assert tracking.mode() == "offline"
    run = tmp_path / "run"
    fit = ["fit", "--method", "linear_adapter", "--train", str(synth_domains["source"]), "--shots", "2"]
    fit += ["--out", str(run), "--set", "epochs=2", "--wandb", "--cache-dir", str(tmp_path / "c"), *TINY]
    assert main(fit) == 0
    assert (
        main(
            [
                "eval",
                "--run",
                str(run),
                "--test",
                f"tgt={synth_domains['target']}",
                "--wandb",
                "--cache-dir",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    run_id = (run / "wandb" / "run_id").read_text().strip()
    logged = records(run)
    assert len(logged) == 2 and all(name.endswith(run_id) for name in logged)  # eval resumed the fit's run
    fit_bytes, eval_bytes = logged.values()
    name = f"linear_adapter/{Path(synth_domains['source']).parent.name}/k2/s0".encode()
    assert name in fit_bytes and name in eval_bytes  # <label>/<source>/k<shots>/s<seed>
    for key in (b"train/loss", b"method_config", b"train_manifest_sha256", b"split/support", b"random-weights"):
        assert key in fit_bytes, key
    for key in (b"tgt/image_auroc", b"tgt/pixel_auroc", b"tgt/dice", b"tgt/overlays", b"not a result"):
        assert key in eval_bytes, key
    images = list(run.glob("wandb/offline-run-*/files/media/images/tgt/*.png"))
    assert 1 <= len(images) <= tracking.OVERLAYS_PER_TEST
    split_tables = list(run.glob("wandb/offline-run-*/files/media/table/split/*.table.json"))
    assert len(json.loads(split_tables[0].read_text())["data"]) == 2 * 3  # the 6 support ids


def test_sweep_summary_table_groups_runs_per_method_and_shots(tmp_path):
    grid = {
        "name": "mini",
        "data": {"src": "s.csv", "tgt": "t.csv"},
        "source": "src",
        "targets": ["tgt"],
        "methods": ["m"],
        "shots": [4],
        "seeds": [0, 1],
        "out": str(tmp_path / "runs"),
        "wandb": {"project": "p", "group": "g", "tags": ["t"]},
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    exp = load_experiment(tmp_path / "grid.yaml")
    for point, value in zip(exp.points(), (0.6, 0.8), strict=True):
        point.run_dir.mkdir(parents=True)
        (point.run_dir / "metrics.json").write_text(
            json.dumps({"config": {}, "tests": {"tgt": {"image_auroc": value}}})
        )
    assert tracking.sweep_settings(exp, exp.points()[0])["group"] == "g/m/k4"
    tracking.log_sweep_summary(exp)
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("*.table.json")}
    assert tables["runs"]["data"] == [["m", "src", 4, 0, "tgt", 0.6], ["m", "src", 4, 1, "tgt", 0.8]]
    (row,) = tables["mean"]["data"]
    assert row[:4] == ["m", 4, "tgt", "image_auroc"] and row[4] == pytest.approx(0.7) and row[6] == 2
    assert row[5] == pytest.approx(0.1414, abs=1e-3)
