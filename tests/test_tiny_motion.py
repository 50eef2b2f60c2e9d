"""The shipped tiny-motion model: loads offline by name, animates held-out first frames on CPU in seconds,
and beats the still-frame baseline against the held-out ground truth."""

import json
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, run_subprocess

from animate_cli import quality
from animate_cli.models import load_model, packaged_model
from animate_cli.pipeline import Settings

FOLDER = packaged_model("tiny-motion")
pytestmark = pytest.mark.skipif(FOLDER is None, reason="animate_cli/weights/tiny-motion is not shipped")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model("tiny-motion", torch.float32, torch.device("cpu"))


def settings(model, steps=15, guidance=3.0) -> Settings:
    w, h = model.native_size
    return Settings(width=w, height=h, frames=model.frames, steps=steps, fps=7, motion=127, noise_aug=0.02,
                    min_guidance=1.0, max_guidance=guidance, decode_chunk=model.frames, sampler="dpmpp_2m",
                    schedule="log_sigma")


def test_shipped_in_diffusers_layout_under_10_mb():
    everything = [p for p in FOLDER.rglob("*") if p.is_file()]
    assert not [p for p in everything if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    student = [p for p in everything if "student" in p.relative_to(FOLDER).parts]
    files = [p for p in everything if p not in student]
    assert sum(p.stat().st_size for p in files) <= 10 * 1024 * 1024  # the model
    assert sum(p.stat().st_size for p in student) <= 10 * 1024 * 1024  # its distilled student
    names = {str(p.relative_to(FOLDER)) for p in files}
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "image_encoder/model.safetensors", "model_index.json", "animate.json",
                 "scheduler/scheduler_config.json"):
        assert part in names
    meta = json.loads((FOLDER / "animate.json").read_text())
    assert meta["heldout"]["generator"] == "animate_cli.clips"


def test_loads_offline_by_name(model):
    assert not model.random_weights and model.source == "tiny-motion"
    assert model.native_size == (32, 32) and model.frames == 8
    assert quality.heldout_spec(model)["size"] == 32


def test_beats_the_still_frame_on_heldout_clips(model):
    start = time.perf_counter()
    result = quality.evaluate(model, settings(model), n=8)
    elapsed = time.perf_counter() - start
    assert result["generated"].shape == (8, 8, 32, 32, 3)
    assert elapsed < 60, f"8 clips took {elapsed:.1f} s"
    assert result["model"]["mse"] < result["still"]["mse"], result
    assert result["model"]["centroid_error_px"] < result["still"]["centroid_error_px"], result


def test_the_shape_moves(model):
    result = quality.evaluate(model, settings(model), n=4)
    for clip in result["generated"]:
        assert np.abs(clip[-1].astype(int) - clip[0].astype(int)).mean() > 1.0


def test_sampler_distance_is_zero_for_the_same_setting_and_small_between_solvers(model):
    a = quality.evaluate(model, settings(model, steps=15), n=2)["generated"]
    b = quality.evaluate(model, settings(model, steps=15), n=2)["generated"]
    assert quality.sampler_distance(a, b)["rmse"] == 0.0
    c = quality.evaluate(model, settings(model, steps=30), n=2)["generated"]
    assert 0 < quality.sampler_distance(a, c)["rmse"] < 0.1


def test_cli_demo_writes_a_gif(cli, tmp_path):
    from animate_cli.clips import heldout

    image = tmp_path / "shapes.png"
    from PIL import Image

    Image.fromarray(heldout(1)[0].frames[0]).save(image)
    out = tmp_path / "out.gif"
    r = cli(str(image), "-o", str(out), "--model", "tiny-motion", "--device", "cpu", "--seed", "0")
    assert r.exit_code == 0, r.stderr
    assert out.is_file() and out.stat().st_size > 0
    assert "random weights" not in r.text


def test_measures():
    truth = quality.heldout_clips(2)
    still = quality.still_frame_baseline(truth[0].frames[0], 8)
    e = quality.clip_error(truth[0].frames, truth[0].frames)
    assert e["mse"] == 0 and e["psnr"] == float("inf")
    s = quality.clip_error(still, truth[0].frames)
    assert s["mse"] > 0 and s["mse_per_frame"][0] == 0
    m = quality.motion_error(truth[0].frames, truth[0].frames)
    assert m["centroid_error"] < 1e-9 and m["lost"] == 0
    ms = quality.motion_error(still, truth[0].frames)
    assert ms["centroid_error"] > 2 and abs(ms["centroid_error"] - ms["true_displacement"]) < 1e-6


def test_shipped_student_one_pass_per_step_and_beats_the_still_frame():
    """The distilled preset finds tiny-motion's student/ by itself: 8 single-batch UNet calls, and its clips
    are still closer to the truth than the first frame repeated."""
    from animate_cli.preset import load_preset
    from animate_cli.runner import open_model, settings_for

    preset = load_preset("distilled").replace(compile=False, dtype="float32")
    model = open_model("tiny-motion", preset, torch.device("cpu"))
    assert model.extras["student"]["steps"] == 8 and model.extras["student"]["teacher"] == "tiny-motion"
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        result = quality.evaluate(model, settings_for(preset, model, 32, 32), n=4, batch=4)
    finally:
        hook.remove()
    assert calls == [4] * 8  # one call per step for the four videos: no unconditional half
    assert result["model"]["mse"] < result["still"]["mse"]


