"""Runs never lose work: validation before writing, atomic swap, locks, signals, offline errors, labels.

Issue 13. The subprocess tests start the real ``usad-bench`` entry point and signal it mid-training;
every network access is pointed at a port on 127.0.0.1, so no test sends traffic beyond loopback.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from usad_bench.cli import main
from usad_bench.io import exclusive_lock, lock_path_for
from usad_bench.runner import read_csv_rows

TINY = ["--backbone", "usad-tiny", "--pretrained", "none"]


def cli(*args) -> int:
    return main([str(a) for a in args])


def fit_args(method: str, train: Path, out: Path, *extra) -> list:
    return ["fit", "--method", method, "--train", train, "--shots", 2, "--out", out, *TINY, *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synth_domains) -> dict:
    root = tmp_path_factory.mktemp("safety")
    run = root / "runs" / "adapter"
    cache = root / "cache"
    args = fit_args("linear_adapter", synth_domains["source"], run, "--set", "epochs=1", "--cache-dir", cache)
    assert cli(*args) == 0
    return {"run": run, "cache": cache, "root": root, **synth_domains}


# ----------------------------------------------------------------------------- 1. a failed fit loses nothing
def test_every_failed_refit_leaves_the_finished_run_byte_identical(finished, tmp_path, capsys, monkeypatch):
    run, source = finished["run"], finished["source"]
    before = snapshot(run)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 64)
    wrong = tmp_path / "wrong.pt"
    from usad_bench.backbone import Backbone, BackboneSpec

    state = Backbone.load(BackboneSpec(name="usad-tiny", pretrained=None)).model.state_dict()
    state["text_projection"] = torch.zeros(3, 5)  # another architecture's shape
    torch.save(state, wrong)
    backbone = ["--backbone", "usad-tiny", "--pretrained"]
    cases = [
        (["--device", "tpu"], "unknown device"),
        (["--set", "epochs=x"], "not a valid int"),
        ([*backbone, corrupt], "cannot be read"),
        ([*backbone, wrong], "does not fit --backbone usad-tiny"),
        (["--backbone", "hf-hub:nobody/nothing"], "not cached and the network is unreachable"),  # HF_HUB_OFFLINE
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "sees no CUDA GPU"))
    for extra, message in cases:
        assert cli(*fit_args("linear_adapter", source, run, "--seed", 7, *extra)) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (extra, err)
        assert snapshot(run) == before, extra
    # A crash in the last stage, after training: still nothing of the new fit reaches the folder.
    import usad_bench.runner as runner

    def crash(*_):
        raise RuntimeError("simulated crash while calibrating")

    monkeypatch.setattr(runner, "calibrate", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli(
            *fit_args("linear_adapter", source, run, "--seed", 7, "--set", "epochs=1", "--cache-dir", finished["cache"])
        )
    assert snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["adapter"]  # no temporary folder or lock left


# ----------------------------------------------------------------------------- 4. a refit owns the whole folder
def test_a_refit_leaves_only_the_new_fit_in_the_folder(finished, tmp_path):
    run = tmp_path / "zs"
    source = finished["source"]
    assert cli(*fit_args("zero_shot_clip", source, run, "--cache-dir", finished["cache"])) == 0
    (run / "predicted" / "overlays").mkdir(parents=True)
    (run / "predicted" / "scores.csv").write_text("image,score\nold.png,0.5\n")
    (run / "wandb" / "offline-run-1").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    assert cli(*fit_args("zero_shot_clip", source, run, "--seed", 1, "--cache-dir", finished["cache"])) == 0
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "model.pt", "split.json", "support.json"]
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1


def test_fit_refuses_to_replace_a_folder_that_is_not_a_run(finished, tmp_path, capsys):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert cli(*fit_args("zero_shot_clip", finished["source"], precious, "--cache-dir", finished["cache"])) == 2
    assert "not a usad_bench run" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work" and len(list(precious.iterdir())) == 1


# ----------------------------------------------------------------------------- 2. one process per run folder
HOLD_LOCK = """
import sys, time
from usad_bench.io import exclusive_lock, lock_path_for
with exclusive_lock(lock_path_for(sys.argv[1]), sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_gets_one_error_line_naming_the_holder(finished, tmp_path, capsys):
    run = tmp_path / "locked_run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli(*fit_args("zero_shot_clip", finished["source"], run, "--cache-dir", finished["cache"])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and f"pid {holder.pid}" in err[0], err
        assert not run.exists()  # the refused fit wrote nothing
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, naming a dead pid
        holder.wait()
    assert f"pid {holder.pid}" in lock_path_for(run).read_text()
    assert (
        cli(*fit_args("zero_shot_clip", finished["source"], run, "--cache-dir", finished["cache"])) == 0
    )  # taken over
    assert not lock_path_for(run).exists()  # released on the way out


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    from usad_bench.errors import UsadError

    first = exclusive_lock(tmp_path / ".x.lock", "x")
    first.__enter__()
    with pytest.raises(UsadError, match=f"pid {os.getpid()}"), exclusive_lock(tmp_path / ".x.lock", "x"):
        pass
    first.__exit__(None, None, None)
    with exclusive_lock(tmp_path / ".x.lock", "x"):  # free again
        pass


# ----------------------------------------------------------------------------- 3. exit codes a scheduler can trust
class Child:
    """A ``usad-bench`` subprocess whose output lines are read as they come."""

    def __init__(self, args: list, cwd: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "usad_bench.cli", "-v", *map(str, args)]
        self.proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=lambda s=stream: [self.lines.put(x) for x in s], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.seen):
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}: {''.join(self.seen)}")
            try:
                self.seen.append(self.lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout}s: {''.join(self.seen)}") from None

    def stop(self, signum: int) -> tuple[int, str]:
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=120)
        time.sleep(0.2)  # let the reader threads drain the pipes
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, "".join(self.seen)


