"""The ``usad-bench`` command line (the contract is in README.md, "Command line").

Each sub-command is a thin parser over a library function; heavy imports happen inside the
handlers so ``usad-bench --help`` stays fast. Every :class:`UsadError` is printed as one line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import usad_bench
from usad_bench.errors import Stopped, UsadError

CONVERTER_KINDS = ("busi", "bus_uclm", "bus_bra", "folder")
TABLES = ("table1", "table_cls", "table2", "ablation")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    previous = _raise_on_signals()  # first: importing torch and Lightning takes seconds, Ctrl-C may come then
    try:
        _quiet_libraries(args.verbose)
        return args.handler(args) or 0
    except UsadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0
    except (Stopped, KeyboardInterrupt) as exc:
        stop = exc if isinstance(exc, Stopped) else Stopped(signal.SIGINT)
        done = stop.done or "finished outputs are kept"
        name = signal.Signals(stop.signum).name
        print(f"stopped by {name}: {done}; re-run the same command to resume", file=sys.stderr)
        return stop.exit_code  # 130 for SIGINT, 143 for SIGTERM, as shells and schedulers expect
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_on_signals() -> dict:
    """SIGINT and SIGTERM raise :class:`Stopped`, so locks and temporary folders are cleaned up on the way out.

    Returns the previous handlers (restored when ``main`` returns; tests call it in-process).
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        raise Stopped(signum)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help, unless there is no default or the help names it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """Every (sub-)command's --help shows the defaults; sub-parsers inherit the class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="usad-bench",
        description="Few-shot CLIP adaptation for ultrasound anomaly analysis: UltraAD and baselines.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {usad_bench.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log usad_bench's progress (not the libraries')")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list registered methods")
    p.set_defaults(handler=cmd_methods)

    _add_data_commands(sub)

    _add_run_commands(sub)

    p = sub.add_parser("sweep", help="run an experiment grid (resumable, shardable)")
    p.add_argument("experiment", type=Path)
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th grid point starting at i (0-based)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    p.add_argument("--backbone", help="override the grid's backbone name (e.g. ViT-B-16 for a CPU)")
    p.add_argument("--pretrained", help="override the grid's weights (tag, checkpoint file, or none)")
    p.add_argument("--out", type=Path, help="override the grid's out folder (keep runs of other backbones apart)")
    p.add_argument(
        "--workers", type=int, default=1, help="run N grid points at once here, the CPU threads split between them"
    )
    p.add_argument(
        "--no-share-runs",
        dest="share_runs",
        action="store_false",
        help="always fit; by default an identical fitted run of a sibling grid (same method, options, backbone, "
        "source, shots, seed) is copied instead of refitted",
    )
    _add_wandb_arg(p)
    _add_launcher_args(p)
    _add_runtime_args(p)
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("table", help="paper-style tables (mean ± std over seeds) from run directories")
    p.add_argument("results", type=Path)
    p.add_argument("--which", choices=TABLES, required=True)
    p.add_argument("--out", type=Path, help="folder for .md/.csv/.tex (default: print only)")
    p.set_defaults(handler=cmd_table)

    _add_figure_command(sub)

    p = sub.add_parser("demo", help="synthetic source -> shifted target: adapt, evaluate, draw heat maps")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for data, run and overlays")
    p.add_argument("--method", default="linear_adapter", help="a registered method (`usad-bench methods`)")
    p.add_argument("--shots", type=int, default=4, help="support images per class")
    p.add_argument("--n", type=int, default=60, help="synthetic images per domain")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the support set and training")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one method option")
    _add_wandb_arg(p)
    _add_backbone_args(p, name="usad-tiny", pretrained="synth")  # synthetic-only pretrained tiny CLIP
    _add_runtime_args(p)
    p.set_defaults(handler=cmd_demo)

    _add_pretrain_command(sub)
    return parser


def _add_pretrain_command(sub) -> None:
    p = sub.add_parser("pretrain", help="Ultrasound-CLIP semantic-aware pretraining on captioned / attributed images")
    p.add_argument("--train", required=True, type=Path, help="manifest with a caption and/or attributes column")
    p.add_argument("--out", required=True, type=Path, help="folder for model.safetensors, pretrain.json, logs")
    p.add_argument("--backbone", default="usad-tiny", help="open_clip model name (default usad-tiny)")
    p.add_argument("--init", default="none", help="starting weights: tag or checkpoint file; 'none' = random")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--semantic-weight", type=float, default=1.0, help="weight of the MSE+KL semantic loss")
    p.add_argument("--no-augment", action="store_true", help="no flips / gain-contrast jitter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N rows (quick checks)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    p.add_argument("--devices", default="1", help="Lightning devices: a count, or a list like 0,1")
    p.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed, 16-mixed")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0 = torch default); fix it for bit-identical runs"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (offline without a key)")
    p.set_defaults(handler=cmd_pretrain)


def _add_run_commands(sub) -> None:
    """fit, eval and predict: the life cycle of one run directory."""
    p = sub.add_parser("fit", help="adapt a method on k shots per class")
    p.add_argument("--method", required=True, help="a registered method (`usad-bench methods`)")
    p.add_argument("--train", required=True, type=Path, help="manifest of the adaptation domain")
    p.add_argument("--shots", required=True, type=int, help="support images per class")
    p.add_argument("--seed", type=int, default=0, help="draws the support set and seeds training")
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
    _add_wandb_arg(p)
    _add_runtime_args(p)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("predict", help="score new images: scores.csv + heat-map overlays")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path, help="an image, or a folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-overlays", action="store_true", help="scores.csv only, no heat-map PNGs")
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
    _add_folder_options(p)
    p.set_defaults(handler=cmd_data_prepare)

    p = data.add_parser("synth", help="synthetic ultrasound-like images with lesion masks")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=90, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--size", type=int, default=128, help="image side (px)")
    p.add_argument("--domain", default="source", help="style preset: source or target")
    p.add_argument("--gain", type=float, help="override: echo brightness multiplier")
    p.add_argument("--speckle", type=float, help="override: speckle grain size (px)")
    p.add_argument("--attenuation", type=float, help="override: depth attenuation strength")
    p.add_argument(
        "--pretraining", action="store_true", help="a pretraining corpus: every image in its own random scanner style"
    )
    p.set_defaults(handler=cmd_data_synth)

    p = data.add_parser("summary", help="counts per class, domain, patient and mask")
    p.add_argument("manifest", type=Path)
    p.set_defaults(handler=cmd_data_summary)


def _add_folder_options(p) -> None:
    """Options of `data prepare folder` (docs/data.md, "Bring your own data")."""
    g = p.add_argument_group("folder layout (kind `folder` only)")
    g.add_argument("--normal", help="NAME[,NAME]: class folders of normal images (default: common spellings)")
    g.add_argument("--mask-suffix", help="SUFFIX[,SUFFIX]: lesion-mask name endings, e.g. _tumor (default: common)")
    g.add_argument("--mask-background", help="mask background value or colour R:G:B (default 0)")
    g.add_argument("--mask-keep", help="only these mask codes are lesion: values or R:G:B colours, comma-separated")
    g.add_argument("--groups", type=Path, help="CSV image,patient (default: SRC/groups.csv when present)")
    g.add_argument("--group-pattern", help="regex on the file stem; its first group (or the match) is the patient")
    p.add_argument("--prompts", default="breast_ultrasound", help="prompt vocabulary to check the classes against")


def _folder_options(args):
    """FolderOptions from the command line, or None when no folder option was given."""
    from usad_bench.data.folder import FolderOptions
    from usad_bench.data.images import LESION_MASK_SUFFIXES, MaskRule

    names = ("normal", "mask_suffix", "mask_background", "mask_keep", "groups", "group_pattern")
    if all(getattr(args, n) is None for n in names):
        return None
    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip()) if text else ()  # noqa: E731
    return FolderOptions(
        normal=split(args.normal),
        mask_suffixes=split(args.mask_suffix) or LESION_MASK_SUFFIXES,
        mask_rule=MaskRule.parse(args.mask_background, args.mask_keep),
        groups=args.groups,
        group_pattern=args.group_pattern,
    )


def _add_backbone_args(p, name: str = "ViT-L-14-336", pretrained: str = "openai") -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=name, help="open_clip model, hf-hub:<id> or local-dir:<folder>")
    g.add_argument("--pretrained", default=pretrained, help="tag, checkpoint file, or 'none' for random weights")
    g.add_argument("--image-size", type=int, help="input size override")
    g.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="of the frozen backbone")
    g.add_argument(
        "--activation",
        default=None,
        choices=("gelu", "quick_gelu", "native"),
        help="MLP activation of the backbone (default: the method's authors' choice; native = what the weights "
        "were trained with)",
    )


def _add_wandb_arg(p) -> None:
    p.add_argument(
        "--wandb", action="store_true", help="also log to Weights & Biases (offline without WANDB_API_KEY; sync later)"
    )


def _add_launcher_args(p) -> None:
    g = p.add_argument_group("launcher (submitit)")
    g.add_argument(
        "--launcher",
        default="local",
        choices=("local", "slurm", "submitit-local"),
        help="local: run here (default); slurm: a SLURM job array; submitit-local: subprocesses here",
    )
    g.add_argument("--runs-per-task", type=int, default=1, help="grid points per array task")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per array task")
    g.add_argument("--cpus-per-job", type=int, default=8, help="CPU cores per array task")
    g.add_argument("--mem-gb", type=int, help="memory per array task (GB)")
    g.add_argument("--time", type=int, default=240, help="time limit per array task, in minutes")
    g.add_argument("--max-parallel", type=int, default=64, help="array tasks running at once")
    g.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option, e.g. account=myproj or qos=high",
    )
    g.add_argument("--wait", action="store_true", help="wait for the array and report each task's outcome")


def _add_figure_command(sub) -> None:
    p = sub.add_parser("figure", help="the paper's qualitative figure (Figure 2) from a sweep's runs")
    p.add_argument("results", type=Path, help="a sweep's out folder (runs below it)")
    p.add_argument("--which", choices=("qualitative",), default="qualitative")
    p.add_argument("--images", type=int, default=6, help="test images (rows), stratified by class")
    p.add_argument("--test", help="test set name (default: the first target with masks)")
    p.add_argument("--shots", type=int, help="runs with this k (default: the smallest)")
    p.add_argument("--seed", type=int, default=0, help="picks the images and the runs' few-shot seed")
    p.add_argument("--out", type=Path, default=Path("results/figures"))
    _add_runtime_args(p)
    p.set_defaults(handler=cmd_figure)


def _add_runtime_args(p) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--cache-dir", type=Path, default=Path(".usad_cache"), help="feature cache folder")
    g.add_argument("--no-cache", action="store_true", help="compute features without reading or writing the cache")


def _quiet_libraries(verbose: bool) -> None:
    """Keep the console to our own messages unless -v: Lightning's banners and known-benign warnings."""
    import warnings

    import lightning  # noqa: F401  (imported first: at import it resets its loggers to INFO)

    # Lightning's INFO lines (device banners, tips) are not ours: hidden even with -v, which shows our own.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("usad_bench").setLevel(logging.INFO if verbose else logging.WARNING)
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
    return BackboneSpec(
        name=args.backbone,
        pretrained=pretrained,
        image_size=args.image_size,
        precision=args.precision,
        activation=getattr(args, "activation", None),
    )


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
    from usad_bench.data.summary import prompt_coverage, summarise

    path = prepare(args.kind, args.src, args.out, _folder_options(args))
    print(f"wrote {path}")
    manifest = read_manifest(path)
    print(summarise(manifest, check_masks=False))  # the converter has dropped (and reported) empty masks
    print(prompt_coverage(manifest, args.prompts))


