"""
The one base class of every error a user can cause: a bad config or flag, a missing or corrupt file, data in the
wrong format. Each concern keeps its own subclass (ConfigError, DataError, CheckpointError, ...) so the message
can be specific; the commands catch UserError alone (@nanoforge.cli.command) and print it as one line.
"""


class UserError(Exception):
    """Something the user can fix; its message names the problem and the fix."""
