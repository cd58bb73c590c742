"""Paper-style tables from run directories: mean ± std over few-shot seeds, in %, beside the paper's numbers.

``make_table(results_dir, which)`` reads every ``metrics.json`` below ``results_dir`` and groups
runs by (label, target, shots). Each of our columns is followed by the paper's value for the same
cell where the paper reports one (``resources/paper_numbers.yaml``, clearly marked "paper:"), and
methods the paper reports but this project has not run get rows of their own. Rows and columns
follow the experiment's order (``sweep.json``, written by ``usad-bench sweep``), else the paper's.

Each table is printed as Markdown and, with ``out``, also written as .md, .csv and .tex with the
same content: a banner when any run used random or synthetic-only backbone weights (so such numbers
are never taken for results), the notes, and the list of incomplete cells with the reason
(not fitted, not evaluated, failed). Labels carry "(transductive)" for runs not scored per image.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from usad_bench.errors import UsadError
from usad_bench.io import read_json, read_yaml, write_text

# Which metrics each table shows, in order. Values are fractions in metrics.json, shown x100.
TABLE_METRICS = {
    "table1": ("image_auroc",),
    "table_cls": ("cls_auroc_macro",),
    "table2": ("pixel_auroc", "pixel_ap", "aupro", "dice", "dice_at_0.5", "iou_at_0.5"),
    # The paper's ablation I-AUROC comes from the class branch ("–" for the row without one); the
    # mask-guided image score is shown beside it.
    "ablation": ("image_auroc_class_branch", "pixel_auroc", "image_auroc"),
}
# A test set without normal images (BUS-BRA) defines no image AUROC; its detection-like number is
# malignant vs benign, named in the column header so it is never read as I-AUROC (README, metrics).
FALLBACKS = {
    "image_auroc": "cls_auroc_malignant_vs_benign",
    "image_auroc_class_branch": "cls_auroc_malignant_vs_benign",
}
# The ablation shows the class-branch and the mask-guided I-AUROC; only the first falls back, so M-vs-B
# is not shown twice.
NO_FALLBACK = {"ablation": ("image_auroc",)}
SHORT = {
    "image_auroc": "I-AUROC",
    "image_auroc_class_branch": "I-AUROC (class branch)",
    "cls_auroc_macro": "cls-AUROC",
    "cls_auroc_malignant_vs_benign": "M-vs-B AUROC",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "aupro": "AUPRO",
    "dice": "Dice (support thr.)",
    "dice_at_0.5": "Dice@0.5",
    "iou_at_0.5": "IoU@0.5",
}
SHORT_BY_TABLE = {"ablation": {"image_auroc": "I-AUROC (mask-guided)"}}
RANDOM_BANNER = "WARNING: some runs used RANDOM backbone weights; these numbers check the pipeline and are not results."
SYNTH_BANNER = (
    "WARNING: some runs used synthetic-only weights (a backbone pretrained on synthetic images only); "
    "these numbers check the pipeline and are not results."
)
GRID_FILE = "sweep.json"  # the grid a sweep was asked for, written by `usad-bench sweep` into its `out`
CLASS_BRANCH_MARK = "†"
CLASS_BRANCH_NOTE = (
    f"{CLASS_BRANCH_MARK} metrics.json predates `image_auroc_class_branch`: the mask-guided image AUROC is shown; "
    "re-run `usad-bench eval` for the class-branch figure."
)


def weights_label(config: dict) -> str | None:
    """'random weights', 'synthetic-only weights' or None (real pretrained weights), from a run's config."""
    if config.get("random_weights"):
        return "random weights"
    pretrained = str((config.get("backbone") or {}).get("pretrained") or "").lower()
    if pretrained == "synth" or str(config.get("weights", "")).lower().startswith("synth"):
        return "synthetic-only weights"
    return None


# ----------------------------------------------------------------------------- the grid and run status
@dataclass
class Grid:
    """The cells a table should have: from sweep.json when there is one, else from the runs found."""

    labels: list[str]
    targets: list[str]
    shots: list[int]
    seeds: list[int]
    run_dirs: dict[tuple[str, int, int], Path] = field(default_factory=dict)  # (label, shots, seed) -> run dir
    from_sweep: bool = False


