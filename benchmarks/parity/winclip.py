"""Parity of ``winclip`` (WinCLIP and WinCLIP+) with anomalib's ``WinClipModel``
(src/anomalib/models/image/winclip: torch_model.py, utils.py, prompting.py).

anomalib pins open_clip to >=2.23,<2.26.1, whose vision transformer takes sequence-first (LND) input; its
window pass permutes to LND before ``visual.transformer`` (torch_model.py:265-267), which open_clip >= 2.26
(batch-first) would misread. Their side therefore runs in a child process with open_clip 2.24.0 first on
``sys.path`` (``--open-clip``: a folder holding that release's ``open_clip`` package, e.g. the unpacked
wheel of ``pip download open_clip_torch==2.24.0 --no-deps``); our side runs with the project's open_clip.
Both get the same random weights (our state dict, loaded into their ``clip``), images and class word.

Stubbed: the weight download (``PRETRAINED`` set to None, then our weights loaded), ``anomalib.data``'s
``InferenceBatch`` (a plain record of the two outputs) and the ``anomalib`` package around the winclip
folder (its ``__init__`` pulls in Lightning modules); ``BufferListMixin`` / ``DynamicBufferMixin`` are
their real files from the clone.

    python benchmarks/parity/winclip.py --original ORIGINALS/anomalib --open-clip /tmp/open_clip_2.24.0
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from _common import diff, load_file, write

REPO, COMMIT = "openvinotoolkit/anomalib", "161bb369547d06df29d468e4980ddefae25a0ba5"
WINCLIP_DIR = Path("src/anomalib/models/image/winclip")
COMPONENTS_DIR = Path("src/anomalib/models/components/base")
CLASS_WORD = "breast"  # our prompt file's object word, passed to theirs as class_name
SHOTS = 2


def their_side(original: Path, open_clip_dir: Path, model: str, inputs: Path, outputs: Path) -> None:
    """Child process: anomalib's WinClipModel under open_clip 2.24 on the given weights and images."""
    sys.path.insert(0, str(open_clip_dir))
    import importlib.util

    import open_clip

    package_dir = Path(importlib.util.find_spec("usad_bench").submodule_search_locations[0])
    open_clip.add_model_config(package_dir / "resources" / "model_configs")  # usad-tiny's JSON config only
    for name in ("anomalib", "anomalib.models", "anomalib.models.components", "anomalib.models.image"):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = []
    data = types.ModuleType("anomalib.data")
    data.InferenceBatch = type("InferenceBatch", (types.SimpleNamespace,), {})  # stub: a record of the outputs
    sys.modules["anomalib.data"] = data
    components = sys.modules["anomalib.models.components"]
    components.BufferListMixin = load_file("buffer_list", original / COMPONENTS_DIR / "buffer_list.py").BufferListMixin
    dynamic = load_file("dynamic_buffer", original / COMPONENTS_DIR / "dynamic_buffer.py")
    components.DynamicBufferMixin = dynamic.DynamicBufferMixin
    package = types.ModuleType("anomalib.models.image.winclip")
    package.__path__ = [str(original / WINCLIP_DIR)]
    sys.modules[package.__name__] = package
    torch_model = importlib.import_module("anomalib.models.image.winclip.torch_model")
    prompting = importlib.import_module("anomalib.models.image.winclip.prompting")
    torch_model.BACKBONE, torch_model.PRETRAINED = model, None  # stub: no download; our weights below
    given = torch.load(inputs)
    winclip = torch_model.WinClipModel()
    winclip.clip.load_state_dict(given["state"])
    winclip.eval()
    from open_clip.version import __version__ as open_clip_version

    out = {"open_clip": open_clip_version, "prompts": prompting.create_prompt_ensemble(CLASS_WORD)}
    with torch.no_grad():
        winclip.setup(class_name=CLASS_WORD)
        out["text"] = winclip.text_embeddings
        out["image"], out["windows"], out["patches"] = winclip.encode_image(given["images"])
        zero = winclip(given["images"])
        out["zero_score"], out["zero_map"] = zero.pred_score, zero.anomaly_map
        winclip.setup(reference_images=given["references"])
        few = winclip(given["images"])
        out["few_score"], out["few_map"] = few.pred_score, few.anomaly_map
    torch.save(out, outputs)


