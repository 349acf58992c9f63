"""GSD training engine: teacher, samplers, SiD + isometric distillation, evaluation (docs/definitions.md §3)."""

__version__ = "0.1.0"
