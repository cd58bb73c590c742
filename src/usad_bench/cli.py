"""The ``usad-bench`` command line (the contract is in README.md, "Command line").

Each sub-command is a thin parser over a library function; heavy imports happen inside the
handlers so ``usad-bench --help`` stays fast. Every :class:`UsadError` is printed as one line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from usad_bench.errors import UsadError

CONVERTER_KINDS = ("busi", "bus_uclm", "bus_bra", "folder")
TABLES = ("table1", "table_cls", "table2", "ablation")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    _quiet_libraries(args.verbose)
    try:
        return args.handler(args) or 0
    except UsadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, re-run the same command to resume", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usad-bench",
        description="Few-shot CLIP adaptation for ultrasound anomaly analysis: UltraAD and baselines.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list registered methods")
    p.set_defaults(handler=cmd_methods)

    _add_data_commands(sub)

    _add_run_commands(sub)

    p = sub.add_parser("sweep", help="run an experiment grid (resumable, shardable)")
    p.add_argument("experiment", type=Path)
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th grid point starting at i (0-based)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    _add_runtime_args(p)
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("table", help="paper-style tables (mean ± std over seeds) from run directories")
    p.add_argument("results", type=Path)
    p.add_argument("--which", choices=TABLES, required=True)
    p.add_argument("--out", type=Path, help="folder for .md/.csv/.tex (default: print only)")
    p.set_defaults(handler=cmd_table)

    p = sub.add_parser("demo", help="synthetic source -> shifted target: adapt, evaluate, draw heat maps")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--method", default="linear_adapter")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--n", type=int, default=60, help="synthetic images per domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _add_backbone_args(p, name="usad-tiny", pretrained="none")
    _add_runtime_args(p)
    p.set_defaults(handler=cmd_demo)
    return parser


def _add_run_commands(sub) -> None:
    """fit, eval and predict: the life cycle of one run directory."""
    p = sub.add_parser("fit", help="adapt a method on k shots per class")
    p.add_argument("--method", required=True)
    p.add_argument("--train", required=True, type=Path, help="manifest of the adaptation domain")
    p.add_argument("--shots", required=True, type=int, help="support images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", help="comma-separated classes to use (default: all in the manifest)")
    p.add_argument("--config", type=Path, help="YAML of method options (e.g. baselines/<method>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one method option")
    p.add_argument("--out", required=True, type=Path, help="run directory to create")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (offline without a key)")
    _add_backbone_args(p)
    _add_runtime_args(p)
    p.set_defaults(handler=cmd_fit)

    p = sub.add_parser("eval", help="evaluate a fitted run on test manifests -> metrics.json")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--test", required=True, action="append", help="[NAME=]MANIFEST; repeat for several")
    p.add_argument("--out", type=Path, help="where metrics.json goes (default: the run directory)")
    _add_runtime_args(p)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("predict", help="score new images: scores.csv + heat-map overlays")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-overlays", action="store_true")
    _add_runtime_args(p)
    p.set_defaults(handler=cmd_predict)


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="prepare, synthesise and summarise manifests").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("prepare", help="convert a release (or a class-folder tree) to OUT/manifest.csv")
    p.add_argument("kind", choices=CONVERTER_KINDS)
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(handler=cmd_data_prepare)

    p = data.add_parser("synth", help="synthetic ultrasound-like images with lesion masks")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--domain", default="source", help="style preset: source or target")
    p.add_argument("--gain", type=float, help="override: echo brightness multiplier")
    p.add_argument("--speckle", type=float, help="override: speckle grain size (px)")
    p.add_argument("--attenuation", type=float, help="override: depth attenuation strength")
    p.set_defaults(handler=cmd_data_synth)

    p = data.add_parser("summary", help="counts per class, domain, patient and mask")
    p.add_argument("manifest", type=Path)
    p.set_defaults(handler=cmd_data_summary)


def _add_backbone_args(p, name: str = "ViT-L-14-336", pretrained: str = "openai") -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=name, help=f"open_clip model or hf-hub:<id> (default {name})")
    g.add_argument("--pretrained", default=pretrained, help="tag, checkpoint file, or 'none' for random weights")
    g.add_argument("--image-size", type=int, help="input size override")
    g.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))


def _add_runtime_args(p) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--cache-dir", type=Path, default=Path(".usad_cache"), help="feature cache folder")
    g.add_argument("--no-cache", action="store_true", help="compute features without reading or writing the cache")


def _quiet_libraries(verbose: bool) -> None:
    """Keep the console to our own messages unless -v: Lightning's banners and known-benign warnings."""
    import warnings

    import lightning  # noqa: F401  (imported first: at import it resets its loggers to INFO)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_random_weights_notice)  # our own outputs label random weights already
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen backbone, by design
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def _drop_random_weights_notice(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


def _cache_dir(args) -> Path | None:
    return None if args.no_cache else args.cache_dir


def _backbone_spec(args):
    from usad_bench.backbone import BackboneSpec

    pretrained = None if str(args.pretrained).lower() in ("none", "random", "") else args.pretrained
    return BackboneSpec(name=args.backbone, pretrained=pretrained, image_size=args.image_size, precision=args.precision)


def parse_overrides(items: list[str], config: Path | None = None) -> dict:
    """Method options from a YAML file, then ``--set key=value`` pairs on top."""
    from usad_bench.io import read_yaml

    values: dict = {}
    if config is not None:
        if not config.is_file():
            raise UsadError(f"config file not found: {config}")
        values.update(read_yaml(config) or {})
    for item in items:
        if "=" not in item:
            raise UsadError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return values


# ----------------------------------------------------------------------------- handlers
def cmd_methods(args) -> None:
    from usad_bench.methods import get_method, list_methods

    for name in list_methods():
        cls = get_method(name)
        kind = "trained" if cls.trainable else "training-free"
        print(f"{name:20s} {kind:14s} outputs: {', '.join(cls.outputs)}")


def cmd_data_prepare(args) -> None:
    from usad_bench.data.converters import prepare
    from usad_bench.data.manifest import read_manifest
    from usad_bench.data.summary import summarise

    path = prepare(args.kind, args.src, args.out)
    print(f"wrote {path}")
    print(summarise(read_manifest(path)))


def cmd_data_synth(args) -> None:
    from dataclasses import replace

    from usad_bench.data.synth import DOMAINS, synthesise

    if args.domain not in DOMAINS:
        raise UsadError(f"unknown domain preset {args.domain!r}; known: {', '.join(DOMAINS)}")
    style = DOMAINS[args.domain]
    changes = {k: getattr(args, k) for k in ("gain", "speckle", "attenuation") if getattr(args, k) is not None}
    path = synthesise(args.out, n=args.n, seed=args.seed, style=replace(style, **changes), size=args.size)
    print(f"wrote {path}")


def cmd_data_summary(args) -> None:
    from usad_bench.data.manifest import read_manifest
    from usad_bench.data.summary import summarise

    print(summarise(read_manifest(args.manifest)))


def cmd_fit(args) -> None:
    from usad_bench.runner import FitOptions, fit

    opts = FitOptions(
        method=args.method,
        train=args.train,
        shots=args.shots,
        seed=args.seed,
        out=args.out,
        backbone=_backbone_spec(args),
        overrides=parse_overrides(args.set, args.config),
        classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        cache_dir=_cache_dir(args),
        device=args.device,
        wandb=args.wandb,
    )
    run = fit(opts)
    print(f"fitted {args.method} on {args.shots} shots/class (seed {args.seed}) -> {run}")


def cmd_eval(args) -> None:
    from usad_bench.runner import evaluate, parse_test_arg
    from usad_bench.tables import format_metrics

    tests = [parse_test_arg(t) for t in args.test]
    payload = evaluate(args.run, tests, args.out, args.device, _cache_dir(args))
    print(format_metrics(payload, [name for name, _ in tests]))
    print(f"wrote {(args.out or args.run) / 'metrics.json'}")


def cmd_predict(args) -> None:
    from usad_bench.runner import predict

    path = predict(args.run, args.images, args.out, args.device, _cache_dir(args), overlays=not args.no_overlays)
    print(f"wrote {path}")


def cmd_sweep(args) -> None:
    from usad_bench.sweep import run_sweep

    run_sweep(args.experiment, args.shard, device=args.device, cache_dir=_cache_dir(args), dry_run=args.dry_run)


def cmd_table(args) -> None:
    from usad_bench.tables import make_table

    print(make_table(args.results, args.which, args.out))


def cmd_demo(args) -> None:
    from usad_bench.demo import run_demo

    run_demo(
        out=args.out,
        method=args.method,
        shots=args.shots,
        n=args.n,
        seed=args.seed,
        backbone=_backbone_spec(args),
        overrides=parse_overrides(args.set),
        device=args.device,
        cache_dir=_cache_dir(args),
    )


if __name__ == "__main__":
    sys.exit(main())
