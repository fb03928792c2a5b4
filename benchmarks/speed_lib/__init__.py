"""The inference-speed benchmark (``python -m benchmarks.speed``): models, pruning arms, deployment modes, timing,
diagnostics and the report (issue #19)."""
