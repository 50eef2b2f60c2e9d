"""Quality measures against held-out ground truth (models trained on animate_cli.clips, e.g. tiny-motion),
and the distance between two sampler settings' outputs.

All frames are uint8 arrays [F, H, W, 3] (or [B, F, H, W, 3]); errors are computed in [0, 1].
- clip_error: per-frame MSE and PSNR against the true clip, and their means (PSNR of the mean MSE).
- motion_error: the shape's centroid (its colourful pixels) in each frame against the true clip's, in pixels:
  a still clip scores the true displacement, a clip that moves the shape where it should scores ~0.
- still_frame_baseline: the first frame repeated (what "no motion" scores).
- sampler_distance: RMSE / PSNR between two settings' outputs from the same seeds (same noise).
- distillation_report: a distilled student at its steps against its teacher at the base steps and at the
  student's steps, on the same held-out first frames and noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from animate_cli import clips


def heldout_clips(n: int, seed: int = 0, frames: int = 8, size: int = 32,
                  motion: int = clips.DEFAULT_MOTION) -> list[clips.Clip]:
    """n held-out clips (a stream disjoint from training's), each with its scene (colour, kind, path)."""
    return clips.heldout(n, seed, frames, size, motion)


def still_frame_baseline(first: np.ndarray, frames: int) -> np.ndarray:
    """The first frame [H, W, 3] repeated: [F, H, W, 3]."""
    return np.repeat(np.asarray(first)[None], frames, axis=0)


def _unit(frames) -> np.ndarray:
    a = np.asarray(frames)
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def clip_error(frames, truth) -> dict:
    """MSE and PSNR (dB, peak 1) per frame and overall, of `frames` against `truth` (same shape)."""
    a, b = _unit(frames), _unit(truth)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    per_frame = ((a - b) ** 2).reshape(*a.shape[:-3], -1).mean(-1)  # [..., F]
    per_frame = per_frame.reshape(-1, a.shape[-4]).mean(0)  # averaged over clips when batched
    mse = float(per_frame.mean())
    return {"mse": mse, "psnr": psnr(mse), "mse_per_frame": per_frame.tolist(),
            "psnr_per_frame": [psnr(m) for m in per_frame]}


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def shape_track(frames, threshold: float = 0.35, ramp: float = 0.2) -> np.ndarray:
    """Centroid (x, y) in pixels of the shape in each frame: [F, 2], NaN where there is none. The shape is what
    is colourful: chroma (max - min of RGB) >= 0.6 for the clips' shapes, mostly < 0.3 for their backgrounds;
    pixels are weighted by how far their chroma rises above `threshold` (full weight at threshold + ramp).
    Chroma rather than the exact colour, so a model whose decoder shifts hues is still tracked."""
    a = _unit(frames)  # [F, H, W, 3]
    chroma = a.max(axis=-1) - a.min(axis=-1)
    w = np.clip((chroma - threshold) / ramp, 0, 1) ** 2  # [F, H, W]
    h, wd = a.shape[1:3]
    ys, xs = np.mgrid[0:h, 0:wd] + 0.5
    total = w.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (w * xs).sum(axis=(1, 2)) / total
        cy = (w * ys).sum(axis=(1, 2)) / total
    track = np.stack([cx, cy], axis=-1)
    track[total < 0.5] = np.nan  # less than half a pixel's worth of the colour: the shape is lost
    return track


def motion_error(frames, truth) -> dict:
    """Centroid error of the shape (pixels) per frame, mean over frames 1.. (frame 0 is the given image),
    and the fraction of frames where the shape was lost (counted as the frame's half-diagonal)."""
    gen, ref = shape_track(frames), shape_track(truth)
    size = np.asarray(frames).shape[-2]
    err = np.linalg.norm(gen - ref, axis=-1)
    lost = np.isnan(err)
    err = np.where(lost, size / math.sqrt(2), err)
    true_disp = np.linalg.norm(ref - ref[:1], axis=-1)
    return {"centroid_error": float(err[1:].mean()), "centroid_error_per_frame": err.tolist(),
            "lost": float(lost[1:].mean()), "true_displacement": float(np.nan_to_num(true_disp[1:]).mean())}


def sampler_distance(a, b) -> dict:
    """How far two outputs (same shape, e.g. two samplers from the same seeds) are: RMSE, PSNR, max |diff|."""
    x, y = _unit(a), _unit(b)
    mse = float(((x - y) ** 2).mean())
    return {"rmse": math.sqrt(mse), "psnr": psnr(mse), "max_abs": float(np.abs(x - y).max())}


def paired_distance(a, b, reference) -> dict:
    """Clip by clip (axis 0), how much closer to `reference` a is than b: each clip's RMSE for both, the mean of
    (a's - b's) with its standard error over clips, and on how many clips a is the closer. The same clips and
    noise for both, so the clip-to-clip spread that both share drops out of the comparison."""
    ref = _unit(reference)
    per = [np.sqrt(((_unit(x) - ref) ** 2).reshape(len(ref), -1).mean(axis=1)) for x in (a, b)]
    return {"clips": len(ref), "rmse_a": per[0].tolist(), "rmse_b": per[1].tolist(), **_compare(*per)}


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-clip RMSEs a and b: the mean of (a - b), its standard error, and on how many clips a is the smaller."""
    diff = a - b
    n = len(diff)
    return {"mean_difference": float(diff.mean()),
            "standard_error": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
            "a_closer_on": int((diff < 0).sum())}


def paired_parts(paired: dict, first: int) -> dict:
    """A paired_distance result split into its first `first` clips and the rest (e.g. the clips a recipe was chosen
    on and clips that played no part in choosing it): for each part, its clips, both RMSEs over it (the root of
    the mean per-clip square), and the mean difference, its standard error and a's closer count as above."""
    a, b = np.asarray(paired["rmse_a"]), np.asarray(paired["rmse_b"])
    parts, cut = {}, min(first, len(a))
    for lo, hi in ((0, cut), (cut, len(a))):
        if hi <= lo:
            continue
        parts[f"clips {lo + 1}-{hi}"] = {
            "clips": hi - lo, "rmse_a": float(np.sqrt((a[lo:hi] ** 2).mean())),
            "rmse_b": float(np.sqrt((b[lo:hi] ** 2).mean())), **_compare(a[lo:hi], b[lo:hi])}
    return parts


# ---------------------------------------------------------------- held-out data of a model
def packaged_folder(name: str) -> Path | None:
    """The folder of a model shipped under animate_cli/weights/, or None."""
    from animate_cli.models import packaged_model

    return packaged_model(name)


def heldout_spec(model) -> dict | None:
    """The held-out data a model names in its animate.json ('heldout'), or None (no held-out data)."""
    source = str(getattr(model, "source", model))
    folder = packaged_folder(source) or Path(source).expanduser()
    meta = folder / "animate.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("heldout")


def evaluate(model, settings, n: int = 16, seed: int = 0, batch: int = 8, spec: dict | None = None,
             seeds: list[int] | None = None) -> dict:
    """Generate from the first frames of n held-out clips (video i with seed seeds[i], default i) and score
    model and still-frame baseline against the true clips. Returns figures and the generated frames."""
    import torch
    from PIL import Image

    from animate_cli.pipeline import generate
    from animate_cli.timing import StageTimer

    spec = spec or heldout_spec(model) or {}
    size, frames = spec.get("size", settings.width), spec.get("frames", settings.frames)
    if (settings.width, settings.height, settings.frames) != (size, size, frames):
        raise ValueError(f"held-out clips are {size}x{size}, {frames} frames; settings are "
                         f"{settings.width}x{settings.height}, {settings.frames} frames")
    truth = heldout_clips(n, spec.get("seed", seed), frames, size, spec.get("motion", clips.DEFAULT_MOTION))
    seeds = list(range(n)) if seeds is None else seeds
    timer = StageTimer(torch.device(model.device))
    outputs = []
    for start in range(0, n, batch):
        part = truth[start:start + batch]
        images = [Image.fromarray(c.frames[0]) for c in part]
        outputs.append(generate(model, images, seeds[start:start + batch], settings, timer).cpu().numpy())
    generated = np.concatenate(outputs)
    return {"n": n, "generated": generated, **score(generated, truth)}


def score(generated: np.ndarray, truth: list[clips.Clip]) -> dict:
    """Model and still-frame figures over clips: mean MSE, PSNR of the mean MSE, centroid error, lost."""
    rows = {"model": [], "still": []}
    for gen, clip in zip(generated, truth, strict=True):
        still = still_frame_baseline(clip.frames[0], len(clip.frames))
        for name, frames in (("model", gen), ("still", still)):
            e, m = clip_error(frames, clip.frames), motion_error(frames, clip.frames)
            rows[name].append((e["mse"], m["centroid_error"], m["lost"]))
    result = {}
    for name, values in rows.items():
        v = np.asarray(values)
        result[name] = {"mse": float(v[:, 0].mean()), "psnr": psnr(float(v[:, 0].mean())),
                        "centroid_error_px": float(v[:, 1].mean()), "lost": float(v[:, 2].mean())}
    return result


def random_twin(model, seed: int = 0):
    """The same architecture as `model` (same configs, scaling factor, scheduler and sizes) with random weights
    (seed `seed`): the 'untrained' reference for the held-out error."""
    import dataclasses

    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionModelWithProjection

    from animate_cli.models import prepare

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel.from_config(model.unet.config)
    vae = AutoencoderKLTemporalDecoder.from_config(model.vae.config)
    encoder = CLIPVisionModelWithProjection(model.image_encoder.config)
    dtype, device = model.dtype, model.device
    return dataclasses.replace(model, source=f"random twin of {model.source}", unet=prepare(unet, dtype, device),
                               vae=prepare(vae, dtype, device), image_encoder=prepare(encoder, dtype, device),
                               random_weights=True, extras={})


# ---------------------------------------------------------------- a distilled student against its teacher
def distillation_report(teacher, student, n: int = 32, max_guidance: float | None = None,
                        min_guidance: float | None = None, batch: int = 8, stage1=None, before_match=None,
                        teacher_samplers: tuple[str, ...] = ()) -> dict:
    """On n held-out clips of the teacher's held-out data, from the same seeds (video i: seed i): the teacher
    with guidance (two passes) and Euler (DDIM) on the base grid the student was distilled from ("teacher_base",
    e.g. 32 steps), the teacher the same way on the student's grid ("teacher_steps", e.g. 8: every 4th point of
    the base grid), and the student on its grid with one pass per step ("student"). Returns their errors against
    the true clips, the still-frame baseline, and each one's distance to teacher_base.

    `teacher` and `student` are loaded models (animate_cli.models) of one architecture; the student's UNet
    is a guidance-distilled one (animate_cli.runner.attach_student) whose student.json names its grid.

    `stage1`, the same run's stage-1 student (WORKDIR/phase-0: guidance folded in, still on the base grid), adds
    "stages", which splits the student's distance in two: "guidance", stage 1 on the base grid against
    teacher_base (what one pass loses); "steps", the student against stage 1 on the base grid (what the halving
    rounds lose), beside stage 1 taking the student's steps without them (what plain Euler would lose).

    `before_match`, the same run's student before stage 3 (WORKDIR/phase-ROUNDS, on the student's grid), adds
    "before_match": its distance to teacher_base and its errors against the truth, to set beside the student's.

    `teacher_samplers` (names in animate_cli.sampling.SAMPLERS) adds "teacher_samplers": the teacher, guided, with
    each of those samplers on the student's grid, and its distance to teacher_base and errors against the truth:
    whether another sampler at the student's step count would be a higher bar than Euler's."""
    import dataclasses

    from animate_cli.pipeline import Settings
    from animate_cli.sampling import SCHEDULES

    meta = student.extras.get("student") or {}
    if "sigmas" not in meta or "schedule" not in meta:
        raise ValueError("the student model carries no distilled grid (student.json 'sigmas' and 'schedule')")
    grid = [float(x) for x in meta["sigmas"]]
    sched = meta["schedule"]
    base = SCHEDULES[sched["name"]](sched["base_steps"], sched["sigma_min"], sched["sigma_max"])
    nested = base[:: sched["stride"]].numpy()
    if not same_grid(nested, grid):
        raise ValueError("student.json's sigmas are not its base grid taken every stride points")
    spec = heldout_spec(teacher)
    if spec is None:
        raise ValueError(f"{teacher.source} has no held-out clips")
    guidance = meta.get("guidance", {})
    size, frames = spec["size"], spec["frames"]
    cond = meta.get("conditioning", {})
    settings = Settings(width=size, height=size, frames=frames, steps=len(grid) - 1, fps=cond.get("fps", 7),
                        motion=cond.get("motion", 127), noise_aug=cond.get("noise_aug", 0.02),
                        min_guidance=min_guidance if min_guidance is not None else guidance.get("min_guidance", 1.0),
                        max_guidance=max_guidance if max_guidance is not None else
                        max(guidance.get("max_guidance_range", [3.0])),
                        decode_chunk=frames, sampler="euler", schedule=sched["name"])
    runs = {
        "teacher_base": (teacher, dataclasses.replace(settings, steps=sched["base_steps"],
                                                      sigmas=tuple(float(x) for x in base))),
        "teacher_steps": (teacher, dataclasses.replace(settings, sigmas=tuple(grid))),
        "student": (student, dataclasses.replace(settings, sigmas=tuple(grid))),
    }
    results = {name: evaluate(model, s, n=n, batch=batch, spec=spec) for name, (model, s) in runs.items()}
    reference = results["teacher_base"]["generated"]
    report = {"clips": n, "max_guidance": settings.max_guidance, "min_guidance": settings.min_guidance,
              "steps": {"teacher_base": sched["base_steps"], "teacher_steps": len(grid) - 1,
                        "student": len(grid) - 1},
              "errors_vs_truth": {name: r["model"] for name, r in results.items()},
              "distance_to_teacher_base": {name: sampler_distance(results[name]["generated"], reference)
                                           for name in ("teacher_steps", "student")},
              "student_vs_teacher_steps": paired_distance(results["student"]["generated"],
                                                          results["teacher_steps"]["generated"], reference)}
    report["errors_vs_truth"]["still_frame"] = results["teacher_base"]["still"]
    if teacher_samplers:
        report["teacher_samplers"] = {}
        for name in teacher_samplers:
            r = evaluate(teacher, dataclasses.replace(runs["teacher_steps"][1], sampler=name), n=n, batch=batch,
                         spec=spec)
            report["teacher_samplers"][name] = {"distance_to_teacher_base": sampler_distance(r["generated"],
                                                                                             reference),
                                                "errors_vs_truth": r["model"]}
    if stage1 is not None:
        report["stages"] = stage_distances(stage1, runs, results, n, batch, spec)
    if before_match is not None:
        earlier = (before_match.extras.get("student") or {}).get("sigmas", [])
        if not same_grid(earlier, grid):
            raise ValueError("the student before stage 3 is not on the student's grid (student.json 'sigmas')")
        r = evaluate(before_match, runs["student"][1], n=n, batch=batch, spec=spec)
        report["before_match"] = {"distance_to_teacher_base": sampler_distance(r["generated"], reference),
                                  "errors_vs_truth": r["model"]}
    return report


def same_grid(a, b) -> bool:
    """Whether two sigma grids are the same points (to float32 rounding)."""
    return len(a) == len(b) and np.allclose(a, b, rtol=1e-5)


def stage_distances(stage1, runs: dict, results: dict, n: int, batch: int, spec: dict) -> dict:
    """distillation_report's "stages": the stage-1 student on the base grid and on the student's grid."""
    base_settings, steps_settings = runs["teacher_base"][1], runs["student"][1]
    meta = stage1.extras.get("student") or {}
    sigmas = meta.get("sigmas", [])
    if not same_grid(sigmas, base_settings.sigmas):
        raise ValueError("the stage-1 student was not distilled on the student's base grid (student.json 'sigmas')")
    one_pass_base = evaluate(stage1, base_settings, n=n, batch=batch, spec=spec)["generated"]
    one_pass_steps = evaluate(stage1, steps_settings, n=n, batch=batch, spec=spec)["generated"]
    return {"guidance": {"stage1_base_vs_teacher_base": sampler_distance(one_pass_base,
                                                                         results["teacher_base"]["generated"])},
            "steps": {"student_vs_stage1_base": sampler_distance(results["student"]["generated"], one_pass_base),
                      "stage1_steps_vs_stage1_base": sampler_distance(one_pass_steps, one_pass_base)}}
