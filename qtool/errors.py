"""Error hierarchy. Each user-facing failure carries its CLI exit code and a hint that names the fix."""

from __future__ import annotations


class QtoolError(Exception):
    """Base class of every error qtool reports to users."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(QtoolError):
    """Command-line arguments that do not fit together (click's own usage errors also exit 2)."""

    exit_code = 2


class ConfigError(QtoolError):
    """Invalid recipe: unknown key, wrong type, cross-field rule."""

    exit_code = 3


class IncompatibleModelError(QtoolError):
    """The model cannot be handled: unknown architecture, adapter resolution failed."""

    exit_code = 4


class LayoutError(QtoolError):
    """A shape/bits/group combination the layout cannot hold (found at plan time)."""

    exit_code = 4


class KernelUnavailableError(QtoolError):
    """The requested kernel backend cannot run here."""

    exit_code = 5


class CheckpointError(QtoolError):
    """I/O or checkpoint integrity problem: exists without --overwrite, manifest mismatch, missing file."""

    exit_code = 6


class AssetError(CheckpointError):
    """A bundled asset (model, corpus) is missing; the hint says how to fetch it."""


class CalibrationError(QtoolError):
    """Calibration could not produce a result (e.g. not enough data)."""

    exit_code = 7
