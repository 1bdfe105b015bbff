"""The errors moe-merge raises for bad input and failed steps.

Each is told in one line that names the file or key at fault. Every command catches
:class:`MoeMergeError`, prints the message and exits non-zero (2; 3 for :class:`SpikeError`), so
a new error type needs no handler of its own: subclass the base.
"""

from __future__ import annotations


class MoeMergeError(Exception):
    """Bad input or a failed step: the message is the whole story, in one line."""


class ConfigError(MoeMergeError, ValueError):
    """A recipe key, override or engine config that is invalid; names the key and file."""


class DataError(MoeMergeError, ValueError):
    """A corpus or tokenizer that cannot be used; names the file."""


class CheckpointError(MoeMergeError, ValueError):
    """A checkpoint file or layout refused; names the file and key."""


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint tag that misses some of its files (one still being written, or cut short)."""


class MergeError(MoeMergeError, ValueError):
    """A merge that cannot be done as asked (selection, weights, mismatched inputs, output)."""


class LaunchError(MoeMergeError, RuntimeError):
    """A training launch that failed; the message names the log holding its output."""


class SpikeError(MoeMergeError, RuntimeError):
    """Training could not get past a loss spike within the allowed recoveries (exit 3)."""
