"""Sweeps as data: the search space checked against the config, and the leaderboard and best config written after."""
