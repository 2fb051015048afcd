"""report.md: the report as Markdown tables, with the PNG figures linked from ``report_plots/``.

Every number comes from the report dict (what report.json holds), formatted the same way as in report.html.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.reporting.honesty import warning
from orchestrator.reporting.recipe import recipe_rows, shown

CLASS_NAMES = ("a", "b", "tie")


def fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def title(report: dict) -> str:
    return f"CV report: {report.get('experiment') or Path(report['run_dir']).name}"


def verdict(report: dict) -> tuple[bool, float]:
    """(beats the class prior?, OOF log loss minus prior log loss)."""
    delta = report["cv_log_loss"] - report["prior_log_loss"]
    return delta < 0, delta


def summary_rows(report: dict) -> list[tuple[str, str, float, float | None, str]]:
    """(key, name, log loss, accuracy, how it was obtained) for each figure of merit the run has, prior last."""
    rows = [("plain", "model (OOF)", report["cv_log_loss"], report["cv_accuracy"],
             "each row predicted by the fold model that never saw it"),
            ("calibrated", "temperature-scaled", report["cv_log_loss_calibrated"], report["cv_accuracy"],
             f"T fitted on the other folds' OOF rows for each fold; global T = {report['temperature']:.3f} "
             f"(used by predict)")]
    if "cv_log_loss_tta" in report:
        rows += [("tta", "A/B-swap TTA", report["cv_log_loss_tta"], report["cv_accuracy_tta"],
                  "mean of the row and the row with responses a/b swapped (swapped back)"),
                 ("tta_calibrated", "TTA + temperature", report["cv_log_loss_tta_calibrated"],
                  report["cv_accuracy_tta"], f"as above, global T = {report['temperature_tta']:.3f}")]
    if report.get("length_baseline_log_loss") is not None:
        rows.append(("length", "length-only baseline", report["length_baseline_log_loss"], None,
                     "logistic regression on response lengths, fitted per fold on its training rows: the model "
                     "should beat it"))
    rows.append(("prior", "class prior", report["prior_log_loss"], None,
                 "every row gets its training folds' class frequencies: the bar to beat"))
    return rows


FOLD_BY_TEXT = {
    "id": "fold = id % n_folds (data.fold_by=id). Rows that share a prompt can sit on both sides of a split; on data "
          "with repeated prompts (arena data) that makes this CV optimistic - data.fold_by=prompt keeps them together.",
    "row": "fold = row position % n_folds (data.fold_by=row, the seed notebook's split). Rows that share a prompt can "
           "sit on both sides of a split; on data with repeated prompts (arena data) that makes this CV optimistic - "
           "data.fold_by=prompt keeps them together.",
    "prompt": "stratified by label, grouped by prompt text (data.fold_by=prompt, StratifiedGroupKFold): no prompt is "
              "on both sides of a split.",
}


def folds_text(report: dict) -> str:
    """How rows were split into folds, in plain words (with the warning when the split can make CV optimistic)."""
    return FOLD_BY_TEXT[report.get("fold_by", "id")]


def error_bar(report: dict) -> str:
    """'95% CI [lo, hi] over rows, fold std s' for the OOF log loss (empty for a report written before they existed)."""
    if "cv_log_loss_ci95" not in report:
        return ""
    lo, hi = report["cv_log_loss_ci95"]
    return (f"95% CI [{fmt(lo)}, {fmt(hi)}] (bootstrap over rows), std over folds "
            f"{fmt(report.get('cv_log_loss_fold_std'))}")


def fold_columns(report: dict) -> list[tuple[str, str]]:
    """(per-fold key, column title) of the per-fold table."""
    cols = [("log_loss", "log loss"), ("log_loss_calibrated", "temperature-scaled")]
    if "cv_log_loss_tta" in report:
        cols += [("log_loss_tta", "TTA"), ("log_loss_tta_calibrated", "TTA + temperature")]
    if "length_baseline_log_loss" in report:
        cols.append(("length_baseline_log_loss", "length baseline"))
    return cols + [("prior_log_loss", "class prior"), ("accuracy", "accuracy"),
                   ("temperature", "T (fitted on other folds)")]


def render_markdown(report: dict, plots: dict[str, str] | None = None) -> str:
    """The Markdown report; ``plots`` maps figure names to relative PNG paths to link (none: no images)."""
    plots = plots or {}
    beats, delta = verdict(report)
    lc = report["label_counts"]
    out = [f"# {title(report)}", "",
           f"**OOF log loss {fmt(report['cv_log_loss'])}** vs class prior {fmt(report['prior_log_loss'])}: "
           f"{'beats' if beats else 'does NOT beat'} the prior by {fmt(abs(delta))}.", "",
           *([f"- OOF log loss {error_bar(report)}"] if error_bar(report) else []),
           *([f"- **{'Optimistic CV' if report['distillation']['optimistic'] else 'Distillation'}:** "
              f"{report['distillation']['note']}"] if report.get("distillation") else []),
           *([f"- **Optimistic CV:** {warning(report)}"] if warning(report) else []),
           f"- rows: {report['n_rows']} over {report['n_folds']} folds; "
           f"labels a/b/tie: {lc['a']}/{lc['b']}/{lc['tie']}",
           f"- folds: {folds_text(report)}",
           f"- probabilities clipped to [{report['clip']:g}, 1 - {report['clip']:g}] and renormalised (as Kaggle)",
           "", "| figure | log loss | accuracy | how |", "|---|---:|---:|---|"]
    out += [f"| {name} | {fmt(ll)} | {fmt(acc)} | {how} |" for _, name, ll, acc, how in summary_rows(report)]
    cols = fold_columns(report)
    out += ["", "## Per fold", "", "| fold | rows | " + " | ".join(t for _, t in cols) + " | steps | train s |",
            "|---:|---:|" + "---:|" * len(cols) + "---:|---:|"]
    for f in report["folds"]:
        vals = " | ".join(fmt(f.get(k), 3 if k == "temperature" else 4) for k, _ in cols)
        secs = f"{f['train_seconds']:.0f}" if f.get("train_seconds") is not None else "-"
        out.append(f"| {f['fold']} | {f['n_rows']} | {vals} | {f.get('steps') or '-'} | {secs} |")
    # The combined row: report keys are the per-fold keys with a cv_ prefix (the prior's has none); no single T.
    cv = [fmt(report.get(f"cv_{k}", report.get(k))) if k != "temperature" else "" for k, _ in cols]
    out.append(f"| **CV** | {report['n_rows']} | " + " | ".join(cv) + " | | |")
    out += _image(plots, "folds", "per-fold log loss")
    out += _ensemble_section(report)
    out += ["", "## Calibration", "",
            f"Expected calibration error (top-label, 10 bins): {fmt(report['ece'])} as predicted, "
            f"{fmt(report['ece_calibrated'])} after temperature scaling."]
    out += _image(plots, "reliability", "reliability diagram")
    cm = report["confusion"]
    out += ["", "## Confusion matrix", "", "| true \\ predicted | a | b | tie |", "|---|---:|---:|---:|"]
    out += [f"| {name} | {cm[i][0]} | {cm[i][1]} | {cm[i][2]} |" for i, name in enumerate(CLASS_NAMES)]
    out += _image(plots, "confusion", "confusion matrix")
    out += ["", "## Log loss by input length", "", f"Length: {report['length_unit']}; buckets hold similar row "
            "counts.", "", "| characters | rows | log loss | class prior | accuracy |", "|---|---:|---:|---:|---:|"]
    out += [f"| {b['min_chars']}–{b['max_chars']} | {b['n_rows']} | {fmt(b['log_loss'])} | "
            f"{fmt(b['prior_log_loss'])} | {fmt(b['accuracy'])} |" for b in report["length_buckets"]]
    out += _image(plots, "length", "log loss by input length")
    out += _recipe_section(report, plots)
    return "\n".join(out) + "\n"


def _recipe_section(report: dict, plots: dict[str, str]) -> list[str]:
    """Model, data, time, GPUs, the config keys that differ from the defaults, the loss curves."""
    recipe = report.get("recipe")
    if not recipe:
        return []
    out = ["", "## Recipe", ""] + [f"- {label}: `{text}`" if label == "TensorBoard" else f"- {label}: {text}"
                                   for label, text in recipe_rows(recipe)]
    out += ["", "Config keys that differ from the defaults:", "", "| key | value |", "|---|---|"]
    out += [f"| `{k}` | `{shown(v)}` |" for k, v in recipe["non_default"].items()]
    out += _image(plots, "loss", "training loss per fold")
    return out


def member_name(member: dict) -> str:
    return member.get("experiment") or Path(member["run_dir"]).name


def ensemble_tables(report: dict) -> tuple[list[list[str]], list[list[str]]]:
    """(members table, per-fold table) of an ensemble report as rows of cells, header first; used by both pages."""
    ens = report["ensemble"]
    members = [["member", "run directory", "OOF log loss", "weight for new rows"]]
    members += [[member_name(m), m["run_dir"], fmt(m["cv_log_loss"]), f"{w:.3f}"]
                for m, w in zip(ens["members"], ens["weights"])]
    folds = [["fold", "ensemble", *(member_name(m) for m in ens["members"]), "weights (fitted on the other folds)"]]
    folds += [[str(f["fold"]), fmt(f["log_loss"]), *(fmt(x) for x in f["member_log_losses"]),
               ", ".join(f"{w:.3f}" for w in f["weights"])] for f in report["folds"]]
    return members, folds


def _ensemble_section(report: dict) -> list[str]:
    if "ensemble" not in report:
        return []
    out = ["", "## Ensemble", "", f"Method: `{report['ensemble']['method']}`; {report['ensemble']['note']}."]
    for table in ensemble_tables(report):
        out += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
        out += ["| " + " | ".join(r) + " |" for r in table[1:]]
    return out


def _image(plots: dict[str, str], name: str, alt: str) -> list[str]:
    return ["", f"![{alt}]({plots[name]})"] if name in plots else []
