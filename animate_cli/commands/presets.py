"""`animate presets [NAME]`: list the presets, or show one."""

from typing import Annotated

import typer
from rich.table import Table

from animate_cli.console import out
from animate_cli.preset import FIELDS, load_preset, preset_names


def presets(name: Annotated[str | None, typer.Argument(help="A preset name or .toml file to show.")] = None) -> None:
    """List every preset and its fields, or show one."""
    chosen = [load_preset(name)] if name else [load_preset(n) for n in preset_names()]
    table = Table(title="presets" if name is None else f"preset {chosen[0].name}", title_justify="left")
    table.add_column("field")
    for preset in chosen:
        table.add_column(preset.name)
    for field in FIELDS:
        if field == "name":
            continue
        table.add_row(field, *(str(getattr(p, field)) for p in chosen))
    out.stdout.print(table)
