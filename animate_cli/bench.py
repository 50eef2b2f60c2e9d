"""`animate bench`: presets side by side, per stage, on one image and seed, repeats interleaved.

Rows are presets (or the ablation: one switch at a time from fp32) and optionally diffusers' own
pipeline. Every row runs the whole path from image to written MP4; the model is loaded once per
distinct (dtype, attention, compile, student) and kept for the whole bench.
"""

import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from animate_cli.errors import AnimateError
from animate_cli.media import VideoStream, fit_image, resolve_size, write_video
from animate_cli.metrics import drift
from animate_cli.models import Model
from animate_cli.pipeline import Settings, generate
from animate_cli.preset import Preset, load_preset
from animate_cli.runner import configure_backends, open_model, settings_for
from animate_cli.timing import StageTimer

# The ablation: each row adds one switch to the one before, starting from the fp32 reference.
ABLATION = (
    ("fp32", {}),
    ("+bf16", {"dtype": "bfloat16"}),
    ("+attention", {"attention": "project_once"}),
    ("+dpm-solver", {"sampler": "dpmpp_2m", "schedule": "log_sigma", "steps": 15}),
    ("+compile", {"compile": True}),
)


@dataclass
class Row:
    label: str
    preset: Preset | None = None  # None: the diffusers peer or an unavailable preset
    peer: str | None = None  # "diffusers"
    unavailable: str | None = None  # why
    runs: list[dict] = field(default_factory=list)  # steady-state runs
    cold: dict | None = None  # the first run (compile included for a compiled preset)
    frames: torch.Tensor | None = None  # uint8 [F, H, W, 3] of the first run, for drift
    heldout: dict | None = None  # error against held-out clips, for a model that ships them
    drift: dict = field(default_factory=dict)  # id(reference row) -> drift against its frames, computed once


def plan_rows(presets: list[str], ablation: bool, peer: str | None, peer_dtype: str,
              overrides: dict) -> list[Row]:
    rows = []
    if ablation:
        preset = load_preset("fp32")
        for label, change in ABLATION:
            preset = preset.replace(**change)
            rows.append(Row(label, preset.replace(name=label, **overrides)))
        rows.append(distillation_row(overrides))
    for name in presets:
        if any(r.label == name for r in rows):
            continue
        try:
            preset = load_preset(name).replace(**overrides)
        except AnimateError as e:
            rows.append(Row(name, unavailable=str(e)))
            continue
        same = next((r for r in rows if r.preset is not None and same_switches(r.preset, preset)), None)
        if same is not None:  # an ablation row already is this preset: name it, do not run it twice
            same.label = f"{same.label} = {name}"
        else:
            rows.append(Row(name, preset))
    if peer is not None:
        if peer != "diffusers":
            raise AnimateError(f"--peer {peer!r}: the only peer is 'diffusers'")
        base = load_preset("fp32").replace(dtype=peer_dtype, **overrides)
        rows.append(Row(f"diffusers ({peer_dtype})", base.replace(name="diffusers"), peer="diffusers"))
    return rows


def same_switches(a: Preset, b: Preset) -> bool:
    ignore = ("name", "description")
    return {k: v for k, v in a.as_dict().items() if k not in ignore} == {
        k: v for k, v in b.as_dict().items() if k not in ignore}


def distillation_row(overrides: dict) -> Row:
    try:
        return Row("+distillation", load_preset("distilled").replace(**overrides))
    except AnimateError:
        return Row("+distillation", unavailable="no distilled preset yet: distillation is not built")


