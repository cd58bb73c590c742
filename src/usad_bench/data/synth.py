"""Synthetic breast-ultrasound-like images with lesion masks, for tests, CI smoke runs and the demo.

The generator imitates how a B-mode image is formed, because that is what makes the domain knobs
meaningful and the lesions look like lesions rather than drawn shapes:

* **Tissue echogenicity** (mean backscatter): horizontal layers for skin (bright), subcutaneous fat
  (dark), fibroglandular tissue (bright, patchy) and pectoral muscle (striated), with wavy
  boundaries. Every image, normal ones included, has hypo-echoic fat lobules and bright Cooper's
  ligaments, so "there is a dark blob" is not on its own enough to call an image abnormal.
* **Speckle** is multiplicative: it is the interference of echoes from sub-resolution scatterers,
  so its amplitude scales with the local backscatter. A dark lesion keeps speckle texture but at a
  lower level, exactly as in a real scan (additive noise would fill lesions in with grey). It is
  modelled as a complex Gaussian scatterer field blurred by the point-spread function, whose
  magnitude is Rayleigh distributed.
* **Depth attenuation**, scanner gain, then **log compression** to a display dynamic range and a
  little additive electronic noise.

Lesions are rendered from BI-RADS descriptors (shape, orientation, margin, echo pattern,
posterior features, halo) drawn per patient from class-conditional priors
(:data:`ATTRIBUTE_PRIORS`): benign (fibroadenoma-like) lesions are mostly oval, parallel,
circumscribed, with posterior enhancement; malignant (carcinoma-like) ones mostly irregular, not
parallel, spiculated or indistinct, heterogeneous, with shadowing and an echogenic halo -- but not
always, as in real series. The descriptors are written to the manifest's ``attributes`` column
(see :mod:`usad_bench.captions`), from which ``usad-bench pretrain`` builds captions.

The mask is the lesion only (not halo or shadow). A patient's images share anatomy and the lesion's
shape (two views of one lesion); speckle and the view (position, scale, tilt) change per image.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from usad_bench.captions import LESION_ATTRIBUTES, format_attributes, normal_attributes
from usad_bench.data.manifest import CLASS_ORDER, COLUMNS, NORMAL, Sample, write_manifest
from usad_bench.errors import UsadError
from usad_bench.io import atomic_path, write_text

DATASET = "synth"
ATTRIBUTES_COLUMN = "attributes"  # extra manifest column: the lesion's descriptors, see usad_bench.captions


@dataclass(frozen=True)
class DomainStyle:
    """How a (fictitious) scanner renders tissue: the knob that makes a domain shift."""

    name: str  # the manifest's domain column; ids are "synth-<name>/<NNNN>"
    gain: float = 1.0  # overall echo brightness multiplier (scanner gain, applied before log compression)
    speckle: float = 4.0  # speckle grain size in pixels: larger = coarser, i.e. a different transducer
    attenuation: float = 0.6  # depth attenuation strength (nepers over the image depth): deeper rows darker
    noise: float = 0.02  # additive electronic noise, standard deviation on the [0, 1] grey scale
    dynamic_range: float = 45.0  # dB shown between black and white: smaller = harsher contrast
    haze: float = 0.0  # grey veil added near the skin (reverberation / near-field clutter), 0..1


# The target differs in every knob (brighter, coarser grain, stronger attenuation, noisier, harsher,
# hazy near field) but keeps lesions recognisable: lesions are 10-18 dB below their surroundings.
DOMAINS: dict[str, DomainStyle] = {
    "source": DomainStyle("source", gain=1.0, speckle=4.0, attenuation=0.6, noise=0.02, dynamic_range=45.0),
    "target": DomainStyle("target", gain=2.0, speckle=7.0, attenuation=1.5, noise=0.05, dynamic_range=38.0, haze=0.12),
}


@dataclass
class _Lesion:
    """Lesion geometry in pixels plus its echo properties; drawn per patient, jittered per view."""

    cx: float
    cy: float
    a: float  # lateral semi-axis
    b: float  # axial (depth) semi-axis
    tilt: float  # radians
    harmonics: np.ndarray  # (k, amplitude, phase) rows: margin lobulation / irregularity
    spikes: np.ndarray  # (angle, half-width, length) rows: spiculations, empty for benign
    darkness: float  # echogenicity inside relative to surrounding tissue
    heterogeneity: float  # internal echo variation
    posterior: float  # > 0 enhancement, < 0 shadowing (fraction of brightness)
    halo: float  # echogenic rim strength
    blur: float = 1.0  # edge width multiplier: > 1 for an indistinct margin


def get_style(style: DomainStyle | str) -> DomainStyle:
    if isinstance(style, DomainStyle):
        return style
    if style not in DOMAINS:
        raise UsadError(f"unknown synthetic domain {style!r}; known: {', '.join(DOMAINS)} (or pass a DomainStyle)")
    return DOMAINS[style]


def synthesise(
    out: Path,
    n: int,
    seed: int = 0,
    style: DomainStyle | str = "source",
    size: int = 128,
    class_fractions: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
    images_per_patient: int = 2,
) -> Path:
    """Write ``n`` synthetic images, masks and ``manifest.csv`` under ``out``; return the manifest path.

    ``class_fractions`` are the shares of normal, benign and malignant images. Output is
    byte-identical for the same arguments. Anatomy is seeded by (seed, domain name), so source and
    target synthesised with one seed still hold different patients. The manifest has an extra
    ``attributes`` column: each lesion's BI-RADS descriptors (see :mod:`usad_bench.captions`).

    Crash safety: an existing ``out/manifest.csv`` is removed first, every PNG is written
    atomically, and the new manifest is written (atomically) last, so a killed run leaves either
    no manifest or one whose files all exist and match it.
    """
    style = get_style(style)
    return _write_domain(Path(out), n, seed, style.name, lambda rng: style, size, class_fractions, images_per_patient)


# Scanner styles of the pretraining corpus. The demo's and the tests' "target" preset lies outside
# this range in every knob (gain 2.0, grain 7 px, attenuation 1.5, noise 0.05, 38 dB, haze 0.12), so
# a model pretrained here still crosses a domain gap there; "source" lies inside.
PRETRAIN_STYLE_RANGE: dict[str, tuple[float, float]] = {
    "gain": (0.6, 1.5),
    "speckle": (2.5, 5.5),
    "attenuation": (0.2, 1.1),
    "noise": (0.005, 0.035),
    "dynamic_range": (42.0, 60.0),
    "haze": (0.0, 0.06),
}


def random_style(rng: np.random.Generator, name: str = "pretrain") -> DomainStyle:
    """A scanner style drawn uniformly from :data:`PRETRAIN_STYLE_RANGE`."""
    return DomainStyle(name, **{k: float(rng.uniform(lo, hi)) for k, (lo, hi) in PRETRAIN_STYLE_RANGE.items()})


def synthesise_pretraining(
    out: Path, n: int, seed: int = 0, size: int = 128, images_per_patient: int = 2, name: str = "pretrain"
) -> Path:
    """Like :func:`synthesise`, but every image gets its own scanner style from :func:`random_style`.

    This is the captioned corpus ``usad-bench pretrain`` learns from: many scanners, one domain name.
    """
    fractions = (1 / 3, 1 / 3, 1 / 3)
    return _write_domain(Path(out), n, seed, name, random_style, size, fractions, images_per_patient)


def _write_domain(
    out: Path,
    n: int,
    seed: int,
    name: str,
    style_for,
    size: int,
    class_fractions: Sequence[float],
    images_per_patient: int,
) -> Path:
    """Render and write one synthetic domain; ``style_for(rng)`` gives each image's scanner style."""
    _check_args(n, seed, size, class_fractions, images_per_patient)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "manifest.csv").unlink(missing_ok=True)
    domain_key = zlib.crc32(name.encode("utf-8"))
    plan = _plan(n, class_fractions, images_per_patient, np.random.default_rng([seed, domain_key]))
    width = max(4, len(str(n - 1)))
    samples, attributes = [], []
    for index, (label, patient, view) in enumerate(plan):
        anatomy_rng = np.random.default_rng([seed, domain_key, patient, 0])
        view_rng = np.random.default_rng([seed, domain_key, patient, 1, view])
        lesion_attributes = draw_attributes(np.random.default_rng([seed, domain_key, patient, 2]), label)
        style = style_for(np.random.default_rng([seed, domain_key, patient, 3, view]))
        image, mask = render_image(label, style, size, anatomy_rng, view_rng, lesion_attributes)
        stem = f"{index:0{width}d}"
        image_path = out / "images" / f"{stem}.png"
        _save_png(image, image_path)
        masks: tuple[Path, ...] = ()
        if mask is not None:
            masks = (out / "masks" / f"{stem}.png",)
            _save_png(mask.astype(np.uint8) * 255, masks[0])
        samples.append(
            Sample(
                id=f"synth-{name}/{stem}",
                image=image_path,
                masks=masks,
                label=label,
                is_anomaly=label != NORMAL,
                group=f"synth-{name}:p{patient:03d}",
                domain=name,
                dataset=DATASET,
            )
        )
        attributes.append(format_attributes(lesion_attributes))
    return _write_manifest_with_attributes(samples, attributes, out / "manifest.csv")