def failure_path(run_dir: Path) -> Path:
    """Where a sweep records that a run failed: a sibling file, so a refit of the folder never hides it."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.name}.failed.json"


def read_grid(results: Path, runs: list[dict]) -> Grid:
    grid_file = Path(results) / GRID_FILE
    if grid_file.is_file():
        raw = read_json(grid_file)
        dirs = {(r["label"], int(r["shots"]), int(r["seed"])): Path(results) / r["dir"] for r in raw["runs"]}
        return Grid(raw["labels"], raw["targets"], raw["shots"], raw["seeds"], dirs, from_sweep=True)
    found = runs + _unevaluated_runs(Path(results))
    dirs = {(run_label(r["config"]), r["config"].get("shots"), r["config"].get("seed")): r["_dir"] for r in found}
    paper_targets = list(paper_numbers()["targets"])
    targets = sorted(
        {t for r in runs for t in r.get("tests", {})},
        key=lambda t: (t not in paper_targets, paper_targets.index(t) if t in paper_targets else 0, t),
    )
    return Grid(
        labels=_paper_order(sorted({k[0] for k in dirs})),
        targets=targets,
        shots=sorted({k[1] for k in dirs}, key=lambda k: k or 0),
        seeds=sorted({k[2] for k in dirs}, key=lambda s: s or 0),
        run_dirs=dirs,
    )


def _unevaluated_runs(results: Path) -> list[dict]:
    """Fitted runs (config.yaml) without metrics.json, so an un-evaluated run still counts as a cell."""
    return [
        {"config": read_yaml(p) or {}, "_dir": p.parent}
        for p in sorted(results.rglob("config.yaml"))
        if (p.parent / "split.json").is_file() and not (p.parent / "metrics.json").is_file()  # not wandb's config.yaml
    ]


def run_status(run_dir: Path | None, target: str) -> str:
    """'done', 'failed: …', 'not evaluated' or 'not fitted' for one run and one test set."""
    if run_dir is None:
        return "not fitted"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file() and target in read_json(metrics_file).get("tests", {}):
        return "done"
    if failure_path(run_dir).is_file():
        return f"failed: {read_json(failure_path(run_dir)).get('error', '?')}"
    return "not evaluated" if (run_dir / "config.yaml").is_file() else "not fitted"


def incomplete_cells(grid: Grid) -> list[str]:
    """One line per (label, target, shots) cell that lacks seeds, saying which and why."""
    lines = []
    for label in grid.labels:
        for target in grid.targets:
            for k in grid.shots:
                why = {s: run_status(grid.run_dirs.get((label, k, s)), target) for s in grid.seeds}
                missing = {s: reason for s, reason in why.items() if reason != "done"}
                if missing:
                    reasons = "; ".join(f"s{s} {reason}" for s, reason in missing.items())
                    done = len(grid.seeds) - len(missing)
                    lines.append(f"{label} / {target} / k={k}: {done} of {len(grid.seeds)} seeds ({reasons})")
    return lines


# ----------------------------------------------------------------------------- paper numbers
@cache
def paper_numbers() -> dict:
    text = resources.files("usad_bench").joinpath("resources/paper_numbers.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _paper_order(labels: list[str]) -> list[str]:
    order = list(paper_numbers()["names"])
    return sorted(labels, key=lambda label: (order.index(label) if label in order else len(order), label))


def paper_value(which: str, paper_metric: str, label: str, target: str, shots: int) -> str:
    """The paper's value as text: '' when the paper has no such cell, '–' for its own dash."""
    paper = paper_numbers()
    entry = paper["tables"].get(which, {}).get(paper_metric)
    values = (entry or {}).get("values", {}).get(label, {})
    if target not in values:
        return ""
    value = values[target]
    if isinstance(value, list):
        shots_list = entry.get("shots", paper["shots"])
        if shots not in shots_list:
            return ""
        value = value[shots_list.index(shots)]
    return "–" if value is None else f"{value:.1f}"


def paper_columns_beside(which: str, metric: str, target: str, shots: int) -> list[tuple[str, str]]:
    """(paper metric, header) for the paper columns that go right after our (target, shots, metric) column."""
    paper = paper_numbers()
    out = []
    for name, entry in paper["tables"].get(which, {}).items():
        if entry["beside"] != metric or target not in paper["targets"]:
            continue
        if any(paper_value(which, name, label, target, shots) for label in entry["values"]):
            star = "*" if target in paper.get("stand_ins", []) else ""  # another data set stands in
            out.append((name, f"paper: {paper['targets'][target]}{star} k={shots} {entry['short']}"))
    return out


