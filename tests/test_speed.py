"""The speed switches of issue 4: each is exact or accurate as claimed (CPU, tiny models)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from animate_cli.models import load_model
from animate_cli.optimize import apply_optimizations
from animate_cli.pipeline import Settings, encode, generate, make_denoiser, make_generators, preprocess, randn
from animate_cli.preset import load_preset
from animate_cli.sampling import SAMPLERS, SCHEDULES, log_sigma_sigmas, sample_dpmpp_2m
from animate_cli.timing import StageTimer

CPU = torch.device("cpu")


def settings(**changes) -> Settings:
    base = dict(width=32, height=32, frames=2, steps=3, fps=7, motion=127, noise_aug=0.02, min_guidance=1.0,
                max_guidance=3.0, decode_chunk=2, sampler="euler", schedule="karras")
    return Settings(**{**base, **changes})


def image(seed: int, size=(32, 32)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny", torch.float32, CPU)


def test_presets_bundle_the_switches():
    fp32, bf16, compiled = load_preset("fp32"), load_preset("bf16"), load_preset("compiled")
    assert (fp32.dtype, fp32.tf32, fp32.attention, fp32.sampler, fp32.steps, fp32.compile) == (
        "float32", False, "stock", "euler", 25, False)
    assert (bf16.dtype, bf16.attention, bf16.sampler, bf16.schedule, bf16.steps, bf16.compile) == (
        "bfloat16", "project_once", "dpmpp_2m", "log_sigma", 15, False)
    # compiled is bf16 plus compile, nothing else
    diff = {k for k, v in compiled.as_dict().items() if bf16.as_dict()[k] != v}
    assert diff == {"name", "description", "compile"} and compiled.compile


def test_dpm_solver_15_steps_lands_closer_than_euler_25(tiny):
    """Against a 200-step trajectory from the same noise (DPM-Solver++ at 200 steps; Heun at 200 steps
    agreed with it to 4e-4 relative when checked by hand), 15 DPM-Solver++ steps in log sigma land at
    least as close as SVD's stock 25 Euler steps (Karras spacing)."""
    s = settings()
    gens = make_generators([0], CPU)
    with torch.inference_mode():
        pixels, clip = preprocess(tiny, [image(0)])
        model = make_denoiser(tiny, encode(tiny, pixels, clip, s, gens), s)
        noise = randn((2, 4, 16, 16), gens, CPU, torch.float32)

        def run(sampler, schedule, n):
            sigmas = SCHEDULES[schedule](n, 0.002, 700.0)
            return SAMPLERS[sampler](model, noise * sigmas[0], sigmas)

        reference = run("dpmpp_2m", "log_sigma", 200)
        err_dpm = ((run("dpmpp_2m", "log_sigma", 15) - reference).norm() / reference.norm()).item()
        err_euler = ((run("euler", "karras", 25) - reference).norm() / reference.norm()).item()
    print(f"relative error vs 200-step reference: dpmpp_2m/15 {err_dpm:.4f}, euler/25 {err_euler:.4f}")
    assert err_dpm <= err_euler