STYLES = ("source", "target")  # the synthetic generator's two scanner presets


def signal_self_when_training(monkeypatch, signum: int) -> None:
    """In-process twin of the subprocess tests: the signal arrives as training starts."""
    import usad_bench.runner as runner

    real_train = runner.train

    def train(*args, **kwargs):
        os.kill(os.getpid(), signum)  # handled at the next bytecode, inside this call
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", train)


def test_fit_killed_mid_training_exits_128_plus_signal_and_keeps_the_old_run(finished, tmp_path, monkeypatch, capsys):
    run = tmp_path / "sub" / "run"
    shutil.copytree(finished["run"], run)
    before = snapshot(run)
    args = [*fit_args("linear_adapter", finished["source"], run, "--set", "epochs=100000"), "--cache-dir"]
    child = Child([*args, finished["cache"]], cwd=tmp_path)  # the real entry point, killed by SIGTERM
    child.wait_for("INFO training")  # -v: usad_bench's own progress
    returned, output = child.stop(signal.SIGTERM)
    assert returned == 143, output
    assert "stopped by SIGTERM: the fit did not finish" in output and "re-run the same command" in output
    assert "GPU available" not in output and "Tip" not in output  # -v hides Lightning's banners
    assert snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # no temporary folder, no lock

    signal_self_when_training(monkeypatch, signal.SIGINT)  # Ctrl-C: 130, not Lightning's exit(1)
    assert cli(*args, finished["cache"]) == 130
    assert "stopped by SIGINT: the fit did not finish" in capsys.readouterr().err
    assert snapshot(run) == before and sorted(p.name for p in run.parent.iterdir()) == ["run"]


def test_sweep_killed_exits_128_plus_signal_and_says_how_many_runs_finished(tmp_path, monkeypatch, capsys):
    from usad_bench.data.synth import synthesise

    data = {name: synthesise(tmp_path / name, n=9, seed=i, style=name, size=64) for i, name in enumerate(STYLES)}
    experiment = {
        "backbone": {"name": "usad-tiny", "pretrained": "none"},
        "data": {"src": str(data["source"]), "tgt": str(data["target"])},
        "source": "src",
        "targets": ["tgt"],
        "methods": ["zero_shot_clip", {"label": "long", "method": "linear_adapter", "set": {"epochs": 100000}}],
        "shots": [2],
        "seeds": [0],
    }
    outputs = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        path = tmp_path / f"{signum.name}.yaml"
        path.write_text(yaml.safe_dump({**experiment, "name": signum.name, "out": str(tmp_path / signum.name)}))
        args = ["sweep", path, "--cache-dir", tmp_path / "cache"]
        if signum == signal.SIGINT:  # the real entry point
            child = Child(args, cwd=tmp_path)
            child.wait_for("INFO training")  # the second run; the first (training-free) one is finished
            returned, outputs[signum] = child.stop(signum)
        else:  # in-process
            signal_self_when_training(monkeypatch, signum)
            returned = cli(*args)
            outputs[signum] = capsys.readouterr().err
        assert returned == 128 + signum, outputs[signum]
        assert "1 of the 2 runs of this shard are finished" in outputs[signum], outputs[signum]
        assert "re-run the same command" in outputs[signum]
        out = tmp_path / signum.name
        assert (out / "zero_shot_clip" / "src" / "k2" / "s0" / "metrics.json").is_file()
        assert not list((out / "long" / "src" / "k2").iterdir())  # the interrupted run left nothing behind
        assert not list(out.glob(".sweep*.lock"))


