"""The one exception type users see as a one-line error.

Library code raises :class:`SnnadvError` (or a subclass) for anything that is the
user's input at fault: a bad option, missing or corrupt data, a checkpoint of the
wrong kind.  The command line prints ``error: <message>`` and exits non-zero; Python
users catch it like any other exception.
"""


class SnnadvError(Exception):
    """A user-facing error whose message fits on one line."""


class DataError(SnnadvError):
    """A dataset directory or file is missing or malformed."""


class CheckpointError(SnnadvError):
    """A checkpoint is missing, corrupt, or of the wrong kind or architecture."""


class TrainingError(SnnadvError):
    """Training cannot go on (for example the loss became NaN)."""
