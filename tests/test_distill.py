"""Guidance/step distillation (animate_cli.distill), the guidance-conditioned student (animate_cli.student), the
AnimateLCM consistency sampler, and `animate distill`. Everything on random:tiny at 32x32, 2 frames, a few steps."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_user_error
from PIL import Image

from animate_cli import distill
from animate_cli.errors import AnimateError
from animate_cli.sampling import SAMPLERS, SCHEDULES, animatelcm_sigmas, sample_animatelcm
from animate_cli.student import (
    load_animatelcm_unet,
    load_student,
    make_student,
    save_student,
    set_guidance,
)

OPTIONS = dict(model="random:tiny", width=32, height=32, frames=2, stage1_steps=2, round_steps=2, rounds=1,
               final_steps=2, lr=1e-3)


@pytest.fixture(scope="module")
def tiny_unet():
    from animate_cli.models import build_random

    return build_random("tiny", torch.float32, torch.device("cpu")).unet


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "stills"
    folder.mkdir()
    for i in range(3):
        pixels = (np.random.RandomState(i).rand(40, 48, 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"still{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def unet_inputs(b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(b, 2, 8, 8, 8, generator=g)
    t = torch.full((b,), 0.3)
    embeds = torch.randn(b, 1, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]]).expand(b, 3)
    return sample, t, embeds, ids


def call(unet, inputs):
    sample, t, embeds, ids = inputs
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=embeds, added_time_ids=ids, return_dict=False)[0]


# ---------------------------------------------------------------- the student
@pytest.mark.parametrize("per_frame", [False, True])
def test_untrained_student_equals_teacher_for_any_w(tiny_unet, per_frame):
    student = make_student(tiny_unet, per_frame=per_frame)
    inputs = unet_inputs()
    expected = call(tiny_unet, inputs)
    for w in (torch.tensor([1.0, 3.0]), torch.tensor([0.0, 17.5]), torch.tensor([2.2])):
        set_guidance(student, w)
        assert torch.equal(call(student, inputs), expected)
    # the embedding is wired in: once its last layer is not zero, w changes the output
    with torch.no_grad():
        student.add_embedding.mlp[2].weight.normal_(0, 0.1)
    set_guidance(student, torch.tensor([1.0, 1.0]))
    a = call(student, inputs)
    set_guidance(student, torch.tensor([1.0, 3.0]))
    b = call(student, inputs)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    assert "add_embedding.mlp.0.weight" not in tiny_unet.state_dict()  # the teacher is untouched


def test_per_frame_student_embeds_each_frames_scale(tiny_unet):
    """Per frame, frame f gets the embedding of min + (w - min) f / (F - 1): with min = w every frame gets w's,
    which is what the per-video student adds once for the whole video; with min < w the frames differ."""
    video = make_student(tiny_unet)
    frame = make_student(tiny_unet, per_frame=True)
    with torch.no_grad():
        video.add_embedding.mlp[2].weight.normal_(0, 0.1)
    frame.add_embedding.mlp.load_state_dict(video.add_embedding.mlp.state_dict())
    inputs = unet_inputs()
    w = torch.tensor([2.0, 3.0])
    set_guidance(video, w)
    set_guidance(frame, w, min_guidance=2.0)
    assert not torch.allclose(call(frame, inputs)[1], call(video, inputs)[1])  # frame 0 of video 1 is at 2.0
    set_guidance(frame, torch.tensor([2.0, 2.0]), min_guidance=2.0)
    set_guidance(video, torch.tensor([2.0, 2.0]))
    assert torch.allclose(call(frame, inputs), call(video, inputs), atol=1e-6)
    set_guidance(frame, torch.tensor([1.0, 3.0]), min_guidance=1.0)
    term = frame.add_embedding.frame_term(2, 3, torch.float32, "cpu")
    expected = frame.add_embedding.embed(torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 3.0]), torch.float32)
    assert torch.allclose(term, expected)


def test_a_seeded_student_draws_its_embedding_from_the_seed_alone(tiny_unet):
    def first_layer(student):
        return student.add_embedding.mlp[0].weight.detach().clone()

    torch.manual_seed(1)
    a = first_layer(make_student(tiny_unet, seed=7))
    torch.manual_seed(2)  # another global state: the same layer
    state = torch.get_rng_state()
    b = first_layer(make_student(tiny_unet, seed=7))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    assert torch.equal(a, b) and a.abs().sum() > 0
    assert not torch.equal(a, first_layer(make_student(tiny_unet, seed=8)))
    torch.manual_seed(1)
    unseeded = first_layer(make_student(tiny_unet))
    torch.manual_seed(2)
    assert not torch.equal(unseeded, first_layer(make_student(tiny_unet)))  # without a seed: the global one


def test_student_without_guidance_scale_is_an_error(tiny_unet):
    student = make_student(tiny_unet)
    with pytest.raises(RuntimeError, match="set_guidance"):
        call(student, unet_inputs())


@pytest.mark.parametrize("per_frame", [False, True])
def test_save_and_load_student_round_trip(tiny_unet, tmp_path, per_frame):
    student = make_student(tiny_unet, per_frame=per_frame, min_guidance=0.5)
    with torch.no_grad():
        for p in student.add_embedding.mlp.parameters():
            p.normal_(0, 0.05)
        student.conv_in.weight.mul_(1.01)
    config = {"steps": 8, "sampler": "euler", "sigmas": [700.0, 1.0, 0.0], "teacher": "random:tiny",
              "guidance": {"min_guidance": 1.0, "max_guidance_range": [1.0, 3.0]}}
    folder = save_student(student, tmp_path / "student", config)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["guidance_embedding.safetensors", "student.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    loaded, meta = load_student(folder, torch.float32, "cpu")
    assert meta["kind"] == "guidance-distilled" and meta["steps"] == 8 and meta["teacher"] == "random:tiny"
    assert meta["guidance_embedding"]["per_frame"] is per_frame and loaded.add_embedding.per_frame is per_frame
    inputs = unet_inputs()
    w = torch.tensor([1.5, 2.5])
    set_guidance(student, w)
    set_guidance(loaded, w)
    assert torch.equal(call(student, inputs), call(loaded, inputs))
    half = save_student(student, tmp_path / "half", config, dtype=torch.float16)  # saved from a deep copy
    set_guidance(student, w)
    assert torch.equal(call(student, inputs), call(loaded, inputs))  # the original's hooks still see its own w
    assert load_student(half, torch.float32, "cpu")[0].add_embedding.min_guidance == 0.5
    # the unet/ folder is a stock diffusers UNet (no guidance keys)
    from safetensors.torch import load_file

    keys = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")).keys()
    assert not any("mlp" in k or ".orig." in k for k in keys)


def test_load_student_rejects_a_folder_that_is_not_one(tmp_path):
    with pytest.raises(AnimateError, match="not a distilled student folder"):
        load_student(tmp_path)


def test_check_compatible_names_the_architecture_difference(tiny_unet):
    from diffusers import UNetSpatioTemporalConditionModel

    from animate_cli.student import check_compatible

    check_compatible(make_student(tiny_unet), tiny_unet)
    other = UNetSpatioTemporalConditionModel.from_config({**tiny_unet.config, "num_frames": 6})
    with pytest.raises(AnimateError, match="num_frames: 4 vs 6"):
        check_compatible(make_student(tiny_unet), other)


def test_load_animatelcm_unet_loads_and_checks_keys(tiny_unet, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone() * 1.5 for k, v in tiny_unet.state_dict().items()}
    good = tmp_path / "AnimateLCM-SVD-xt.safetensors"
    save_file(state, str(good))
    unet = load_animatelcm_unet(good, tiny_unet)
    assert torch.equal(unet.conv_in.weight, tiny_unet.conv_in.weight * 1.5)
    assert unet is not tiny_unet

    wrong = dict(state)
    wrong["not.a.unet.key"] = wrong.pop("conv_in.weight")
    bad = tmp_path / "bad.safetensors"
    save_file(wrong, str(bad))
    with pytest.raises(AnimateError, match=r"not an SVD-XT UNet state dict.*1 missing \(e\.g\. conv_in\.weight\)"
                                           r".*1 unexpected \(e\.g\. not\.a\.unet\.key\)"):
        load_animatelcm_unet(bad, tiny_unet)
    shaped = dict(state)
    shaped["conv_in.bias"] = torch.zeros(3)
    save_file(shaped, str(bad))
    with pytest.raises(AnimateError, match="wrong shape.*conv_in.bias"):
        load_animatelcm_unet(bad, tiny_unet)
    pickle = tmp_path / "x.ckpt"
    pickle.write_text("x")
    with pytest.raises(AnimateError, match="only .safetensors"):
        load_animatelcm_unet(pickle, tiny_unet)


@pytest.fixture(scope="module")
def tiny_setup():
    """(model, conditioning of one 32x32 still, settings factory) from random:tiny, as the pipeline builds them."""
    from animate_cli.models import build_random
    from animate_cli.pipeline import Settings, encode, make_generators, preprocess

    model = build_random("tiny", torch.float32, torch.device("cpu"))
    image = Image.fromarray((np.random.RandomState(5).rand(32, 32, 3) * 255).astype(np.uint8))

    def settings(min_guidance: float = 1.0, max_guidance: float = 1.0):
        return Settings(width=32, height=32, frames=2, steps=2, fps=7, motion=127, noise_aug=0.02,
                        min_guidance=min_guidance, max_guidance=max_guidance, decode_chunk=2, sampler="euler",
                        schedule="karras")

    with torch.no_grad():
        pixels, clip_pixels = preprocess(model, [image])
        cond = encode(model, pixels, clip_pixels, settings(), make_generators([0], model.device))
    return model, cond, settings


def test_student_denoiser_is_one_pass_and_equals_the_pipelines_untrained(tiny_setup):
    import dataclasses

    from animate_cli.pipeline import make_denoiser
    from animate_cli.student import make_student_denoiser
    from animate_cli.timing import StageTimer

    model, cond, settings = tiny_setup
    student_model = dataclasses.replace(model, unet=make_student(model.unet))
    x = torch.randn(1, 2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.tensor(3.0)
    timer = StageTimer(torch.device("cpu"))
    with torch.no_grad():
        ours = make_student_denoiser(student_model, cond, settings(1.0, 2.5), timer)(x, sigma)
        theirs = make_denoiser(model, cond, settings(1.0, 1.0))(x, sigma)  # unguided: the student's untrained self
    assert torch.equal(ours, theirs)
    assert (timer.unet_calls, timer.unet_passes) == (1, 1)
    out = SAMPLERS["euler"](make_student_denoiser(student_model, cond, settings(1.0, 2.5)), x * 200,
                            torch.tensor([700.0, 1.0, 0.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_guided_teacher_target_is_the_pipelines_guidance(tiny_setup):
    from animate_cli.pipeline import make_denoiser

    model, cond, settings = tiny_setup
    z = torch.randn(1, 2, 4, 16, 16, generator=torch.Generator().manual_seed(2)) * 3
    sigma = torch.tensor([3.0])
    latents = cond.image_latents.unsqueeze(1).expand(-1, 2, -1, -1, -1)
    batch = distill.Batch(index=torch.tensor([0]), w=torch.tensor([2.5]), k=torch.tensor([0]), sigma=sigma, z=z,
                          embeds=cond.image_embeds, latents=latents, time_ids=cond.added_time_ids)
    with torch.no_grad():
        v = distill.guided_teacher_v(model.unet, batch, z, sigma, 1.0, torch.float32)
        expected = make_denoiser(model, cond, settings(1.0, 2.5))(z, sigma[0])
    assert torch.allclose(distill.x0_from_v(z, sigma, v), expected, atol=1e-5)


# ---------------------------------------------------------------- the AnimateLCM sampler
def test_animatelcm_schedule_is_the_consistency_schedulers():
    sigmas = animatelcm_sigmas(4, 0.002, 700.0)
    lo, hi = 0.002 ** (1 / 7), 700.0 ** (1 / 7)
    expected = [(hi + r * (lo - hi)) ** 7 for r in (0, 10 / 39, 20 / 39, 30 / 39)] + [0.0]
    assert torch.allclose(sigmas, torch.tensor(expected, dtype=torch.float32))
    assert SCHEDULES["animatelcm"] is animatelcm_sigmas and SAMPLERS["animatelcm"] is sample_animatelcm


def test_animatelcm_sampler_matches_a_hand_computed_two_step_trajectory():
    def toy(x, sigma):  # a toy denoiser D(x, s) = x / (1 + s^2) + 0.1
        return x / (1 + sigma**2) + 0.1

    x = torch.tensor([[1.0, -2.0, 0.5]])
    sigmas = torch.tensor([2.0, 0.5, 0.0])
    seen = []
    out = sample_animatelcm(toy, x, sigmas, callback=lambda info: seen.append(info["i"]),
                            generator=torch.Generator().manual_seed(7))
    # by hand: step 1 denoises at 2.0 and renoises to 0.5 with fresh noise; step 2 (the last) denoises only
    z = torch.randn(1, 3, generator=torch.Generator().manual_seed(7))
    d0 = [1.0 / 5 + 0.1, -2.0 / 5 + 0.1, 0.5 / 5 + 0.1]
    x1 = [d0[j] + 0.5 * z[0, j].item() for j in range(3)]
    expected = torch.tensor([[v / 1.25 + 0.1 for v in x1]])
    assert torch.allclose(out, expected, atol=1e-6)
    assert seen == [0, 1]
    # s_noise scales the fresh noise; one generator per video gives each video its own noise
    half = sample_animatelcm(toy, x, sigmas, generator=torch.Generator().manual_seed(7), s_noise=0.0)
    assert torch.allclose(half, torch.tensor([[v / 1.25 + 0.1 for v in d0]]), atol=1e-6)
    pair = sample_animatelcm(toy, torch.cat([x, x]), sigmas,
                             generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    assert torch.allclose(pair[0], out[0]) and not torch.allclose(pair[1], out[0])


# ---------------------------------------------------------------- distillation
def test_stage1_steps_lower_the_loss_on_a_fixed_batch(images, tmp_path):
    s = distill.open_session(dict(OPTIONS, stage1_steps=10, batch_size=2), images, tmp_path / "work",
                             torch.device("cpu"))
    assert s.data.names == ["still0.png", "still1.png", "still2.png"]
    assert s.data.x0.shape == (3, 4, 16, 16)
    batch = distill.draw_batch(s.config, s.data, s.sigmas, 1, s.device)
    batch.k[:] = 2  # a middle noise level (2.27 on the 4-step base grid from 700 to 0.002), fresh noise
    batch.sigma = s.sigmas[2].repeat(2)
    eps = torch.randn(batch.z.shape, generator=torch.Generator().manual_seed(3))
    batch.z = s.data.x0[batch.index].unsqueeze(1) + batch.sigma.view(-1, 1, 1, 1, 1) * eps
    batch.w = torch.tensor([2.0, 3.0])
    with torch.no_grad():
        first = distill.batch_loss(s, batch).item()
    assert first > 0  # the untrained student is the unguided teacher: it misses guidance
    losses = [distill.train_step(s, batch) for _ in range(6)]
    with torch.no_grad():
        last = distill.batch_loss(s, batch).item()
    assert losses[0] == pytest.approx(first, rel=1e-5)
    assert last < 0.5 * first, (first, losses, last)


@pytest.mark.parametrize(("round_target", "rounds", "factor", "final"), [
    ("previous", 1, 2, 2),  # 4 -> 2 steps, the default halving: 2 steps of the stage-1 student per student step
    ("previous", 1, 4, 2),  # 8 -> 2 steps: 4 steps of the stage-1 student per student step
    ("teacher", 1, 4, 2),  # 8 -> 2: 4 guided steps of the original teacher
    ("teacher", 2, 2, 1),  # 4 -> 2 -> 1: round 2's one step spans all 4 of the teacher's
])
def test_a_round_folds_its_span_of_its_target_models_steps_into_one(images, tmp_path, round_target, rounds, factor,
                                                                     final):
    from animate_cli.student import load_student

    options = dict(OPTIONS, step_factor=factor, round_target=round_target, rounds=rounds, final_steps=final,
                   batch_size=2)
    s = distill.open_session(options, images, tmp_path / "work", torch.device("cpu"))
    c = s.config
    assert c.base_steps == final * factor**rounds and c.student_steps(rounds) == final
    for _ in range(rounds):  # to the last round, each earlier phase cut short
        distill.end_phase(s, log=lambda m: None)
    assert s.phase == rounds
    if round_target == "teacher":  # the original UNet, not the stage-1 student
        assert s.teacher is s.base_unet  # no guidance embedding: two passes per step
        assert not any(n.startswith("add_embedding.mlp.") for n, _ in s.teacher.named_parameters())
    previous, _ = load_student(tmp_path / "work" / f"phase-{rounds - 1}", torch.float32, torch.device("cpu"))
    fine_steps = c.base_steps if round_target == "teacher" else c.student_steps(rounds - 1)
    fine = distill.grid(c, s.scheduler_config, fine_steps)
    span = (len(fine) - 1) // final
    student_grid = distill.grid(c, s.scheduler_config, final)
    assert torch.equal(student_grid, fine[::span])  # the grids nest
    batch = distill.draw_batch(c, s.data, student_grid, 7, s.device, phase=rounds)
    batch.k = torch.arange(len(batch.k)) % final  # every one of the student's steps, the last ending at sigma 0
    batch.k[-1] = final - 1
    batch.sigma = student_grid[batch.k].float()
    x0 = distill.x0_from_v(batch.z, batch.sigma, distill.stage2_target(s, batch))
    one = x0 + (student_grid[batch.k + 1] / batch.sigma).view(-1, 1, 1, 1, 1) * (batch.z - x0)

    def x0_of(x, a):  # what the round's target model predicts, computed here without stage2_target
        if round_target == "teacher":
            return distill.x0_from_v(x, a, distill.guided_teacher_v(s.base_unet, batch, x, a, c.min_guidance,
                                                                       torch.float32))
        return distill.x0_from_v(x, a, distill.student_v(previous, batch, x, a, torch.float32))

    x = batch.z
    with torch.no_grad():
        for j in range(span):  # Euler steps on the finer grid from each video's own grid point
            a, b = fine[span * batch.k + j], fine[span * batch.k + j + 1]
            d = x0_of(x, a)
            x = d + (b / a).view(-1, 1, 1, 1, 1) * (x - d)
    assert torch.allclose(one, x, atol=1e-4 * (1 + x.abs().max().item()))
    # and it trains: the round's loss is finite and the student moves
    before = [p.detach().clone() for p in s.student.parameters()]
    assert math.isfinite(distill.train_step(s))
    assert any(not torch.equal(a, p) for a, p in zip(before, s.student.parameters(), strict=True))


def test_a_teacher_target_round_resumes_with_the_original_teacher(images, tmp_path):
    options = dict(OPTIONS, round_target="teacher")
    work = tmp_path / "work"
    s = distill.open_session(options, images, work, torch.device("cpu"))
    distill.run(s, until=3, log=lambda m: None)  # stage 1 (2 steps), then 1 of round 1
    resumed = distill.open_session(options, images, work, torch.device("cpu"))
    assert (resumed.phase, resumed.step) == (1, 1) and resumed.teacher is resumed.base_unet
    assert distill.train_step(resumed) == distill.train_step(s)
    with pytest.raises(AnimateError, match="round_target|round-target"):
        distill.open_session(dict(options, round_target="previous"), images, work, torch.device("cpu"))
    distill.run(s, log=lambda m: None)
    meta = json.loads((work / "phase-1" / "student.json").read_text())
    assert (meta["distillation"]["round_target"], meta["distillation"]["step_factor"]) == ("teacher", 2)
    more = distill.open_session(dict(options, match_steps=1), images, work, torch.device("cpu"))  # on to stage 3
    assert more.config.is_match(more.phase) and more.teacher is None and more.base_unet is None


def test_the_same_options_make_the_same_student_whatever_the_global_generator(images, tmp_path):
    options = dict(OPTIONS, model="tiny-motion", frames=8, samples_per_image=1)  # loaded, not built from a seed
    torch.manual_seed(1)
    a = distill.open_session(options, images, tmp_path / "a", torch.device("cpu"), log=lambda m: None)
    torch.manual_seed(2)
    b = distill.open_session(options, images, tmp_path / "b", torch.device("cpu"), log=lambda m: None)
    assert all(torch.equal(v, b.student.state_dict()[k]) for k, v in a.student.state_dict().items())
    assert distill.train_step(a) == distill.train_step(b)


def test_checkpoint_resumes_to_the_same_state(images, tmp_path):
    work = tmp_path / "work"
    s = distill.open_session(OPTIONS, images, work, torch.device("cpu"))
    distill.run(s, until=3, checkpoint_every=100, log=lambda m: None)  # stage 1 (2 steps), then 1 of round 1
    assert (s.phase, s.step, s.global_step) == (1, 1, 3)
    weights = {k: v.clone() for k, v in s.student.state_dict().items()}
    resumed = distill.open_session(OPTIONS, images, work, torch.device("cpu"))
    assert (resumed.phase, resumed.step, resumed.global_step) == (1, 1, 3)
    state = resumed.student.state_dict()
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    assert distill.train_step(resumed) == distill.train_step(s)  # the next loss, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(s.student.parameters(), resumed.student.parameters(), strict=True))
    log = [json.loads(line) for line in (work / distill.LOSS_LOG).read_text().splitlines()]
    assert [e["global_step"] for e in log] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) for e in log)


def test_stage3_samples_as_the_preset_does_and_pairs_each_teacher_sample_with_its_noise(images, tmp_path):
    import dataclasses

    from animate_cli.models import build_random
    from animate_cli.pipeline import Conditioning
    from animate_cli.sampling import sample_euler
    from animate_cli.student import make_student_denoiser

    s = distill.open_session(dict(OPTIONS, match_steps=3, samples_per_image=2), images, tmp_path / "work",
                             torch.device("cpu"))
    c = s.config
    assert (c.last_phase, c.student_steps(2), c.phase_steps(2)) == (2, 2, 3)
    distill.run(s, until=4, log=lambda m: None)
    distill.end_phase(s, log=lambda m: None)  # rounds done: stage 3, no teacher UNet (its samples are the targets)
    assert s.phase == 2 and c.is_match(2) and s.teacher is None and not s.done
    batch = distill.draw_match_batch(c, s.data, s.sigmas, 9, s.device)
    j, i = batch.sample[0].item(), batch.index[0].item()
    w, noise = distill.sample_draw(c, j, (2, 4, 16, 16))
    assert batch.w[0].item() == pytest.approx(w) and torch.equal(batch.z[0], noise * s.sigmas[0])
    assert i == s.data.video_image[j].item()
    # the teacher's guided Euler from that noise on the base grid lands on the sample: the pair is right
    model = build_random("tiny", torch.float32, torch.device("cpu"))
    one = dataclasses.replace(batch, **{k: getattr(batch, k)[:1] for k in ("index", "w", "sigma", "z", "embeds",
                                                                             "latents", "time_ids", "sample")})
    base = distill.base_sigmas(c, s.scheduler_config)
    with torch.no_grad():
        teacher = sample_euler(lambda x, a: distill.x0_from_v(x, a.view(1), distill.guided_teacher_v(
            model.unet, one, x, a.view(1), c.min_guidance, torch.float32)), one.z, base)
    assert torch.allclose(teacher, s.data.videos[j:j + 1], atol=1e-4 * (1 + teacher.abs().max().item()))
    # the student's sample is what the distilled preset's Euler sampler makes from the same noise
    cond = Conditioning(s.data.embeds[i:i + 1], s.data.image_latents[i:i + 1], s.data.time_ids[i:i + 1])
    settings = distill_settings(c, w)
    with torch.no_grad():
        ours = distill.student_sample(s, one)
        preset = sample_euler(make_student_denoiser(dataclasses.replace(model, unet=s.student.eval()), cond, settings),
                              one.z, s.sigmas)
    assert torch.allclose(ours, preset, atol=1e-4 * (1 + preset.abs().max().item()))
    first = distill.batch_loss(s, batch).item()
    assert first == pytest.approx(torch.mean((distill.student_sample(s, batch) - s.data.videos[batch.sample]) ** 2)
                                  .item(), rel=1e-5)
    losses = [distill.train_step(s, batch) for _ in range(5)]
    with torch.no_grad():
        last = distill.batch_loss(s, batch).item()
    assert losses[0] == pytest.approx(first, rel=1e-5) and last < 0.7 * first, (first, losses, last)


def distill_settings(c, w):
    from animate_cli.pipeline import Settings

    return Settings(width=c.width, height=c.height, frames=c.frames, steps=c.final_steps, fps=c.fps, motion=c.motion,
                    noise_aug=c.noise_aug, min_guidance=c.min_guidance, max_guidance=w, decode_chunk=2,
                    sampler="euler", schedule="karras")


def test_stage3_resumes_and_can_follow_a_finished_run(images, tmp_path):
    work = tmp_path / "work"
    s = distill.open_session(OPTIONS, images, work, torch.device("cpu"))
    distill.run(s, log=lambda m: None)
    assert s.done and s.global_step == 4
    with pytest.raises(AnimateError, match="--stage1-steps: its phase is finished"):
        distill.open_session(dict(OPTIONS, stage1_steps=5), images, work, torch.device("cpu"))
    more = dict(OPTIONS, match_steps=3, match_lr=5e-4)
    resumed = distill.open_session(more, images, work, torch.device("cpu"))  # a finished run gains stage 3
    assert not resumed.done and resumed.config.is_match(resumed.phase) and resumed.step == 0
    distill.run(resumed, until=6, log=lambda m: None)
    again = distill.open_session(more, images, work, torch.device("cpu"))
    assert (again.phase, again.step, again.global_step) == (2, 2, 6)
    assert distill.train_step(again) == distill.train_step(resumed)  # the next loss, bit for bit
    log = [json.loads(line) for line in (work / distill.LOSS_LOG).read_text().splitlines()]
    assert [e["stage"] for e in log] == [1, 1, 2, 2, 3, 3]
    assert [e["lr"] for e in log[4:]] == pytest.approx([5e-4, 5e-4 * 2 / 3])
    distill.run(again, log=lambda m: None)
    assert again.done
    folder = distill.export(again, tmp_path / "student")
    meta = json.loads((folder / "student.json").read_text())
    assert meta["steps"] == 2 and len(meta["sigmas"]) == 3
    assert meta["distillation"]["match_steps"] == 3 and meta["distillation"]["phase"] == 2


def test_match_error_rmse_averages_each_videos_rmse_and_weighs_far_off_videos_less():
    target = torch.zeros(3, 2, 4)
    sample = torch.stack([torch.full((2, 4), 0.1), torch.full((2, 4), 0.2), torch.full((2, 4), 1.0)])
    sample[0, 0, 0] = 0.3  # video 0: seven errors of 0.1 and one of 0.3
    assert distill.match_error(sample, target, "mse").item() == pytest.approx(sample.square().mean().item())
    by_hand = (math.sqrt((7 * 0.01 + 0.09) / 8 + 1e-6) + math.sqrt(0.04 + 1e-6) + math.sqrt(1 + 1e-6)) / 3
    assert distill.match_error(sample, target, "rmse").item() == pytest.approx(by_hand, rel=1e-6)
    shares = {}
    for metric in distill.MATCH_METRICS:
        x = sample.clone().requires_grad_(True)
        distill.match_error(x, target, metric).backward()
        norms = x.grad.flatten(1).norm(dim=1)
        shares[metric] = (norms[2] / norms.sum()).item()  # the far-off video's share of the gradient
    assert shares["mse"] > 0.7 and shares["rmse"] < 0.4, shares
    x = torch.zeros(2, 3, requires_grad=True)  # an exact match: the floor keeps the gradient finite
    distill.match_error(x, torch.zeros(2, 3), "rmse").backward()
    assert torch.isfinite(x.grad).all()


def test_stage3_with_the_rmse_metric_trains_and_is_recorded(images, tmp_path):
    s = distill.open_session(dict(OPTIONS, match_steps=3, samples_per_image=2, match_metric="rmse"), images,
                             tmp_path / "work", torch.device("cpu"))
    distill.run(s, until=4, log=lambda m: None)
    distill.end_phase(s, log=lambda m: None)
    assert s.config.is_match(s.phase)
    batch = distill.draw_match_batch(s.config, s.data, s.sigmas, 9, s.device)
    with torch.no_grad():
        per_video = (distill.student_sample(s, batch) - s.data.videos[batch.sample]).square().flatten(1).mean(1)
        first = distill.batch_loss(s, batch).item()
    assert first == pytest.approx((per_video + 1e-6).sqrt().mean().item(), rel=1e-5)
    assert first != pytest.approx(per_video.mean().item(), rel=0.1)  # so it is not the mean square error
    for _ in range(5):
        distill.train_step(s, batch)
    with torch.no_grad():
        assert distill.batch_loss(s, batch).item() < 0.8 * first
    distill.run(s, log=lambda m: None)
    meta = json.loads((distill.export(s, tmp_path / "student") / "student.json").read_text())
    assert meta["distillation"]["match_metric"] == "rmse"


def test_decoded_frames_are_the_presets_decode_and_carry_gradients():
    import contextlib
    from types import SimpleNamespace

    from animate_cli.models import build_random

    model = build_random("tiny", torch.float32, torch.device("cpu"))
    s = SimpleNamespace(vae=model.vae.eval().requires_grad_(False), autocast=contextlib.nullcontext)
    latents = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sf = model.vae.config.scaling_factor
    with torch.no_grad():  # the presets' way: each video apart, `chunk` frames per VAE call
        by_hand = {chunk: torch.stack([torch.cat([model.vae.decode(v[i:i + chunk] / sf, num_frames=len(v[i:i + chunk]))
                                                  .sample for i in range(0, 3, chunk)]) for v in latents])
                   for chunk in (1, 2, 3)}
    assert not torch.allclose(by_hand[2], by_hand[3], atol=1e-4)  # the decoder mixes a call's frames: chunks matter
    for chunk in (1, 2, 3):  # 1 and 3 divide the 3 frames (one batched call), 2 does not (call by call)
        x = latents.clone().requires_grad_(True)
        frames = distill.decoded(s, x, chunk=chunk)
        assert frames.shape[:3] == (2, 3, 3)
        assert torch.allclose(frames, by_hand[chunk], atol=1e-5), chunk
        frames.square().mean().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_stage3_on_pixels_fits_the_decoded_frames_and_can_follow_a_finished_run(images, tmp_path):
    work = tmp_path / "work"
    s = distill.open_session(dict(OPTIONS, samples_per_image=2), images, work, torch.device("cpu"))
    assert s.vae is None  # no check and no stage 3 on pixels: the VAE is not kept
    distill.run(s, log=lambda m: None)
    more = dict(OPTIONS, match_steps=8, samples_per_image=2, match_loss="pixels")
    s = distill.open_session(more, images, work, torch.device("cpu"))
    assert s.config.match_loss == "pixels" and s.config.is_match(s.phase) and s.vae is not None
    batch = distill.draw_match_batch(s.config, s.data, s.sigmas, 9, s.device)
    with torch.no_grad():
        sample = distill.student_sample(s, batch)
        target = s.data.videos[batch.sample]
        sf = s.vae.config.scaling_factor
        frames = [torch.stack([s.vae.decode(v / sf, num_frames=len(v)).sample for v in x]) for x in (sample, target)]
        first = distill.batch_loss(s, batch).item()
        on_latents = torch.mean((sample - target) ** 2).item()
    assert first == pytest.approx(torch.mean((frames[0] - frames[1]) ** 2).item(), rel=1e-4)
    assert first != pytest.approx(on_latents, rel=0.1)  # so it is not the latent loss
    losses = [distill.train_step(s, batch) for _ in range(5)]
    with torch.no_grad():
        last = distill.batch_loss(s, batch).item()
    assert losses[0] == pytest.approx(first, rel=1e-4) and last < 0.7 * first, (first, losses, last)
    distill.run(s, log=lambda m: None)
    folder = distill.export(s, tmp_path / "student")
    meta = json.loads((folder / "student.json").read_text())
    assert meta["distillation"]["match_loss"] == "pixels" and meta["distillation"]["match_steps"] == 8


def test_init_student_starts_from_a_saved_student_and_checks_it(images, tmp_path):
    first = distill.open_session(OPTIONS, images, tmp_path / "a", torch.device("cpu"))
    distill.run(first, log=lambda m: None)  # phase-0/ holds its trained stage-1 student
    saved, _ = load_student(tmp_path / "a" / "phase-0", torch.float32, "cpu")
    fresh = distill.open_session(dict(OPTIONS, stage1_steps=0), images, tmp_path / "b", torch.device("cpu"))
    options = dict(OPTIONS, stage1_steps=0, init_student=str(tmp_path / "a" / "phase-0"))
    s = distill.open_session(options, images, tmp_path / "c", torch.device("cpu"))
    want, got, untrained = saved.state_dict(), s.student.state_dict(), fresh.student.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(untrained[k], want[k]) for k in want)  # so the copy is what made them equal
    distill.run(s, log=lambda m: None)  # the round then starts from it, and the student records where it began
    meta = json.loads((distill.export(s, tmp_path / "student") / "student.json").read_text())
    assert meta["distillation"]["init_student"] == str(tmp_path / "a" / "phase-0")
    with pytest.raises(AnimateError, match="give --guidance-input video"):
        distill.open_session(dict(options, guidance_input="frame"), images, tmp_path / "d", torch.device("cpu"))
    with pytest.raises(AnimateError, match="--init-student"):  # a resumed run keeps the weights it started from
        distill.open_session(dict(options, init_student=str(tmp_path / "b")), images, tmp_path / "c",
                             torch.device("cpu"))


# ---------------------------------------------------------------- the command
def test_cli_distill_writes_a_student_and_resumes(cli, images, tmp_path):
    work, student = tmp_path / "work", tmp_path / "student"
    args = ["distill", images, "--model", "random:tiny", "--workdir", work, "--stage1-steps", "2", "--round-steps",
            "2", "--rounds", "1", "--final-steps", "2", "--size", "32x32", "--frames", "2", "--device", "cpu",
            "--guidance-input", "frame", "--sigma-sampling", "lognormal", "--guidance-range", "2", "2.5",
            "--lr", "1e-4", "--precision", "bf16", "--holdout", "1", "--warmup", "0.5", "--out", student]
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().endswith("student")
    assert "2 images (and 1 held out)" in result.text and "held-out: the 2-step student is" in result.text
    checks = [json.loads(x) for x in (work / "eval.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"], r["steps"]) for r in checks] == [(0, 0, 4), (0, 2, 4), (1, 0, 2), (1, 2, 2)]
    files = sorted(str(p.relative_to(student)) for p in student.rglob("*") if p.is_file())
    assert files == ["guidance_embedding.safetensors", "student.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    meta = json.loads((student / "student.json").read_text())
    assert meta["steps"] == 2 and meta["sampler"] == "euler" and len(meta["sigmas"]) == 3
    assert meta["sigmas"][-1] == 0.0 and meta["teacher"] == "random:tiny"
    assert meta["guidance"]["embedding_input"] == "frame_scale" and meta["guidance_embedding"]["per_frame"]
    assert meta["distillation"]["sigma_sampling"]["lognormal"] == [0.7, 1.3]
    assert meta["distillation"]["round_sigma_sampling"] == "uniform"
    assert meta["distillation"]["precision"] == "bf16" and meta["distillation"]["warmup"] == 0.5
    assert meta["guidance"]["max_guidance_range"] == [2.0, 2.5]
    assert len((work / "loss.jsonl").read_text().splitlines()) == 4
    assert (work / "phase-0" / "student.json").is_file() and (work / "phase-1" / "student.json").is_file()
    loaded, _ = load_student(student, torch.float32, "cpu")
    assert loaded.dtype == torch.float32

    again = cli(*args)  # finished: resumes, trains nothing, exports again
    assert again.exit_code == 0, again.stderr
    assert "resumed at step 4" in again.text
    assert len((work / "loss.jsonl").read_text().splitlines()) == 4

    changed = cli(*args[:-2], "--lr", "0.5")
    assert_user_error(changed, "--lr 0.5 differs from the run in this workdir")

    # the distilled preset with this student: the default max guidance (3) is outside its range, refused before
    # anything is written; one inside it animates
    video = tmp_path / "video.gif"
    use = [images / "still0.png", "-o", video, "--model", "random:tiny", "--preset", "distilled", "--set",
           f"student={student}", "--set", "compile=false", "--frames", "2", "--steps", "2", "--device", "cpu"]
    assert_user_error(cli(*use), "distilled for max guidance 2 to 2.5, not 3: use --set max_guidance=2.5")
    assert not video.exists()
    inside = cli(*use, "--set", "max_guidance=2.25")
    assert inside.exit_code == 0, inside.stderr
    assert video.is_file()


def test_cli_distill_bad_input_is_one_line(cli, tmp_path):
    assert_user_error(cli("distill", tmp_path / "nope", "--workdir", tmp_path / "w", "--device", "cpu"),
                      "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(cli("distill", empty, "--workdir", tmp_path / "w", "--device", "cpu"), "holds no images")
    (tmp_path / "one.png").write_bytes(b"")
    assert_user_error(cli("distill", tmp_path / "one.png", "--workdir", tmp_path / "w", "--device", "cpu"),
                      "is not a folder")
    (empty / "a.png").write_bytes(b"not a png")
    assert_user_error(cli("distill", empty, "--workdir", tmp_path / "w", "--device", "cpu", "--size", "3x"),
                      "--size '3x'")
    assert_user_error(cli("distill", empty, "--workdir", tmp_path / "w", "--device", "cpu", "--model", "random:tiny",
                          "--guidance-range", "3", "1"), "--guidance-range 3.0 1.0: expected 0 <= LOW <= HIGH")
    assert not (tmp_path / "w").exists()  # no workdir made for a run that never started


# ---------------------------------------------------------------- the teacher's samples as data
def test_teacher_samples_are_the_pipelines_guided_euler_samples(images, tmp_path):
    import dataclasses

    from animate_cli.models import build_random
    from animate_cli.pipeline import Conditioning, Settings, make_denoiser
    from animate_cli.sampling import sample_euler

    s = distill.open_session(dict(OPTIONS, samples_per_image=2), images, tmp_path / "work", torch.device("cpu"))
    data, c = s.data, s.config
    assert data.videos.shape == (6, 2, 4, 16, 16)
    assert data.video_image.tolist() == [0, 0, 1, 1, 2, 2]
    lo, hi = c.guidance_range
    assert all(lo <= w <= hi for w in data.video_w.tolist()) and len(set(data.video_w.tolist())) == 6
    model = build_random("tiny", torch.float32, torch.device("cpu"))  # the same seeded random weights
    base = distill.base_sigmas(c, s.scheduler_config)
    for j in (1, 4):
        w, noise = distill.sample_draw(c, j, (2, 4, 16, 16))
        assert w == pytest.approx(data.video_w[j].item())
        i = data.video_image[j].item()
        cond = Conditioning(data.embeds[i:i + 1], data.image_latents[i:i + 1], data.time_ids[i:i + 1])
        settings = Settings(width=32, height=32, frames=2, steps=4, fps=7, motion=127, noise_aug=0.02,
                            min_guidance=c.min_guidance, max_guidance=w, decode_chunk=2, sampler="euler",
                            schedule="karras")
        expected = sample_euler(make_denoiser(model, cond, settings), noise[None] * base[0], base)
        assert torch.allclose(data.videos[j:j + 1], expected, atol=1e-4 * (1 + expected.abs().max().item()))
    # a batch draws whole samples with the still each was made from, and w afresh
    batch = distill.draw_batch(dataclasses.replace(c, batch_size=5), data, s.sigmas, 7, s.device)
    assert torch.equal(batch.index, data.video_image[batch.sample])
    assert all(lo <= w <= hi for w in batch.w.tolist()) and not set(batch.w.tolist()) & set(data.video_w.tolist())


def test_teacher_samples_are_kept_and_remade_when_they_do_not_match(images, tmp_path, monkeypatch):
    work = tmp_path / "work"
    first = distill.open_session(dict(OPTIONS, samples_per_image=2), images, work, torch.device("cpu"))
    path = work / distill.SAMPLES_FILE
    assert path.is_file() and not list(work.glob(".*.tmp"))

    def no_sampling(*args, **kwargs):
        raise AssertionError("the saved teacher samples should have been reused")

    with monkeypatch.context() as m:
        m.setattr(distill, "teacher_samples", no_sampling)
        again = distill.open_session(dict(OPTIONS, samples_per_image=2), images, work, torch.device("cpu"))
    assert torch.equal(again.data.videos, first.data.videos)
    other = tmp_path / "other"
    other.mkdir()
    (other / distill.SAMPLES_FILE).write_bytes(path.read_bytes())  # made for 2 per image, this run wants 1
    lines = []
    remade = distill.open_session(dict(OPTIONS, samples_per_image=1), images, other, torch.device("cpu"),
                                  log=lines.append)
    assert remade.data.videos.shape[0] == 3 and any("made for another run" in line for line in lines)


def test_trajectory_rounds_keep_the_teachers_paths_and_land_where_they_went(images, tmp_path, monkeypatch):
    from animate_cli.models import build_random
    from animate_cli.pipeline import Conditioning, Settings, make_denoiser
    from animate_cli.sampling import sample_euler

    options = dict(OPTIONS, round_target="trajectory", rounds=2, step_factor=2, final_steps=1, batch_size=4,
                   samples_per_image=2)  # 4 -> 2 -> 1 steps
    work = tmp_path / "work"
    s = distill.open_session(options, images, work, torch.device("cpu"))
    data, c = s.data, s.config
    assert data.paths.shape == (6, 3, 2, 4, 16, 16)  # the states on round 1's 2-step grid
    assert torch.equal(data.paths[:, -1], data.videos)
    model = build_random("tiny", torch.float32, torch.device("cpu"))
    base = distill.base_sigmas(c, s.scheduler_config)
    for j in (0, 5):  # each kept state is where the guided teacher's Euler steps reach, computed independently
        w, noise = distill.sample_draw(c, j, (2, 4, 16, 16))
        i = data.video_image[j].item()
        cond = Conditioning(data.embeds[i:i + 1], data.image_latents[i:i + 1], data.time_ids[i:i + 1])
        settings = Settings(width=32, height=32, frames=2, steps=4, fps=7, motion=127, noise_aug=0.02,
                            min_guidance=c.min_guidance, max_guidance=w, decode_chunk=2, sampler="euler",
                            schedule="karras")
        denoise = make_denoiser(model, cond, settings)
        for point in range(3):
            expected = sample_euler(denoise, noise[None] * base[0], base[:2 * point + 1])
            assert torch.allclose(data.paths[j:j + 1, point], expected, atol=1e-4 * (1 + expected.abs().max().item()))

    def no_model(*args, **kwargs):
        raise AssertionError("a trajectory round runs no model to make its targets")

    for phase in (1, 2):
        distill.end_phase(s, log=lambda m: None)
        assert s.phase == phase and s.teacher is None and s.base_unet is None
        sigmas = s.sigmas
        batch = distill.draw_path_batch(c, data, sigmas, 5, s.device, phase)
        stride = 2 // (len(sigmas) - 1)
        assert torch.equal(batch.z, data.paths[batch.sample, batch.k * stride])
        assert torch.equal(batch.z_next, data.paths[batch.sample, (batch.k + 1) * stride])
        assert torch.equal(batch.w, data.video_w[batch.sample]) and torch.equal(batch.index,
                                                                               data.video_image[batch.sample])
        assert torch.equal(batch.sigma, sigmas[batch.k].float())
        with monkeypatch.context() as m:
            m.setattr(distill, "guided_teacher_v", no_model)
            m.setattr(distill, "student_v", no_model)
            target = distill.stage2_target(s, batch)
        x0 = distill.x0_from_v(batch.z, batch.sigma, target)  # one DDIM step with the target's x0 lands on z_next
        one = x0 + (sigmas[batch.k + 1] / batch.sigma).view(-1, 1, 1, 1, 1) * (batch.z - x0)
        assert torch.allclose(one, batch.z_next, atol=1e-4 * (1 + batch.z_next.abs().max().item()))
    assert math.isfinite(distill.train_step(s))
    # it resumes exactly, from the kept paths, without sampling them again
    distill.save_checkpoint(s)
    with monkeypatch.context() as m:
        m.setattr(distill, "teacher_samples", no_model)
        resumed = distill.open_session(options, images, work, torch.device("cpu"))
    assert (resumed.phase, resumed.step) == (2, 1) and resumed.teacher is None
    assert distill.train_step(resumed) == distill.train_step(s)
    # samples kept without paths are made again with them
    other = tmp_path / "other"
    distill.open_session(dict(options, round_target="teacher"), images, other, torch.device("cpu"))
    lines = []
    again = distill.open_session(options, images, other, torch.device("cpu"), log=lines.append)
    assert again.data.paths is not None and any("made for another run" in line for line in lines)
    # and samples kept with their paths serve a run that needs none, its videos only
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / distill.SAMPLES_FILE).write_bytes((work / distill.SAMPLES_FILE).read_bytes())
    with monkeypatch.context() as m:
        m.setattr(distill, "teacher_samples", no_model)
        reused = distill.open_session(dict(options, round_target="previous"), images, plain, torch.device("cpu"))
    assert torch.equal(reused.data.videos, data.videos) and reused.data.paths is None
    with pytest.raises(AnimateError, match="--round-target trajectory needs --data teacher"):
        distill.open_session(dict(options, data="stills"), images, tmp_path / "stills-run", torch.device("cpu"))


# ---------------------------------------------------------------- the held-out check
def test_heldout_stills_train_nothing_and_measure_the_student_against_the_teachers_videos(images, tmp_path,
                                                                                       monkeypatch):
    from animate_cli.models import build_random
    from animate_cli.pipeline import Conditioning, Settings, decode, make_denoiser
    from animate_cli.sampling import sample_euler

    work = tmp_path / "work"
    s = distill.open_session(dict(OPTIONS, holdout=1, samples_per_image=1), images, work, torch.device("cpu"))
    h, c = s.heldout, s.config
    assert len(s.data.names) == 2 and len(h.data.names) == 1
    assert sorted(s.data.names + h.data.names) == ["still0.png", "still1.png", "still2.png"]
    assert set(s.data.video_image.tolist()) == {0, 1}  # the teacher's training videos: none from the held-out still
    # the held-out video is the teacher's guided Euler sample on the base grid from its noise, as the pipeline makes
    model = build_random("tiny", torch.float32, torch.device("cpu"))
    base = distill.base_sigmas(c, s.scheduler_config)
    w, noise = distill.heldout_draw(c, 0, (2, 4, 16, 16))
    assert w == pytest.approx(2.0) == pytest.approx(h.w[0].item())  # the middle of guidance range 1 to 3
    assert torch.equal(noise, h.noise[0])
    cond = Conditioning(h.data.embeds, h.data.image_latents, h.data.time_ids)
    settings = Settings(width=32, height=32, frames=2, steps=4, fps=7, motion=127, noise_aug=0.02, min_guidance=1.0,
                        max_guidance=w, decode_chunk=2, sampler="euler", schedule="karras")
    expected = decode(model, sample_euler(make_denoiser(model, cond, settings), noise[None] * base[0], base), 8)
    assert (h.frames.int() - expected.int()).abs().max() <= 1  # its frames, as the pipeline decodes them
    # the teacher's own distance on the final grid: its guided Euler steps on every 2nd point, in frames (0 to 1)
    coarse = sample_euler(make_denoiser(model, cond, settings), noise[None] * base[0], base[::2])
    frames = decode(model, coarse, 8)
    expected_bar = ((frames.double() - expected.double()) / 255).pow(2).mean().sqrt().item()
    assert list(h.teacher) == [2] and h.teacher[2] == pytest.approx(expected_bar, rel=1e-2) and expected_bar > 0
    # the untrained student is the unguided teacher: it misses guidance 2 on the held-out video
    assert distill.heldout_distance(s) > 0.2 * h.teacher[2]

    with monkeypatch.context() as m:  # kept in the workdir, and reused
        m.setattr(distill, "sample_heldout", lambda *a, **k: pytest.fail("the held-out videos should be reused"))
        again = distill.open_session(dict(OPTIONS, holdout=1, samples_per_image=1), images, work,
                                     torch.device("cpu"))
    assert torch.equal(again.heldout.frames, h.frames) and again.heldout.teacher == h.teacher

    # at guidance 1 the guided teacher is its conditional pass, so the untrained student samples the same video
    one = distill.open_session(dict(OPTIONS, holdout=1, guidance_range=(1.0, 1.0), samples_per_image=1), images,
                               tmp_path / "one", torch.device("cpu"))
    assert distill.heldout_distance(one) < 1e-3 * one.heldout.teacher[2]  # (a pixel may round the other way)


def test_eval_every_logs_each_check_and_keep_best_ends_the_phase_with_the_best_even_across_a_resume(
        images, tmp_path, monkeypatch):
    values = [0.9, 0.5, 0.2, 0.4, 0.3,  # stage 1's checks at its start, steps 1, 2, 3 and its end (4)
              0.05, 0.1, 0.15]  # round 1's at its start, step 1 and end: none better than where it started
    scripted = iter(values)
    weights = {}

    def distance(s):
        weights[s.phase, s.global_step] = {k: v.clone() for k, v in s.student.state_dict().items()}
        return next(scripted)

    monkeypatch.setattr(distill, "heldout_distance", distance)
    work = tmp_path / "work"
    options = dict(OPTIONS, stage1_steps=4, holdout=1, eval_every=1, keep_best=True, samples_per_image=1)
    lines = []
    first = distill.open_session(options, images, work, torch.device("cpu"))
    distill.run(first, until=3, log=lines.append)
    assert (work / "phase-0-best" / "student.json").is_file()
    resumed = distill.open_session(options, images, work, torch.device("cpu"))
    assert resumed.extras["best"] == (0.2, 2)
    distill.run(resumed, log=lines.append)
    rows = [json.loads(x) for x in (work / "eval.jsonl").read_text().splitlines()]
    assert [(r["global_step"], r["phase"], r["distance"], r["steps"]) for r in rows] == [
        (0, 0, 0.9, 4), (1, 0, 0.5, 4), (2, 0, 0.2, 4), (3, 0, 0.4, 4), (4, 0, 0.3, 4),
        (4, 1, 0.05, 2), (5, 1, 0.1, 2), (6, 1, 0.15, 2)]  # no second start check on resuming
    assert any("keeping the student of the phase's step 2 (held-out 0.20000)" in x for x in lines)
    assert any("keeping the student of the phase's step 0 (held-out 0.05000)" in x for x in lines)  # round 1's
    assert any("held-out: the 4-step student is 0.40000" in x and "best of this phase: 0.20000 at its step 2" in x
               for x in lines)
    assert any("held-out: the 2-step student is 0.15000" in x and "best of this phase: 0.05000 at its step 0" in x
               for x in lines)
    kept, _ = load_student(work / "phase-0", torch.float32, "cpu")
    state = kept.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights[0, 2].items())
    assert not all(torch.equal(state[k], v) for k, v in weights[0, 4].items())
    assert not (work / "phase-0-best").exists() and not (work / "phase-1-best").exists()
    assert rows[5]["teacher_distance"] is not None and rows[0]["teacher_distance"] is None  # the bar on 2 steps
    final, _ = load_student(work / "phase-1", torch.float32, "cpu")  # round 1 kept where it started: stage 1's
    assert all(torch.equal(final.state_dict()[k], v) for k, v in weights[0, 2].items())  # kept student (step 2)
    assert all(torch.equal(resumed.student.state_dict()[k], v) for k, v in weights[0, 2].items())  # what export writes
    assert not all(torch.equal(final.state_dict()[k], v) for k, v in weights[1, 6].items())

    last = tmp_path / "last"  # --keep-last (the default): the phase ends with its last student, checked all the same
    scripted = iter(values)
    plain = distill.open_session(dict(options, keep_best=False), images, last, torch.device("cpu"))
    distill.run(plain, log=lambda m: None)
    kept, _ = load_student(last / "phase-0", torch.float32, "cpu")
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in weights[0, 4].items())
    assert len((last / "eval.jsonl").read_text().splitlines()) == 8 and not (last / "phase-0-best").exists()


def test_ema_ends_each_phase_with_the_average_of_its_weights_and_the_checks_measure_it(images, tmp_path,
                                                                                      monkeypatch):
    options = dict(OPTIONS, stage1_steps=4, ema=0.2, holdout=1, eval_every=1, samples_per_image=1)
    checked = []

    def sample(s, data, noise, w, steps, x0_fn):  # the held-out check: which weights does it sample with?
        checked.append({k: v.clone() for k, v in s.student.state_dict().items()})
        return noise

    monkeypatch.setattr(distill, "sample_heldout", sample)
    s = distill.open_session(options, images, tmp_path / "work", torch.device("cpu"))
    weights = [{k: v.clone() for k, v in s.student.state_dict().items()}]
    for _ in range(4):
        distill.train_step(s)
        weights.append({k: v.clone() for k, v in s.student.state_dict().items()})
    average = {k: v.clone() for k, v in weights[0].items()}  # by hand: decay (1 + n) / (10 + n), at most 0.2
    for n in range(1, 5):
        decay = min(0.2, (1 + n) / (10 + n))
        assert decay == distill.ema_decay(s.config, n)
        average = {k: decay * average[k] + (1 - decay) * weights[n][k] for k in average}
    assert [round(distill.ema_decay(s.config, n), 4) for n in range(1, 5)] == [0.1818, 0.2, 0.2, 0.2]
    assert all(torch.allclose(s.ema[k], average[k], rtol=0, atol=1e-6) for k in average)
    assert not all(torch.allclose(average[k], weights[4][k], rtol=0, atol=1e-4) for k in average)  # not the last
    distill.check_heldout(s, log=lambda m: None)
    assert all(torch.equal(checked[-1][k], s.ema[k]) for k in average)  # the check measured the average ...
    assert all(torch.equal(s.student.state_dict()[k], weights[4][k]) for k in average)  # ... and put the live back
    distill.end_phase(s, log=lambda m: None)
    kept, _ = load_student(tmp_path / "work" / "phase-0", torch.float32, "cpu")
    assert all(torch.equal(kept.state_dict()[k], s.student.state_dict()[k]) for k in average)
    assert all(torch.allclose(kept.state_dict()[k], average[k], rtol=0, atol=1e-6) for k in average)
    assert s.ema is None and s.phase == 1  # round 1 starts its own average from the kept weights
    start = {k: v.clone() for k, v in s.student.state_dict().items()}
    distill.train_step(s)
    decay = 2 / 11
    assert all(torch.allclose(s.ema[k], decay * start[k] + (1 - decay) * s.student.state_dict()[k], rtol=0,
                              atol=1e-6) for k in average)
    with pytest.raises(AnimateError, match="--ema 0.5 differs from the run"):
        distill.open_session(dict(options, ema=0.5), images, tmp_path / "work", torch.device("cpu"))


def test_ema_resumes_to_the_same_average(images, tmp_path):
    options = dict(OPTIONS, stage1_steps=4, ema=0.2)
    straight = distill.open_session(options, images, tmp_path / "a", torch.device("cpu"))
    distill.run(straight, until=6, log=lambda m: None)  # stage 1, then 2 steps of round 1
    first = distill.open_session(options, images, tmp_path / "b", torch.device("cpu"))
    distill.run(first, until=2, log=lambda m: None)  # stops mid stage 1 (the checkpoint holds the average)
    resumed = distill.open_session(options, images, tmp_path / "b", torch.device("cpu"))
    assert resumed.ema is not None and all(torch.equal(resumed.ema[k], v) for k, v in first.ema.items())
    distill.run(resumed, until=6, log=lambda m: None)
    a, _ = load_student(tmp_path / "a" / "phase-0", torch.float32, "cpu")
    b, _ = load_student(tmp_path / "b" / "phase-0", torch.float32, "cpu")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert all(torch.equal(straight.ema[k], resumed.ema[k]) for k in straight.ema)
    assert all(torch.equal(straight.student.state_dict()[k], v) for k, v in resumed.student.state_dict().items())


def test_precision_sets_the_autocast_and_may_change_on_resume(images, tmp_path):
    work = tmp_path / "work"
    s = distill.open_session(dict(OPTIONS, stage1_steps=4), images, work, torch.device("cpu"))
    with s.autocast():  # auto on a CPU: float32
        assert not torch.is_autocast_enabled("cpu")
    distill.run(s, until=2, log=lambda m: None)
    s = distill.open_session(dict(OPTIONS, stage1_steps=4, precision="bf16"), images, work, torch.device("cpu"))
    assert s.config.precision == "bf16" and s.global_step == 2
    set_guidance(s.student, torch.tensor([2.0]))
    args = (s.student, s.data.videos[:1], torch.tensor([1.0]), s.data.embeds[:1],
            s.data.image_latents[:1].unsqueeze(1).expand(-1, 2, -1, -1, -1), s.data.time_ids[:1], torch.float32)
    with torch.no_grad():
        with s.autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            v = distill.unet_v(*args)
        v32 = distill.unet_v(*args)
    assert v.dtype == torch.float32  # the loss stays in float32
    assert not torch.equal(v, v32) and torch.allclose(v, v32, atol=0.05 * v32.abs().max().item())  # bf16 inside
    distill.run(s, until=3, log=lambda m: None)
    assert s.global_step == 3 and math.isfinite(s.last_loss)
    with pytest.raises(AnimateError, match="--lr 0.5 differs from the run"):
        distill.open_session(dict(OPTIONS, stage1_steps=4, lr=0.5), images, work, torch.device("cpu"))


def test_gradient_checkpointing_is_an_option_that_may_change_on_resume(images, tmp_path):
    work = tmp_path / "work"
    s = distill.open_session(dict(OPTIONS, stage1_steps=4), images, work, torch.device("cpu"))
    assert not s.student.is_gradient_checkpointing  # default: on for CUDA only
    distill.run(s, until=2, log=lambda m: None)
    s = distill.open_session(dict(OPTIONS, stage1_steps=4, gradient_checkpointing=True), images, work,
                             torch.device("cpu"))
    assert s.student.is_gradient_checkpointing and s.global_step == 2
    distill.run(s, until=3, log=lambda m: None)
    assert s.global_step == 3 and math.isfinite(s.last_loss)


def test_stills_data_uses_each_still_on_every_frame(images, tmp_path):
    s = distill.open_session(dict(OPTIONS, data="stills"), images, tmp_path / "work", torch.device("cpu"))
    assert s.data.videos is None and not (tmp_path / "work" / distill.SAMPLES_FILE).exists()
    batch = distill.draw_batch(s.config, s.data, s.sigmas, 3, s.device)
    # z = x0 + sigma * eps with x0 the still on both frames: z's frame difference is the noise's alone
    assert batch.z.shape == (1, 2, 4, 16, 16)
    x0 = s.data.x0[batch.index]
    eps = (batch.z - x0.unsqueeze(1)) / batch.sigma.view(-1, 1, 1, 1, 1)
    assert abs(eps.std().item() - 1) < 0.2


def test_learning_rate_anneals_linearly_within_each_phase(images, tmp_path):
    work = tmp_path / "work"
    s = distill.open_session(dict(OPTIONS, stage1_steps=4), images, work, torch.device("cpu"))
    distill.run(s, until=6, log=lambda m: None)  # 4 steps of stage 1, 2 of round 1
    log = [json.loads(line) for line in (work / distill.LOSS_LOG).read_text().splitlines()]
    base = OPTIONS["lr"]
    assert [e["lr"] for e in log] == pytest.approx([base, 0.75 * base, 0.5 * base, 0.25 * base, base, 0.5 * base])
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * base)
    assert s.optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * base * s.config.guidance_lr_mult)
    flat = distill.open_session(dict(OPTIONS, lr_schedule="constant"), images, tmp_path / "flat",
                                torch.device("cpu"))
    distill.run(flat, until=3, log=lambda m: None)
    assert flat.optimizer.param_groups[0]["lr"] == base


def test_warmup_raises_the_learning_rate_over_each_phase_first_steps(images, tmp_path):
    work = tmp_path / "work"
    s = distill.open_session(dict(OPTIONS, stage1_steps=10, round_steps=4, warmup=0.3), images, work,
                             torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in s.student.named_parameters()}
    distill.run(s, until=1, log=lambda m: None)
    # Adam's first step moves every weight with a gradient by the rate itself, whatever the gradient's size: the
    # warmup makes that a third of it here (three warmup steps)
    base = OPTIONS["lr"]
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in s.student.named_parameters()
                if not n.startswith("add_embedding.mlp."))
    assert moved == pytest.approx(base / 3, rel=1e-3)
    distill.run(s, until=14, log=lambda m: None)  # the rest of stage 1 (10 steps) and round 1 (4)
    log = [json.loads(line) for line in (work / distill.LOSS_LOG).read_text().splitlines()]
    stage1 = [1 / 3, 2 / 3 * 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # ramp x linear anneal
    round1 = [1, 0.75, 0.5, 0.25]  # 0.3 x 4 steps rounds to one: no ramp left
    assert [e["lr"] for e in log] == pytest.approx([base * f for f in stage1 + round1])
    flat = distill.open_session(dict(OPTIONS, stage1_steps=4, lr_schedule="constant", warmup=0.5), images,
                                tmp_path / "flat", torch.device("cpu"))
    distill.run(flat, until=4, log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "flat" / distill.LOSS_LOG).read_text().splitlines()]
    assert [e["lr"] for e in log] == pytest.approx([base / 2, base, base, base])
    _, meta = load_student(work / "phase-0", torch.float32, "cpu")
    assert meta["distillation"]["warmup"] == 0.3  # student.json records it


def test_the_annealed_rate_stops_at_zero_past_the_phase_end():
    c = distill.DistillConfig(stage1_steps=4, warmup=0.0)
    assert [distill.lr_factor(c, 0, k) for k in range(7)] == pytest.approx([1, 0.75, 0.5, 0.25, 0, 0, 0])
    flat = distill.DistillConfig(stage1_steps=4, warmup=0.0, lr_schedule="constant")
    assert distill.lr_factor(flat, 0, 6) == 1


@pytest.mark.parametrize(("option", "message"), [
    ({"data": "videos"}, "--data 'videos': choose teacher or stills"),
    ({"samples_per_image": 0}, "--samples-per-image must be at least 1"),
    ({"lr_schedule": "cosine"}, "lr schedule 'cosine': choose linear or constant"),
    ({"guidance_input": "pixel"}, "guidance input 'pixel': choose frame or video"),
    ({"sigma_sampling": "cosine"}, "sigma sampling 'cosine': choose lognormal or uniform"),
    ({"round_sigma_sampling": "even"}, "round sigma sampling 'even': choose lognormal or uniform"),
    ({"sigma_log_std": 0.0}, "--sigma-log-std must be positive"),
    ({"match_steps": 2, "data": "stills"}, "--match-steps needs --data teacher"),
    ({"match_lr": 0.0}, "--match-lr must be positive"),
    ({"match_loss": "rgb"}, "--match-loss 'rgb': choose latents or pixels"),
    ({"match_metric": "mae"}, "--match-metric 'mae': choose mse or rmse"),
    ({"precision": "fp16"}, "--precision 'fp16': choose auto, bf16, fp32"),
    ({"step_factor": 1}, "--step-factor must be at least 2"),
    ({"round_target": "student"}, "--round-target 'student': choose previous, teacher or trajectory"),
    ({"holdout": 3}, "--holdout 3: the folder holds 3 stills; hold out fewer"),
    ({"eval_every": 5}, "--eval-every needs --holdout N"),
    ({"keep_best": True}, "--keep-best needs --holdout N"),
    ({"ema": 1.0}, "--ema must be at least 0 and below 1"),
    ({"warmup": 1.0}, "--warmup is a share of each phase's steps"),
])
def test_bad_distill_options_are_named(images, tmp_path, option, message):
    with pytest.raises(AnimateError, match=message):
        distill.open_session(dict(OPTIONS, **option), images, tmp_path / "work", torch.device("cpu"))
    assert not (tmp_path / "work").exists()  # nothing left behind


def test_sigma_sampling_defaults_to_lognormal_in_stage1_but_older_runs_resume_as_they_drew():
    import dataclasses

    c = distill.DistillConfig(model="random:tiny")
    assert (c.sigma_sampling, c.sigma_log_mean, c.sigma_log_std) == ("lognormal", 0.7, 1.3)
    assert [c.sampling(phase) for phase in (0, 1, 2)] == ["lognormal", "uniform", "uniform"]
    saved = dataclasses.asdict(c)
    assert distill.DistillConfig.from_dict(saved) == c  # a run saved with the options keeps what it drew by
    del saved["round_sigma_sampling"]  # saved before the rounds had their own: they drew as stage 1
    assert distill.DistillConfig.from_dict(saved).round_sigma_sampling == "lognormal"
    del saved["sigma_sampling"]  # saved before either option: every phase drew evenly
    old = distill.DistillConfig.from_dict(saved)
    assert (old.sigma_sampling, old.round_sigma_sampling) == ("uniform", "uniform")
    del saved["step_factor"], saved["round_target"]  # saved before these options: rounds halved, from the student
    old = distill.DistillConfig.from_dict(saved)
    assert (old.step_factor, old.round_target) == (2, "previous")


def test_lognormal_sigma_sampling_favours_the_middle_of_the_grid_and_keeps_every_point():
    import dataclasses

    c = distill.DistillConfig(sigma_sampling="lognormal", sigma_log_mean=math.log(10.0), sigma_log_std=1.5)
    sigmas = SCHEDULES["karras"](32, 0.002, 700.0)
    p = distill.sigma_probabilities(c, sigmas)
    assert p.shape == (32,) and p.sum().item() == pytest.approx(1.0)
    nearest = int((sigmas[:32].log() - math.log(10.0)).abs().argmin())
    assert int(p.argmax()) == nearest
    assert p.min().item() >= distill.UNIFORM_SHARE / 32 - 1e-12  # the ends are still trained
    assert p[nearest].item() > 10 * p[0].item()  # sigma 10 far more often than sigma 700
    flat = distill.sigma_probabilities(dataclasses.replace(c, sigma_sampling="uniform"), sigmas)
    assert torch.equal(flat, torch.full((32,), 1 / 32, dtype=torch.float64))
    # draw_batch draws by these probabilities: a large batch's counts follow them
    data = distill.Data(names=["a"], x0=torch.zeros(1, 4, 2, 2), embeds=torch.zeros(1, 1, 8),
                        image_latents=torch.zeros(1, 4, 2, 2), time_ids=torch.zeros(1, 3))
    big = dataclasses.replace(c, batch_size=20000, frames=1)
    batch = distill.draw_batch(big, data, sigmas, 1, torch.device("cpu"))
    counts = torch.bincount(batch.k, minlength=32).double() / 20000
    assert (counts - p).abs().max().item() < 0.01
    assert torch.equal(batch.sigma, sigmas[batch.k].float())
    # the rounds draw evenly unless told to draw as stage 1 does
    grid16 = sigmas[::2]
    for sampling in ("uniform", "lognormal"):
        rounds = dataclasses.replace(big, round_sigma_sampling=sampling)
        p16 = distill.sigma_probabilities(rounds, grid16, phase=1)
        assert torch.equal(p16, distill.sigma_probabilities(dataclasses.replace(rounds, sigma_sampling=sampling),
                                                            grid16))
        k = distill.draw_batch(rounds, data, grid16, 1, torch.device("cpu"), phase=1).k
        assert (torch.bincount(k, minlength=16).double() / 20000 - p16).abs().max().item() < 0.01
    assert distill.sigma_probabilities(big, grid16, phase=1).max().item() == pytest.approx(1 / 16)