# ----------------------------------------------------------------------------- 5. the weights label everywhere
def test_every_artefact_of_a_random_weights_run_says_so(finished, tmp_path, capsys):
    run, cache = finished["run"], finished["cache"]
    assert cli("eval", "--run", run, "--test", f"target={finished['target']}", "--out", tmp_path / "ev",
               "--cache-dir", cache) == 0  # fmt: skip
    first_line = (tmp_path / "ev" / "predictions" / "target.csv").read_text().splitlines()[0]
    assert first_line.startswith("# random backbone weights") and "not results" in first_line
    assert read_csv_rows(tmp_path / "ev" / "predictions" / "target.csv")[0]["id"]  # the data rows follow
    capsys.readouterr()

    images = tmp_path / "new"
    images.mkdir()
    scan = sorted(Path(finished["target"]).parent.rglob("*.png"))[0]
    (images / "scan.png").write_bytes(scan.read_bytes())
    assert cli("predict", "--run", run, "--images", images, "--out", tmp_path / "pred", "--cache-dir", cache) == 0
    assert "note: random backbone weights" in capsys.readouterr().out
    assert (tmp_path / "pred" / "scores.csv").read_text().startswith("# random backbone weights")
    png = Image.open(tmp_path / "pred" / "overlays" / "scan.png")
    assert "RANDOM WEIGHTS" in png.info["Comment"]
    assert_label_band(png, Image.open(scan))

    from usad_bench.demo import draw_overlays

    montage = draw_overlays(run, finished["target"], tmp_path / "demo", "cpu", cache, count=2)
    panel = next(p for p in (tmp_path / "demo").glob("*.png") if p.name != "montage.png")
    assert (
        "RANDOM WEIGHTS" in Image.open(montage).info["Comment"]
        and "RANDOM WEIGHTS" in Image.open(panel).info["Comment"]
    )
    assert_label_band(Image.open(panel), Image.open(scan))


def assert_label_band(labelled: Image.Image, original: Image.Image) -> None:
    """A band was added below the image, with yellow text burnt into it."""
    assert labelled.height > original.height and labelled.width == original.width
    band = np.asarray(labelled.convert("RGB"))[original.height :]
    yellow = (band[..., 0] > 200) & (band[..., 1] > 150) & (band[..., 2] < 80)
    assert yellow.sum() > 50


def test_fit_console_names_the_weights_and_synthetic_weights_get_their_own_label(finished, tmp_path, capsys):
    assert cli(*fit_args("zero_shot_clip", finished["source"], tmp_path / "zs", "--cache-dir", finished["cache"])) == 0
    assert "note: random backbone weights" in capsys.readouterr().out
    from usad_bench.runner import weights_stamp, weights_warning

    synth = {"random_weights": False, "backbone": {"name": "usad-tiny", "pretrained": "synth"}}
    real = {"random_weights": False, "backbone": {"name": "ViT-B-16", "pretrained": "openai"}}
    assert weights_warning(synth).startswith("synthetic-only weights") and "SYNTHETIC-ONLY" in weights_stamp(synth)
    assert weights_warning(real) is None and weights_stamp(real) is None


# ----------------------------------------------------------------------------- 6. offline in seconds, loopback only
def dead_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def online_mode_behind_proxy(monkeypatch, tmp_path):
    """huggingface_hub not in offline mode, an empty hub cache, every proxy variable -> ``set_proxy(port)``."""
    from huggingface_hub import constants

    from usad_bench import backbone

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache (~/.cache/clip) is empty too
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    backbone._network_error.cache_clear()

    def set_proxy(port: int) -> None:
        backbone._network_error.cache_clear()
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{port}")

    yield set_proxy
    backbone._network_error.cache_clear()


@pytest.mark.parametrize("name, pretrained", [("ViT-B-16", "openai"), ("hf-hub:nobody/nothing", None)])
def test_offline_weights_fail_in_seconds_with_the_fix(online_mode_behind_proxy, name, pretrained):
    from usad_bench.backbone import Backbone, BackboneSpec
    from usad_bench.errors import UsadError

    online_mode_behind_proxy(dead_port())
    started = time.perf_counter()
    with pytest.raises(UsadError) as caught:
        Backbone.load(BackboneSpec(name=name, pretrained=pretrained))
    assert time.perf_counter() - started < 5.0  # the bound; a retrying download took 29-52 s
    message = str(caught.value)
    assert "network is unreachable" in message and "Connection refused" in message and "\n" not in message
    assert ("--pretrained /path/to/file" in message) if pretrained else ("local-dir:" in message)


