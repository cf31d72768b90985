"""Exceptions with messages written for the person who has to fix the problem."""

from __future__ import annotations


class TembenchError(Exception):
    """Base class: the CLI prints these as one paragraph and exits with status 2."""


class PluginError(TembenchError):
    """A plugin is malformed (duplicate name, missing Params or method, unknown kind)."""


class ScenarioError(TembenchError):
    """A scenario file is malformed or asks for something impossible."""


class KindMismatchError(ScenarioError):
    """A component receives a measurement or reconstruction kind it does not accept."""


class DeviceError(TembenchError):
    """The requested compute device is not available."""


class ResourceError(TembenchError):
    """A job would not fit in memory (raised before allocating)."""


class RunDirectoryError(TembenchError):
    """An output folder holds a different scenario's run, or is otherwise unusable."""
