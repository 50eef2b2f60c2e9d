"""`animate IMAGE -o OUT`: the default command."""

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from animate_cli import options
from animate_cli.console import out
from animate_cli.errors import AnimateError
from animate_cli.media import (
    FITS,
    FORMATS,
    check_writable,
    fit_image,
    load_image,
    output_format,
    parse_size,
    resolve_size,
)


def animate(
    inputs: Annotated[list[Path], typer.Argument(
        help="Images, folders or quoted globs to animate. One image: single mode, -o names the output. "
        "Several, a folder or a glob: batch mode, -o names OUTDIR.", show_default=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="One image: output file (.mp4, .gif, .webp) or folder of PNG frames "
        "(default: IMAGE's name, .mp4). Batch: OUTDIR, created if missing; each output is named after its input "
        "(stem + the format's suffix), with OUTDIR/animate-manifest.jsonl as the run's record.")] = None,
    preset: options.Preset = "bf16",
    model: options.Model = options.DEFAULT_MODEL,
    frames: options.Frames = None,
    steps: options.Steps = None,
    fps: Annotated[int | None, typer.Option("--fps", min=1, help="Frames per second, of the file and of SVD's "
                                            "conditioning (default: from the preset).")] = None,
    motion: Annotated[int | None, typer.Option(
        "--motion", min=1, max=255,
        help="SVD motion bucket id, 1..255: more is more motion (default: from the preset).")] = None,
    noise_aug: Annotated[float | None, typer.Option(
        "--noise-aug", min=0.0, help="Noise added to the conditioning image: more is more motion, "
        "less likeness (default: from the preset).")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Seed, as torch.Generator(device).manual_seed(S). Batch: each image's seed is derived from S "
        "and its relative path, so it does not depend on order or batching. Default: random (one per image).")] = None,
    size: options.Size = None,
    fit: Annotated[str, typer.Option("--fit", help=f"How the image meets --size: {', '.join(FITS)}.")] = "crop",
    decode_chunk: Annotated[int | None, typer.Option(
        "--decode-chunk", min=1,
        help="Frames per VAE decoder call: less uses less memory (default: from the preset).")] = None,
    device: options.Device = "auto",
    fmt: Annotated[str | None, typer.Option(
        "--format", help=f"{'|'.join(FORMATS)} (default: from the -o suffix).")] = None,
    quality: Annotated[int, typer.Option("--quality", min=1, max=100,
                                         help="1..100: MP4 (x264 CRF = 0.51 x (100 - q)) and WebP quality.")] = 70,
    json_path: options.JsonPath = None,
    quiet: options.Quiet = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    sets: options.Settings = None,
    recursive: Annotated[bool, typer.Option(
        "--recursive", "-r", help="Batch: descend into sub-folders (and let ** in globs do so); outputs mirror "
        "the sub-folders under OUTDIR.")] = False,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Batch: images of one output size run through the encoders and the UNet "
        "together; each video is the same as alone with its seed. More is faster and uses more memory.")] = 1,
) -> None:
    """Animate IMAGE into a short video: animate photo.jpg -o out.mp4

    Batch: animate photos/ 'more/*.png' -o videos/ [--recursive] [--batch-size N]. Resumable: outputs that
    exist are skipped, so the same command again after an interrupt finishes the rest. Exit 0: every image
    done or skipped; 1: some failed (reasons in the manifest); 2: usage error; 130: interrupted.
    """
    import torch

    from animate_cli import report
    from animate_cli.pipeline import generate
    from animate_cli.runner import draw_seed, open_model, resolve_device, resolve_preset, settings_for
    from animate_cli.timing import StageTimer

    out.quiet = quiet
    if fit not in FITS:
        raise AnimateError(f"--fit {fit!r}: choose one of {', '.join(FITS)}")
    chosen = resolve_preset(preset, sets, frames=frames, steps=steps, fps=fps, motion=motion,
                            noise_aug=noise_aug, decode_chunk=decode_chunk)
    if size is not None:
        parse_size(size)  # a bad --size is a usage error before anything loads
    report.check_json_path(json_path)
    if is_batch(inputs):
        from animate_cli.batch import BatchOptions, run_batch

        if output is None:
            raise AnimateError("with several images, a folder or a glob, give -o OUTDIR for the videos")
        run_batch(BatchOptions(
            inputs=inputs, outdir=output, fmt=output_format(Path("x.mp4"), fmt), preset=chosen, model=model,
            device=resolve_device(device), recursive=recursive, batch_size=batch_size, overwrite=overwrite,
            seed=seed, size=size, fit=fit, quality=quality, json_path=json_path))
        return
    image_path = inputs[0]
    output = output if output is not None else Path(image_path.stem + ".mp4")
    fmt = output_format(output, fmt)
    check_writable(output, overwrite)
    image = load_image(image_path)  # fail on a bad image before the model loads
    torch_device = resolve_device(device)
    seed = draw_seed() if seed is None else seed

    timer = StageTimer(torch_device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    with timer.stage("load"):
        loaded = open_model(model, chosen, torch_device, progress=not quiet)
    if loaded.random_weights:
        out.warn(f"{loaded.source} has {report.RANDOM_WEIGHTS_NOTE}")
    with timer.stage("preprocess"):
        width, height = resolve_size(size, image, loaded.native_size, loaded.size_multiple)
        fitted = fit_image(image, (width, height), fit)
    settings = settings_for(chosen, loaded, width, height)
    out.info(f"{image_path} -> {output}: {settings.frames} frames at {width}x{height}, preset {chosen.name}, "
             f"seed {seed}, {torch_device}")

    from animate_cli.media import VideoStream

    # The video is encoded as each chunk of frames is decoded; "write" is what is left once decoding ends.
    with VideoStream(output, fmt, settings.fps, quality, (width, height)) as stream:
        with step_progress(settings.steps) as on_step:
            generate(loaded, [fitted], [seed], settings, timer, on_step=on_step,
                     sink=lambda _, frames: stream.append(frames))
        with timer.stage("write"):
            stream.close()

    peak = report.peak_memory_gib(torch_device)
    out.result(report.stage_table(timer, f"{output} ({fmt}, {settings.frames} frames, seed {seed})", peak))
    if json_path is not None:
        report.write_json(json_path, {
            "input": str(image_path),
            "output": str(output),
            "format": fmt,
            "seed": seed,
            "model": loaded.source,
            "random_weights": loaded.random_weights,
            "note": report.RANDOM_WEIGHTS_NOTE if loaded.random_weights else None,
            "preset": chosen.as_dict(),
            "settings": vars(settings),
            "device": str(torch_device),
            "device_name": report.device_name(torch_device),
            "peak_memory_gib": peak,
            "timing": timer.as_dict(),
            "step_times_s": timer.step_times,
            "versions": report.versions(),
        })


@contextlib.contextmanager
def step_progress(steps: int):
    """A progress bar over the denoising steps on a terminal; nothing otherwise."""
    if not out.interactive:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=out.stderr, transient=True) as progress:
        task = progress.add_task("denoise", total=steps)
        yield lambda i: progress.update(task, completed=i + 1)


def is_batch(inputs: list[Path]) -> bool:
    """Single mode (as before batches existed): one input that is not a folder and not an unmatched glob."""
    import glob

    if len(inputs) != 1:
        return True
    path = inputs[0]
    return path.is_dir() or (not path.exists() and not path.is_symlink() and glob.has_magic(str(path)))