@dataclass
class Bench:
    model_spec: str
    device: torch.device
    image: Image.Image
    seed: int
    size: str | None
    fit: str
    rows: list[Row]
    out_dir: Path
    compile_backend: str = "inductor"
    models: dict = field(default_factory=dict)

    def model_for(self, preset: Preset) -> Model:
        key = (preset.dtype, preset.attention, preset.time_conv, preset.compile, preset.student)
        if key not in self.models:
            self.models[key] = open_model(self.model_spec, preset, self.device, progress=False,
                                          compile_backend=self.compile_backend)
        return self.models[key]

    def settings(self, preset: Preset, model: Model) -> tuple[Settings, Image.Image]:
        width, height = resolve_size(self.size, self.image, model.native_size, model.size_multiple)
        return settings_for(preset, model, width, height), fit_image(self.image, (width, height), self.fit)

    def run(self, row: Row) -> dict:
        """One whole run, image to written MP4. Peak memory counts this row's weights, not the others'."""
        preset = row.preset
        model = self.model_for(preset if row.peer is None else preset.replace(attention="stock", time_conv="conv3d",
                                                                                       compile=False))
        configure_backends(preset)
        timer = StageTimer(self.device)
        before = memory_allocated(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with timer.stage("preprocess"):
            settings, fitted = self.settings(preset, model)
        output = self.out_dir / f"row{self.rows.index(row)}.mp4"
        if row.peer is None:
            # As `animate` writes: encoding each chunk of frames as it is decoded, "write" being what is left.
            with VideoStream(output, "mp4", settings.fps, 70, (settings.width, settings.height)) as stream:
                frames = generate(model, [fitted], [self.seed], settings, timer,
                                  sink=lambda _, chunk: stream.append(chunk))[0]
                with timer.stage("write"):
                    stream.close()
        else:  # diffusers' pipeline hands back the whole video, written after it
            frames = run_diffusers(model, fitted, self.seed, settings, timer)
            with timer.stage("write"):
                write_video(frames, output, "mp4", settings.fps, 70)
        frames = frames.cpu()  # kept for drift against the other rows, which may live on another device
        peak = None
        if self.device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(self.device) - before + weight_bytes(model)) / 2**30
        figures = timer.as_dict()
        figures["peak_gib"] = peak
        figures["frames"] = frames
        figures["settings"] = vars(settings)
        return figures


def heldout_quality(bench: Bench, n: int = 8) -> None:
    """For a model that ships held-out clips (tiny-motion): each row's error against the true clips from the
    same first frames, and the still-frame baseline's, into row.heldout."""
    from animate_cli.quality import evaluate, heldout_spec

    spec = heldout_spec(bench.model_spec)
    if spec is None:
        return
    for row in bench.rows:
        if row.unavailable is not None or row.peer is not None:
            continue
        model = bench.model_for(row.preset)
        configure_backends(row.preset)
        settings = settings_for(row.preset.replace(frames=spec["frames"]), model, spec["size"], spec["size"])
        figures = evaluate(model, settings, n=n, spec=spec)
        row.heldout = {"clips": figures["n"], "model": figures["model"], "still_frame": figures["still"]}


