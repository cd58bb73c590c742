"""The submitit launcher: a tiny grid as parallel local processes sharing one feature cache and results root."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from usad_bench.cli import main
from usad_bench.tables import make_table


def grid_file(tmp_path: Path, domains: dict, out: Path) -> Path:
    experiment = {
        "name": "mini",
        "backbone": {"name": "usad-tiny", "pretrained": "none"},
        "data": {"src": str(domains["source"]), "tgt": str(domains["target"])},
        "source": "src",
        "targets": ["tgt"],
        "methods": ["zero_shot_clip", {"label": "adapter-1ep", "method": "linear_adapter", "set": {"epochs": 1}}],
        "shots": [2],
        "seeds": [0],
        "out": str(out),
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


@pytest.mark.slow
def test_submitit_local_array_matches_a_sequential_sweep(tmp_path, synth_domains, capsys):
    cache = tmp_path / "cache"  # one cache for every process (a shared file system on a cluster)
    parallel = grid_file(tmp_path, synth_domains, tmp_path / "parallel")
    args = ["sweep", str(parallel), "--launcher", "submitit-local", "--runs-per-task", "1", "--wait"]
    assert main([*args, "--cpus-per-job", "1", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "2 unfinished runs -> 2 array tasks" in out and "2 of 2 array tasks finished" in out
    logs = list((tmp_path / "parallel" / ".submitit").glob("*_log.out"))
    assert len(logs) == 2  # two processes ran, one grid point each
    assert all(log.read_text().count("finished in") == 1 for log in logs)
    assert not list(cache.rglob("*.tmp"))  # concurrent writers left no partial entry behind

    sequential = grid_file(tmp_path, synth_domains, tmp_path / "sequential")
    # the same (now warm) cache: entries the parallel tasks wrote must serve a sequential sweep unchanged
    # (--no-share-runs: fit and evaluate here rather than copy the sibling grid's identical runs)
    assert main(["sweep", str(sequential), "--cache-dir", str(cache), "--device", "cpu", "--no-share-runs"]) == 0
    for which in ("table1", "table2"):
        assert make_table(tmp_path / "parallel", which) == make_table(tmp_path / "sequential", which)

    # Everything is done now: a second submission submits nothing.
    assert main([*args, "--cache-dir", str(cache)]) == 0
    assert "0 unfinished runs -> 0 array tasks" in capsys.readouterr().out


def _hammer(root: str, rounds: int, queue) -> None:
    """Store and load one entry over and over, as array tasks encoding the same image would."""
    import torch

    from usad_bench.cache import FeatureCache

    cache = FeatureCache(root)
    tensors = {"cls": torch.arange(4096, dtype=torch.float32)}
    bad = 0
    for _ in range(rounds):
        cache.store("k" * 64, "a" * 64, tensors)
        got = cache.load("k" * 64, "a" * 64)
        bad += got is None or not torch.equal(got["cls"], tensors["cls"])
    queue.put((bad, cache.rejected))


def test_concurrent_writers_of_one_cache_entry_never_expose_a_partial_file(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(str(tmp_path), 40, queue)) for _ in range(3)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert results == [(0, 0)] * 3  # every load saw a complete, valid entry; none was rejected
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["a" * 64 + ".safetensors"]  # no temp files left


def test_slurm_launcher_writes_one_job_array_of_the_unfinished_runs(tmp_path, monkeypatch, capsys):
    """A stand-in `sbatch` on the PATH records the script submitit hands to SLURM (no cluster needed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncat "$1" > {tmp_path}/script.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; never called here
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    data = tmp_path / "m.csv"
    data.write_text("id,image,masks,class,is_anomaly,group,domain,dataset\n")
    grid = {"name": "g", "data": {"s": str(data), "t": str(data)}, "source": "s", "targets": ["t"]}
    grid |= {"methods": ["zero_shot_clip", "linear_probe"], "shots": [4, 8], "seeds": [0, 1, 2]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid | {"out": str(tmp_path / "runs")}))
    args = ["sweep", str(tmp_path / "g.yaml"), "--launcher", "slurm", "--partition", "gpu", "--runs-per-task", "4"]
    assert main([*args, "--time", "90", "--max-parallel", "2", "--slurm-arg", "account=lab"]) == 0
    assert "12 unfinished runs -> 3 array tasks (slurm)" in capsys.readouterr().out
    script = (tmp_path / "script.sh").read_text()
    for line in ("--array=0-2%2", "--partition=gpu", "--gpus-per-node=1", "--time=90", "--account=lab"):
        assert f"#SBATCH {line}" in script, line
