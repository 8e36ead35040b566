"""The comparison engine: record probes (record), train GD as per-episode deltas (gd), turn
recordings into metrics (metrics, baselines) and tidy rows (table), aggregate over episodes
(stats), and run one comparison end to end (compare) into Results (results).
See docs/architecture.md for the path of one `compare()` call through these modules."""
