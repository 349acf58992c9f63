"""GSD training engine: teacher, samplers, SiD + isometric distillation, evaluation (docs/definitions.md §3).

`gsd.load_generator(path_or_run_dir)` loads a one-step generator (gsd.generator); it is imported
on first use, so that `import gsd.errors` and the other light modules stay light."""

__version__ = "0.1.0"

__all__ = ["load_generator", "__version__"]


def __getattr__(name):
    if name == "load_generator":
        from gsd.generator import load_generator

        return load_generator
    raise AttributeError(f"module 'gsd' has no attribute {name!r}")
