"""The one error type for mistakes a user can fix: printed as one line, never as a traceback."""


class AnimateError(Exception):
    """What is wrong and what to do about it. exit_code 2: usage or configuration; 1: a run that failed."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
