"""Report generation from a fixed run directory: report.html (self-contained, plots embedded), report.md and the
report.json numbers they show, checked against sklearn on the OOF rows.

The fold files are written here from fixed probabilities (no model needed to test the reducer): informative but
over-confident, with TTA columns, so every section of the report has something to show."""

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix
from sklearn.metrics import log_loss as sk_log_loss

from orchestrator.report import main as report_main
from tests.conftest import DATA
from trainer_core.data import assign_folds, load_rows

N_ROWS, FOLDS = 150, [0, 1, 2, 3, 4]
P, TTA = ["p_a", "p_b", "p_tie"], ["p_a_tta", "p_b_tta", "p_tie_tta"]


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    out.mkdir()
    rows = assign_folds(load_rows(DATA, max_rows=N_ROWS), 5)
    rows.to_parquet(out / "data.parquet", index=False)
    (out / "run.json").write_text(json.dumps({"experiment": "fixed", "n_folds": 5, "folds": FOLDS,
                                              "fingerprint": "0123456789abcdef"}))
    rng = np.random.default_rng(7)
    for k in FOLDS:
        held = rows[rows["fold"] == k].sort_values("id")
        onehot = np.eye(3)[held["label"].to_numpy()]
        z = 1.5 * onehot + rng.normal(0, 1.0, size=(len(held), 3))
        fdir = out / f"fold={k}"
        fdir.mkdir()
        oof = pd.DataFrame({"id": held["id"].to_numpy(), "fold": k, "label": held["label"].to_numpy()})
        oof[P] = softmax(4.0 * z)  # over-confident on purpose: temperature scaling has work to do
        oof[TTA] = softmax(3.0 * (z + rng.normal(0, 0.3, size=z.shape)))
        oof.to_parquet(fdir / "oof.parquet", index=False)
        (fdir / "metrics.json").write_text(json.dumps({"fold": k, "steps": 12, "train_seconds": 3.5}))
    assert report_main([str(out)]) == 0
    return out


def test_report_json_numbers_match_sklearn(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    oof = pd.read_parquet(run_dir / "oof.parquet")
    assert list(oof.columns) == ["id", "fold", "label", *P, *TTA] and len(oof) == N_ROWS
    y = oof["label"].to_numpy()
    assert rep["cv_log_loss"] == pytest.approx(sk_log_loss(y, oof[P], labels=[0, 1, 2]), abs=1e-12)
    assert rep["cv_log_loss_tta"] == pytest.approx(sk_log_loss(y, oof[TTA], labels=[0, 1, 2]), abs=1e-12)
    # over-confident input: the cross-fitted temperature is > 1 and lowers the log loss
    assert rep["temperature"] > 1.5 and rep["cv_log_loss_calibrated"] < rep["cv_log_loss"] - 0.05
    assert rep["cv_log_loss_tta_calibrated"] < rep["cv_log_loss_tta"]
    assert rep["confusion"] == confusion_matrix(y, oof[P].to_numpy().argmax(1), labels=[0, 1, 2]).tolist()
    assert sum(b["n_rows"] for b in rep["length_buckets"]) == N_ROWS
    assert sum(b["n_rows"] for b in rep["reliability"]["plain"]["bins"]) == N_ROWS
    assert rep["ece_calibrated"] < rep["ece"]
    for f in rep["folds"]:
        sel = oof[oof["fold"] == f["fold"]]
        assert f["log_loss"] == pytest.approx(sk_log_loss(sel["label"], sel[P], labels=[0, 1, 2]))
        assert f["temperature"] == pytest.approx(rep["temperatures_by_fold"][str(f["fold"])])


def test_html_is_self_contained_with_every_plot(run_dir):
    page = (run_dir / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in images] == ["log loss per fold", "reliability diagram", "confusion matrix",
                                          "log loss by input length"]
    for _, b64 in images:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a real drawing, not an empty canvas
    assert not re.search(r'(src|href)="(?!data:)', page), "nothing may load from outside the file"


def test_pages_show_the_numbers_of_report_json(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    page = (run_dir / "report.html").read_text()
    md = (run_dir / "report.md").read_text()
    headline = [rep[k] for k in ("cv_log_loss", "prior_log_loss", "cv_log_loss_calibrated", "cv_log_loss_tta",
                                 "cv_log_loss_tta_calibrated", "cv_accuracy")]
    per_fold = [f[k] for f in rep["folds"] for k in ("log_loss", "log_loss_calibrated", "log_loss_tta",
                                                      "prior_log_loss", "accuracy")]
    buckets = [b[k] for b in rep["length_buckets"] for k in ("log_loss", "prior_log_loss")]
    for text in (page, md):
        for x in headline + per_fold + buckets + [rep["ece"], rep["ece_calibrated"]]:
            assert f"{x:.4f}" in text
        assert f"{rep['temperature']:.3f}" in text
    for name, row in zip(("a", "b", "tie"), rep["confusion"]):
        assert f"| {name} | {row[0]} | {row[1]} | {row[2]} |" in md
        assert f"<td>{row[0]}</td><td>{row[1]}</td><td>{row[2]}</td>" in page
    for name in ("folds", "reliability", "confusion", "length"):  # report.md links the same figures as files
        assert f"](report_plots/{name}.png)" in md and (run_dir / "report_plots" / f"{name}.png").exists()


def test_regenerating_gives_the_same_report(run_dir):
    before = (run_dir / "report.json").read_text()
    assert report_main([str(run_dir)]) == 0
    assert (run_dir / "report.json").read_text() == before