def test_average_students_averages_weight_by_weight_and_keeps_what_it_is_given(tmp_path):
    """benchmarks/average_students.py (which made the shipped student from two): each weight is the mean in
    float32, stored in the first student's dtype with its file's metadata; a mismatched student or an existing
    --out stops it with exit 2 and a message, leaving nothing behind."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder in (a, b, c):
        shutil.copytree(FOLDER / "student", folder)
    wa = load_file(str(a / unet))
    g = torch.Generator().manual_seed(0)
    wb = {k: (v.float() + torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in wa.items()}
    save_file(wb, str(b / unet), metadata={"format": "pt"})
    save_file({k: v for k, v in wa.items() if k != next(iter(wa))}, str(c / unet))  # one weight short
    script = REPO / "benchmarks" / "average_students.py"

    r = run_subprocess([sys.executable, script, a, b, "--out", tmp_path / "soup"])
    assert r.exit_code == 0, r.stderr
    soup = load_file(str(tmp_path / "soup" / unet))
    for k, v in wa.items():
        assert soup[k].dtype == v.dtype
        assert torch.equal(soup[k], ((v.float() + wb[k].float()) / 2).to(v.dtype)), k
    assert any(not torch.equal(soup[k], v) for k, v in wa.items())  # (b's weights differ from a's)
    with safe_open(str(tmp_path / "soup" / unet), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    meta = json.loads((tmp_path / "soup" / "student.json").read_text())
    first = json.loads((a / "student.json").read_text())  # (the shipped student is an average too)
    assert meta == {**first, "averaged_from": [str(a), str(b)]}

    before = (tmp_path / "soup" / unet).read_bytes()
    r = run_subprocess([sys.executable, script, a, b, "--out", tmp_path / "soup"])
    assert r.exit_code == 2 and "exists" in r.stderr and (tmp_path / "soup" / unet).read_bytes() == before
    r = run_subprocess([sys.executable, script, a, c, "--out", tmp_path / "bad"])
    assert r.exit_code == 2 and "not the same weights" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "soup"]


def untrained_student(model, base_steps: int, stride: int, max_guidance: float = 1.0):
    """(the teacher as an untrained student whose student.json names the `stride`-th points of a Karras
    `base_steps`-step grid, that base grid)."""
    import dataclasses

    from animate_cli.sampling import karras_sigmas
    from animate_cli.student import make_student

    cfg = model.scheduler_config
    base = karras_sigmas(base_steps, cfg["sigma_min"], cfg["sigma_max"])
    meta = {"sigmas": [float(x) for x in base[::stride]],
            "guidance": {"min_guidance": 1.0, "max_guidance_range": [1, max_guidance]},
            "schedule": {"name": "karras", "base_steps": base_steps, "stride": stride, "sigma_min": cfg["sigma_min"],
                         "sigma_max": cfg["sigma_max"]}}
    return dataclasses.replace(model, unet=make_student(model.unet), extras={**model.extras, "student": meta}), base


def test_paired_distance_compares_clip_by_clip():
    reference = np.zeros((3, 2, 4, 4, 3))
    a, b = reference.copy(), reference.copy()
    a[0] += 0.1  # clip 0: a is 0.1 away, b 0.2; clip 1: a 0.3, b 0.1; clip 2: both 0.05
    b[0] += 0.2
    a[1] -= 0.3
    b[1] += 0.1
    a[2] += 0.05
    b[2] -= 0.05
    p = quality.paired_distance(a, b, reference)
    assert p["rmse_a"] == pytest.approx([0.1, 0.3, 0.05]) and p["rmse_b"] == pytest.approx([0.2, 0.1, 0.05])
    diffs = np.array([-0.1, 0.2, 0.0])
    assert p["mean_difference"] == pytest.approx(diffs.mean())
    assert p["standard_error"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert p["a_closer_on"] == 1 and p["clips"] == 3
    frames = (np.random.RandomState(0).rand(2, 2, 4, 4, 3) * 255).astype(np.uint8)  # uint8 frames count /255
    assert quality.paired_distance(frames, frames, frames)["rmse_a"] == [0.0, 0.0]


def test_paired_parts_splits_the_clips_at_first():
    paired = {"rmse_a": [0.1, 0.3, 0.05, 0.2], "rmse_b": [0.2, 0.1, 0.05, 0.1]}
    parts = quality.paired_parts(paired, 2)
    assert list(parts) == ["clips 1-2", "clips 3-4"]
    head, rest = parts["clips 1-2"], parts["clips 3-4"]
    assert head["clips"] == 2 and rest["clips"] == 2
    assert head["rmse_a"] == pytest.approx(np.sqrt((0.01 + 0.09) / 2))
    assert rest["rmse_b"] == pytest.approx(np.sqrt((0.0025 + 0.01) / 2))
    assert head["mean_difference"] == pytest.approx(0.05) and rest["mean_difference"] == pytest.approx(0.05)
    assert head["standard_error"] == pytest.approx(np.std([-0.1, 0.2], ddof=1) / np.sqrt(2))
    assert head["a_closer_on"] == 1 and rest["a_closer_on"] == 0
    assert list(quality.paired_parts(paired, 4)) == ["clips 1-4"]  # nothing after the first four


def test_distillation_report_compares_on_one_grid_from_the_same_noise(model):
    """An untrained student without guidance is the unguided teacher: on the student's grid it must land exactly
    where the teacher does, and the report must say so; a grid that is not the base grid's is refused."""
    import dataclasses

    student, base = untrained_student(model, 16, 4)
    meta = student.extras["student"]
    report = quality.distillation_report(model, student, n=2, batch=2, teacher_samplers=("euler", "dpmpp_2m"))
    assert report["steps"] == {"teacher_base": 16, "teacher_steps": 4, "student": 4}
    dist = report["distance_to_teacher_base"]
    assert dist["student"] == dist["teacher_steps"] and dist["teacher_steps"]["rmse"] > 0
    paired = report["student_vs_teacher_steps"]
    assert paired["mean_difference"] == 0 and paired["a_closer_on"] == 0 and paired["clips"] == 2
    assert paired["rmse_a"] == paired["rmse_b"] and min(paired["rmse_a"]) > 0
    errors = report["errors_vs_truth"]
    assert errors["student"] == errors["teacher_steps"] and errors["still_frame"]["mse"] > 0
    samplers = report["teacher_samplers"]
    assert samplers["euler"]["distance_to_teacher_base"] == dist["teacher_steps"]  # the same run as teacher_steps
    assert samplers["euler"]["errors_vs_truth"] == errors["teacher_steps"]
    dpm = samplers["dpmpp_2m"]["distance_to_teacher_base"]["rmse"]
    assert dpm > 0 and dpm != dist["teacher_steps"]["rmse"]
    bad = dataclasses.replace(student, extras={**model.extras, "student": {**meta, "sigmas": [float(x) for x in
                                                                                        base[::8]]}})
    with pytest.raises(ValueError, match="not its base grid"):
        quality.distillation_report(model, bad, n=1)