def _write_manifest_with_attributes(samples: list[Sample], attributes: list[str], path: Path) -> Path:
    """The standard manifest plus an ``attributes`` column, written atomically."""
    plain = path.with_name(f".{path.name}.plain")
    write_manifest(samples, plain)  # the standard columns, exactly as every other manifest writes them
    with open(plain, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    plain.unlink()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, ATTRIBUTES_COLUMN], lineterminator="\n")
    writer.writeheader()
    for row, cell in zip(rows, attributes, strict=True):
        writer.writerow({**row, ATTRIBUTES_COLUMN: cell})
    write_text(path, buf.getvalue())
    return path


def render_image(
    label: str,
    style: DomainStyle,
    size: int,
    anatomy_rng: np.random.Generator,
    view_rng: np.random.Generator,
    attributes: dict[str, str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One (size, size) uint8 image and its boolean lesion mask (None for normal images).

    ``anatomy_rng`` must be seeded per patient (it draws what two views of a patient share) and
    ``view_rng`` per image. ``attributes`` are the lesion's descriptors (drawn from the class
    priors with ``anatomy_rng`` when not given).
    """
    if label not in CLASS_ORDER:
        raise UsadError(f"synthetic class must be one of {', '.join(CLASS_ORDER)}, got {label!r}")
    layers = anatomy_rng.uniform(size=6)
    lesion = None
    if label != NORMAL:
        lesion = _draw_lesion(anatomy_rng, attributes or draw_attributes(anatomy_rng, label), size)
    echo = _tissue(view_rng, size, layers)
    mask = None
    if lesion is not None:
        lesion = _jitter_view(view_rng, lesion, size)
        inside, rim, mask = _lesion_maps(lesion, size)
        texture = 1.0 + lesion.heterogeneity * _smooth_noise(view_rng, size, cells=12)
        echo *= 1.0 - (1.0 - lesion.darkness * np.clip(texture, 0.3, None)) * inside
        echo *= 1.0 + lesion.halo * rim
        echo *= _posterior(inside, lesion.posterior)
    return _render(echo, style, view_rng), mask


def _check_args(n: int, seed: int, size: int, class_fractions: Sequence[float], images_per_patient: int) -> None:
    if n < 1:
        raise UsadError(f"number of synthetic images must be >= 1, got {n}")
    if seed < 0:
        raise UsadError(f"seed must be >= 0, got {seed}")
    if size < 32:
        raise UsadError(f"synthetic image size must be >= 32 px, got {size}")
    if images_per_patient < 1:
        raise UsadError(f"images_per_patient must be >= 1, got {images_per_patient}")
    fractions = list(class_fractions)
    if len(fractions) != len(CLASS_ORDER) or min(fractions) < 0 or sum(fractions) <= 0:
        raise UsadError(
            f"class_fractions must be {len(CLASS_ORDER)} non-negative numbers "
            f"({', '.join(CLASS_ORDER)}) with a positive sum, got {fractions}"
        )


def _plan(
    n: int, class_fractions: Sequence[float], images_per_patient: int, rng: np.random.Generator
) -> list[tuple[str, int, int]]:
    """(class, patient, view) per image; a patient's images are consecutive and of one class."""
    shares = np.asarray(class_fractions, dtype=float) * n / float(sum(class_fractions))
    counts = np.floor(shares).astype(int)
    # Largest remainder, ties to the earlier class, so counts sum to n exactly.
    for c in sorted(range(len(counts)), key=lambda c: (-(shares[c] - counts[c]), c))[: n - counts.sum()]:
        counts[c] += 1
    patients = []  # (class, number of views)
    for label, count in zip(CLASS_ORDER, counts, strict=True):
        full, rest = divmod(int(count), images_per_patient)
        patients += [(label, images_per_patient)] * full + ([(label, rest)] if rest else [])
    # Interleave classes so that the first rows of a manifest are not all normal.
    order = rng.permutation(len(patients))
    return [(patients[i][0], p, view) for p, i in enumerate(order) for view in range(patients[i][1])]


def _tissue(rng: np.random.Generator, size: int, layers: np.ndarray) -> np.ndarray:
    """Echogenicity (mean backscatter, glandular tissue ~ 1) of breast tissue without lesion."""
    v, u = _grid(size)  # depth, lateral position in [0, 1)
    jitter = rng.uniform(-0.015, 0.015, size=3)
    wave = [0.02 * np.sin(2 * np.pi * (0.6 + layers[i]) * u[0] + 6.3 * layers[i + 3]) for i in range(3)]
    skin = 0.035 + 0.015 * layers[0] + jitter[0] + wave[0] * 0.3
    fat = 0.16 + 0.10 * layers[1] + jitter[1] + wave[1]  # bottom of subcutaneous fat
    gland = 0.74 + 0.08 * layers[2] + jitter[2] + wave[2]  # bottom of fibroglandular tissue
    echo = np.where(v < skin, 4.0, np.where(v < fat, 0.3, np.where(v < gland, 1.0, 0.45)))
    patchy = 1.0 + 0.35 * _smooth_noise(rng, size, cells=10)
    echo = np.where((v >= fat) & (v < gland), echo * patchy, echo)
    # Pectoral muscle: fine oblique striations below the gland.
    stria = 1.0 + 0.35 * np.sin(2 * np.pi * (v * 28 + u * 3 * (layers[3] - 0.5)))
    echo = np.where(v >= gland + 0.04, echo * stria, echo)
    echo = _add_lobules(rng, echo, u, v, skin, fat)
    echo = _add_ligaments(rng, echo, u, v, gland, size)
    return gaussian_filter(echo, 0.6)  # tissue boundaries are not pixel-sharp


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:size, 0:size] / size
    v.flags.writeable = u.flags.writeable = False  # shared by every caller through the cache
    return v, u


