"""Performance measurements: the step benchmark (the seed's setup against ours), the seed notebook's exact HF Trainer
path, and where a fold's wall time went."""
