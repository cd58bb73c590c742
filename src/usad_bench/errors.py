"""The one exception type users see.

Every problem caused by input (a missing file, a corrupt image, k larger than a class, an
unknown method) is raised as :class:`UsadError` with a message that says what to do. The CLI
prints it on one line and exits with status 2, without a traceback.
"""


class UsadError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived; raised from the signal handler so clean-up (locks, temporary folders) runs.

    A BaseException, not a KeyboardInterrupt: Lightning turns a KeyboardInterrupt inside training into
    ``exit(1)``, which a scheduler would read as an ordinary failure. ``done`` says what was finished;
    the command that catches it sets it, the CLI prints it and exits with ``exit_code`` (128 + signal).
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.done: str | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
