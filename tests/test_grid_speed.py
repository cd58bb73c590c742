"""Grid speed-ups that must not change results: shared fitted runs between grids, `sweep --workers N`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from usad_bench.cli import main
from usad_bench.io import exclusive_lock, lock_path_for, read_json, read_yaml
from usad_bench.tables import make_table

ADAPTER = {"label": "adapter-1ep", "method": "linear_adapter", "set": {"epochs": 1}}


def grid_file(tmp_path: Path, domains: dict, out: Path, methods: list, targets: dict | None = None) -> Path:
    experiment = {
        "name": out.name,
        "backbone": {"name": "usad-tiny", "pretrained": "none"},
        "data": {"src": str(domains["source"]), **(targets or {"tgt": str(domains["target"])})},
        "source": "src",
        "targets": sorted(targets or ["tgt"]),
        "methods": methods,
        "shots": [2],
        "seeds": [0],
        "out": str(out),
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def sweep(path: Path, cache: Path, *extra: str) -> None:
    assert main(["sweep", str(path), "--cache-dir", str(cache), "--device", "cpu", *extra]) == 0


@pytest.fixture(scope="module")
def first(tmp_path_factory, synth_domains) -> dict:
    """One sequential grid (zero-shot CLIP, a 1-epoch adapter) that the other grids share or compare with."""
    root = tmp_path_factory.mktemp("grids")
    cache, runs = root / "cache", root / "runs"
    sweep(grid_file(root, synth_domains, runs / "first", ["zero_shot_clip", ADAPTER]), cache)
    return {"cache": cache, "runs": runs}


@pytest.mark.slow
def test_a_second_grid_copies_identical_fitted_runs_instead_of_refitting(tmp_path, synth_domains, first, capsys):
    cache, runs = first["cache"], first["runs"]
    renamed = {**ADAPTER, "label": "adapter"}  # same method and options under another label: the same model
    other = {"label": "adapter-2ep", "method": "linear_adapter", "set": {"epochs": 2}}  # other options: refitted
    second = grid_file(tmp_path, synth_domains, runs / "second", [renamed, other])
    capsys.readouterr()
    sweep(second, cache)
    out = capsys.readouterr().out
    assert out.count("shared the fitted run") == 1

    source, copy = runs / "first/adapter-1ep/src/k2/s0", runs / "second/adapter/src/k2/s0"
    assert read_json(copy / "shared_from.json")["tests"] == ["tgt"]  # its test result came along: not evaluated
    assert read_json(copy / "metrics.json")["tests"] == read_json(source / "metrics.json")["tests"]
    assert read_yaml(copy / "config.yaml")["label"] == "adapter"  # tables name it after this grid
    assert (copy / "model.pt").read_bytes() == (source / "model.pt").read_bytes()
    assert not (runs / "second/adapter-2ep/src/k2/s0/shared_from.json").exists()
    table = make_table(runs / "second", "table1")
    assert "adapter" in table and "adapter-2ep" in table and "adapter-1ep" not in table

    # A finished grid stays finished; --no-share-runs fits its own run.
    sweep(second, cache)
    assert "shared the fitted run" not in capsys.readouterr().out
    third = grid_file(tmp_path, synth_domains, runs / "third", [ADAPTER])
    sweep(third, cache, "--no-share-runs")
    assert not (runs / "third/adapter-1ep/src/k2/s0/shared_from.json").exists()


@pytest.mark.slow
def test_shared_runs_bring_only_results_on_the_same_test_manifest(tmp_path, synth_domains, first):
    cache, runs = first["cache"], first["runs"]
    # "tgt" now names another manifest (the source's): the copied fit is evaluated on it afresh
    moved = grid_file(tmp_path, synth_domains, runs / "moved", [ADAPTER], {"tgt": str(synth_domains["source"])})
    sweep(moved, cache)
    copy, source = runs / "moved/adapter-1ep/src/k2/s0", runs / "first/adapter-1ep/src/k2/s0"
    assert read_json(copy / "shared_from.json")["tests"] == []
    tested = read_json(copy / "metrics.json")["tests"]["tgt"]
    assert tested["manifest"] == str(Path(synth_domains["source"]).resolve())
    assert tested != read_json(source / "metrics.json")["tests"]["tgt"]


@pytest.mark.slow
def test_a_busy_source_run_is_passed_over(tmp_path, synth_domains, first):
    from usad_bench.run_store import adopt_shared_run, find_shared_run
    from usad_bench.sweep import fit_options, load_experiment

    cache, runs = first["cache"], first["runs"]
    exp = load_experiment(grid_file(tmp_path, synth_domains, runs / "busy", [ADAPTER]))
    opts = fit_options(exp, exp.points()[0], "cpu", cache)
    found = find_shared_run(runs, "src", opts)
    assert found == runs / "first/adapter-1ep/src/k2/s0"
    with exclusive_lock(lock_path_for(found.resolve()), "held by another sweep"):
        assert adopt_shared_run(found, opts, {"tgt": synth_domains["target"]}) is False
    assert not opts.out.exists()
    assert adopt_shared_run(found, opts, {"tgt": synth_domains["target"]}) is True


@pytest.mark.slow
def test_two_workers_give_the_same_metrics_as_one(tmp_path, synth_domains, first, capsys):
    cache = tmp_path / "cache"  # cold: both workers compute (and write) the target's entries at once
    parallel = grid_file(tmp_path, synth_domains, tmp_path / "parallel" / "grid", ["zero_shot_clip", ADAPTER])
    sweep(parallel, cache, "--workers", "2", "--no-share-runs")
    assert "2 workers, " in capsys.readouterr().out
    assert not list(cache.rglob("*.tmp"))  # two writers of one cache left no partial entry
    for label in ("zero_shot_clip", "adapter-1ep"):
        run = Path("src/k2/s0")
        got = read_json(tmp_path / "parallel/grid" / label / run / "metrics.json")["tests"]["tgt"]
        want = read_json(first["runs"] / "first" / label / run / "metrics.json")["tests"]["tgt"]
        for metric in ("image_auroc", "pixel_auroc"):
            assert got[metric] == pytest.approx(want[metric], abs=1e-6)


def test_threads_are_split_between_workers():
    from usad_bench.errors import UsadError
    from usad_bench.sweep_workers import threads_per_worker

    assert threads_per_worker(2, total=2) == 1
    assert threads_per_worker(4, total=2) == 1  # never zero threads
    assert threads_per_worker(2, total=16) == 8
    with pytest.raises(UsadError):
        threads_per_worker(0, total=2)


def test_workers_run_here_only(tmp_path, synth_domains, capsys):
    path = grid_file(tmp_path, synth_domains, tmp_path / "runs" / "grid", [ADAPTER])
    assert main(["sweep", str(path), "--workers", "2", "--launcher", "slurm"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["sweep", str(path), "--workers", "0"]) == 2


def test_one_encoder_pass_serves_every_method_of_the_grid(first):
    """Issue 16 item 4: the sweep plans every raw block first, so the adapter's evaluation (blocks 1-4),
    after zero-shot CLIP's (block 4 only), reads every test image from the cache."""
    plans = list((first["cache"] / "layer_plans").glob("*.json"))
    assert [read_json(p)["layers"] for p in plans] == [[1, 2, 3, 4]]
    zero_shot = read_json(next((first["runs"] / "first").glob("zero_shot_clip/**/metrics.json")))
    adapter = read_json(next((first["runs"] / "first").glob("adapter-1ep/**/metrics.json")))
    assert zero_shot["cache"]["misses"] > 0  # the first method encodes the test images ...
    assert adapter["cache"] == {"hits": zero_shot["cache"]["misses"], "misses": 0, "rejected": 0}  # ... once
