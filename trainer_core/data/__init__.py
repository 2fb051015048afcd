"""Rows and tokens: the arena CSV format (parsing, labels, folds), tokenization, batch plans, which rows a fold trains
on, soft labels for distillation and the A/B swap."""
