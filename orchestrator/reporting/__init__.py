"""The reducer and everything a report shows: calibration, diagnostics, baselines, error bars, plots, Markdown and
HTML. Reads files only: no Ray, no model."""
