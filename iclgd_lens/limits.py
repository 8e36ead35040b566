"""The ranges of the numbers a user gives everywhere (compare(), the command line, sweep specs),
kept in one place that imports nothing heavy (the CLI reads them at import)."""

MAX_SEED = 2**31 - 1
"""The largest seed: the draws seed their generators with seed plus small offsets and, for the random
update, seed * 1_000_003 + episode (`gd.deltas.random_seed`), which then still fit torch's int64."""

MAX_THREADS = 1024
"""The most torch threads a run may ask for."""

MAX_TRAIN_STEPS = 1_000_000
"""The most steps `iclgd-lens train` takes: the shipped models train for 2,000 (minutes on a CPU);
a million is already weeks there, and more is a typo, refused instead of run."""
