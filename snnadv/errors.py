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


class SnnadvWarning(UserWarning):
    """Something the user should know that is not an error (the CLI prints one line)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with what the run kept on disk.

    ``path``: the checkpoint; ``epoch``: the last completed (saved) epoch, 0 if none;
    ``epochs``: the epochs asked for.  ``str()`` is the sentence the CLI prints.
    """

    def __init__(self, path, epoch: int, epochs: int):
        super().__init__(path, epoch, epochs)
        self.path, self.epoch, self.epochs = str(path), epoch, epochs

    def __str__(self) -> str:
        if self.epoch == 0:
            return f"no epoch was completed, nothing was saved in {self.path}"
        return f"epoch {self.epoch} of {self.epochs} is saved in {self.path}, continue with --resume"
