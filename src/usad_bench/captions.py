"""Diagnostic attributes of an image and the captions built from them.

Ultrasound-CLIP (US-365K) describes each image along diagnostic-attribute dimensions (its UDAF
taxonomy) and trains CLIP with targets derived from attribute overlap. The synthetic generator
draws the breast (BI-RADS) subset of those dimensions for every lesion, records them in the
manifest's ``attributes`` column, and this module turns them into varied report-like sentences.

Manifest ``attributes`` column: ``key=value`` pairs joined by ``;``, e.g.
``diagnosis=benign;shape=oval;orientation=parallel;margin=circumscribed;echo=hypoechoic;posterior=enhancement;halo=absent``.
Normal images carry ``diagnosis=normal`` and ``none`` in every lesion dimension. Users may bring
their own keys and values (any anatomy); only the synthetic vocabulary below has sentence templates.
"""

from __future__ import annotations

import functools

import numpy as np

from usad_bench.errors import UsadError

NONE = "none"

# Lesion dimensions the generator renders, with their BI-RADS values (ACR lexicon, see docs/prompts.md).
LESION_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("oval", "round", "irregular"),
    "orientation": ("parallel", "not_parallel"),
    "margin": ("circumscribed", "microlobulated", "indistinct", "spiculated"),
    "echo": ("anechoic", "hypoechoic", "heterogeneous"),
    "posterior": ("enhancement", "none", "shadowing"),
    "halo": ("absent", "present"),
}
ATTRIBUTE_KEYS = ("diagnosis", *LESION_ATTRIBUTES)

# Words per value; one is picked per caption, so a value has several surface forms.
_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {"oval": ("oval",), "round": ("round",), "irregular": ("irregular", "irregularly shaped")},
    "orientation": {
        "parallel": ("parallel", "wider-than-tall"),
        "not_parallel": ("not parallel", "taller-than-wide"),
    },
    "margin": {
        "circumscribed": ("circumscribed", "well-defined", "smooth circumscribed"),
        "microlobulated": ("microlobulated",),
        "indistinct": ("indistinct", "ill-defined"),
        "spiculated": ("spiculated",),
    },
    "echo": {
        "anechoic": ("anechoic",),
        "hypoechoic": ("hypoechoic", "homogeneous hypoechoic"),
        "heterogeneous": ("heterogeneous", "heterogeneous hypoechoic"),
    },
    "posterior": {
        "enhancement": ("posterior acoustic enhancement",),
        "none": ("no posterior acoustic features",),
        "shadowing": ("posterior acoustic shadowing",),
    },
    "halo": {"present": ("an echogenic halo",), "absent": ()},
    "diagnosis": {
        "benign": ("benign",),
        "malignant": ("malignant", "suspicious"),
    },
}
_LESION_NOUNS = ("mass", "lesion", "nodule")
_NORMAL_SENTENCES = (
    "This is a normal breast ultrasound image with homogeneous fibroglandular tissue and no focal mass.",
    "Normal breast ultrasound: skin, subcutaneous fat, fibroglandular tissue and pectoral muscle, no mass.",
    "A B-mode ultrasound scan of a healthy breast without a lesion.",
    "Unremarkable breast ultrasound with no architectural distortion and no focal lesion.",
    "Breast ultrasound showing normal breast tissue with hypoechoic fat lobules and Cooper's ligaments; no mass.",
)


def format_attributes(attributes: dict[str, str]) -> str:
    """``{'shape': 'oval', ...}`` -> the manifest cell ``shape=oval;...`` (keys in a fixed order)."""
    keys = [k for k in ATTRIBUTE_KEYS if k in attributes] + sorted(set(attributes) - set(ATTRIBUTE_KEYS))
    return ";".join(f"{k}={attributes[k]}" for k in keys)


def parse_attributes(cell: str, where: str = "attributes") -> dict[str, str]:
    """The manifest cell back to a dict; an empty cell gives ``{}``."""
    out: dict[str, str] = {}
    for item in (cell or "").split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsadError(f"{where}: attribute {item!r} is not key=value (e.g. shape=oval;margin=spiculated)")
        out[key.strip()] = value.strip()
    return out


def normal_attributes() -> dict[str, str]:
    return {"diagnosis": "normal", **{k: NONE for k in LESION_ATTRIBUTES}}