def memory_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def weight_bytes(model: Model) -> int:
    modules = (model.unet, model.vae, model.image_encoder)
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def run_diffusers(model: Model, image: Image.Image, seed: int, settings: Settings, timer: StageTimer):
    """diffusers' own StableVideoDiffusionPipeline on the same components, Euler as it ships."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline(
        vae=model.vae, image_encoder=model.image_encoder, unet=model.unet, feature_extractor=model.feature_extractor,
        scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    with timer.stage("pipeline"), torch.inference_mode():
        video = pipe(image, height=settings.height, width=settings.width, num_frames=settings.frames,
                     num_inference_steps=settings.steps, min_guidance_scale=settings.min_guidance,
                     max_guidance_scale=settings.max_guidance, fps=settings.fps, motion_bucket_id=settings.motion,
                     noise_aug_strength=settings.noise_aug, decode_chunk_size=settings.decode_chunk,
                     generator=torch.Generator(model.device).manual_seed(seed), output_type="pt").frames[0]
    timer.unet_calls = settings.steps
    timer.unet_passes = settings.steps * (2 if max(settings.min_guidance, settings.max_guidance) > 1 else 1)
    return (video.permute(0, 2, 3, 1).float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def measure(bench: Bench, warmup: int, repeats: int, on_run=None) -> None:
    """warmup + repeats rounds; each round runs every row once, so drift hits all rows alike. A run that
    compiled is cold start, not steady state: rows that had one get extra rounds until `repeats` are measured."""
    active = [r for r in bench.rows if r.unavailable is None]
    round_index = 0
    while True:
        pending = active if round_index < warmup + repeats else [r for r in active if len(r.runs) < repeats]
        if not pending:
            return
        for row in pending:
            figures = bench.run(row)
            if row.cold is None:
                row.cold = figures
                row.frames = figures["frames"]
            if round_index >= warmup and "compile" not in figures["stages"]:
                row.runs.append(figures)
            if on_run is not None:
                on_run(row, round_index, figures)
        round_index += 1


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def summarise(bench: Bench) -> list[dict]:
    """Per row: per-stage median/min/max, whole-pipeline median, speed-up against the first row, drift."""
    rows = bench.rows
    reference = next((r for r in rows if r.label == "fp32" and r.frames is not None),
                     next((r for r in rows if r.frames is not None), None))
    first = next((r for r in rows if r.runs), None)
    first_total = statistics.median(run["total_s"] for run in first.runs) if first else None
    result = []
    for row in rows:
        entry = {"label": row.label, "available": row.unavailable is None, "reason": row.unavailable,
                 "peer": row.peer, "preset": row.preset.as_dict() if row.preset else None}
        if row.runs:
            stage_names = list(dict.fromkeys(name for run in row.runs for name in run["stages"]))
            total = spread([run["total_s"] for run in row.runs])
            entry.update(
                repeats=len(row.runs),
                stages={name: spread([run["stages"].get(name, 0.0) for run in row.runs]) for name in stage_names},
                total_s=total,
                speedup=first_total / total["median"] if first_total and total["median"] else None,
                unet_calls=row.runs[0]["unet_calls"],
                unet_passes=row.runs[0]["unet_passes"],
                mean_step_s=statistics.median(r["mean_step_s"] for r in row.runs if r["mean_step_s"]) if any(
                    r["mean_step_s"] for r in row.runs) else None,
                peak_gib=max((r["peak_gib"] for r in row.runs if r["peak_gib"] is not None), default=None),
                cold_start_s=row.cold["total_s"],
                compile_s=row.cold["stages"].get("compile"),
                settings=row.runs[0]["settings"],
            )
        elif row.cold is not None:
            entry.update(cold_start_s=row.cold["total_s"], compile_s=row.cold["stages"].get("compile"),
                         repeats=0)
        if row.heldout is not None:
            entry["heldout"] = row.heldout
        if row.frames is not None and reference is not None and reference.frames is not None:
            if row.frames.shape == reference.frames.shape:
                entry["drift_vs"] = reference.label
                if id(reference) not in row.drift:  # frames are fixed once taken: the JSON is rewritten per run
                    row.drift[id(reference)] = drift(row.frames, reference.frames)
                entry["drift"] = row.drift[id(reference)]
        result.append(entry)
    return result


def header(device: torch.device, model: str, random_weights: bool) -> dict:
    import diffusers

    from animate_cli import __version__

    info = {"device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "animate": __version__, "model": model, "random_weights": random_weights}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, driver=nvidia_driver())
    else:
        from animate_cli.report import device_name

        info["gpu"] = None
        info["cpu"] = device_name(device)
    return info


def nvidia_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AnimateError("--plot needs matplotlib: pip install 'animate-cli[plot]'") from None
    return plt


def plot(summary: list[dict], title: str, path: Path) -> None:
    """Stacked per-stage medians, one bar per row, written to a PNG."""
    plt = require_matplotlib()
    rows = [r for r in summary if r.get("stages")]
    stages = list(dict.fromkeys(name for r in rows for name in r["stages"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4.5), dpi=100)
    bottoms = [0.0] * len(rows)
    for stage in stages:
        heights = [r["stages"].get(stage, {"median": 0.0})["median"] for r in rows]
        ax.bar([r["label"] for r in rows], heights, bottom=bottoms, label=stage)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_ylabel("seconds (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="animate-bench-")

