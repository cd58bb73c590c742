"""Share fitted runs between grids: a run's model serves every table it can fill.

A fitted run is identified by what makes its model: method, method options, backbone, shots, seed and
the training manifest's bytes (the adaptation source) — the label and the grid it was made for do not
enter. Before a sweep fits a grid point it looks for a finished run of the same identity in the other
grids that live beside its own out folder (``results/runs/*/<label>/<source>/k<shots>/s<seed>``), so
``make table_cls`` after ``make table1`` fits UltraAD, zero-shot CLIP and the rest of the shared
points no more. A match is *copied* into the point's folder (the grids' folders stay self-contained,
so `usad-bench table RESULTS_DIR` finds each table's runs as before), together with the test results
it already has for the same test manifests; only the missing targets are then evaluated.

The copy is built in a temporary sibling and swapped in under the point's lock (as a fit is), while
the source run is held under its own lock, so neither a refit of the source nor another process
fitting this point can mix two runs. A source that another process holds (being evaluated or refitted)
is passed over: the point is then fitted as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from usad_bench.errors import UsadError
from usad_bench.io import exclusive_lock, lock_path_for, read_json, read_yaml, write_json, write_yaml

log = logging.getLogger(__name__)

COPIED = ("config.yaml", "model.pt", "split.json", "support.json")  # a finished fit (runner.is_fitted)
SHARED_FROM = "shared_from.json"  # in a copied run: where it came from


def run_identity(opts) -> dict:
    """What a fitted run's config.yaml must hold to be this grid point's model (sweep.check_same_config)."""
    from usad_bench.cache import file_digest
    from usad_bench.methods import get_method

    if not Path(opts.train).is_file():
        raise UsadError(f"training manifest not found: {opts.train}; create it with `make data` or fix `data:`")
    return {
        "method": opts.method,
        "method_config": get_method(opts.method).config_class.from_dict(opts.overrides).to_dict(),
        "backbone": opts.backbone.to_dict(),
        "shots": opts.shots,
        "seed": opts.seed,
        "train_manifest_sha256": file_digest(Path(opts.train).resolve()),
    }


def differing_keys(config: dict, identity: dict) -> list[str]:
    return [key for key, value in identity.items() if config.get(key) != value]


def find_shared_run(store_root: Path, source: str, opts) -> Path | None:
    """A finished run elsewhere under ``store_root`` with this point's identity, or None."""
    from usad_bench.runner import is_fitted

    store_root, here = Path(store_root), Path(os.path.abspath(opts.out))
    if not store_root.is_dir():
        return None
    identity = run_identity(opts)
    pattern = f"*/*/{source}/k{opts.shots}/s{opts.seed}/config.yaml"
    for config_path in sorted(store_root.glob(pattern)):
        candidate = config_path.parent
        if Path(os.path.abspath(candidate)) == here or not is_fitted(candidate):
            continue
        try:
            config = read_yaml(config_path) or {}
        except Exception:  # a damaged config.yaml is that run's problem, not a reason to stop this sweep
            continue
        if not differing_keys(config, identity):
            return candidate
    return None


def adopt_shared_run(source_run: Path, opts, test_manifests: dict[str, Path]) -> bool:
    """Copy the fitted run ``source_run`` into ``opts.out``; False when the source is busy (fit instead).

    Test results are carried over only for targets whose manifest is the one this grid names
    (``test_manifests``: target name -> manifest path); the label becomes this grid point's.
    """
    from usad_bench.runner import check_replaceable, swap_in

    run = Path(os.path.abspath(opts.out))
    run.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(lock_path_for(Path(os.path.abspath(source_run))), str(source_run)))
        except UsadError:
            log.info("shared run %s is busy in another process; fitting %s instead", source_run, run)
            return False
        held.enter_context(exclusive_lock(lock_path_for(run), str(run)))
        check_replaceable(run)
        staging = Path(tempfile.mkdtemp(prefix=f".{run.name}.new-", dir=run.parent))
        try:
            new = staging / run.name
            new.mkdir()
            _copy_fitted(Path(source_run), new, opts, test_manifests)
            swap_in(new, run)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True


def _copy_fitted(source_run: Path, new: Path, opts, test_manifests: dict[str, Path]) -> None:
    """The fit's files, this point's label, and the source's results on the same test manifests."""
    for name in COPIED[1:]:
        shutil.copy2(source_run / name, new / name)
    config = read_yaml(source_run / "config.yaml")
    config["label"] = opts.label or opts.method
    tests = _reusable_tests(source_run, test_manifests)
    predictions = new / "predictions"
    for name in tests:
        csv = source_run / "predictions" / f"{name}.csv"
        if csv.is_file():
            predictions.mkdir(exist_ok=True)
            shutil.copy2(csv, predictions / csv.name)
    if tests:
        payload = read_json(source_run / "metrics.json")
        write_json(new / "metrics.json", {**payload, "config": config, "tests": tests})
    write_json(new / SHARED_FROM, {"run": str(Path(os.path.abspath(source_run))), "tests": sorted(tests)})
    write_yaml(new / "config.yaml", config)  # written last, as in runner.save_run


def _reusable_tests(source_run: Path, test_manifests: dict[str, Path]) -> dict:
    metrics_path = source_run / "metrics.json"
    if not metrics_path.is_file():
        return {}
    try:
        tests = read_json(metrics_path).get("tests", {})
    except Exception:  # unreadable metrics: evaluate here instead
        return {}
    wanted = {name: str(Path(path).resolve()) for name, path in test_manifests.items()}
    return {name: result for name, result in tests.items() if wanted.get(name) == result.get("manifest")}
