"""Our sampling loop against diffusers' own StableVideoDiffusionPipeline on the same components, and the
seed contract (same seed same video, a video independent of its batch). random:tiny, float32, CPU."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import assert_frames_close, gradient
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
from PIL import Image

from animate_cli.models import load_model
from animate_cli.pipeline import generate
from animate_cli.preset import load_preset
from animate_cli.runner import settings_for
from animate_cli.timing import StageTimer

CPU = torch.device("cpu")
WIDTH, HEIGHT = 64, 32


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny", torch.float32, CPU)


@pytest.fixture(scope="module")
def reference(model):
    """fp32 at 3 steps: the reference preset (Euler, Karras sigmas, two-pass guidance 1 -> 3)."""
    preset = load_preset("fp32").replace(steps=3)
    assert (preset.dtype, preset.sampler, preset.schedule) == ("float32", "euler", "karras")
    return settings_for(preset, model, WIDTH, HEIGHT)


def picture(seed: int = 0) -> Image.Image:
    """A structured picture with some noise, so the CLIP and VAE encodings are not trivial."""
    noise = np.random.default_rng(seed).integers(-40, 40, (HEIGHT, WIDTH, 3))
    return Image.fromarray(np.clip(gradient((WIDTH, HEIGHT)).astype(int) + noise, 0, 255).astype(np.uint8))


def ours(model, images, seeds, settings) -> np.ndarray:
    timer = StageTimer(CPU)
    frames = generate(model, images, seeds, settings, timer)
    assert frames.dtype == torch.uint8
    assert frames.shape == (len(images), settings.frames, settings.height, settings.width, 3)
    return frames.numpy()


def theirs(model, image, seed, settings) -> np.ndarray:
    pipe = StableVideoDiffusionPipeline(
        vae=model.vae, image_encoder=model.image_encoder, unet=model.unet,
        scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config),
        feature_extractor=model.feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        image, height=settings.height, width=settings.width, num_frames=settings.frames,
        num_inference_steps=settings.steps, min_guidance_scale=settings.min_guidance,
        max_guidance_scale=settings.max_guidance, fps=settings.fps, motion_bucket_id=settings.motion,
        noise_aug_strength=settings.noise_aug, decode_chunk_size=settings.decode_chunk,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np").frames
    frames = np.asarray(frames)  # float32 [1, F, H, W, 3] in [0, 1]
    assert frames.shape == (1, settings.frames, settings.height, settings.width, 3)
    return np.round(frames[0] * 255).astype(np.uint8)


@pytest.mark.parametrize("changes", [
    {},  # the reference: guidance 1 -> 3 over the frames
    {"min_guidance": 1.0, "max_guidance": 1.0},  # guidance off: one UNet batch, no unconditional half
    {"fps": 12, "motion": 30, "noise_aug": 0.1, "min_guidance": 2.0, "max_guidance": 4.5, "decode_chunk": 3},
], ids=["guided", "guidance-off", "other-conditioning"])
def test_same_frames_as_diffusers(model, reference, changes):
    settings = dataclasses.replace(reference, **changes)
    image, seed = picture(), 1234
    ours_frames = ours(model, [image], [seed], settings)[0]
    their_frames = theirs(model, image, seed, settings)
    assert their_frames.std() > 5  # a real video, not a constant a wrong test could match
    # Both compute in float32 and agree to float32 rounding (same noise, sigmas, preconditioning and guidance);
    # our frames are round(x * 255) of floats that can differ in the last bits, so a value may be 1 apart.
    assert_frames_close(ours_frames, their_frames)


def test_guidance_matters(model, reference):
    """The guided and unguided runs differ: the equivalence above is not blind to the guidance path."""
    image = picture()
    guided = ours(model, [image], [5], reference)[0].astype(int)
    unguided = ours(model, [image], [5], dataclasses.replace(reference, max_guidance=1.0))[0].astype(int)
    assert np.abs(guided - unguided).mean() > 1


def test_same_seed_same_frames(model, reference):
    image = picture()
    np.testing.assert_array_equal(ours(model, [image], [77], reference), ours(model, [image], [77], reference))


def test_different_seeds_differ(model, reference):
    image = picture()
    a, b = (ours(model, [image], [s], reference)[0].astype(int) for s in (77, 78))
    assert np.abs(a - b).mean() > 5


def test_batch_equals_each_alone(model, reference):
    """A video depends on its image and seed only: batch [a, b] with seeds [s, t] gives a's video with s and
    b's video with t, as each alone."""
    images, seeds = [picture(1), picture(2)], [101, 202]
    batch = ours(model, images, seeds, reference)
    alone = [ours(model, [im], [s], reference)[0] for im, s in zip(images, seeds, strict=True)]
    # Batched matmuls may sum in another order than single ones: equal up to uint8 rounding.
    assert_frames_close(batch[0], alone[0])
    assert_frames_close(batch[1], alone[1])
    assert np.abs(batch[0].astype(int) - batch[1]).mean() > 5  # and the two videos are not the same one


def test_batch_of_one_image_twice_with_one_seed(model, reference):
    image = picture()
    batch = ours(model, [image, image], [9, 9], reference)
    assert_frames_close(batch[0], batch[1])


def test_decode_chunks_never_span_two_videos(model, reference):
    """The temporal decoder mixes the frames of one call: with 3 frames in chunks of 2, a batch of two still
    gives each video as alone (a chunk holding video a's last frame and video b's first would not)."""
    settings = dataclasses.replace(reference, frames=3, decode_chunk=2)
    images, seeds = [picture(1), picture(2)], [101, 202]
    batch = ours(model, images, seeds, settings)
    for i in range(2):
        assert_frames_close(batch[i], ours(model, [images[i]], [seeds[i]], settings)[0])


def test_decode_hands_each_chunk_to_the_sink_before_decoding_the_next(model, reference, monkeypatch):
    """So the caller encodes one chunk while the next decodes; the chunks make up the returned frames."""
    settings = dataclasses.replace(reference, frames=5, decode_chunk=2)
    events, real = [], model.vae.decode

    def vae_decode(z, *args, **kwargs):
        events.append(("decode", len(z)))
        return real(z, *args, **kwargs)

    def sink(video, frames):
        assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
        events.append(("sink", video, frames.copy()))

    monkeypatch.setattr(model.vae, "decode", vae_decode)
    frames = generate(model, [picture(3)], [5], settings, StageTimer(CPU), sink=sink)
    assert [e[:2] for e in events] == [("decode", 2), ("sink", 0), ("decode", 2), ("sink", 0), ("decode", 1),
                                       ("sink", 0)]
    assert np.array_equal(np.concatenate([e[2] for e in events if e[0] == "sink"]), frames[0].numpy())
    assert np.array_equal(frames.numpy(), ours(model, [picture(3)], [5], settings))
