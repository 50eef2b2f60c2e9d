"""Option types shared by the commands, as Annotated aliases."""

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt"

Preset = Annotated[str, typer.Option("--preset", help="Preset name (see `animate presets`) or a .toml file.")]
Model = Annotated[
    str,
    typer.Option(
        "--model", help="Hub id, local folder in diffusers layout, or random:NAME (random weights, no download)."
    ),
]
Frames = Annotated[
    int | None,
    typer.Option("--frames", min=1, help="Frames to generate (default: from the preset; auto = the model's count)."),
]
Steps = Annotated[int | None, typer.Option("--steps", min=1, help="Denoising steps (default: from the preset).")]
Size = Annotated[
    str | None,
    typer.Option(
        "--size",
        help="WIDTHxHEIGHT, rounded to the model's multiple (default: the model's size in the image's orientation).",
    ),
]
Seed = Annotated[
    int | None,
    typer.Option(
        "--seed", help="Seed, as torch.Generator(device).manual_seed(S) (default: drawn at random and reported)."
    ),
]
Device = Annotated[str, typer.Option("--device", help="cuda, cuda:N, cpu or auto.")]
JsonPath = Annotated[Path | None, typer.Option("--json", help="Also write the figures and settings as JSON here.")]
Settings = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="FIELD=VALUE", help="Override any preset field; repeatable (e.g. --set steps=15)."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