def _add_lobules(
    rng: np.random.Generator, echo: np.ndarray, u: np.ndarray, v: np.ndarray, skin: np.ndarray, fat: np.ndarray
) -> np.ndarray:
    """Hypo-echoic fat lobules: small, oval, wider-than-tall, in the subcutaneous fat.

    They look like tiny benign lesions on purpose: a model must learn size, depth and contrast,
    not just "dark oval = lesion".
    """
    depth_top, depth_bottom = float(np.mean(skin)), float(np.mean(fat))
    for _ in range(int(rng.integers(2, 5))):
        cu = rng.uniform(0.05, 0.95)
        cv = rng.uniform(depth_top + 0.02, max(depth_top + 0.03, depth_bottom - 0.02))
        a, b = rng.uniform(0.04, 0.09), rng.uniform(0.02, 0.035)
        blob = ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 < 1.0
        echo = np.where(blob, echo * rng.uniform(0.55, 0.75), echo)
    return echo


def _add_ligaments(
    rng: np.random.Generator, echo: np.ndarray, u: np.ndarray, v: np.ndarray, gland: np.ndarray, size: int
) -> np.ndarray:
    """Cooper's ligaments: thin bright oblique curves crossing fat and gland."""
    for _ in range(int(rng.integers(1, 4))):
        v0, slope, bend = rng.uniform(0.15, 0.5), rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.3)
        curve = v0 + slope * (u - 0.5) + bend * (u - 0.5) ** 2
        line = np.exp(-(((v - curve) * size / 0.8) ** 2))
        echo = echo * (1.0 + 1.2 * line * (v < gland))
    return echo


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean smooth noise (std ~0.5, clipped to [-1, 1]) with about ``cells`` blobs across the image."""
    up = _upsampler(size, cells)
    field = up @ rng.standard_normal((cells, cells)) @ up.T  # two small matmuls: much faster than zoom
    return np.clip(field, -1.0, 1.0)


@functools.lru_cache(maxsize=16)
def _upsampler(size: int, cells: int) -> np.ndarray:
    """(size, cells) Gaussian interpolation weights, rows scaled so the output has std 0.5."""
    centres = (np.arange(size) + 0.5) * cells / size - 0.5
    weights = np.exp(-0.5 * ((centres[:, None] - np.arange(cells)[None, :]) / 0.7) ** 2)
    weights /= np.sqrt((weights**2).sum(axis=1, keepdims=True))
    weights.flags.writeable = False  # shared by every caller through the cache
    return weights * 0.5  # std 0.5: clipping at +-1 touches only the tails


# P(attribute value | class): informative but not deterministic, as in real series (BI-RADS positive
# predictive values): some fibroadenomas shadow or look irregular, some carcinomas look circumscribed.
ATTRIBUTE_PRIORS: dict[str, dict[str, dict[str, float]]] = {
    "benign": {
        "shape": {"oval": 0.7, "round": 0.18, "irregular": 0.12},
        "orientation": {"parallel": 0.85, "not_parallel": 0.15},
        "margin": {"circumscribed": 0.72, "microlobulated": 0.1, "indistinct": 0.12, "spiculated": 0.06},
        "echo": {"anechoic": 0.3, "hypoechoic": 0.55, "heterogeneous": 0.15},
        "posterior": {"enhancement": 0.55, "none": 0.3, "shadowing": 0.15},
        "halo": {"absent": 0.9, "present": 0.1},
    },
    "malignant": {
        "shape": {"oval": 0.15, "round": 0.08, "irregular": 0.77},
        "orientation": {"parallel": 0.3, "not_parallel": 0.7},
        "margin": {"circumscribed": 0.12, "microlobulated": 0.2, "indistinct": 0.23, "spiculated": 0.45},
        "echo": {"anechoic": 0.04, "hypoechoic": 0.4, "heterogeneous": 0.56},
        "posterior": {"enhancement": 0.08, "none": 0.3, "shadowing": 0.62},
        "halo": {"absent": 0.45, "present": 0.55},
    },
}


def draw_attributes(rng: np.random.Generator, label: str) -> dict[str, str]:
    """The BI-RADS descriptors of one patient's lesion (``diagnosis=normal`` and ``none`` for normal)."""
    if label == NORMAL:
        return normal_attributes()
    priors = ATTRIBUTE_PRIORS["benign" if label == "benign" else "malignant"]
    drawn = {"diagnosis": label}
    for key in LESION_ATTRIBUTES:
        values = list(priors[key])
        drawn[key] = values[int(rng.choice(len(values), p=np.asarray([priors[key][v] for v in values])))]
    return drawn


