"""The package's error classes: the ground floor every other module may import.

A `UsageError` is bad input from the user (flags, paths, files). Commands report it in one
line with exit code 2 (`gsd.cli.run_main`), never as a traceback. Library modules raise it
(and its subclasses) without knowing about the command line.
"""

from __future__ import annotations

__all__ = ["UsageError", "DataError", "PickleRefused", "GuidanceError", "TrainingStopped", "StorageError",
           "RunLocked", "DamagedCheckpoint", "Terminated"]


class UsageError(Exception):
    """Bad input from the user (flags, paths, files). Reported in one line, exit code 2."""


class DataError(UsageError):
    """A data set cannot be loaded (unknown name, missing root, unreadable file...)."""


class PickleRefused(UsageError):
    """The pickle references something outside the allow-list (nothing from it was run)."""


class GuidanceError(UsageError, ValueError):
    """Guidance cannot be applied as asked (method, sampler, loss or denoiser unfit).

    A `UsageError` (one line, exit code 2 in the commands) and a `ValueError`.
    """


class TrainingStopped(UsageError):
    """A run that went wrong (non-finite, every sample dropped, exploding): one line, exit 2."""


class StorageError(UsageError):
    """A file could not be written (disk full, read-only, quota): one line, exit 2, with the
    previous version of the file intact."""


class RunLocked(UsageError):
    """Another live process is using the run directory."""


class DamagedCheckpoint(UsageError):
    """A checkpoint fails its integrity checks (digest, dtype, finite values)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's warning before it kills): handled as the first Ctrl-C is,
    and the command exits with 143 (128 + SIGTERM)."""