def cmd_data_synth(args) -> None:
    from dataclasses import replace

    from usad_bench.data.synth import DOMAINS, synthesise

    if args.domain not in DOMAINS:
        raise UsadError(f"unknown domain preset {args.domain!r}; known: {', '.join(DOMAINS)}")
    style = DOMAINS[args.domain]
    changes = {k: getattr(args, k) for k in ("gain", "speckle", "attenuation") if getattr(args, k) is not None}
    if getattr(args, "pretraining", False):
        from usad_bench.data.synth import synthesise_pretraining

        if changes:
            raise UsadError("--pretraining draws a style per image; drop --gain/--speckle/--attenuation")
        print(f"wrote {synthesise_pretraining(args.out, n=args.n, seed=args.seed, size=args.size)}")
        return
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
    try:
        run = fit(opts)
    except Stopped as stop:
        stop.done = f"the fit did not finish; {args.out} was not touched (an earlier run there is unchanged)"
        raise
    print(f"fitted {args.method} on {args.shots} shots/class (seed {args.seed}) -> {run}")
    _print_weights_note(run)


def _print_weights_note(run: Path) -> None:
    """Console twin of the label every artefact of a random/synthetic-weights run carries."""
    from usad_bench.io import read_yaml
    from usad_bench.runner import weights_warning

    warning = weights_warning(read_yaml(Path(run) / "config.yaml") or {})
    if warning:
        print(f"note: {warning}")