def _draw_lesion(rng: np.random.Generator, attributes: dict[str, str], size: int) -> _Lesion:
    """Geometry and echo properties of one patient's lesion, rendered from its descriptors."""
    long_axis = rng.uniform(0.1, 0.2) * size
    shape = attributes["shape"]
    aspect = {"round": rng.uniform(1.0, 1.12), "oval": rng.uniform(1.35, 2.0)}.get(shape, rng.uniform(1.2, 1.8))
    if attributes["orientation"] == "parallel":  # wider than tall
        a, b = long_axis, long_axis / aspect
    else:
        a, b = long_axis / aspect, long_axis
    if shape == "irregular":  # angular, lobulated outline
        ks = np.arange(3, 9)
        harmonics = np.stack([ks, rng.uniform(0.04, 0.11, ks.size), rng.uniform(0, 2 * np.pi, ks.size)], axis=1)
    else:  # gently undulating at most
        ks = rng.choice([2, 3], size=2, replace=False)
        harmonics = np.stack([ks, rng.uniform(0.0, 0.05, 2), rng.uniform(0, 2 * np.pi, 2)], axis=1)
    margin = attributes["margin"]
    if margin == "microlobulated":  # many small undulations
        ks = rng.choice(np.arange(10, 17), size=3, replace=False)
        harmonics = np.concatenate([harmonics, np.stack([ks, rng.uniform(0.03, 0.05, 3), rng.uniform(0, 6.28, 3)], 1)])
    spikes = np.zeros((0, 3))
    if margin == "spiculated":
        n_spikes = int(rng.integers(5, 11))
        spikes = np.stack(
            [rng.uniform(0, 2 * np.pi, n_spikes), rng.uniform(0.05, 0.12, n_spikes), rng.uniform(0.2, 0.55, n_spikes)],
            axis=1,
        )
    echo = {
        "anechoic": (rng.uniform(0.04, 0.1), 0.03),
        "hypoechoic": (rng.uniform(0.12, 0.25), 0.05),
        "heterogeneous": (rng.uniform(0.15, 0.3), 0.35),
    }[attributes["echo"]]
    posterior = {"enhancement": rng.uniform(0.15, 0.45), "none": 0.0, "shadowing": -rng.uniform(0.5, 0.75)}[
        attributes["posterior"]
    ]
    halo = rng.uniform(0.15, 0.35) if attributes["halo"] == "present" else 0.0
    blur = rng.uniform(2.5, 4.0) if margin == "indistinct" else 1.0
    tilt = rng.uniform(-0.2, 0.2)
    extent = _extent(a, b, harmonics, spikes) * 1.1 + 0.03 * size + 1  # room for _jitter_view
    cx = rng.uniform(extent + 2, size - extent - 2) if size - 2 * extent > 4 else size / 2
    low, high = max(0.2 * size, 0.1 * size + extent), min(0.62 * size, 0.84 * size - extent)
    cy = rng.uniform(low, high) if high > low else (low + high) / 2
    return _Lesion(cx, cy, a, b, tilt, harmonics, spikes, echo[0], echo[1], posterior, halo, blur)


