"""The one exception type for errors a user can cause in data/ (missing file, corrupt shard, bad option).

It subclasses ValueError so that callers who only know the builtin types still catch it; the CLIs
turn it into a one-line message and a non-zero exit instead of a traceback.
"""

from model.errors import UserError


class DataError(UserError, ValueError):
    """A user-fixable problem; the message says what is wrong and what to do."""
