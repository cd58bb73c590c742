"""Parity of hybrid_tuning with the authors' code: jinggqu/NextGen-UIA @ 69dd54fe5f9a996c378117d5ab888f8297bac48a.

    python benchmarks/parity/hybrid_tuning.py --original /path/to/NextGen-UIA

Loads THEIR ``src/adapters/mona.py`` (``HybridNoiseFreqMona``; its noise estimator is compared alone,
and the filter alone against their filter step's formula with their parameter, since that step is not a
separate module there) and ``src/third_party/timm/clip_adapter.py`` (``TimmCLIPAdapter``) from the clone at run time,
gives both sides the same random weights (every parameter drawn afresh, so the LN branch and the filter
are not at their identity initial values) and the same random tokens, and writes the max abs / relative
differences to results/parity/hybrid_tuning.json. Only ``TimmCLIPAdapter.extract_vit_features`` is
stubbed (it runs a BiomedCLIP backbone): it returns the given block activations.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO, COMMIT = "jinggqu/NextGen-UIA", "69dd54fe5f9a996c378117d5ab888f8297bac48a"  # `make parity` reads this line
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from usad_bench.io import write_text  # noqa: E402
from usad_bench.methods.hybrid_adapter import HybridAdapter  # noqa: E402
from usad_bench.methods.hybrid_tuning import HybridHeads  # noqa: E402


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if p.dim() == 1 else 0.0))


def differences(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    diff = (ours - theirs).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(theirs.abs().max().item(), 1e-12), "shape": list(theirs.shape)}


def compare_adapter(mona, grid=(7, 7), width=96, batch=3) -> dict:
    """Their hybrid MONA on [N, B, D] tokens with a CLS token vs ours on the batch-first patch tokens."""
    theirs = mona.HybridNoiseFreqMona(width, 64).eval()
    randomise(theirs, 0)
    state = {
        k.replace("adapter_conv.freq_filter", "adapter_conv.frequency.weight"): v
        for k, v in theirs.state_dict().items()
    }
    ours = HybridAdapter(width, grid, 64, "channel").eval()
    ours.load_state_dict(state)
    tokens = torch.randn(batch, 1 + grid[0] * grid[1], width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_theirs = theirs(tokens.permute(1, 0, 2), grid).permute(1, 0, 2)[:, 1:]  # patch tokens
        out_ours = ours(tokens[:, 1:])
        # the filter alone: their forward's first step (mona.py, HybridNoiseFreqMonaOp) vs our FrequencyFilter
        grid_x = torch.randn(batch, 64, *grid, generator=torch.Generator().manual_seed(2))
        spectrum = torch.fft.rfft2(grid_x) * theirs.adapter_conv.freq_filter.view(1, -1, 1, 1)
        filt_theirs = torch.fft.irfft2(spectrum, s=grid)
        filt_ours = ours.adapter_conv.frequency(grid_x)
        noise_theirs = theirs.adapter_conv.noise_estimator(grid_x)
        noise_ours = ours.adapter_conv.noise_estimator(grid_x)
    return {
        "adapter_patch_tokens": differences(out_ours, out_theirs),
        "frequency_filter": differences(filt_ours, filt_theirs),
        "noise_weights": differences(noise_ours, noise_theirs),
    }


def compare_heads(clip_adapter, grid=(14, 14), batch=2, n_classes=3, img_size=224) -> dict:
    """Their TimmCLIPAdapter heads (cls and seg) vs ours on the same three block activations."""
    acts = [
        torch.randn(batch, 1 + grid[0] * grid[1], 768, generator=torch.Generator().manual_seed(3 + i)) for i in range(3)
    ]
    result = {}
    ours = HybridHeads(3, 768, 512, n_classes).eval()
    for task, classes in (("cls", n_classes), ("seg", 2)):
        theirs = clip_adapter.TimmCLIPAdapter(
            torch.nn.Module(), num_classes=classes, img_size=img_size, task=task
        ).eval()
        randomise(theirs, 10)
        theirs.extract_vit_features = lambda x, acts=acts: (None, acts)  # stub: the backbone's block outputs
        ours.reduces.load_state_dict(theirs.reduces.state_dict())
        ours.blocks.load_state_dict(theirs.blocks.state_dict())
        with torch.no_grad():
            out_theirs = theirs(torch.zeros(batch, 3, img_size, img_size))
            if task == "cls":
                ours.cls_head[1].load_state_dict(theirs.cls_head[3].state_dict())
            else:
                ours.seg_conv.load_state_dict(theirs.seg_head[1].state_dict())
            mask, logits = ours(torch.stack([a[:, 1:] for a in acts], 1), grid)
            up = torch.nn.functional.interpolate(mask, size=(img_size, img_size), mode="bilinear", align_corners=False)
        result[f"{task}_logits"] = differences(logits if task == "cls" else up, out_theirs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", type=Path, required=True, help=f"local clone of {REPO}")
    parser.add_argument("--out", type=Path, default=ROOT / "results/parity/hybrid_tuning.json")
    args = parser.parse_args()
    mona = load_module(args.original / "src/adapters/mona.py", "nextgen_mona")
    clip_adapter = load_module(args.original / "src/third_party/timm/clip_adapter.py", "nextgen_clip_adapter")
    report = {
        "method": "hybrid_tuning",
        "original": REPO,
        "commit": COMMIT,
        "compared": {**compare_adapter(mona), **compare_heads(clip_adapter)},
        "note": "random weights and inputs (no pretrained weights involved); float32, CPU",
    }
    report["max_abs_overall"] = max(v["max_abs"] for v in report["compared"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
