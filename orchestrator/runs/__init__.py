"""Run directories: a run's data file and folds, runs lined up row by row, ensemble weights and soft-label export."""