def _jitter_view(rng: np.random.Generator, lesion: _Lesion, size: int) -> _Lesion:
    """The same lesion seen in another image: shifted, rescaled and tilted a little."""
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.03, 0.03, size=2) * size
    return _Lesion(
        **{
            **lesion.__dict__,
            "cx": lesion.cx + shift[0],
            "cy": lesion.cy + shift[1],
            "a": lesion.a * scale,
            "b": lesion.b * scale,
            "tilt": lesion.tilt + rng.uniform(-0.08, 0.08),
        }
    )


def _lesion_maps(lesion: _Lesion, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft inside (0..1), echogenic rim (0..1) and hard mask of a lesion, full-image arrays."""
    inside, rim = np.zeros((size, size)), np.zeros((size, size))
    reach = _extent(lesion.a, lesion.b, lesion.harmonics, lesion.spikes) + 6.0  # + the rim
    rows = slice(max(0, int(lesion.cy - reach)), min(size, int(lesion.cy + reach) + 2))
    cols = slice(max(0, int(lesion.cx - reach)), min(size, int(lesion.cx + reach) + 2))
    y, x = np.mgrid[rows, cols].astype(float)  # only the lesion's bounding box: 4-10x less work
    dx, dy = x - lesion.cx, y - lesion.cy
    cos, sin = math.cos(lesion.tilt), math.sin(lesion.tilt)
    xr, yr = (dx * cos + dy * sin) / lesion.a, (-dx * sin + dy * cos) / lesion.b
    rho, theta = np.hypot(xr, yr), np.arctan2(yr, xr)
    radius = np.ones_like(rho)
    for k, amplitude, phase in lesion.harmonics:
        radius += amplitude * np.cos(k * theta + phase)
    for angle, half_width, length in lesion.spikes:
        gap = np.abs((theta - angle + np.pi) % (2 * np.pi) - np.pi)  # angular distance in [0, pi]
        radius += length * np.clip(1.0 - gap / half_width, 0.0, None)  # triangular: a sharp spicule
    # Edge width in units of the normalised radius: about one pixel for either shape.
    edge = lesion.blur / min(lesion.a, lesion.b)
    inside[rows, cols] = 1.0 / (1.0 + np.exp(np.clip((rho - radius) / (0.5 * edge), -30, 30)))
    rim[rows, cols] = np.exp(-(((rho - radius - 2.5 * edge) / (1.5 * edge)) ** 2)) * (rho > radius)
    return inside, rim, inside > 0.5


def _extent(a: float, b: float, harmonics: np.ndarray, spikes: np.ndarray) -> float:
    """Upper bound on the lesion's radius in pixels."""
    return max(a, b) * (1.0 + np.abs(harmonics[:, 1]).sum() + (spikes[:, 2].max() if len(spikes) else 0.0))


def _posterior(inside: np.ndarray, strength: float) -> np.ndarray:
    """Brightness factor behind the lesion: shadowing (< 1) or enhancement (> 1).

    Sound crossing the lesion is attenuated more (carcinoma) or less (fluid-rich fibroadenoma)
    than through tissue, so every pixel inherits the effect of the lesion thickness above it: a
    column-wise cumulative sum, full strength below the thickest column, tapering to the sides.
    """
    if strength == 0.0:
        return np.ones_like(inside)
    thickness = np.cumsum(inside, axis=0)
    full = thickness / max(thickness[-1].max(), 1.0)
    return gaussian_filter(1.0 + strength * full, sigma=(1.0, 1.5))


def _speckle(rng: np.random.Generator, size: int, grain: float) -> np.ndarray:
    """Rayleigh-distributed speckle with mean 1 and cells about ``grain`` px wide (half as tall)."""
    # A Gaussian PSF of std s gives speckle cells ~3.3 s wide; axial resolution is twice the lateral.
    sigma = (max(grain, 1.0) / 6.6, max(grain, 1.0) / 3.3)
    field = rng.standard_normal((2, size, size))
    re, im = gaussian_filter(field[0], sigma), gaussian_filter(field[1], sigma)
    magnitude = np.hypot(re, im)
    return magnitude / magnitude.mean()


def _render(echo: np.ndarray, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Echogenicity -> speckled, attenuated, log-compressed 8-bit B-mode image."""
    size = echo.shape[0]
    depth = (np.arange(size) / size)[:, None]
    gain = style.gain * rng.uniform(0.9, 1.1)  # the sonographer's gain knob varies a little per image
    envelope = echo * _speckle(rng, size, style.speckle) * gain * np.exp(-style.attenuation * depth)
    db = 20.0 * np.log10(np.maximum(envelope, 1e-6))
    grey = 1.0 + (db - 20.0) / style.dynamic_range  # +20 dB over glandular tissue is white
    grey += style.haze * np.exp(-depth / 0.2)
    grey += style.noise * rng.standard_normal(echo.shape)
    return np.round(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
