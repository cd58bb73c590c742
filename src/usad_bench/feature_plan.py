"""Before a sweep: tell the feature cache every raw block its runs will ask of each backbone.

Raw features are cached one entry per image holding every block encoded so far (``usad_bench.cache``).
A miss encodes the blocks of the cache's *layer plan*; if the plan already names every block the
grid needs, the first run's pass over the test images serves all later methods. Without this, a grid
whose first method asks for fewer blocks (``table1``: zero-shot CLIP's last block, then UltraAD's
four) pays a second pass over every test image (~0.6 s per image at ViT-B-16 on one CPU thread).

Each distinct (method, options, backbone) of the unfinished runs is built once, as a fit builds it,
only to read its ``feature_request()``; prompt embeddings are memoised by the backbone, so the runs
in this process do not encode them again. A method that cannot be built is skipped here: its run
reports the error itself.
"""

from __future__ import annotations

import logging

from usad_bench.backbone import Backbone
from usad_bench.cache import FeatureCache
from usad_bench.data.manifest import order_classes, read_manifest
from usad_bench.errors import UsadError
from usad_bench.feature_kinds import RAW
from usad_bench.features import FeatureExtractor
from usad_bench.methods import get_method

log = logging.getLogger(__name__)


def plan_raw_layers(fit_options: list, device) -> None:
    """Record the raw blocks of every distinct run configuration in ``fit_options``."""
    from usad_bench.runner import build_method  # runner imports the sweep machinery; import late

    backbones: dict = {}
    done = set()
    for opts in fit_options:
        if opts.cache_dir is None:
            continue
        spec = opts.backbone.with_default_activation(get_method(opts.method).activation)
        config = (opts.method, repr(sorted(opts.overrides.items())), repr(spec), str(opts.cache_dir))
        if config in done:
            continue
        done.add(config)
        try:
            if spec not in backbones:
                backbones[spec] = Backbone.load(spec, device)
            classes = opts.classes or order_classes(s.label for s in read_manifest(opts.train).samples)
            method = build_method(opts.method, opts.overrides, backbones[spec], classes, opts.shots, [])
            request = method.feature_request()
        except (UsadError, OSError, ValueError, RuntimeError, KeyError) as exc:
            log.info("feature plan: skipped %s (%s); its run reports it", opts.method, exc)
            continue
        if request.kind == RAW and request.layers:
            FeatureExtractor(backbones[spec], FeatureCache(opts.cache_dir), request)  # records its blocks
