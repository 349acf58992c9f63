"""A distillation run, the library behind `python -m gsd.train`: `run` (the phases of a run),
`loop` (iterations, logging, checkpoints, the stop rule, interrupts), `resume` (continuing a
run from its checkpoint) and `settings` (checking a run's resolved settings once)."""
