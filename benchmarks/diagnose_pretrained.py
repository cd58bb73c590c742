"""What limits a pretrained model's zero-shot malignant-vs-benign AUROC on synthetic data (docs/pretraining.md).

    python benchmarks/diagnose_pretrained.py [--pretrained synth] [--n 400] [--work runs/diagnose_pretrained]
                                             [--out results/pretrained_synth/diagnosis.json]

Three ceilings, from the cheapest to the model's own:

1. **Bayes ceiling of the generator**: the AUROC of the true log-likelihood ratio of the recorded BI-RADS
   descriptors (``ATTRIBUTE_PRIORS``, Monte Carlo), all descriptors and each alone. If it were near 0.7 no
   model could pass a 0.7 target;
2. **zero-shot attribute reading**: for each descriptor, the model's zero-shot prediction of its most
   malignant-looking value (e.g. "spiculated") from descriptor prompts, scored against the truth;
3. **linear read-out of the image embedding**: a logistic regression on the model's CLS embeddings,
   5-fold cross-validated with patients kept within one fold, for malignant-vs-benign and each descriptor.
   Zero-shot near this read-out means the text side is not the limit; both low means the image tower is.

Data: ``usad-bench data synth`` of the ``target`` style (outside the pretraining range, seed 1000) and the
``source`` style (inside it, seed 0). With synthetic-only weights these figures are synthetic, not results.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.cache import FeatureCache
from usad_bench.data.synth import ATTRIBUTE_PRIORS, synthesise
from usad_bench.features import FeatureExtractor
from usad_bench.io import write_json
from usad_bench.pretrain.data import read_pairs
from usad_bench.prompts import load_prompts

# The value of each descriptor that points to malignancy, and the words that ask the model about each value.
MALIGNANT_VALUE = {
    "shape": "irregular",
    "orientation": "not_parallel",
    "margin": "spiculated",
    "echo": "heterogeneous",
    "posterior": "shadowing",
    "halo": "present",
}
VALUE_WORDS = {
    "shape": {"oval": "an oval mass", "round": "a round mass", "irregular": "an irregular mass"},
    "orientation": {"parallel": "a parallel mass", "not_parallel": "a taller-than-wide mass"},
    "margin": {
        "circumscribed": "a circumscribed mass",
        "microlobulated": "a microlobulated mass",
        "indistinct": "an indistinct mass",
        "spiculated": "a spiculated mass",
    },
    "echo": {
        "anechoic": "an anechoic mass",
        "hypoechoic": "a hypoechoic mass",
        "heterogeneous": "a heterogeneous mass",
    },
    "posterior": {
        "enhancement": "a mass with posterior acoustic enhancement",
        "none": "a mass with no posterior acoustic features",
        "shadowing": "a mass with posterior acoustic shadowing",
    },
    "halo": {"absent": "a mass", "present": "a mass with an echogenic halo"},
}
DESCRIPTOR_TEMPLATES = ("an ultrasound image of a breast with {}.", "a breast ultrasound image showing {}.")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="usad-tiny")
    p.add_argument("--pretrained", default="synth")
    p.add_argument("--n", type=int, default=400, help="images per domain")
    p.add_argument("--work", type=Path, default=Path("runs/diagnose_pretrained"))
    p.add_argument("--out", type=Path, default=Path("results/pretrained_synth/diagnosis.json"))
    return p.parse_args()


def bayes_ceiling(n: int = 20000, seed: int = 0) -> dict[str, float]:
    """AUROC of the true descriptor log-likelihood ratio, malignant vs benign: all descriptors and each alone."""
    rng = np.random.default_rng(seed)
    benign, malignant = ATTRIBUTE_PRIORS["benign"], ATTRIBUTE_PRIORS["malignant"]
    keys = list(benign)
    llr = {key: [] for key in keys}
    labels = np.repeat([0, 1], n)
    for diagnosis in ("benign", "malignant"):
        for key in keys:
            values = list(ATTRIBUTE_PRIORS[diagnosis][key])
            drawn = rng.choice(values, size=n, p=[ATTRIBUTE_PRIORS[diagnosis][key][v] for v in values])
            ratio = {v: np.log(malignant[key][v] / benign[key][v]) for v in values}
            llr[key].extend(ratio[v] for v in drawn)
    out = {"all": roc_auc_score(labels, np.sum([llr[k] for k in keys], axis=0))}
    out.update({key: roc_auc_score(labels, llr[key]) for key in keys})
    return {k: round(float(v), 3) for k, v in out.items()}


def text_embedding(backbone: Backbone, sentences: list[str]) -> torch.Tensor:
    """Mean of the normalised sentence embeddings, normalised: (D,)."""
    return F.normalize(F.normalize(backbone.encode_text(sentences), dim=-1).mean(0), dim=-1)


def zero_shot(backbone: Backbone, emb: torch.Tensor, labels: np.ndarray, attrs: list[dict]) -> dict:
    """Zero-shot malignant-vs-benign (the class prompts) and each descriptor's reading, on lesion images."""
    prompts = load_prompts("breast_ultrasound")
    classes = torch.stack([text_embedding(backbone, prompts.class_prompts(c)) for c in ("benign", "malignant")])
    margin = (emb @ classes.T)[:, 1] - (emb @ classes.T)[:, 0]
    malignant = labels == "malignant"
    out = {"malignant_vs_benign": roc_auc_score(malignant, margin)}
    for key, words in VALUE_WORDS.items():
        texts = torch.stack(
            [text_embedding(backbone, [t.format(w) for t in DESCRIPTOR_TEMPLATES]) for w in words.values()]
        )
        p = (emb @ texts.T / 0.01).softmax(-1)[:, list(words).index(MALIGNANT_VALUE[key])]
        out[f"reads_{key}={MALIGNANT_VALUE[key]}"] = roc_auc_score([a[key] == MALIGNANT_VALUE[key] for a in attrs], p)
    return {k: round(float(v), 3) for k, v in out.items()}


