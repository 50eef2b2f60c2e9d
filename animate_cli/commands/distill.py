"""`animate distill IMAGES --model M --workdir DIR`: guidance + step distillation into a one-pass, 8-step student."""

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from animate_cli.console import out
from animate_cli.errors import AnimateError
from animate_cli.media import parse_size


def distill(
    images: Annotated[Path, typer.Argument(help="Folder of still images (the conditioning to distil on).",
                                           show_default=False)],
    workdir: Annotated[Path, typer.Option(
        "--workdir", help="Folder for the checkpoint, the loss log (loss.jsonl) and each phase's student; "
        "the same command again resumes from it.", show_default=False)],
    model: Annotated[str | None, typer.Option(
        "--model", help="Teacher: hub id, local folder in diffusers layout, or random:NAME "
        "\\[stabilityai/stable-video-diffusion-img2vid-xt].")] = None,
    stage1_steps: Annotated[int | None, typer.Option(
        "--stage1-steps", min=0, help="Optimizer steps of stage 1 (guidance distillation) [2000].")] = None,
    round_steps: Annotated[int | None, typer.Option(
        "--round-steps", min=0, help="Optimizer steps of each step-reducing round [2000].")] = None,
    rounds: Annotated[int | None, typer.Option(
        "--rounds", min=0, help="Step-reducing rounds, each dividing the steps by --step-factor: the student "
        "starts at final-steps x step-factor^rounds [2].")] = None,
    step_factor: Annotated[int | None, typer.Option(
        "--step-factor", min=2, help="Steps each round folds into one: the student starts at final-steps x "
        "step-factor^rounds [2].")] = None,
    round_target: Annotated[str | None, typer.Option(
        "--round-target", help="Where each round's targets come from: 'previous' (step-factor steps of the "
        "previous phase's student), 'teacher' (the original teacher's guided steps over the same span: no "
        "stage-1 error in the target, two passes per step) or 'trajectory' (where the teacher's own videos' "
        "sampling paths went over that span, kept with them: no pass to make a target, but only those paths; "
        "needs --data teacher) \\[previous].")] = None,
    final_steps: Annotated[int | None, typer.Option(
        "--final-steps", min=1, help="Sampling steps of the final student [8].")] = None,
    match_steps: Annotated[int | None, typer.Option(
        "--match-steps", min=0, help="Optimizer steps of stage 3: the final student, sampling from each teacher "
        "video's own noise, learns to land where the teacher's 32-step video did (needs --data teacher) [0: none]."
    )] = None,
    match_lr: Annotated[float | None, typer.Option(
        "--match-lr", min=0.0, help="Learning rate of stage 3 (default: --lr).", show_default=False)] = None,
    match_loss: Annotated[str | None, typer.Option(
        "--match-loss", help="What stage 3's mean square error compares: the two videos' 'latents', or their "
        "'pixels' as the VAE decodes them (the frames the distance to the teacher is measured on; two decoder "
        "passes and one backward per video, so more time and memory) \\[latents].")] = None,
    match_metric: Annotated[str | None, typer.Option(
        "--match-metric", help="Stage 3's loss: 'mse', the mean square error over the batch, or 'rmse', each "
        "video's root mean square error averaged over the videos, as students are scored clip by clip (far-off "
        "videos weigh less) \\[mse].")] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="AdamW learning rate [1e-5]; the new "
                                             "guidance embedding gets 10x.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Videos per step [1].")] = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="What the student trains on: 'teacher' (videos the teacher makes from each still, made once "
        "and kept in WORKDIR) or 'stills' (each still as a video without motion) \\[teacher].")] = None,
    samples_per_image: Annotated[int | None, typer.Option(
        "--samples-per-image", min=1, help="Teacher videos per still with --data teacher [4].")] = None,
    guidance_range: Annotated[tuple[float, float] | None, typer.Option(
        "--guidance-range", help="LOW HIGH: the max guidance each training video draws, uniformly; the student "
        "is for guidance in this range, and refuses a max guidance outside it (LOW = HIGH distils one value) "
        "[1 3].", show_default=False)] = None,
    guidance_input: Annotated[str | None, typer.Option(
        "--guidance-input", help="What the guidance embedding sees: 'frame' (each frame's own scale, added to "
        "that frame's time embedding) or 'video' (the video's max guidance) \\[video].")] = None,
    lr_schedule: Annotated[str | None, typer.Option(
        "--lr-schedule", help="'linear' (annealed to zero within each phase) or 'constant' \\[linear].")] = None,
    sigma_sampling: Annotated[str | None, typer.Option(
        "--sigma-sampling", help="Which noise levels train: 'lognormal' (a normal in log sigma, see "
        "--sigma-log-mean/--sigma-log-std, with a tenth spread evenly) or 'uniform' over the grid \\[lognormal].")]
    = None,
    round_sigma_sampling: Annotated[str | None, typer.Option(
        "--round-sigma-sampling", help="The same for the step-reducing rounds' grids \\[uniform].")] = None,
    sigma_log_mean: Annotated[float | None, typer.Option(
        "--sigma-log-mean", help="Centre of the lognormal sigma sampling, in log sigma [0.7].")] = None,
    sigma_log_std: Annotated[float | None, typer.Option(
        "--sigma-log-std", help="Spread of the lognormal sigma sampling, in log sigma [1.3].")] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="'auto' (bf16 autocast on CUDA, float32 elsewhere), 'bf16' (bf16 autocast on any "
        "device: faster on CPUs with bf16 instructions) or 'fp32'; may change on resume \\[auto].")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute the student's activations in the backward pass: less memory, more time (default: on "
        "CUDA, where memory is short for a large model; off for a small one); may change on resume.",
        show_default=False)] = None,
    holdout: Annotated[int | None, typer.Option(
        "--holdout", min=0, help="Stills kept out of training (picked by --seed): the teacher makes a video from "
        "each, and the student's distance to those videos, sampling on its phase's grid from the same noise, is "
        "measured at each phase's start and end (and every --eval-every steps), logged and kept in "
        "WORKDIR/eval.jsonl [0].")]
    = None,
    eval_every: Annotated[int | None, typer.Option(
        "--eval-every", min=0, help="Measure the held-out distance every this many steps as well (needs "
        "--holdout) [0: at each phase's start and end only].")] = None,
    keep_best: Annotated[bool | None, typer.Option(
        "--keep-best/--keep-last", help="End each phase with its student that measured closest on the held-out "
        "stills (the one it started with, if none did better) rather than its last (needs --holdout) "
        "\\[keep-last].", show_default=False)] = None,
    ema: Annotated[float | None, typer.Option(
        "--ema", min=0.0, help="End each phase with an exponential moving average of its weights, this decay per "
        "step (0.99: about the last 100 steps; warmed up as (1 + n) / (10 + n) over the phase's first steps n), "
        "rather than its last weights; the held-out checks measure the average \\[0: the last].",
        show_default=False)] = None,
    warmup: Annotated[float | None, typer.Option(
        "--warmup", min=0.0, help="Raise the learning rate linearly from zero over this share of each phase's "
        "first steps (0.1: the first tenth) \\[0: none].", show_default=False)] = None,
    init_student: Annotated[Path | None, typer.Option(
        "--init-student", help="Start the student from this student folder (a WORKDIR/phase-N/ or --out of an "
        "earlier run of this teacher) rather than from the teacher: e.g. a stage-1 student, with --stage1-steps 0, "
        "to run the rounds or stage 3 on other stills or more teacher videos. Its guidance input must be "
        "--guidance-input's.", show_default=False)] = None,
    size: Annotated[str | None, typer.Option(
        "--size", help="WIDTHxHEIGHT of the training videos (default: the model's native size).")] = None,
    frames: Annotated[int | None, typer.Option("--frames", min=1, help="Frames (default: the model's).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Run seed: image order, guidance, sigmas, noise [0].")]
    = None,
    device: Annotated[str, typer.Option("--device", help="cuda, cuda:N, cpu or auto.")] = "auto",
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where the final student goes (default: WORKDIR/student).")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1)] = 100,
    log_every: Annotated[int, typer.Option("--log-every", min=1)] = 10,
) -> None:
    """Distil the model into a guidance-conditioned student that samples in one UNet pass per step and few steps
    (Meng et al. 2023): stage 1 learns classifier-free guidance, then each round divides the steps by --step-factor
    (2: 32 -> 16 -> 8); an optional stage 3 (--match-steps) fits the final student's videos to the teacher's, end
    to end.

    Resumes from WORKDIR/checkpoint.safetensors. Writes WORKDIR/phase-N/ after each phase, and the final student
    (diffusers layout, safetensors) to --out.
    """
    from animate_cli import distill as d
    from animate_cli.runner import resolve_device

    given = dict(model=model, stage1_steps=stage1_steps, round_steps=round_steps, rounds=rounds,
                 step_factor=step_factor, round_target=round_target, final_steps=final_steps,
                 match_steps=match_steps, match_lr=match_lr, match_loss=match_loss, match_metric=match_metric,
                 lr=lr, batch_size=batch_size, frames=frames, seed=seed, data=data,
                 samples_per_image=samples_per_image, lr_schedule=lr_schedule, guidance_input=guidance_input,
                 guidance_range=tuple(guidance_range) if guidance_range is not None else None,
                 sigma_sampling=sigma_sampling, round_sigma_sampling=round_sigma_sampling,
                 sigma_log_mean=sigma_log_mean, sigma_log_std=sigma_log_std, precision=precision,
                 gradient_checkpointing=gradient_checkpointing, holdout=holdout, eval_every=eval_every,
                 keep_best=keep_best, ema=ema, warmup=warmup,
                 init_student=str(init_student) if init_student is not None else None)
    if size is not None:
        given["width"], given["height"] = parse_size(size)
    options = {k: v for k, v in given.items() if v is not None}
    torch_device = resolve_device(device)
    d.image_files(images)  # fail on a bad folder before the model loads
    if init_student is not None and not d.checkpoint_path(workdir).is_file():  # (a resumed run does not read it)
        from animate_cli.student import read_student_config

        read_student_config(init_student)
    if workdir.exists() and not workdir.is_dir():
        raise AnimateError(f"--workdir {workdir} is a file; give a folder")
    out_dir = out_dir if out_dir is not None else workdir / "student"
    if out_dir.exists() and not out_dir.is_dir():
        raise AnimateError(f"--out {out_dir} is a file; give a folder")

    log_path = workdir / "distill.log"

    def log(message: str) -> None:
        from rich.markup import escape

        out.info(escape(message))
        with log_path.open("a") as f:
            f.write(message + "\n")

    with phase_progress() as progress:
        session = d.open_session(options, images, workdir, torch_device, log=log, progress=progress)
        c = session.config
        log(f"{'resumed at step ' + str(session.global_step) if session.global_step else 'new run'}: {c.model}, "
            f"{len(session.data.names)} images{f' (and {c.holdout} held out)' if c.holdout else ''} at "
            f"{c.width}x{c.height}, {c.frames} frames, {torch_device}; "
            f"{c.base_steps} -> {c.final_steps} steps in {c.rounds} round{'' if c.rounds == 1 else 's'}"
            f"{f', then {c.match_steps} matching steps' if c.match_steps else ''}; data: {c.data}")
        d.run(session, checkpoint_every=checkpoint_every, log_every=log_every, log=log, progress=progress,
              step_lines=progress is None)
    folder = d.export(session, out_dir)
    log(f"student ({c.final_steps} steps, one pass per step) written to {folder}")
    out.result(str(folder))


@contextlib.contextmanager
def phase_progress():
    """A rich progress bar per phase on a terminal; None (plain log lines) otherwise."""
    if not out.interactive:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=out.stderr) as progress:
        tasks = {}

        def update(name: str, step: int, total: int, loss: float | None = None) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total, loss="")
            fields = {"loss": f"loss {loss:.5f}"} if loss is not None else {}
            progress.update(tasks[name], completed=step, total=total, **fields)

        yield update
