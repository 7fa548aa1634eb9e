"""The one exception type for problems a user can cause or fix in train/.

`python -m train` turns it (and data.errors.DataError, model.io.ArtifactError) into one line on stderr
and a non-zero exit, never a traceback. Kept free of torch so that config errors are reported fast.
"""

from model.errors import UserError


class TrainError(UserError, RuntimeError):
    """A user-fixable problem or a deliberate stop (bad config, missing data, non-finite loss);
    the message says what happened and what to do."""


class ConfigError(TrainError, ValueError):
    """An unknown config key, a wrong type or an invalid value; raised before any work starts."""

    label = "config error"  # the runner's line: `config error: ...` (model/cli.py)
