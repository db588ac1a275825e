"""Method steps as passes: each takes a model + context and a frozen config."""
