"""The one exception type users see.

Every problem caused by input (a missing file, a corrupt image, k larger than a class, an
unknown method) is raised as :class:`UsadError` with a message that says what to do. The CLI
prints it on one line and exits with status 2, without a traceback.
"""


class UsadError(Exception):
    """A user-facing error: the message names the problem and the fix."""
