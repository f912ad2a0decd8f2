"""The one exception type for mistakes a user can make (bad config, missing file, ...).

The CLI prints its message and exits non-zero without a traceback; library callers can
catch it. Anything else that escapes is a bug in saekit.
"""


class SaekitError(Exception):
    """A user-facing error: the message says what is wrong and what to change."""
