"""report.html: one self-contained page (inline CSS, figures embedded as base64 PNGs) that opens anywhere offline.

It shows the same numbers as report.md, formatted by the same helpers, all taken from the report dict (report.json).
"""

from __future__ import annotations

import base64
import html

from orchestrator.reporting import markdown as markdown_report
from orchestrator.reporting.honesty import warning
from orchestrator.reporting.markdown import CLASS_NAMES, fmt, fold_columns, folds_text, summary_rows, title, verdict
from orchestrator.reporting.plots import COLORS
from orchestrator.reporting.recipe import recipe_rows, shown

CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2937;
 background:#f6f7f9;margin:0}
main{max-width:1120px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:32px 0 10px;border-bottom:1px solid #e5e7eb;
 padding-bottom:6px}
.sub{color:#6b7280;font-size:13px;margin-bottom:18px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:14px 16px;border-top:4px solid #ccc}
.card .k{color:#6b7280;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:28px;font-weight:650;font-variant-numeric:tabular-nums;margin:2px 0}
.card .n{color:#6b7280;font-size:12px}
.hero{grid-column:span 2} .hero .v{font-size:34px}
.badge{display:inline-block;padding:1px 8px;white-space:nowrap;border-radius:999px;font-size:12px;font-weight:600}
.good{background:#dcfce7;color:#166534} .bad{background:#fee2e2;color:#991b1b}
table{border-collapse:collapse;background:#fff;border:1px solid #e5e7eb;border-radius:8px;font-size:13px;
 font-variant-numeric:tabular-nums;width:100%}
th,td{padding:6px 10px;border-bottom:1px solid #eef0f3;text-align:right;white-space:nowrap}
th{background:#f9fafb;color:#374151;font-weight:600}
td.l,th.l{text-align:left;white-space:normal} tr.total td{font-weight:650;background:#f9fafb}
.best{color:#166534;font-weight:650}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
figure{margin:0;background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:10px}
figure img{width:100%;height:auto;display:block} figcaption{color:#6b7280;font-size:12px;margin-top:6px}
.note{color:#6b7280;font-size:12px;margin-top:8px}
code{background:#eef0f3;padding:1px 5px;border-radius:4px;font-size:12px}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _card(label: str, value: str, note: str, color: str, hero: bool = False) -> str:
    return (f'<div class="card{" hero" if hero else ""}" style="border-top-color:{color}"><div class="k">'
            f'{html.escape(label)}</div><div class="v">{value}</div><div class="n">{note}</div></div>')


def _vs_prior(report: dict, value: float) -> str:
    """Signed difference to the class prior, coloured: negative (better than the prior) is green."""
    d = value - report["prior_log_loss"]
    return f'<span style="color:{"#166534" if d < 0 else "#991b1b"}">{d:+.4f} vs prior</span>'


def _cards(report: dict) -> str:
    beats, delta = verdict(report)
    badge = (f'<span class="badge {"good" if beats else "bad"}">{"beats" if beats else "does not beat"} the prior '
             f'by {fmt(abs(delta))}</span>')
    if markdown_report.error_bar(report):
        badge += f"<br>{html.escape(markdown_report.error_bar(report))}"
    cards = [_card("OOF log loss", fmt(report["cv_log_loss"]), badge, COLORS["plain"], hero=True),
             _card("class prior", fmt(report["prior_log_loss"]), "the baseline to beat", COLORS["prior"])]
    if report.get("length_baseline_log_loss") is not None:
        cards.append(_card("length-only baseline", fmt(report["length_baseline_log_loss"]),
                           "logistic regression on response lengths &middot; "
                           f"{_vs_prior(report, report['length_baseline_log_loss'])}", COLORS["length"]))
    cards.append(_card("temperature-scaled", fmt(report["cv_log_loss_calibrated"]),
                       f"T = {report['temperature']:.3f}, cross-fitted &middot; "
                       f"{_vs_prior(report, report['cv_log_loss_calibrated'])}", COLORS["calibrated"]))
    if "cv_log_loss_tta" in report:
        cards.append(_card("A/B-swap TTA", fmt(report["cv_log_loss_tta"]),
                           f"+ temperature: {fmt(report['cv_log_loss_tta_calibrated'])} &middot; "
                           f"{_vs_prior(report, report['cv_log_loss_tta_calibrated'])}", COLORS["tta"]))
    cards.append(_card("accuracy", fmt(report["cv_accuracy"]), f"{report['n_rows']:,} rows, {report['n_folds']} folds",
                       "#374151"))
    return f'<div class="cards">{"".join(cards)}</div>'


def _summary_table(report: dict) -> str:
    rows = summary_rows(report)
    best = min(r[2] for r in rows)
    body = "".join(
        f'<tr><td class="l"><span class="swatch" style="background:{COLORS[key]}"></span>{html.escape(name)}</td>'
        f'<td class="{"best" if ll == best else ""}">{fmt(ll)}</td><td>{fmt(acc)}</td>'
        f'<td class="l">{html.escape(how)}</td></tr>' for key, name, ll, acc, how in rows)
    return ('<table><tr><th class="l">figure</th><th>log loss</th><th>accuracy</th><th class="l">how</th></tr>'
            f"{body}</table>")


def _fold_table(report: dict) -> str:
    cols = fold_columns(report)
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = ""
    for f in report["folds"]:
        vals = "".join(f"<td>{fmt(f.get(k), 3 if k == 'temperature' else 4)}</td>" for k, _ in cols)
        secs = f"{f['train_seconds']:.0f}" if f.get("train_seconds") is not None else "-"
        body += (f"<tr><td>{f['fold']}</td><td>{f['n_rows']}</td>{vals}<td>{f.get('steps') or '-'}</td>"
                 f"<td>{secs}</td></tr>")
    cv = {"log_loss": report["cv_log_loss"], "log_loss_calibrated": report["cv_log_loss_calibrated"],
          "log_loss_tta": report.get("cv_log_loss_tta"),
          "log_loss_tta_calibrated": report.get("cv_log_loss_tta_calibrated"),
          "length_baseline_log_loss": report.get("length_baseline_log_loss"),
          "prior_log_loss": report["prior_log_loss"], "accuracy": report["cv_accuracy"], "temperature": None}
    total = "".join(f"<td>{fmt(cv[k], 4)}</td>" if cv[k] is not None else "<td></td>" for k, _ in cols)
    body += f'<tr class="total"><td>CV</td><td>{report["n_rows"]}</td>{total}<td></td><td></td></tr>'
    return f"<table><tr><th>fold</th><th>rows</th>{head}<th>steps</th><th>train s</th></tr>{body}</table>"


def _length_table(report: dict) -> str:
    body = "".join(
        f"<tr><td>{b['min_chars']:,}–{b['max_chars']:,}</td><td>{b['n_rows']}</td><td>{fmt(b['log_loss'])}</td>"
        f"<td>{fmt(b['prior_log_loss'])}</td><td>{fmt(b['accuracy'])}</td></tr>" for b in report["length_buckets"])
    return ("<table><tr><th>characters</th><th>rows</th><th>log loss</th><th>class prior</th><th>accuracy</th></tr>"
            f"{body}</table>")


def _confusion_table(report: dict) -> str:
    cm = report["confusion"]
    body = "".join(f'<tr><td class="l">{name}</td>' + "".join(f"<td>{c}</td>" for c in cm[i]) + "</tr>"
                   for i, name in enumerate(CLASS_NAMES))
    return ('<table><tr><th class="l">true \\ predicted</th><th>a</th><th>b</th><th>tie</th></tr>'
            f"{body}</table>")


def _distillation_html(report: dict) -> str:
    d = report.get("distillation")
    if warning(report):
        d = {"optimistic": True, "note": warning(report)}
    if not d:
        return ""
    style = "background:#fee2e2;color:#991b1b" if d["optimistic"] else "background:#dcfce7;color:#166534"
    return (f'<p style="{style};padding:8px 12px;border-radius:8px;margin-top:14px"><b>'
            f'{"Optimistic CV" if d["optimistic"] else "Distillation"}:</b> {html.escape(d["note"])}</p>')


def _ensemble_html(report: dict) -> str:
    if "ensemble" not in report:
        return ""
    tables = ""
    for table in markdown_report.ensemble_tables(report):
        head = "".join(f'<th class="l">{html.escape(c)}</th>' for c in table[0])
        body = "".join("<tr>" + "".join(f'<td class="l">{html.escape(c)}</td>' for c in r) + "</tr>" for r in table[1:])
        tables += f'<table style="margin-bottom:12px"><tr>{head}</tr>{body}</table>'
    ens = report["ensemble"]
    return (f"<h2>Ensemble</h2><p class=\"note\">Method <code>{html.escape(ens['method'])}</code>; "
            f"{html.escape(ens['note'])}.</p>{tables}")


def _recipe_html(report: dict, figures: dict[str, bytes]) -> str:
    recipe = report.get("recipe")
    if not recipe:
        return ""
    rows = "".join(f'<tr><td class="l">{html.escape(label)}</td><td class="l"><code>{html.escape(str(text))}</code>'
                   f"</td></tr>" for label, text in recipe_rows(recipe))
    keys = "".join(f'<tr><td class="l"><code>{html.escape(k)}</code></td><td class="l"><code>{html.escape(shown(v))}'
                   f"</code></td></tr>" for k, v in recipe["non_default"].items())
    loss = f'<figure style="margin-top:14px">{_img(figures["loss"], "training loss per fold")}</figure>' \
        if "loss" in figures else ""
    return (f'<h2>Recipe</h2><table>{rows}</table>{loss}<p class="note">Config keys that differ from the '
            f'defaults:</p><table><tr><th class="l">key</th><th class="l">value</th></tr>{keys}</table>')


def render_html(report: dict, figures: dict[str, bytes]) -> str:
    """The whole page; ``figures`` are the PNGs of :func:`orchestrator.reporting.plots.render_figures`."""
    lc = report["label_counts"]
    sub = (f"{report['n_rows']:,} rows &middot; {report['n_folds']} folds &middot; labels a/b/tie "
           f"{lc['a']}/{lc['b']}/{lc['tie']} &middot; run <code>{html.escape(report['run_dir'])}</code>")
    if report.get("fingerprint"):
        sub += f" &middot; config <code>{html.escape(report['fingerprint'])}</code>"
    sub += f"<br>folds: {html.escape(folds_text(report))}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title(report))}</title><style>{CSS}</style></head>
<body><main>
<h1>{html.escape(title(report))}</h1>
<div class="sub">{sub}</div>
{_cards(report)}
{_distillation_html(report)}
<h2>Figures of merit</h2>
{_summary_table(report)}
<p class="note">Log loss as Kaggle scores it: probabilities clipped to [{report['clip']:g}, 1 &minus;
{report['clip']:g}] and renormalised. Temperature scaling is cross-fitted: each fold's rows are rescaled with a T
fitted only on the other folds' OOF rows, so no row's label picks its own temperature.</p>
<h2>Per fold</h2>
{_fold_table(report)}
<figure style="margin-top:14px">{_img(figures['folds'], 'log loss per fold')}</figure>
{_ensemble_html(report)}
<h2>Calibration and errors</h2>
<div class="grid">
<figure>{_img(figures['reliability'], 'reliability diagram')}<figcaption>Expected calibration error
{fmt(report['ece'])} as predicted, {fmt(report['ece_calibrated'])} after temperature scaling. Points above the
diagonal are under-confident, below it over-confident; dot size = rows in the bin.</figcaption></figure>
<figure>{_img(figures['confusion'], 'confusion matrix')}{_confusion_table(report)}</figure>
</div>
<h2>Log loss by input length</h2>
<div class="grid">
<figure>{_img(figures['length'], 'log loss by input length')}</figure>
<div>{_length_table(report)}<p class="note">Length: {html.escape(report['length_unit'])}. Bucket edges are
quantiles, so buckets hold similar row counts. Long rows are where truncation to <code>data.max_length</code> tokens
cuts text away.</p></div>
</div>
{_recipe_html(report, figures)}
<p class="note" style="margin-top:28px">Regenerate:
<code>python -m orchestrator.report {html.escape(report['run_dir'])}</code> &middot; numbers: <code>report.json</code>
&middot; OOF probabilities: <code>oof.parquet</code></p>
</main></body></html>
"""
