"""Paper-style tables from run directories: mean ± std over few-shot seeds, in AUROC %.

``make_table(results_dir, which)`` reads every ``metrics.json`` below ``results_dir`` and groups
runs by (label, target, shots). Each table is printed as Markdown and, with ``out``, also written
as .md, .csv and .tex. Labels carry "(transductive)" for runs not scored per image, and a banner
warns when any run used random backbone weights, so such numbers are never taken for results.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from usad_bench.errors import UsadError
from usad_bench.io import read_json, write_text

# Which metrics each table shows, in order. Values are fractions in metrics.json, shown x100.
TABLE_METRICS = {
    "table1": ("image_auroc",),
    "table_cls": ("cls_auroc_macro",),
    "table2": ("pixel_auroc", "pixel_ap", "aupro", "dice"),
    "ablation": ("image_auroc", "pixel_auroc"),
}
# A test set without normal images (BUS-BRA) defines no image AUROC; its detection-like number is
# malignant vs benign, shown in its own column so it is never read as I-AUROC (README, metrics).
FALLBACKS = {"image_auroc": "cls_auroc_malignant_vs_benign"}
RANDOM_BANNER = "WARNING: some runs used RANDOM backbone weights; these numbers check the pipeline and are not results."


@dataclass
class Cell:
    values: list[float]

    def text(self, expected_seeds: int) -> str:
        vals = [v for v in self.values if v is not None and math.isfinite(v)]
        if not vals:
            return "–"
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        flag = f" (n={len(vals)})" if len(vals) < expected_seeds else ""
        return f"{100 * mean:.1f} ± {100 * std:.1f}{flag}"


def collect_runs(results: Path) -> list[dict]:
    paths = sorted(Path(results).rglob("metrics.json"))
    if not paths:
        raise UsadError(f"no metrics.json under {results}; run `usad-bench sweep` or `usad-bench eval` first")
    return [read_json(p) | {"_path": str(p)} for p in paths]


def run_label(config: dict) -> str:
    label = config.get("label") or config.get("method", "?")
    return label if config.get("scoring", "per-image") == "per-image" else f"{label} (transductive)"


def make_table(results: Path, which: str, out: Path | None = None) -> str:
    if which not in TABLE_METRICS:
        raise UsadError(f"unknown table {which!r}; known: {', '.join(TABLE_METRICS)}")
    runs = collect_runs(results)
    cells: dict[tuple, Cell] = defaultdict(lambda: Cell([]))
    seeds: dict[str, set] = defaultdict(set)
    for run in runs:
        cfg = run["config"]
        label = run_label(cfg)
        seeds[label].add(cfg.get("seed"))
        for target, m in run.get("tests", {}).items():
            for metric in TABLE_METRICS[which]:
                if m.get(metric) is None and m.get(FALLBACKS.get(metric, "")) is not None:
                    metric = FALLBACKS[metric]
                if m.get(metric) is not None:  # undefined for this test set and no fallback: no column
                    cells[(label, target, cfg.get("shots"), metric)].values.append(m[metric])
    header, rows = _layout(cells, seeds, which)
    random_weights = any(r["config"].get("random_weights") for r in runs)
    markdown = _markdown(header, rows, random_weights)
    if out is not None:
        _write_all(Path(out) / which, header, rows, markdown)
    return markdown


def _layout(cells: dict[tuple, Cell], seeds: dict[str, set], which: str) -> tuple[list[str], list[list[str]]]:
    labels = sorted({k[0] for k in cells})
    columns = sorted({(k[1], k[2], k[3]) for k in cells}, key=lambda c: (c[0], c[1] or 0, _metric_order(which, c[2])))
    header = ["method"] + [f"{t} k={k} {_short(m)}" for t, k, m in columns]
    rows = []
    expected = max(len(s) for s in seeds.values())  # seeds of the most complete method
    for label in labels:
        rows.append(
            [label]
            + [cells[(label, t, k, m)].text(expected) if (label, t, k, m) in cells else "–" for t, k, m in columns]
        )
    return header, rows


def _metric_order(which: str, metric: str) -> int:
    metrics = TABLE_METRICS[which]
    inverse = {fallback: original for original, fallback in FALLBACKS.items()}
    return metrics.index(metric if metric in metrics else inverse[metric])


def _short(metric: str) -> str:
    return {
        "image_auroc": "I-AUROC",
        "cls_auroc_macro": "cls-AUROC",
        "cls_auroc_malignant_vs_benign": "M-vs-B AUROC",
        "pixel_auroc": "P-AUROC",
        "pixel_ap": "P-AP",
        "aupro": "AUPRO",
        "dice": "Dice",
    }.get(metric, metric)


def _markdown(header: list[str], rows: list[list[str]], random_weights: bool) -> str:
    lines = [f"> {RANDOM_BANNER}", ""] if random_weights else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines.append("Mean ± sample std over few-shot seeds, AUROC/AP/AUPRO/Dice in %; (n=…) marks cells with fewer seeds.")
    return "\n".join(lines)


def _write_all(stem: Path, header: list[str], rows: list[list[str]], markdown: str) -> None:
    write_text(stem.with_suffix(".md"), markdown + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(stem.with_suffix(".csv"), buf.getvalue())
    tex = ["\\begin{tabular}{l" + "c" * (len(header) - 1) + "}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule"]
    tex += [" & ".join(c.replace("±", "$\\pm$") for c in r) + " \\\\" for r in rows]
    tex += ["\\bottomrule", "\\end{tabular}"]
    write_text(stem.with_suffix(".tex"), "\n".join(tex).replace("_", "\\_") + "\n")


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