def test_distillation_report_splits_the_distance_into_stages(model):
    """With the stage-1 student given: an untrained one (no guidance) on the base grid is the unguided teacher,
    so the guidance part is 0 and the rest of the student's distance is the steps part; a stage-1 student on
    another grid is refused."""
    import dataclasses

    student, base = untrained_student(model, 8, 2)
    meta = student.extras["student"]
    stage1_meta = {**meta, "sigmas": [float(x) for x in base], "schedule": {**meta["schedule"], "stride": 1}}
    stage1 = dataclasses.replace(student, extras={**model.extras, "student": stage1_meta})
    report = quality.distillation_report(model, student, n=2, batch=2, stage1=stage1)
    stages = report["stages"]
    assert stages["guidance"]["stage1_base_vs_teacher_base"]["rmse"] == 0
    steps = stages["steps"]
    assert steps["student_vs_stage1_base"] == report["distance_to_teacher_base"]["student"]
    assert steps["stage1_steps_vs_stage1_base"] == steps["student_vs_stage1_base"]
    assert steps["student_vs_stage1_base"]["rmse"] > 0
    with pytest.raises(ValueError, match="stage-1 student was not distilled"):
        quality.distillation_report(model, student, n=1, stage1=student)


def test_distillation_report_sets_the_student_before_stage3_beside_it(model):
    """The same untrained student given as the one before stage 3 scores exactly as the student; a trained-looking
    change (a nonzero guidance embedding, guidance 3) moves it; one on another grid is refused."""
    import dataclasses

    from animate_cli.student import guided_embedding, make_student

    student, base = untrained_student(model, 8, 2, max_guidance=3.0)
    meta = student.extras["student"]
    same = quality.distillation_report(model, student, n=2, batch=2, before_match=student)["before_match"]
    report = quality.distillation_report(model, student, n=2, batch=2)
    assert same["distance_to_teacher_base"] == report["distance_to_teacher_base"]["student"]
    assert same["errors_vs_truth"] == report["errors_vs_truth"]["student"]
    moved_unet = make_student(model.unet)
    with torch.no_grad():
        for p in guided_embedding(moved_unet).mlp.parameters():
            p.add_(0.05)
    moved = dataclasses.replace(student, unet=moved_unet)
    other = quality.distillation_report(model, student, n=2, batch=2, before_match=moved)["before_match"]
    assert other["distance_to_teacher_base"]["rmse"] != report["distance_to_teacher_base"]["student"]["rmse"]
    off_grid = dataclasses.replace(student, extras={**model.extras, "student": {**meta, "sigmas": [float(x) for x in
                                                                                             base]}})
    with pytest.raises(ValueError, match="before stage 3 is not on the student's grid"):
        quality.distillation_report(model, student, n=1, before_match=off_grid)
