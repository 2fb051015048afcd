"""Ray orchestration of cross-validation folds, sweeps and reports (the only package that imports Ray)."""
