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
from scipy.optimize import minimize
from sklearn.metrics import confusion_matrix
from sklearn.metrics import log_loss as sk_log_loss

from orchestrator.report import main as report_main
from orchestrator.reporting.reducer import format_table
from tests.conftest import DATA
from trainer_core.data.arena import assign_folds, load_rows

N_ROWS, FOLDS = 150, [0, 1, 2, 3, 4]
P, TTA = ["p_a", "p_b", "p_tie"], ["p_a_tta", "p_b_tta", "p_tie_tta"]
LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]


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
                                 "cv_log_loss_tta_calibrated", "cv_accuracy", "length_baseline_log_loss",
                                 "cv_log_loss_fold_std")] + rep["cv_log_loss_ci95"]
    per_fold = [f[k] for f in rep["folds"] for k in ("log_loss", "log_loss_calibrated", "log_loss_tta",
                                                      "prior_log_loss", "accuracy", "length_baseline_log_loss")]
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


def test_console_table_shows_both_baselines_and_the_error_bar(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    table = format_table(rep)
    lo, hi = rep["cv_log_loss_ci95"]
    assert "length_ll" in table and f"{rep['length_baseline_log_loss']:.4f}" in table
    assert f"95% CI {lo:.4f}-{hi:.4f}" in table and f"{rep['cv_log_loss_fold_std']:.4f}" in table
    for f in rep["folds"]:
        assert f"{f['length_baseline_log_loss']:.4f}" in table


def test_error_bars_match_an_independent_bootstrap(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    oof = pd.read_parquet(run_dir / "oof.parquet")
    y, p = oof["label"].to_numpy(), oof[P].to_numpy()
    lo, hi = rep["cv_log_loss_ci95"]
    assert lo < rep["cv_log_loss"] < hi
    # the same interval by hand: resample rows with numpy, take the 2.5/97.5 percentiles of the resampled log loss
    losses = -np.log(np.clip(p, 1e-15, 1)[np.arange(len(y)), y])
    idx = np.random.default_rng(1).integers(0, len(y), size=(4000, len(y)))
    ref_lo, ref_hi = np.percentile(losses[idx].mean(1), [2.5, 97.5])
    width = ref_hi - ref_lo
    assert abs(lo - ref_lo) < 0.1 * width and abs(hi - ref_hi) < 0.1 * width
    assert rep["cv_log_loss_fold_std"] == pytest.approx(np.std([f["log_loss"] for f in rep["folds"]], ddof=1))


def _raw_length_features(df):
    """The baseline's features recomputed from the raw CSV cells (JSON lists of turns joined by a space)."""
    def chars(cell):
        return len(" ".join("" if t is None else t for t in json.loads(cell)))
    c = {col: np.array([chars(v) for v in df[col]], dtype=float) for col in ("prompt", "response_a", "response_b")}
    a, b = c["response_a"], c["response_b"]
    r = np.log1p(a) - np.log1p(b)
    return np.column_stack([np.log1p(c["prompt"]), np.log1p(a), np.log1p(b), (a - b) / 1000, r, np.abs(r)])


def _multinomial_l2(x, y, c=1.0):
    """Multinomial logistic regression minimising C * sum(log loss) + |W|^2 / 2 (intercepts free) with scipy: the
    objective sklearn's LogisticRegression(C=1) solves, written out independently of sklearn."""
    n, d = x.shape
    onehot = np.eye(3)[y]

    def f(theta):
        w, b = theta[:3 * d].reshape(d, 3), theta[3 * d:]
        z = x @ w + b
        z -= z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        g = np.exp(logp) - onehot
        grad = np.concatenate([(c * x.T @ g + w).ravel(), c * g.sum(0)])
        return -c * (onehot * logp).sum() + 0.5 * (w ** 2).sum(), grad

    theta = minimize(f, np.zeros(3 * d + 3), jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-9}).x
    return theta[:3 * d].reshape(d, 3), theta[3 * d:]


def test_length_baseline_matches_an_independent_fit(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    raw = pd.read_csv(DATA).iloc[:N_ROWS]
    x, y, fold = _raw_length_features(raw), raw[LABELS].to_numpy().argmax(1), raw["id"].to_numpy() % 5
    probs = np.zeros((len(y), 3))
    for k in FOLDS:
        tr, te = fold != k, fold == k
        mu, sd = x[tr].mean(0), x[tr].std(0)
        w, b = _multinomial_l2((x[tr] - mu) / sd, y[tr])
        z = (x[te] - mu) / sd @ w + b
        probs[te] = np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
        per_fold = next(f for f in rep["folds"] if f["fold"] == k)
        assert per_fold["length_baseline_log_loss"] == pytest.approx(sk_log_loss(y[te], probs[te], labels=[0, 1, 2]),
                                                                     abs=1e-4)
    assert rep["length_baseline_log_loss"] == pytest.approx(sk_log_loss(y, probs, labels=[0, 1, 2]), abs=1e-4)
    # lengths carry signal on arena rows: the baseline is below the class prior even on 150 rows
    assert rep["length_baseline_log_loss"] < rep["prior_log_loss"]


def test_regenerating_gives_the_same_report(run_dir):
    before = (run_dir / "report.json").read_text()
    assert report_main([str(run_dir)]) == 0
    assert (run_dir / "report.json").read_text() == before


def test_length_baseline_gives_a_class_missing_from_training_its_smoothed_prior():
    from orchestrator.reporting.baselines import fit_predict
    from trainer_core.metrics import class_prior

    rows = load_rows(DATA, max_rows=N_ROWS)
    train, held = rows[rows["label"] != 2], rows[rows["label"] == 2]  # no tie to learn from, ties held out
    p = fit_predict(train, held)
    assert np.allclose(p.sum(1), 1.0) and np.allclose(p[:, 2], class_prior(train["label"].to_numpy())[2])
