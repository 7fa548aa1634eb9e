"""The one base class for errors a user can cause (and fix): every CLI catches it and prints one line.

It imports nothing, so that a bad config key or flag is reported before torch is imported. Each part
has its own subclass (data.errors.DataError, model.io.ArtifactError, train.errors.TrainError,
eval.cli.UsageError); anything else that escapes a CLI is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can cause or fix; the message says what happened and what to do."""