def read_out(emb: torch.Tensor, labels: np.ndarray, attrs: list[dict], groups: np.ndarray) -> dict:
    """Cross-validated (patients within one fold) logistic-regression AUROC from the CLS embedding."""
    targets = {"malignant_vs_benign": labels == "malignant"}
    targets.update({f"{k}={v}": np.array([a[k] == v for a in attrs]) for k, v in MALIGNANT_VALUE.items()})
    out = {}
    for name, y in targets.items():
        probe = LogisticRegression(C=10.0, max_iter=2000)
        p = cross_val_predict(probe, emb.numpy(), y, cv=GroupKFold(5), groups=groups, method="predict_proba")[:, 1]
        out[name] = round(float(roc_auc_score(y, p)), 3)
    return out


def diagnose_domain(backbone: Backbone, manifest: Path) -> dict:
    records = [r for r in read_pairs(manifest) if r.sample.label != "normal"]  # lesions and their descriptors
    samples = [r.sample for r in records]
    with torch.no_grad():
        emb = F.normalize(FeatureExtractor(backbone, FeatureCache(None), ()).extract(samples).cls.float(), dim=-1)
    labels = np.array([s.label for s in samples])
    attrs = [r.attributes for r in records]
    groups = np.array([s.group for s in samples])
    return {
        "lesion_images": len(samples),
        "zero_shot": zero_shot(backbone, emb, labels, attrs),
        "linear_read_out_cv": read_out(emb, labels, attrs, groups),
    }


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    backbone = Backbone.load(BackboneSpec(name=args.backbone, pretrained=args.pretrained))
    result = {"weights": backbone.weights_id, "bayes_ceiling_auroc": bayes_ceiling(), "domains": {}}
    for style, seed in (("target", 1000), ("source", 0)):
        manifest = synthesise(args.work / style, n=args.n, seed=seed, style=style)
        result["domains"][style] = diagnose_domain(backbone, manifest)
    write_json(args.out, result)
    for key, value in result.items():
        print(f"{key}: {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
