"""`animate bench`: what each preset buys on this machine, per stage, in one run."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from animate_cli import options
from animate_cli.console import out
from animate_cli.errors import AnimateError


def bench(
    image: Annotated[Path | None, typer.Argument(help="Image to animate (default: examples/coffee.jpg).")] = None,
    presets: Annotated[str, typer.Option("--presets", help="Comma-separated presets; the first is the "
                                         "speed-up baseline.")] = "fp32,bf16,compiled,distilled",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Measured runs per preset.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Uncounted runs per preset first.")] = 1,
    ablation: Annotated[bool, typer.Option("--ablation", help="Add one optimization at a time from fp32.")] = False,
    peer: Annotated[str | None, typer.Option("--peer", help="Add a row for diffusers' own "
                                             "StableVideoDiffusionPipeline: --peer diffusers.")] = None,
    peer_dtype: Annotated[str, typer.Option("--peer-dtype", help="dtype of the peer row.")] = "bfloat16",
    model: Annotated[str | None, typer.Option(
        "--model", help="Hub id, local folder or random:NAME (default: random:svd-xt on a GPU, "
        "random:tiny on a CPU, where the full model would take hours).")] = None,
    frames: options.Frames = None,
    steps: options.Steps = None,
    size: options.Size = None,
    seed: Annotated[int, typer.Option("--seed", help="One seed for every row.")] = 0,
    device: options.Device = "auto",
    json_path: options.JsonPath = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Write stacked per-stage bars to this PNG.")] = None,
    quiet: options.Quiet = False,
    compile_backend: Annotated[str, typer.Option("--compile-backend", hidden=True,
                                                 help="torch.compile backend (eager: for tests).")] = "inductor",
) -> None:
    """Presets side by side, per stage, against the fp32 reference and diffusers: animate bench --ablation"""
    from animate_cli import bench as b
    from animate_cli.media import load_image
    from animate_cli.pipeline import DTYPES
    from animate_cli.report import RANDOM_WEIGHTS_NOTE, write_json
    from animate_cli.runner import resolve_device

    out.quiet = quiet
    if peer_dtype not in DTYPES:
        raise AnimateError(f"--peer-dtype {peer_dtype!r}: choose one of {', '.join(DTYPES)}")
    if plot_path is not None:
        if plot_path.suffix.lower() != ".png":
            raise AnimateError(f"--plot {plot_path}: give a .png path")
        b.require_matplotlib()  # before the runs, not after them
    image_path = image if image is not None else default_image()
    picture = load_image(image_path)
    overrides = {k: v for k, v in {"frames": frames, "steps": steps}.items() if v is not None}
    names = [p.strip() for p in presets.split(",") if p.strip()]
    rows = b.plan_rows(names, ablation, peer, peer_dtype, overrides)
    torch_device = resolve_device(device)
    if model is None:
        model = "random:svd-xt" if torch_device.type == "cuda" else "random:tiny"

    def report(bench_run, complete: bool) -> tuple[list[dict], dict, list[str]]:
        summary = b.summarise(bench_run)
        random_weights = any(m.random_weights for m in bench_run.models.values())
        head = b.header(torch_device, model, random_weights)
        notes = [f"{r['label']}: unavailable ({r['reason']})" for r in summary if not r["available"]]
        if not complete:
            notes.append("incomplete: written after each run; rows without figures had not run yet")
        if torch_device.type != "cuda":
            notes.append("CPU figures: absolute times say little about a GPU; compare ratios within this run")
        if random_weights:
            notes.append(RANDOM_WEIGHTS_NOTE + "; drift figures only say how far the numerics move")
        if heldout_rows := [r for r in summary if r.get("heldout")]:
            notes.append(f"held-out: PSNR (dB) of each row's clips against the true clips from the same first "
                         f"frames, {heldout_rows[0]['heldout']['clips']} clips, and the error of the moving shape's "
                         "centroid in pixels; still-frame: the first frame repeated")
        if json_path is not None:  # after every run too: a long GPU bench that stops keeps what it measured
            write_json(json_path, {"header": head, "image": str(image_path), "seed": seed, "warmup": warmup,
                                   "repeats": repeats, "complete": complete, "notes": notes, "rows": summary})
        return summary, head, notes

    def on_run(row, i, figures) -> None:
        out.info(f"  round {i + 1}: {row.label} {figures['total_s']:.2f} s")
        if json_path is not None:
            report(bench_run, complete=False)

    with b.scratch_dir() as scratch:
        bench_run = b.Bench(model, torch_device, picture, seed, size, "crop", rows, Path(scratch),
                            compile_backend=compile_backend)
        active = [r for r in rows if r.unavailable is None]
        out.info(f"bench: {len(active)} rows x ({warmup} warm-up + {repeats} measured) runs on {torch_device}, "
                 f"model {model}, image {image_path}")
        b.measure(bench_run, warmup, repeats, on_run=on_run)
        b.heldout_quality(bench_run)
        summary, head, notes = report(bench_run, complete=True)
    out.result(table(summary, head, notes))
    if plot_path is not None:
        b.plot(summary, title_of(head), plot_path)


def default_image() -> Path:
    from animate_cli.preset import packaged_folder

    return Path(str(packaged_folder("examples") / "coffee.jpg"))


def heldout_cells(h: dict | None) -> list[str]:
    if h is None:
        return ["-"] * 4
    return [f"{h['model']['psnr']:.2f}", f"{h['still_frame']['psnr']:.2f}",
            f"{h['model']['centroid_error_px']:.2f}", f"{h['still_frame']['centroid_error_px']:.2f}"]


def title_of(head: dict) -> str:
    where = head.get("gpu") or head.get("cpu")
    return f"animate {head['animate']} on {where}, torch {head['torch']}, diffusers {head['diffusers']}"


def table(summary: list[dict], head: dict, notes: list[str]) -> Table:
    t = Table(title=title_of(head) + (f", CUDA {head['cuda']}, driver {head['driver']}" if head.get("gpu") else ""),
              title_justify="left", caption="\n".join(notes) or None, caption_justify="left")
    heldout = any(r.get("heldout") for r in summary)
    columns = ["row", "total s", "speed-up", "encode", "denoise", "decode", "write", "s/step", "passes",
               "cold start", "peak GiB", "PSNR dB", "SSIM"]
    if heldout:
        columns += ["held-out PSNR", "still-frame PSNR", "centroid px", "still centroid px"]
    for column in columns:
        t.add_column(column, justify="left" if column == "row" else "right")
    for r in summary:
        if not r["available"]:
            t.add_row(r["label"], "unavailable", *[""] * (len(columns) - 2))
            continue
        if not r.get("stages"):
            t.add_row(r["label"], "no measured run", *[""] * (len(columns) - 2))
            continue
        stages = r["stages"]

        def cell(name, stages=stages):
            s = stages.get(name)
            return f"{s['median']:.3f}" if s else "-"

        d = r.get("drift")
        t.add_row(
            r["label"],
            f"{r['total_s']['median']:.3f}",
            f"{r['speedup']:.2f}x" if r["speedup"] else "-",
            cell("encode"),
            cell("denoise") if "denoise" in stages else cell("pipeline") + "*",
            cell("decode"),
            cell("write"),
            f"{r['mean_step_s']:.3f}" if r.get("mean_step_s") else "-",
            str(r["unet_passes"]),
            f"{r['cold_start_s']:.1f}",
            f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-",
            "-" if d is None else ("same" if d["psnr_worst_db"] == float("inf") else f"{d['psnr_mean_db']:.1f}"),
            "-" if d is None else f"{d['ssim_mean']:.4f}",
            *([] if not heldout else heldout_cells(r.get("heldout"))),
        )
    return t
