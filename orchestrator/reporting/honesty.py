"""Whether a run's CV log loss is honest, in plain words: the reasons it is optimistic (too good), inherited down
distillation chains and into ensembles, and the warning every report prints (console, report.md, report.html).

A reason is one sentence; a run is optimistic when it has any. Sources: a student that learned from plain OOF soft
labels (its fold k's targets came from teacher models trained on fold k's labels); a student of in-fold soft labels
whose teacher was itself optimistic (the teacher's fold-k model had seen fold k's labels at one remove, so its in-fold
predictions carry them on); an ensemble with an optimistic member.
"""

from __future__ import annotations


def soft_label_reasons(soft: dict | None) -> list[str]:
    """Why a student's CV is optimistic, from run.json's ``soft_labels`` (kind, path and the file's provenance)."""
    if not soft:
        return []
    prov = soft.get("provenance") or {}
    teacher = prov.get("teacher_run") or soft.get("path")
    if soft["kind"] != "in_fold":
        return [f"it learned from plain OOF soft labels of {teacher}: each fold's training targets were predicted by "
                f"teacher models trained on that fold's held-out labels"]
    inherited = prov.get("teacher_optimistic_because") or []
    if inherited:
        return [f"it learned from in-fold soft labels of {teacher}, whose own CV is optimistic ("
                + "; ".join(inherited) + "): that teacher's fold-k models had seen fold k's labels at one remove, so "
                "their in-fold predictions carry them on"]
    return []


def distillation_note(soft: dict) -> dict:
    """How a student run's soft labels bear on its CV figure, in plain words (run.json's ``soft_labels``)."""
    reasons = soft_label_reasons(soft)
    if reasons:
        how = ("For an honest CV use in-fold soft labels (predict --soft-labels PATH --in-fold) of an honest teacher."
               if soft["kind"] != "in_fold" else
               "For an honest CV the teacher must be honest too: retrain it on in-fold soft labels or none.")
        note = (f"This run's CV log loss is optimistic (too good) and not comparable with honest runs: "
                f"{'; '.join(reasons)}. {how}")
    elif (soft.get("provenance") or {}).get("teacher_run"):
        note = (f"This run learned from in-fold soft labels of {soft['provenance']['teacher_run']}, whose own CV is "
                f"honest: fold k's targets came only from the teacher's fold-k model, which never saw fold k's labels, "
                f"so its CV log loss stays honest.")
    else:
        note = ("This run learned from in-fold soft labels: fold k's targets came only from the file's rows for fold "
                "k. The file does not record which run made it (files written by orchestrator.predict do), so whether "
                "that teacher was itself honest - and with it this CV log loss - cannot be checked.")
    return {**soft, "optimistic": bool(reasons), "optimistic_because": reasons, "note": note}


def warning(report: dict) -> str | None:
    """The one-line warning of an optimistic report that no distillation note already gives (e.g. an ensemble)."""
    reasons = report.get("optimistic_because") or []
    if not reasons or report.get("distillation", {}).get("optimistic"):
        return None
    return ("This CV log loss is optimistic (too good) and not comparable with honest runs: " + "; ".join(reasons)
            + ".")
