"""Figure 2 (qualitative) on a tiny sweep: files, panel count, images stratified by class and chosen by seed."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from usad_bench.cli import main
from usad_bench.data.manifest import read_manifest
from usad_bench.figures import draw, method_maps, pick_images


@pytest.mark.slow
def test_qualitative_figure_from_a_tiny_sweep(tmp_path, synth_domains):
    grid = {
        "name": "fig",
        "backbone": {"name": "usad-tiny", "pretrained": "none"},
        "data": {"src": str(synth_domains["source"]), "tgt": str(synth_domains["target"])},
        "source": "src",
        "targets": ["tgt"],
        "methods": ["zero_shot_clip", {"label": "adapter", "method": "linear_adapter", "set": {"epochs": 1}}],
        "shots": [2],
        "seeds": [0],
        "out": str(tmp_path / "runs"),
    }
    (tmp_path / "fig.yaml").write_text(yaml.safe_dump(grid))
    cache = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(["sweep", str(tmp_path / "fig.yaml"), *cache]) == 0
    out = tmp_path / "figures"
    assert main(["figure", str(tmp_path / "runs"), "--images", "3", "--out", str(out), *cache]) == 0
    png, pdf, record = (out / f"qualitative_runs_tgt{suffix}" for suffix in (".png", ".pdf", ".json"))
    assert Image.open(png).size[0] > 200 and pdf.read_bytes().startswith(b"%PDF")
    drawn = json.loads(record.read_text())
    assert drawn["methods"] == ["zero_shot_clip", "adapter"]  # the grid's order
    assert sorted(label for _, label in drawn["images"]) == ["benign", "malignant", "normal"]  # one per class
    assert drawn["weights"] == ["random weights"]

    samples = [s for s in read_manifest(synth_domains["target"]) if s.id in {i for i, _ in drawn["images"]}]
    assert [s.id for s in pick_images(samples, 3, seed=0)] != [] and pick_images(samples, 3, 0) == pick_images(
        samples, 3, 0
    )
    maps = method_maps("adapter", tmp_path / "runs" / "adapter" / "src" / "k2" / "s0", samples, "cpu", None)
    figure = draw(samples, [maps, maps], title="t")
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == 3 * (2 + 2)  # rows x (image, ground truth, one per method)
