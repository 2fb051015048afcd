"""EXPORT.md: what an export holds, how to run it, and which cross-validated figure stands for it."""

from __future__ import annotations


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def export_markdown(spec: dict, report: dict) -> str:
    folds = spec["folds"]
    cv = [("OOF log loss", report.get("cv_log_loss")),
          ("temperature-scaled (cross-fitted)", report.get("cv_log_loss_calibrated")),
          ("with A/B-swap TTA", report.get("cv_log_loss_tta")),
          ("class prior", report.get("prior_log_loss"))]
    lines = [f"# Export of `{spec['run']}`", "",
             f"- folds: {folds} ({spec['folds_mode']}{', merged into the base weights' if spec['merged'] else ''})",
             f"- head: {spec['head']}; weights loaded as: {spec['quantize']} (bitsandbytes at load time)",
             f"- text: max_length {spec['text']['max_length']}, truncation {spec['text']['truncation']}",
             f"- temperature {spec['temperature']:.4f} (plain), "
             f"{_fmt(spec['temperature_tta'])} (TTA), fitted on all OOF rows", ""]
    if spec["folds_mode"] == "average":
        lines += ["## No honest CV for this model", "",
                  f"This export is **one model**: the average of folds {folds}' LoRA updates"
                  f"{', merged into the base' if spec['merged'] else ''}. Every training row trained it (each row was "
                  "in the training set of all but one of the averaged folds), so no held-out rows are left to "
                  "score it on and **no honest CV exists for it**. The figures below are the fold models' "
                  "cross-validation (each row scored by the one fold model that never saw it): the nearest honest "
                  "estimate, not a measurement of this model. Its temperature was fitted on those fold models' "
                  "OOF rows too.", ""]
    else:
        lines += [f"## Cross-validation of the {len(folds)} fold models (the run's report.json)", "",
                  "predict.py averages these models' probabilities, as `orchestrator.predict` does.", ""]
    lines += ["| figure | log loss |", "|---|---|"] + [f"| {name} | {_fmt(v)} |" for name, v in cv]
    lines += ["", "## Run it (offline: torch, transformers, peft, bitsandbytes, pandas)", "", "```",
              "python predict.py --data test.csv --out submission.csv [--time-budget SECONDS] [--no-tta]", "```", "",
              "`manifest.json` lists every file with its sha256 (`predict.py --verify` checks them).", ""]
    return "\n".join(lines)