def attribute_similarity_matrix(rows: list[dict[str, str]]) -> np.ndarray:
    """(B, B) target similarity: the share of attribute dimensions two images agree on.

    As Ultrasound-CLIP's ``SimilarityMatrixProcessor``: the mean over every dimension (here: every
    key present in the batch) of a per-dimension tag similarity, where a dimension missing from
    either image counts 0, and a unit diagonal. With categorical tags the per-dimension similarity
    is 1 for equal tags and 0 otherwise (the release loads graded tag-similarity matrices mined from
    US-365K, which a user's own taxonomy does not have).
    """
    keys = sorted({k for row in rows for k in row})
    n = len(rows)
    agree = np.zeros((n, n))
    for key in keys:
        values = [row.get(key) for row in rows]
        codes = {v: i for i, v in enumerate(sorted({v for v in values if v is not None}))}
        code = np.array([codes.get(v, -1) for v in values])
        present = code >= 0
        agree += present[:, None] & present[None, :] & (code[:, None] == code[None, :])
    similarity = agree / max(len(keys), 1)
    np.fill_diagonal(similarity, 1.0)
    return similarity.astype(np.float32)


def build_caption(attributes: dict[str, str], label: str, rng: np.random.Generator) -> str:
    """One report-like sentence for an image; different ``rng`` draws give different wordings.

    About a third of the captions reuse the methods' own prompt vocabulary (the built-in
    ``breast_ultrasound`` prompt file: class prompts, state prompts, lesion-aware descriptions),
    so a pretrained model knows the words zero-shot CLIP and UltraAD will ask it about.
    """
    if rng.uniform() < 0.35:
        return _prompt_file_sentence(label, rng)
    if attributes.get("diagnosis", label) == "normal" or all(
        attributes.get(k, NONE) == NONE for k in LESION_ATTRIBUTES
    ):
        return str(rng.choice(_NORMAL_SENTENCES))
    return _lesion_sentence(attributes, label, rng)


def _lesion_sentence(attributes: dict[str, str], label: str, rng: np.random.Generator) -> str:
    words = {k: _pick(k, attributes.get(k), rng) for k in ATTRIBUTE_KEYS}
    adjectives = [words[k] for k in ("shape", "margin", "orientation") if words[k] and rng.uniform() < 0.85]
    rng.shuffle(adjectives)
    if words["echo"]:
        adjectives.append(words["echo"])  # the echo word sits next to the noun, as radiologists write it
    noun = str(rng.choice(_LESION_NOUNS))
    extras = [words[k] for k in ("posterior", "halo") if words[k] and rng.uniform() < 0.85]
    described = ", ".join([*adjectives, noun]).rsplit(", ", 1)  # no comma between the last adjective and the noun
    described = " ".join(described)
    mass = f"{'an' if described[0] in 'aeiou' else 'a'} {described}"
    with_extras = f"{mass} with {' and '.join(extras)}" if extras else mass
    diagnosis = words["diagnosis"] if rng.uniform() < 0.8 else None
    templates = (
        "This is a {dx}breast ultrasound image with {m}.",
        "Breast ultrasound showing {m}{dx_tail}.",
        "A B-mode ultrasound scan of the breast: {m}{dx_tail}.",
        "An ultrasound image of a breast with {m}{dx_tail}.",
    )
    template = str(rng.choice(templates))
    return template.format(
        m=with_extras,
        dx=f"{diagnosis} " if diagnosis else "",
        dx_tail=f", {diagnosis}-appearing" if diagnosis else "",
    )


def _pick(key: str, value: str | None, rng: np.random.Generator) -> str | None:
    options = _PHRASES.get(key, {}).get(value or "", ())
    if value and value != NONE and key not in _PHRASES:  # a user's own attribute: its value is its word
        return value.replace("_", " ")
    return str(rng.choice(options)) if options else None


def _prompt_file_sentence(label: str, rng: np.random.Generator) -> str:
    prompts = _breast_prompts()
    state = "normal" if label == "normal" else "abnormal"
    pools = [prompts.state_prompts(state)]
    if label in prompts.class_names:
        pools.append(prompts.class_prompts(label))
        pools.append(prompts.describe(label, "default"))
    pool = pools[int(rng.integers(len(pools)))]
    return str(pool[int(rng.integers(len(pool)))])


@functools.lru_cache(maxsize=1)
def _breast_prompts():
    from usad_bench.prompts import load_prompts

    return load_prompts("breast_ultrasound")
