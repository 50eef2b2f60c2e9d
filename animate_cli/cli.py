"""The `animate` command line: assembles the commands; maps user errors to one line and an exit code."""

import os
import sys

import typer
from typer.core import TyperGroup

try:  # typer 0.26+ carries its own click
    from typer import _click as click
except ImportError:
    import click

from animate_cli.commands.animate import animate
from animate_cli.commands.bench import bench
from animate_cli.commands.distill import distill
from animate_cli.commands.presets import presets
from animate_cli.commands.train import train_tiny
from animate_cli.console import out
from animate_cli.errors import AnimateError

DEFAULT_COMMAND = "animate"


class DefaultCommandGroup(TyperGroup):
    """`animate photo.jpg ...` runs the default command; `animate presets` runs a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=DefaultCommandGroup,
    name="animate",
    help="Turn still images into short videos on a local GPU, fast.\n\n"
    "animate photo.jpg -o out.mp4 | animate presets | animate COMMAND --help",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(name=DEFAULT_COMMAND)(animate)
app.command()(presets)
app.command()(bench)
app.command(name="train-tiny")(train_tiny)
app.command()(distill)


def main() -> None:
    """Console entry point: user mistakes print one line on stderr (a traceback with ANIMATE_DEBUG=1)."""
    try:
        code = app(standalone_mode=False)  # typer returns Exit codes (130 for Ctrl-C) rather than raising
    except AnimateError as e:
        if os.environ.get("ANIMATE_DEBUG"):
            raise
        out.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except click.exceptions.ClickException as e:  # usage errors: bad option, missing argument, out of range
        e.show()
        sys.exit(e.exit_code)
    if code == 130:
        out.error("interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)
