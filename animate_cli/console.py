"""All printing goes through `out`: results to stdout, messages and errors to stderr."""

import sys

from rich.console import Console


class Output:
    def __init__(self) -> None:
        self.quiet = False
        # Not a terminal (a pipe, a log file, CI): wide enough that tables keep their columns.
        self.stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
        self.stderr = Console(stderr=True, highlight=False)

    @property
    def interactive(self) -> bool:
        """Animated progress only on a terminal and when not quiet."""
        return not self.quiet and self.stderr.is_terminal

    def info(self, message: str) -> None:
        if not self.quiet:
            self.stderr.print(message)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.stderr.print(f"[yellow]warning:[/] {message}")

    def error(self, message: str) -> None:
        # Plain write: the message may hold paths with brackets that rich would read as markup.
        sys.stderr.write(f"error: {message}\n")

    def result(self, renderable) -> None:
        if not self.quiet:
            self.stdout.print(renderable)


out = Output()
