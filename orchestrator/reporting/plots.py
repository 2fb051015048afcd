"""The report's figures as PNG bytes, drawn from report.json alone (matplotlib's Agg renderer, no display needed).

Each figure answers one question a practitioner asks of a CV run: does every fold beat the class prior, and by how
much (``folds``)? Can the probabilities be trusted as probabilities (``reliability``)? Which outcomes does the model
mix up (``confusion``)? Does it get worse on long inputs, where truncation bites (``length``)? Did every fold's
training loss come down, and alike (``loss``, from the recipe's TensorBoard curves)?
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, safe in worker processes

# One colour per figure of merit, the same in every plot and in the HTML tables.
COLORS = {"plain": "#3b6fb6", "calibrated": "#2f9e6e", "tta": "#8a5cc2", "tta_calibrated": "#c2587a",
          "prior": "#9aa0a6", "length": "#d08a2e"}
LABELS = {"plain": "model", "calibrated": "temperature-scaled", "tta": "A/B-swap TTA",
          "tta_calibrated": "TTA + temperature", "prior": "class prior",
          "length": "length baseline"}
CLASS_NAMES = ("a wins", "b wins", "tie")
DPI = 120


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)


def series(report: dict) -> list[str]:
    """The figures of merit this report has, in display order (TTA only when the run scored swapped rows)."""
    keys = ["plain", "calibrated"]
    if "cv_log_loss_tta" in report:
        keys += ["tta", "tta_calibrated"]
    if "length_baseline_log_loss" in report:
        keys.append("length")
    return keys + ["prior"]


BASELINE_KEYS = {"prior": "prior_log_loss", "length": "length_baseline_log_loss"}  # same key per fold and for CV


def _fold_value(f: dict, key: str) -> float:
    return f[{"plain": "log_loss", **BASELINE_KEYS}.get(key, f"log_loss_{key}")]


def _cv_value(report: dict, key: str) -> float:
    return report[{"plain": "cv_log_loss", **BASELINE_KEYS}.get(key, f"cv_log_loss_{key}")]


def folds_figure(report: dict) -> bytes:
    """Grouped bars: log loss of each fold and of the combined OOF rows, for every figure of merit and the prior."""
    keys = series(report)
    groups = [f"fold {f['fold']}" for f in report["folds"]] + ["CV"]
    values = np.array([[_fold_value(f, k) for k in keys] for f in report["folds"]]
                      + [[_cv_value(report, k) for k in keys]])  # (groups, series)
    fig = Figure(figsize=(10, 3.6))
    ax = fig.subplots()
    width = 0.8 / len(keys)
    x = np.arange(len(groups))
    for j, k in enumerate(keys):
        ax.bar(x + (j - (len(keys) - 1) / 2) * width, values[:, j], width, color=COLORS[k], label=LABELS[k])
    # The combined figure gets a shaded background; its exact values are in the table above the plot.
    ax.axvspan(len(groups) - 1.5, len(groups) - 0.5, color="#f3f4f6", zorder=0)
    ax.set_xticks(x, groups)
    # Log losses of a weak model and the prior differ in the second decimal: zoom in (the axis says where it starts).
    lo, hi = values.min(), values.max()
    pad = max(hi - lo, 0.01)
    ax.set_ylim(max(0.0, lo - 0.6 * pad), hi + 0.45 * pad)
    _style(ax, "Log loss per fold vs the class-prior baseline (lower is better)", "", "log loss")
    ax.legend(fontsize=8, ncol=len(keys), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    return _png(fig)


def reliability_figure(report: dict) -> bytes:
    """Top-label reliability diagram (accuracy against confidence per bin) with the row count per bin beneath."""
    rel = report["reliability"]
    fig = Figure(figsize=(5.6, 5.0))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    ax.plot([1 / 3, 1], [1 / 3, 1], color="#555", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = (rel["plain"]["bins"][0]["hi"] - rel["plain"]["bins"][0]["lo"]) if rel["plain"]["bins"] else 0.067
    for i, (key, ece_key) in enumerate((("plain", "ece"), ("calibrated", "ece_calibrated"))):
        bins = rel[key]["bins"]
        conf = [b["confidence"] for b in bins]
        acc = [b["accuracy"] for b in bins]
        n = np.array([b["n_rows"] for b in bins], dtype=float)
        label = f"{LABELS[key]} (ECE {report[ece_key]:.3f})"
        ax.plot(conf, acc, color=COLORS[key], linewidth=1.5, marker="o", markersize=4, label=label)
        ax.scatter(conf, acc, s=20 + 180 * n / max(n.max(), 1), color=COLORS[key], alpha=0.25, linewidths=0)
        centres = np.array([(b["lo"] + b["hi"]) / 2 for b in bins])
        hist.bar(centres + (i - 0.5) * width * 0.45, n, width * 0.45, color=COLORS[key])
    ax.set_xlim(1 / 3 - 0.02, 1.01)
    ax.set_ylim(0, 1.02)
    _style(ax, "Reliability: is a 70% prediction right 70% of the time?", "", "accuracy in bin")
    ax.legend(fontsize=8, loc="lower right", frameon=False)
    _style(hist, "", "confidence (highest class probability)", "rows")
    return _png(fig)


def confusion_figure(report: dict) -> bytes:
    """3x3 confusion matrix, coloured by the share of each true class, annotated with counts and shares."""
    cm = np.array(report["confusion"], dtype=float)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            ax.text(j, i, f"{int(cm[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=10,
                    color="white" if share[i, j] > 0.55 else "#1f2937")
    ax.set_xticks(range(3), CLASS_NAMES)
    ax.set_yticks(range(3), CLASS_NAMES)
    ax.set_title("Confusion matrix (argmax of OOF probabilities)", fontsize=11, loc="left", fontweight="bold")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    return _png(fig)


def length_figure(report: dict) -> bytes:
    """Log loss per input-length bucket, with the class-prior log loss of the same rows as the bar to beat."""
    buckets = report["length_buckets"]
    fig = Figure(figsize=(7.2, 3.6))
    ax = fig.subplots()
    x = np.arange(len(buckets))
    ax.bar(x - 0.2, [b["log_loss"] for b in buckets], 0.4, color=COLORS["plain"], label=LABELS["plain"])
    ax.bar(x + 0.2, [b["prior_log_loss"] for b in buckets], 0.4, color=COLORS["prior"], label=LABELS["prior"])
    ax.set_xticks(x, [f"{b['min_chars']:,}–{b['max_chars']:,}\n{b['n_rows']} rows" for b in buckets], fontsize=8)
    _style(ax, "Log loss by input length", "characters of the formatted input (prompt + both responses)",
           "log loss")
    ax.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2)
    return _png(fig)


def loss_figure(curves: dict[str, list]) -> bytes:
    """Every fold's training loss against its optimizer step (one line per fold)."""
    fig = Figure(figsize=(7.2, 3.4))
    ax = fig.subplots()
    for k, points in sorted(curves.items(), key=lambda kv: int(kv[0])):
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, linewidth=1.3, label=f"fold {k}")
    _style(ax, "Training loss per fold", "optimizer step", "training loss (mean over the logged window)")
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def render_figures(report: dict) -> dict[str, bytes]:
    """{name: PNG bytes} for every figure of the report (``loss`` when the folds left TensorBoard curves)."""
    figures = {"folds": folds_figure(report), "reliability": reliability_figure(report),
               "confusion": confusion_figure(report), "length": length_figure(report)}
    curves = (report.get("recipe") or {}).get("loss_curves") or {}
    if any(curves.values()):
        figures["loss"] = loss_figure(curves)
    return figures