def paper_only_labels(which: str, labels: list[str]) -> list[str]:
    """Methods the paper reports in this table that no run here has, in the paper file's order."""
    named = []
    for entry in paper_numbers()["tables"].get(which, {}).values():
        named += [label for label in entry["values"] if label not in labels and label not in named]
    return named


# ----------------------------------------------------------------------------- our cells
@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    shown: set[str] = field(default_factory=set)  # the metric(s) the values are, after fallbacks
    marked: bool = False  # a value came from the mask-guided score standing in for the class branch

    def text(self, expected_seeds: int) -> str:
        vals = [v for v in self.values if v is not None and math.isfinite(v)]
        if not vals:
            return "–"
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        flag = f" (n={len(vals)})" if len(vals) < expected_seeds else ""
        return f"{100 * mean:.1f} ± {100 * std:.1f}{flag}" + (CLASS_BRANCH_MARK if self.marked else "")


def collect_runs(results: Path) -> list[dict]:
    paths = sorted(Path(results).rglob("metrics.json"))
    if not paths:
        raise UsadError(f"no metrics.json under {results}; run `usad-bench sweep` or `usad-bench eval` first")
    return [read_json(p) | {"_path": str(p), "_dir": p.parent} for p in paths]


def run_label(config: dict) -> str:
    label = config.get("label") or config.get("method", "?")
    return label if config.get("scoring", "per-image") == "per-image" else f"{label} (transductive)"


def pick_metric(m: dict, metric: str, fallback: bool = True) -> tuple[str, float, bool] | None:
    """(metric shown, value, marked) for one test set's metrics, or None when the cell stays empty."""
    marked = False
    if metric == "image_auroc_class_branch" and metric not in m and "cls_auroc_macro" in m:
        metric, marked = "image_auroc", True  # evaluated before the metric existed; the class branch is there
    if m.get(metric) is not None:
        return metric, m[metric], marked
    other = FALLBACKS.get(metric) if fallback else None
    if other and m.get(other) is not None:
        return other, m[other], False
    return None


def gather_cells(runs: list[dict], which: str) -> dict[tuple, Cell]:
    """(label, target, shots, requested metric) -> the seeds' values."""
    cells: dict[tuple, Cell] = defaultdict(Cell)
    for run in runs:
        cfg = run["config"]
        for target, m in run.get("tests", {}).items():
            for metric in TABLE_METRICS[which]:
                picked = pick_metric(m, metric, fallback=metric not in NO_FALLBACK.get(which, ()))
                if picked is None:  # undefined for this test set and no fallback
                    continue
                cell = cells[(run_label(cfg), target, cfg.get("shots"), metric)]
                cell.values.append(picked[1])
                cell.shown.add(picked[0])
                cell.marked |= picked[2]
    return cells


# ----------------------------------------------------------------------------- the table
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    banners: list[str]
    notes: list[str]
    incomplete: list[str]


def make_table(results: Path, which: str, out: Path | None = None) -> str:
    if which not in TABLE_METRICS:
        raise UsadError(f"unknown table {which!r}; known: {', '.join(TABLE_METRICS)}")
    runs = collect_runs(results)
    cells = gather_cells(runs, which)
    grid = read_grid(Path(results), runs)
    table = build_table(cells, grid, which)
    table.banners = _banners(runs)
    table.incomplete = incomplete_cells(grid)
    if table.incomplete and not grid.from_sweep:
        table.notes.append(f"No {GRID_FILE} under {results}: the expected cells are inferred from the runs found.")
    markdown = to_markdown(table)
    if out is not None:
        stem = Path(out) / which
        write_text(stem.with_suffix(".md"), markdown + "\n")
        write_text(stem.with_suffix(".csv"), to_csv(table))
        write_text(stem.with_suffix(".tex"), to_latex(table, which))
    return markdown


def _banners(runs: list[dict]) -> list[str]:
    labels = {weights_label(r["config"]) for r in runs}
    return [
        b
        for label, b in (("random weights", RANDOM_BANNER), ("synthetic-only weights", SYNTH_BANNER))
        if label in labels
    ]


