"""GSD training engine: teacher, samplers, SiD + isometric distillation, evaluation (SPEC §3)."""

__version__ = "0.1.0"
