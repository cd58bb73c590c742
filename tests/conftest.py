"""Shared fixtures: the tiny random backbone and small synthetic domains.

Everything here is built by the tests themselves; nothing is downloaded. Tests that read the
real datasets use ``shared_datasets`` and skip when ``../shared/datasets`` is absent.
"""

from __future__ import annotations

import os

# A test must never wait on a download; huggingface_hub reads this once, at import, so set it first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from usad_bench.backbone import Backbone, BackboneSpec

# One thread: the test models are tiny, so a second thread buys little and costs a lot whenever the
# machine is shared (a tiny AdaCLIP step: 0.13 s with one thread, 5.9 s with two on a loaded 2-core box).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
TINY = BackboneSpec(name="usad-tiny", pretrained=None)


@pytest.fixture(scope="session")
def tiny_spec() -> BackboneSpec:
    return TINY


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    return Backbone.load(TINY)


# usad-tiny pretrained on synthetic images only (`make pretrain-tiny`, shipped in the package): the model the
# learning tests use, so they exercise the real pipeline. Not a clinical model; its figures are synthetic.
PRETRAINED_TINY = BackboneSpec(name="usad-tiny", pretrained="synth")


@pytest.fixture(scope="session")
def pretrained_tiny_spec() -> BackboneSpec:
    return PRETRAINED_TINY


@pytest.fixture(scope="session")
def pretrained_tiny() -> Backbone:
    return Backbone.load(PRETRAINED_TINY)


@pytest.fixture(scope="session")
def synth_domains(tmp_path_factory) -> dict[str, Path]:
    """Source and shifted target synthetic domains (manifest paths), shared by the slow tests."""
    from usad_bench.data.synth import synthesise

    root = tmp_path_factory.mktemp("synth")
    return {
        "source": synthesise(root / "source", n=90, seed=0, style="source", size=128),
        "target": synthesise(root / "target", n=60, seed=1, style="target", size=128),
    }


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets is not present (only the project's own CI machines have it)")
    return SHARED_DATASETS
