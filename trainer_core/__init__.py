"""Train and evaluate one cross-validation fold of a preference classifier (no Ray in here)."""

__all__ = ["config", "data", "fold", "metrics"]