def our_side(model: str):
    from usad_bench.backbone import Backbone, BackboneSpec
    from usad_bench.feature_kinds import WINDOWS, FeatureRequest
    from usad_bench.features import FeatureTable
    from usad_bench.methods.base import SupportSet
    from usad_bench.runner import build_method

    backbone = Backbone.load(BackboneSpec(name=model, pretrained=None, seed=0))
    method = build_method("winclip", {"prompt_ensemble": "winclip"}, backbone, ["normal", "abnormal"], SHOTS, [])
    size = backbone.image_size
    torch.manual_seed(0)
    images, references = torch.randn(3, 3, size, size), torch.randn(SHOTS, 3, size, size)
    request = FeatureRequest(WINDOWS, scales=(2, 3))
    with torch.no_grad():
        feats, ref = backbone.encode_features(images, request), backbone.encode_features(references, request)
    table = FeatureTable([str(i) for i in range(SHOTS)], ref.cls, ref.patches, ref.layers, ref.kind, ref.windows)
    zeros = torch.zeros(SHOTS)
    support = SupportSet([], {"orig": table}, {}, torch.ones(SHOTS, dtype=torch.bool), zeros.long(), zeros)
    zero = method.predict_features(feats)
    method.setup_support(support)
    few = method.predict_features(feats)
    return backbone, method, images, references, feats, zero, few


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=f"parity of usad_bench's winclip with {REPO} @ {COMMIT[:10]}")
    parser.add_argument("--original", type=Path, required=True, help=f"local clone of {REPO}")
    parser.add_argument(
        "--open-clip",
        type=Path,
        default=None,
        help="folder holding open_clip 2.24.0's package (default: open_clip_2.24.0 beside --original)",
    )
    parser.add_argument("--model", default="usad-tiny", help="open_clip model built with random weights")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "results/parity/winclip.json")
    parser.add_argument("--their-side", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.open_clip = args.open_clip or args.original.parent / "open_clip_2.24.0"
    if args.their_side:
        return their_side(args.original, args.open_clip, args.model, *args.their_side)
    for path, what in ((args.original / WINCLIP_DIR, "an anomalib clone"), (args.open_clip / "open_clip", "")):
        if not path.is_dir():
            sys.exit(f"error: {path} is not a directory; pass {what or 'the folder holding open_clip 2.24.0'}")

    from usad_bench.methods.winclip import sentence_lists

    backbone, method, images, references, feats, zero, few = our_side(args.model)
    folder = Path(tempfile.mkdtemp(prefix="usad_parity_winclip_"))
    torch.save({"state": backbone.model.state_dict(), "images": images, "references": references}, folder / "in.pt")
    command = [sys.executable, __file__, "--original", str(args.original), "--open-clip", str(args.open_clip)]
    command += ["--model", args.model, "--their-side", str(folder / "in.pt"), str(folder / "out.pt")]
    subprocess.run(command, check=True)
    theirs = torch.load(folder / "out.pt")

    ours_prompts = sentence_lists(method.task.prompts, "winclip")
    compared = {
        "text_embeddings": diff(method.state_text, theirs["text"]),
        "image_embeddings": diff(feats.cls, theirs["image"]),
        "window_embeddings_2x2": diff(feats.windows[2], theirs["windows"][0]),
        "window_embeddings_3x3": diff(feats.windows[3], theirs["windows"][1]),
        "patch_embeddings": diff(feats.patches[:, 0], theirs["patches"]),
        "zero_shot_score": diff(zero.score, theirs["zero_score"]),
        "zero_shot_map": diff(zero.anomaly_map, theirs["zero_map"]),
        "few_shot_score": diff(few.score, theirs["few_score"]),
        "few_shot_map": diff(few.anomaly_map, theirs["few_map"]),
    }
    same_prompts = (ours_prompts["normal"], ours_prompts["abnormal"]) == tuple(theirs["prompts"])
    notes = [
        f"model {args.model}, random weights (seed 0) on both sides; their open_clip {theirs['open_clip']}",
        f"prompt sentences identical to create_prompt_ensemble({CLASS_WORD!r}): {same_prompts} "
        "(ours: prompt_ensemble=winclip with the prompt file's object word)",
        f"WinCLIP+: {SHOTS} normal reference images; 3 query images; scales (2, 3)",
    ]
    write(types.SimpleNamespace(out=args.out, original=args.original), "winclip", REPO, COMMIT, compared, notes)


if __name__ == "__main__":
    main()