def test_dpm_solver_is_diffusers_edm_dpm_with_svd_parameterisation():
    """Our DPM-Solver++(2M) over SVD's denoiser equals diffusers' EDMDPMSolverMultistepScheduler only with
    sigma_data = 1 (SVD's c_skip = 1 / (sigma^2 + 1)); its default sigma_data = 0.5 is another model."""
    from diffusers import EDMDPMSolverMultistepScheduler

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g) * 0.5
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)

    def v_model(x_in, c_noise):  # a smooth stand-in for the UNet: v = f(c_in * x, c_noise)
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w.double(), x_in) + c_noise)

    def denoiser(x, sigma):  # SVD's EDM preconditioning, as in animate_cli.pipeline.make_denoiser
        s2 = sigma.double() ** 2 + 1
        return v_model(x / s2.sqrt(), 0.25 * sigma.double().log()) * (-sigma / s2.sqrt()) + x / s2

    steps = 12
    sched = EDMDPMSolverMultistepScheduler(
        sigma_min=0.002, sigma_max=700.0, sigma_data=1.0, sigma_schedule="exponential",
        prediction_type="v_prediction", solver_order=2, algorithm_type="dpmsolver++",
        lower_order_final=False, euler_at_final=True, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    sigmas = log_sigma_sigmas(steps, 0.002, 700.0).double()
    torch.testing.assert_close(sched.sigmas.double(), sigmas, rtol=1e-5, atol=0)

    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(v_model(sched.scale_model_input(x, t), t), t, x).prev_sample
    ours = sample_dpmpp_2m(denoiser, noise * sched.init_noise_sigma, sigmas)
    torch.testing.assert_close(ours, x.double(), rtol=1e-4, atol=1e-4)

    # The scheduler's default sigma_data (0.5) preconditions differently from SVD: not a drop-in.
    sigma = torch.tensor(2.0)
    sample, out = torch.ones(1), torch.ones(1)
    default = EDMDPMSolverMultistepScheduler(prediction_type="v_prediction")
    assert not math.isclose(default.precondition_outputs(sample, out, sigma).item(),
                            (out * -sigma / (sigma**2 + 1).sqrt() + sample / (sigma**2 + 1)).item(), rel_tol=1e-3)


def test_project_once_attention_in_the_pipeline_matches_stock():
    stock = load_model("random:tiny", torch.float32, CPU)
    fast = load_model("random:tiny", torch.float32, CPU)
    apply_optimizations(fast, load_preset("fp32").replace(attention="project_once"))
    assert fast.extras["project_once_modules"] > 0
    s = settings()
    a = generate(stock, [image(1)], [3], s, StageTimer(CPU))
    b = generate(fast, [image(1)], [3], s, StageTimer(CPU))
    # float32 frames agree to rounding; as uint8 that is at most one level
    assert (a.int() - b.int()).abs().max() <= 1


def test_conditioning_is_computed_once_per_video_and_guidance_is_one_batched_call(tiny):
    calls = {"clip": [], "vae_encode": 0, "unet": []}
    hooks = [
        tiny.image_encoder.register_forward_hook(lambda m, a, o: calls["clip"].append(a[0].shape[0])),
        tiny.vae.encoder.register_forward_hook(lambda m, a, o: calls.__setitem__("vae_encode",
                                                                               calls["vae_encode"] + 1)),
        tiny.unet.register_forward_pre_hook(lambda m, a: calls["unet"].append(a[0].shape[0])),
    ]
    try:
        timer = StageTimer(CPU)
        generate(tiny, [image(1), image(2)], [1, 2], settings(steps=4), timer)
    finally:
        for h in hooks:
            h.remove()
    assert calls["clip"] == [2] and calls["vae_encode"] == 1  # once for the batch, not per step
    assert calls["unet"] == [4] * 4  # one call per step, batch = 2 videos x (unconditional, conditional)
    assert (timer.unet_calls, timer.unet_passes) == (4, 8)


def test_compiled_model_does_not_recompile_across_images_steps_or_batches():
    """dynamo's error_on_recompile after the warm-up: new images of the same size, every step, and a second
    batch of the same size run on the graphs compiled once. ('eager' backend: dynamo's guards without
    inductor's code generation, which takes minutes on a CPU.)"""
    import torch._dynamo

    torch._dynamo.reset()
    model = load_model("random:tiny", torch.float32, CPU)
    apply_optimizations(model, load_preset("fp32").replace(compile=True, attention="project_once"),
                        backend="eager")
    s = settings(steps=3, frames=3, decode_chunk=2)  # chunks of 2 and 1: two decoder graphs, both warmed
    timer = StageTimer(CPU)
    first = generate(model, [image(1)], [5], s, timer)
    assert "compile" in timer.stages
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(model, [image(2)], [6], s, StageTimer(CPU))
        again = generate(model, [image(1)], [5], s, StageTimer(CPU))
    generate(model, [image(1), image(2)], [5, 6], s, StageTimer(CPU))  # batch of two: warmed once
    with torch._dynamo.config.patch(error_on_recompile=True):
        batch_timer = StageTimer(CPU)
        generate(model, [image(3), image(4)], [7, 8], s, batch_timer)
    assert "compile" not in batch_timer.stages
    assert torch.equal(first, again)
    torch._dynamo.reset()


def test_distilled_preset_takes_one_unet_pass_per_step():
    from animate_cli.runner import open_model, settings_for

    preset = load_preset("distilled").replace(compile=False, dtype="float32")
    model = open_model("random:tiny", preset, CPU)
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    timer = StageTimer(CPU)
    try:
        generate(model, [image(1)], [4], settings_for(preset, model, 32, 32), timer)
    finally:
        hook.remove()
    assert calls == [1] * 8  # batch 1: no unconditional half
    assert (timer.unet_calls, timer.unet_passes) == (8, 8)


def test_distilled_preset_without_a_student_says_how_to_get_one(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline

    from animate_cli.errors import AnimateError
    from animate_cli.runner import open_model

    m = load_model("random:tiny", torch.float32, CPU)
    StableVideoDiffusionPipeline(vae=m.vae, image_encoder=m.image_encoder, unet=m.unet,
                                 scheduler=EulerDiscreteScheduler.from_config(m.scheduler_config),
                                 feature_extractor=m.feature_extractor).save_pretrained(tmp_path / "svd")
    with pytest.raises(AnimateError, match="animate distill"):
        open_model(str(tmp_path / "svd"), load_preset("distilled").replace(compile=False), CPU)


def test_time_conv_is_the_conv3d_it_replaces():
    """A k x 1 x 1 Conv3d as a 2D convolution over (time, height * width): the same sums, the same parameters."""
    from animate_cli.time_conv import TimeConv

    torch.manual_seed(0)
    for k, pad, bias in ((3, 1, True), (3, 0, False), (1, 0, True), (5, 2, True)):
        conv = torch.nn.Conv3d(4, 6, (k, 1, 1), padding=(pad, 0, 0), bias=bias).double()
        x = torch.randn(2, 4, 7, 3, 5, dtype=torch.float64)
        fast = TimeConv(conv)
        assert fast.weight is conv.weight and fast.bias is conv.bias
        assert torch.allclose(fast(x), conv(x), rtol=0, atol=1e-12)
        assert fast.state_dict().keys() == conv.state_dict().keys()


def test_time_conv_leaves_other_convolutions_alone():
    from animate_cli.time_conv import TimeConv, apply_time_conv

    block = torch.nn.Sequential(torch.nn.Conv3d(4, 4, (3, 3, 3), padding=1), torch.nn.Conv3d(4, 4, (3, 1, 1)),
                                torch.nn.Conv3d(4, 4, (3, 1, 1), stride=(2, 1, 1)), torch.nn.Conv2d(4, 4, 1))
    assert apply_time_conv(block) == 1
    assert [type(m).__name__ for m in block] == ["Conv3d", "TimeConv", "Conv3d", "Conv2d"]
    with pytest.raises(ValueError, match="not a time-only convolution"):
        TimeConv(torch.nn.Conv3d(4, 4, (3, 3, 3)))


@pytest.mark.parametrize("form", ["conv2d", "channels_last"])
def test_time_conv_in_the_pipeline_matches_stock(form):
    """Every temporal convolution of the UNet and the VAE takes the other form; the video is the stock one
    (float32, up to summation order) and the weights keep their names."""
    stock = load_model("random:tiny", torch.float32, CPU)
    fast = load_model("random:tiny", torch.float32, CPU)
    keys = (fast.unet.state_dict().keys(), fast.vae.state_dict().keys())
    apply_optimizations(fast, load_preset("fp32").replace(time_conv=form))
    conv3d = [m for part in (stock.unet, stock.vae) for m in part.modules() if isinstance(m, torch.nn.Conv3d)]
    assert fast.extras["time_conv_modules"] == len(conv3d) > 0  # all of SVD's Conv3d are time-only
    left = [m for part in (fast.unet, fast.vae) for m in part.modules() if isinstance(m, torch.nn.Conv3d)]
    if form == "conv2d":
        assert left == []
    else:
        assert len(left) == len(conv3d)
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in left)
        seen = []
        left[0].register_forward_hook(lambda m, args, out: seen.append(
            args[0].is_contiguous(memory_format=torch.channels_last_3d) and args[0].shape[2] > 1))
    assert (fast.unet.state_dict().keys(), fast.vae.state_dict().keys()) == keys
    s = settings(frames=3, decode_chunk=3)
    a = generate(stock, [image(1)], [4], s, StageTimer(CPU))
    b = generate(fast, [image(1)], [4], s, StageTimer(CPU))
    assert (a.int() - b.int()).abs().max() <= 1
    if form == "channels_last":
        assert seen and all(seen)  # the convolution got its input in channels-last-3d


def test_step_clock_on_a_gpu_reads_each_step_once_from_events(monkeypatch):
    """On CUDA the steps are timed by events recorded in the stream (no synchronisation per step): each gap
    between consecutive marks is one step, counted once however often the times are read, and end_steps()
    starts a new run. Events are stood in for here, with times chosen by the test."""
    clock = iter([0.0, 10.0, 30.0, 60.0, 100.0, 150.0])  # ms at each record()

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self, stream=None):
            self.t = next(clock)

        def synchronize(self):
            assert self.t is not None

        def elapsed_time(self, later):
            return later.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    timer = StageTimer(torch.device("cuda"))
    for _ in range(3):
        timer.mark_step()
    assert timer.step_times == [0.010, 0.020]
    timer.mark_step()
    assert timer.step_times == [0.010, 0.020, 0.030]  # read twice, each step once
    timer.end_steps()
    timer.mark_step()
    timer.mark_step()  # a new run: 100 -> 150, not 60 -> 100
    assert timer.step_times == [0.010, 0.020, 0.030, 0.050]