def build_table(cells: dict[tuple, Cell], grid: Grid, which: str) -> Table:
    present = {(k[1], k[2]) for k in cells}
    columns = [
        (t, k, m)
        for t in grid.targets
        for k in grid.shots
        for m in TABLE_METRICS[which]
        if (t, k) in present and any(key[1:] == (t, k, m) for key in cells)
    ]
    labels = [label for label in grid.labels if any(key[0] == label for key in cells)]
    labels += [label for label in {key[0]: None for key in cells} if label not in labels]  # runs outside the grid
    paper_rows = paper_only_labels(which, labels)
    expected = len(grid.seeds) if grid.seeds else 1
    header, rows = ["method"], [[label] for label in labels + paper_rows]
    for t, k, m in columns:
        shown = set().union(*(c.shown for key, c in cells.items() if key[1:] == (t, k, m)))
        header.append(f"{t} k={k} {_short(which, m if m in shown or not shown else sorted(shown)[0])}")
        for row in rows:
            cell = cells.get((row[0], t, k, m))
            row.append(cell.text(expected) if cell is not None else "–")
        for paper_metric, paper_header in paper_columns_beside(which, m, t, k):
            header.append(paper_header)
            for row in rows:
                row.append(paper_value(which, paper_metric, row[0], t, k))
    notes = ["Mean ± sample std over few-shot seeds, in %; (n=…) marks cells with fewer seeds than the grid."]
    if any(h.startswith("paper:") for h in header):
        notes.append(" ".join(paper_numbers()["stand_in_note"].split()))
        if paper_rows:
            notes.append(f"Rows {', '.join(paper_rows)}: reported by the paper, not run here (–).")
    if any(c.marked for c in cells.values()):
        notes.append(CLASS_BRANCH_NOTE)
    return Table(header, rows, [], notes, [])


def _short(which: str, metric: str) -> str:
    return SHORT_BY_TABLE.get(which, {}).get(metric) or SHORT.get(metric, metric)


# ----------------------------------------------------------------------------- formats
def to_markdown(table: Table) -> str:
    lines = [line for b in table.banners for line in (f"> {b}", "")]
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "---|" * len(table.header))
    lines += ["| " + " | ".join(r) + " |" for r in table.rows]
    lines += ["", *table.notes]
    if table.incomplete:
        lines += ["", f"Incomplete cells ({len(table.incomplete)}):", *[f"- {line}" for line in table.incomplete]]
    return "\n".join(lines)


def to_csv(table: Table) -> str:
    """Banners first and notes last as '# '-prefixed one-cell rows (pandas: ``read_csv(comment='#')``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows([f"# {b}"] for b in table.banners)
    writer.writerow(table.header)
    writer.writerows(table.rows)
    writer.writerows([f"# {n}"] for n in table.notes)
    writer.writerows([f"# incomplete: {line}"] for line in table.incomplete)
    return buf.getvalue()


def to_latex(table: Table, which: str) -> str:
    """A booktabs table whose caption carries the banners, notes and incomplete cells."""
    caption = " ".join([*table.banners, f"{which}.", *table.notes])
    if table.incomplete:
        caption += f" Incomplete cells: {'; '.join(table.incomplete)}."
    body = [" & ".join(map(_tex, table.header)) + " \\\\", "\\midrule"]
    body += [" & ".join(_tex(c) for c in row) + " \\\\" for row in table.rows]
    return "\n".join(
        [
            "\\begin{table}",
            "\\centering",
            f"\\caption{{{_tex(caption)}}}",
            "\\begin{tabular}{l" + "c" * (len(table.header) - 1) + "}",
            "\\toprule",
            *body,
            "\\bottomrule",
            "\\end{tabular}",
            "\\end{table}",
            "",
        ]
    )


def _tex(text: str) -> str:
    for old, new in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#")):
        text = text.replace(old, new)
    return text.replace("±", "$\\pm$").replace("†", "$^\\dagger$").replace("–", "--")


def format_metrics(payload: dict, tests: list[str]) -> str:
    """A short human-readable summary of metrics.json for the terminal."""
    keys = (
        "image_auroc",
        "image_ap",
        "pixel_auroc",
        "pixel_ap",
        "aupro",
        "dice",
        "cls_auroc_macro",
        "cls_balanced_accuracy",
    )
    lines = [f"! {payload['warning']}"] if payload.get("warning") else []
    for name in tests:
        m = payload["tests"][name]
        shown = [f"{k}={m[k]:.3f}" for k in keys if m.get(k) is not None]
        lines.append(f"{name} ({m['n_images']} images): " + (", ".join(shown) or "no metric defined"))
        lines += [f"    note: {n}" for n in m.get("notes", [])]
    return "\n".join(lines)