def cmd_eval(args) -> None:
    from usad_bench.runner import evaluate, parse_test_arg
    from usad_bench.tables import format_metrics

    tests = [parse_test_arg(t) for t in args.test]
    payload = evaluate(args.run, tests, args.out, args.device, _cache_dir(args), wandb=args.wandb)
    print(format_metrics(payload, [name for name, _ in tests]))
    print(f"wrote {(args.out or args.run) / 'metrics.json'}")


def cmd_predict(args) -> None:
    from usad_bench.runner import predict

    path = predict(args.run, args.images, args.out, args.device, _cache_dir(args), overlays=not args.no_overlays)
    print(f"wrote {path}")
    _print_weights_note(args.run)


def cmd_sweep(args) -> None:
    from usad_bench.launch import launch_options
    from usad_bench.sweep import run_sweep

    run_sweep(
        args.experiment,
        args.shard,
        device=args.device,
        cache_dir=_cache_dir(args),
        dry_run=args.dry_run,
        wandb=args.wandb,
        launch=launch_options(args),
        grid={"backbone": args.backbone, "pretrained": args.pretrained, "out": args.out},
        workers=args.workers,
        share_runs=args.share_runs,
    )


def cmd_table(args) -> None:
    from usad_bench.tables import make_table

    print(make_table(args.results, args.which, args.out))


def cmd_figure(args) -> None:
    from usad_bench.figures import qualitative_figure

    paths = qualitative_figure(
        args.results,
        args.images,
        args.out,
        test=args.test,
        shots=args.shots,
        seed=args.seed,
        device=args.device,
        cache_dir=_cache_dir(args),
    )
    print("wrote " + ", ".join(str(p) for p in paths))


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
        wandb=args.wandb,
    )


def cmd_pretrain(args) -> None:
    from usad_bench.pretrain.train import PretrainConfig, pretrain

    cfg = PretrainConfig(
        backbone=args.backbone,
        init=None if str(args.init).lower() in ("none", "random", "") else args.init,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        semantic_weight=args.semantic_weight,
        augment=not args.no_augment,
        seed=args.seed,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        limit_images=args.limit,
        threads=args.threads,
    )
    weights = pretrain(args.train, args.out, cfg, resume=args.resume, wandb=args.wandb)
    print(f"wrote {weights}; load it with --backbone {args.backbone} --pretrained {weights}")


if __name__ == "__main__":
    sys.exit(main())
