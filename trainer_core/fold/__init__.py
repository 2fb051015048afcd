"""One fold, top to bottom: setup, the training loop, evaluation, the fold's files (:func:`train_fold`)."""

from trainer_core.fold.loop import FoldResult, train_fold

__all__ = ["FoldResult", "train_fold"]
