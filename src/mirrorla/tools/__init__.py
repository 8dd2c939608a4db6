"""Tools on top of the models: CLI, training, benchmarks, analysis."""