def test_the_network_is_tried_once_not_retried(online_mode_behind_proxy):
    from usad_bench.backbone import Backbone, BackboneSpec
    from usad_bench.errors import UsadError

    attempts = []
    with socket.socket() as server:  # a "proxy" that hangs up on every connection, counting them
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)

        def serve():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    if server.fileno() == -1:
                        return
                    continue
                attempts.append(1)
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        online_mode_behind_proxy(server.getsockname()[1])
        for _ in range(2):  # a second load in the same process does not ask again
            with pytest.raises(UsadError, match="network is unreachable"):
                Backbone.load(BackboneSpec(name="ViT-B-16", pretrained="openai"))
    assert len(attempts) == 1


# ----------------------------------------------------------------------------- 7. own scanner: predict
def test_predict_takes_one_file_skips_a_corrupt_image_and_names_overlays_once(finished, tmp_path, caplog):
    run, cache = finished["run"], finished["cache"]
    scan = sorted(Path(finished["target"]).parent.rglob("*.png"))[0]
    images = tmp_path / "scans"
    images.mkdir()
    (images / "a.png").write_bytes(scan.read_bytes())
    Image.open(scan).convert("RGB").save(images / "a.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("L", (8, 8), 90).save(images / "tiny.png")
    Image.new("L", (1000, 50), 90).save(images / "strip.png")
    out = tmp_path / "pred"
    with caplog.at_level("WARNING", logger="usad_bench"):
        assert cli("predict", "--run", run, "--images", images, "--out", out, "--cache-dir", cache) == 0
    rows = {r["image"]: r for r in read_csv_rows(out / "scores.csv")}
    assert set(rows) == {"a.jpg", "a.png", "broken.png", "strip.png", "tiny.png"}
    assert rows["broken.png"]["score"] == "" and "broken.png" in rows["broken.png"]["error"]
    assert rows["a.png"]["score"] and rows["a.png"]["error"] == ""
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["a_jpg.png", "a_png.png", "strip.png", "tiny.png"]  # never name.png.png
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "1 of 5 images could not be read" in warnings
    assert "smaller than 32 px" in warnings and "8x8" in warnings
    assert "aspect ratio" in warnings and "1000x50" in warnings

    single = tmp_path / "one"
    assert cli("predict", "--run", run, "--images", images / "a.png", "--out", single, "--cache-dir", cache) == 0
    assert [r["image"] for r in read_csv_rows(single / "scores.csv")] == ["a.png"]
    assert (single / "overlays" / "a.png").is_file()


def test_a_normal_only_support_set_is_warned_about(caplog):
    from usad_bench.data.manifest import Sample
    from usad_bench.runner import warn_if_one_sided

    normal = [Sample(f"n{i}", Path(f"n{i}.png"), (), "normal", False, f"g{i}", "d", "d") for i in range(4)]
    with caplog.at_level("WARNING", logger="usad_bench"):
        warn_if_one_sided(normal)
        warn_if_one_sided([*normal, Sample("a", Path("a.png"), (), "benign", True, "ga", "d", "d")])
    assert len(caplog.records) == 1 and "only normal images (4)" in caplog.records[0].getMessage()


# ----------------------------------------------------------------------------- 8. help, version, 9. notes
def test_help_shows_defaults_and_version_is_printed(capsys):
    with pytest.raises(SystemExit):
        cli("--version")
    assert capsys.readouterr().out.startswith("usad-bench ")
    with pytest.raises(SystemExit):
        cli("fit", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: ViT-L-14-336)" in text and "(default: openai)" in text and "(default: auto)" in text


def test_constant_scores_give_null_image_metrics_with_a_note():
    from usad_bench.runner import Collected, score_test

    c = Collected(ids=["a", "b", "c"], labels=["normal", "benign", "malignant"], is_anomaly=[False, True, True])
    c.scores = [np.ones(3, dtype=np.float32)]  # a classifier without a normal class: 1 - p(normal) = 1
    out = score_test(c, ["benign", "malignant"], None)
    assert all(np.isnan(out[k]) for k in ("image_auroc", "image_ap", "image_f1_max"))
    assert any("include no 'normal'" in note for note in out["notes"]), out["notes"]
    assert json.dumps(out["notes"])
