"""`animate train-tiny WORKDIR`: train the tiny-motion model on procedural clips (resumable), and export it."""

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from animate_cli.console import out
from animate_cli.errors import AnimateError


def train_tiny(
    workdir: Annotated[Path, typer.Argument(help="Folder for the checkpoint (checkpoint.safetensors), the log and the "
                                            "exported model (WORKDIR/model).", show_default=False)],
    vae_steps: Annotated[int | None, typer.Option("--vae-steps", min=0, help="VAE steps [400].")] = None,
    unet_steps: Annotated[int | None, typer.Option("--unet-steps", min=0, help="UNet steps [3000].")] = None,
    decoder_steps: Annotated[int | None, typer.Option(
        "--decoder-steps", min=0, help="VAE decoder steps after the UNet, encoder frozen [0].")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Clips per UNet step [8].")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="UNet and CLIP learning rate [5e-4].")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Run seed: weights, clips and noise [0].")] = None,
    minutes: Annotated[float | None, typer.Option(
        "--minutes", min=0, help="Stop (with a checkpoint) after this much wall time; rerun to resume.")] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="CPU threads for torch.")] = 1,
    micro: Annotated[bool, typer.Option("--micro", help="A very small model (for tests).")] = False,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1)] = 200,
    export_to: Annotated[Path | None, typer.Option(
        "--export", help="Where to write the model in diffusers layout, float16 safetensors, when training ends "
        "(default: WORKDIR/model).")] = None,
    export_only: Annotated[bool, typer.Option("--export-only", help="Export the checkpoint as it is; no training.")]
    = False,
    decoder_from: Annotated[Path | None, typer.Option(
        "--decoder-from", help="Export with the VAE decoder of this checkpoint (a decoder phase run beside the UNet "
        "phase from the same VAE checkpoint: its encoder, hence the latents, must be identical).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint and start over.")] = False,
) -> None:
    """Train the tiny-motion model (VAE, then UNet + CLIP encoder) on CPU; resumes from WORKDIR/checkpoint.safetensors.

    The training settings live in the checkpoint: options given on a resumed run replace only step counts.
    """
    import torch

    from animate_cli import train

    torch.set_num_threads(threads)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "checkpoint.safetensors"
    log_file = (workdir / "train.log").open("a")

    def log(message: str) -> None:
        from rich.markup import escape

        out.info(escape(message))
        log_file.write(message + "\n")
        log_file.flush()

    given = {k: v for k, v in dict(vae_steps=vae_steps, unet_steps=unet_steps, decoder_steps=decoder_steps,
                                   batch=batch, lr=lr,
                                   seed=seed).items() if v is not None}
    if checkpoint.is_file() and not fresh:
        state = train.load_checkpoint(checkpoint)
        for key in ("vae_steps", "unet_steps", "decoder_steps"):
            if key in given:
                setattr(state.config, key, given.pop(key))
        if given:
            raise AnimateError(f"{checkpoint} exists: {', '.join(given)} cannot change on resume (use --fresh)")
        log(f"resumed from {checkpoint} at step {state.step}")
    else:
        if export_only:
            raise AnimateError(f"no checkpoint at {checkpoint} to export")
        config = train.micro_config(**given) if micro else train.TrainConfig(**given)
        state = train.new_state(config)
        log(f"new run: {config}")
    if not export_only:
        train.train(state, checkpoint, minutes=minutes, checkpoint_every=checkpoint_every, log=log)
    notes = {}
    if decoder_from is not None:
        other = train.load_checkpoint(decoder_from)
        train.take_decoder(state, other)
        notes["vae_decoder_from"] = {"steps": other.step, "config": asdict(other.config)}
        log(f"VAE decoder taken from {decoder_from} (step {other.step})")
    folder = train.export(state, export_to or workdir / "model", notes=notes)
    log(f"exported step {state.step} to {folder} ({train.folder_size(folder) / 1e6:.2f} MB)")
