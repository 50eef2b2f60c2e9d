"""The command line as a user types it: in process through main(), and as real subprocesses."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import (
    FAST,
    TINY,
    assert_user_error,
    console_script,
    leftovers,
    preset_toml,
    run_subprocess,
)
from PIL import Image

from animate_cli.errors import AnimateError

STAGES = ["load", "preprocess", "encode", "denoise", "decode", "write"]


def read_png_frames(folder):
    files = sorted(folder.glob("frame_*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files])


def check_report(data: dict, *, seed: int | None, preset: str, steps: int, output, fmt: str) -> None:
    """The --json record: every field the brief promises, with values that follow from the run."""
    assert list(data["timing"]["stages"]) == STAGES
    assert all(isinstance(s, float) and s >= 0 for s in data["timing"]["stages"].values())
    assert data["timing"]["total_s"] == pytest.approx(sum(data["timing"]["stages"].values()))
    assert isinstance(data["seed"], int) and 0 <= data["seed"] < 2**31
    if seed is not None:
        assert data["seed"] == seed
    assert data["model"] == "random:tiny"
    assert data["random_weights"] is True
    assert "random weights" in data["note"]
    assert data["preset"]["name"] == preset
    assert data["preset"]["steps"] == steps
    settings = data["settings"]
    assert (settings["width"], settings["height"], settings["frames"]) == (64, 32, 4)  # random:tiny's native size
    assert settings["steps"] == steps
    assert data["timing"]["steps"] == steps and len(data["step_times_s"]) == steps
    # Guided: each step runs the UNet on the conditional and the unconditional input (however it is counted).
    assert data["timing"]["unet_passes"] > 0 and data["timing"]["unet_passes"] % steps == 0
    assert data["device"] == "cpu"
    assert data["device_name"].startswith("CPU")
    assert data["peak_memory_gib"] is None  # CPU: no figure
    for package in ("animate", "torch", "diffusers", "transformers", "python"):
        assert data["versions"][package]
    assert data["versions"]["torch"] == torch.__version__
    assert data["output"] == str(output)
    assert data["format"] == fmt


# ---------------------------------------------------------------- the default command


def test_default_command_without_subcommand_word(cli, make_image, tmp_path):
    image = make_image("photo.jpg")
    out, report = tmp_path / "out.mp4", tmp_path / "run.json"
    result = cli(image, "-o", out, *FAST, "--seed", "5", "--json", report)
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and out.stat().st_size > 0
    check_report(json.loads(report.read_text()), seed=5, preset="fp32", steps=2, output=out, fmt="mp4")
    # The stage table on stdout names every stage and the seed; the run line goes to stderr.
    for stage in STAGES:
        assert stage in result.stdout
    assert "seed 5" in " ".join(result.stdout.split())
    assert "4 frames at 64x32, preset fp32, seed 5, cpu" in " ".join(result.stderr.split())
    assert "random weights" in result.stderr
    assert leftovers(tmp_path, {"photo.jpg", "out.mp4", "run.json"}) == []


def test_seed_is_drawn_reported_and_reproduces(cli, make_image, tmp_path):
    image = make_image("photo.png")
    first, report = tmp_path / "first", tmp_path / "run.json"
    result = cli(image, "-o", first, *FAST, "--json", report)
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    check_report(data, seed=None, preset="fp32", steps=2, output=first, fmt="png")
    seed = data["seed"]
    assert f"seed {seed}" in result.text  # in the table title and the run line
    # The reported seed is the one used: giving it back reproduces the frames exactly.
    again = cli(image, "-o", tmp_path / "again", *FAST, "--seed", str(seed))
    assert again.exit_code == 0, again.stderr
    np.testing.assert_array_equal(read_png_frames(first), read_png_frames(tmp_path / "again"))


def test_quiet_prints_nothing_on_stdout_and_default_output_name(cli, make_image, tmp_path, monkeypatch):
    image = make_image("holiday.png")
    monkeypatch.chdir(tmp_path)
    result = cli(image.name, *FAST, "--quiet", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "->" not in result.stderr  # no run line either (only the random-weights warning remains)
    assert (tmp_path / "holiday.mp4").is_file()  # -o defaults to IMAGE's name with .mp4


def test_set_steps_changes_unet_passes(cli, make_image, tmp_path):
    """--set steps=3 gives 3 denoising steps and 3/2 the UNet passes of 2 steps; a dedicated flag wins over --set."""
    image, figures = make_image(), {}
    for name, extra in (("set", ["--set", "steps=3"]), ("flag", ["--set", "steps=3", "--steps", "2"])):
        report = tmp_path / f"{name}.json"
        result = cli(image, "-o", tmp_path / f"{name}.gif", *TINY, "--preset", "fp32", "--seed", "2",
                     "--json", report, *extra)
        assert result.exit_code == 0, result.stderr
        data = json.loads(report.read_text())
        figures[name] = data["timing"]
        steps = data["settings"]["steps"]
        assert data["preset"]["steps"] == steps == data["timing"]["steps"]
        assert f"{steps} steps" in result.text and f"{data['timing']['unet_passes']} UNet passes" in result.text
    assert (figures["set"]["steps"], figures["flag"]["steps"]) == (3, 2)
    assert figures["set"]["unet_passes"] * 2 == figures["flag"]["unet_passes"] * 3 > 0


def test_preset_as_toml_file(cli, make_image, tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text(preset_toml("fp32", name="mine", steps=2, fps=5, frames=3, motion=90))
    report = tmp_path / "run.json"
    result = cli(make_image(), "-o", tmp_path / "o.gif", *TINY, "--preset", preset, "--seed", "3", "--json", report)
    assert result.exit_code == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["preset"]["name"] == "mine"
    assert data["preset"]["dtype"] == "float32"
    assert (data["settings"]["fps"], data["settings"]["frames"], data["settings"]["motion"]) == (5, 3, 90)
    assert data["timing"]["steps"] == 2
    with Image.open(tmp_path / "o.gif") as gif:
        assert gif.n_frames == 3
        assert gif.info["duration"] == 200  # 1000 / 5 fps


# ---------------------------------------------------------------- `animate presets`


def test_presets_lists_every_preset(cli):
    result = cli("presets")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    for name in ("fp32", "bf16"):
        assert name in result.stdout
    for word in ("dtype", "float32", "bfloat16", "steps", "sampler", "euler"):
        assert word in result.stdout


def test_presets_shows_one(cli):
    result = cli("presets", "fp32")
    assert result.exit_code == 0, result.stderr
    assert "preset fp32" in result.stdout
    assert "float32" in result.stdout
    assert "bfloat16" not in result.stdout and "bf16" not in result.stdout  # only the one asked for


def test_presets_shows_a_toml_file(cli, tmp_path):
    preset = tmp_path / "slow.toml"
    preset.write_text(preset_toml("bf16", name="slow", steps=40))
    result = cli("presets", preset)
    assert result.exit_code == 0, result.stderr
    assert "preset slow" in result.stdout and "40" in result.stdout


def test_presets_unknown_name(cli):
    assert_user_error(cli("presets", "nosuch"), "'nosuch'", "fp32", "bf16")


def test_help(cli):
    result = cli("--help")
    assert result.exit_code == 0
    assert "presets" in result.stdout and "animate" in result.stdout
    result = cli("animate", "--help")  # the default command's own help, by its name
    assert result.exit_code == 0
    assert "--preset" in result.stdout and "--seed" in result.stdout


def test_help_shows_every_default_in_brackets(cli):
    """Rich reads "[word]" in a help text as a style tag and drops it: every bracketed default an option's help
    names must reach the rendered --help of its command."""
    import re

    import typer

    from animate_cli.cli import app

    group = typer.main.get_command(app)
    checked = 0
    for name, command in group.commands.items():
        result = cli(name, "--help", env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
        assert result.exit_code == 0, result.stderr
        shown = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", result.stdout))
        for param in command.params:
            for default in re.findall(r"\[[^\]]+\]", (getattr(param, "help", None) or "").replace("\\[", "[")):
                assert default in shown, f"animate {name} --help: {param.name}'s {default} is not shown"
                checked += 1
    assert checked >= 10


# ---------------------------------------------------------------- real processes


def test_python_dash_m(make_image, tmp_path):
    image = make_image("photo.jpg")
    out, report = tmp_path / "out.mp4", tmp_path / "run.json"
    result = run_subprocess([sys.executable, "-m", "animate_cli", image, "-o", out, *FAST, "--seed", "9",
                             "--json", report], cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and out.stat().st_size > 0
    check_report(json.loads(report.read_text()), seed=9, preset="fp32", steps=2, output=out, fmt="mp4")
    assert "Traceback" not in result.stderr


def test_console_script(make_image, tmp_path):
    image = make_image("photo.png")
    out = tmp_path / "out.webp"
    # The default preset (bf16), as a user would run it first.
    result = run_subprocess([console_script(), image, "-o", out, *TINY, "--steps", "2", "--seed", "4"], cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    with Image.open(out) as webp:
        assert webp.format == "WEBP" and webp.n_frames == 4


def test_error_in_a_real_process_is_one_line(tmp_path):
    """Exit 2 and one stderr line in a real process: nothing else (no import-time warnings) on stderr."""
    missing = tmp_path / "missing.jpg"
    result = run_subprocess([sys.executable, "-m", "animate_cli", missing, "-o", tmp_path / "o.mp4", *FAST],
                            cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {missing}: no such file"]
    assert leftovers(tmp_path, set()) == []


def test_debug_lets_the_error_through(cli, tmp_path):
    """With ANIMATE_DEBUG=1 main() re-raises, so the interpreter prints the traceback (a real process would show
    'Traceback (most recent call last)' and exit 1); without it the same error is the one line above."""
    result = cli(tmp_path / "missing.jpg", "-o", tmp_path / "o.mp4", *FAST, env={"ANIMATE_DEBUG": "1"})
    assert isinstance(result.exception, AnimateError)
    assert "no such file" in str(result.exception)
    assert "error:" not in result.stderr


# ---------------------------------------------------------------- bad inputs


def _truncated_jpeg(tmp_path, make_image):
    whole = make_image("whole.jpg", size=(256, 128), quality=95).read_bytes()
    (tmp_path / "whole.jpg").unlink()
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _not_diffusers_folder(tmp_path):
    folder = tmp_path / "weights"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    return folder


# name -> (setup(tmp_path, make_image, out_dir) -> (image, extra args), substrings of the error line)
BAD_INPUTS = {
    "missing file": (lambda t, m, o: (t / "nope.jpg", []), ["nope.jpg", "no such file"]),
    "folder as preset": (lambda t, m, o: (m(), ["--preset", o]), ["preset file", "not found"]),
    "text named png": (lambda t, m, o: (_write(t / "notes.png", b"hello, not a png\n"), []),
                       ["notes.png", "not an image"]),
    "empty file": (lambda t, m, o: (_write(t / "empty.jpg", b""), []), ["empty.jpg", "not an image"]),
    "truncated jpeg": (lambda t, m, o: (_truncated_jpeg(t, m), []), ["cut.jpg", "corrupt"]),
    "output folder missing": (lambda t, m, o: (m(), ["-o", o / "sub" / "out.mp4"]), ["does not exist"]),
    "unknown hub model offline": (lambda t, m, o: (m(), ["--model", "someone/not-cached"]),
                                  ["someone/not-cached", "not in the local cache", "offline"]),
    "model folder not diffusers": (lambda t, m, o: (m(), ["--model", _not_diffusers_folder(t)]),
                                   ["not a Stable Video Diffusion folder in diffusers layout", "model_index.json"]),
    "model path missing": (lambda t, m, o: (m(), ["--model", "./no/such/folder"]), ["./no/such/folder", "not found"]),
    "model id not owner/name": (lambda t, m, o: (m(), ["--model", "a/b/c"]), ["a/b/c", "hub id"]),
    "unknown random model": (lambda t, m, o: (m(), ["--model", "random:huge"]), ["random model 'huge'", "tiny"]),
    "bad fit": (lambda t, m, o: (m(), ["--fit", "zoom"]), ["--fit 'zoom'", "crop"]),
    "bad format": (lambda t, m, o: (m(), ["--format", "avi"]), ["--format 'avi'", "mp4"]),
    "unknown suffix": (lambda t, m, o: (m(), ["-o", o / "out.avi"]), ["out.avi", "unknown suffix .avi"]),
    "bad device": (lambda t, m, o: (m(), ["--device", "tpu"]), ["--device", "tpu"]),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(cli, make_image, tmp_path, case):
    setup, needles = BAD_INPUTS[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    image, extra = setup(tmp_path, make_image, out_dir)
    args = [image, "-o", out_dir / "out.mp4", *FAST, *extra]  # a later -o wins
    assert_user_error(cli(*args), *needles)
    assert leftovers(out_dir, set()) == []


def test_bad_size(cli, make_image, tmp_path):
    # Found only once the model is loaded (resolve_size needs its native size and multiple): see report.
    assert_user_error(cli(make_image(), "-o", tmp_path / "o.mp4", *FAST, "--size", "wide"), "--size 'wide'",
                      "WIDTHxHEIGHT", after_start=True)
    assert leftovers(tmp_path, {"img.png"}) == []


def test_cuda_device_without_cuda(cli, make_image, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA GPU")
    assert_user_error(cli(make_image(), "-o", tmp_path / "o.mp4", *TINY, "--device", "cuda"), "no CUDA GPU")
    assert not (tmp_path / "o.mp4").exists()


def test_unwritable_output_folder(cli, make_image, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 0o500 does not stop writes here; "
                        "the missing-folder case covers check_writable instead")
        assert_user_error(cli(make_image(), "-o", locked / "o.mp4", *FAST), "not writable")
        assert leftovers(locked, set()) == []
    finally:
        locked.chmod(0o700)


def test_output_exists_without_and_with_overwrite(cli, make_image, tmp_path):
    image = make_image("photo.png")
    out = tmp_path / "out.mp4"
    out.write_bytes(b"precious")
    assert_user_error(cli(image, "-o", out, *FAST), str(out), "exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    assert leftovers(tmp_path, {"photo.png", "out.mp4"}) == []

    result = cli(image, "-o", out, *FAST, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[4:8] == b"ftyp"  # an MP4 now
    assert leftovers(tmp_path, {"photo.png", "out.mp4"}) == []


def test_output_is_a_folder_fails_at_write_and_leaves_nothing(cli, make_image, tmp_path):
    """The run gets as far as writing: the temporary file must be removed and the folder left alone."""
    image = make_image("photo.png")
    out = tmp_path / "clip.mp4"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(cli(image, "-o", out, *FAST, "--overwrite"), "is a folder", after_start=True)
    assert (out / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path, {"photo.png", "clip.mp4"}) == []


def test_json_into_missing_folder_is_a_user_error(cli, make_image, tmp_path):
    image = make_image("photo.png")
    assert_user_error(cli(image, "-o", tmp_path / "o.gif", *FAST, "--json", tmp_path / "nope" / "r.json"),
                      "r.json", after_start=True)
    assert not (tmp_path / "nope").exists()
    assert not [p for p in tmp_path.rglob("*partial*")]


@pytest.mark.parametrize("args, needle", [(["--steps", "0"], "--steps"), (["--bogus"], "--bogus"),
                                          ([], "Usage")])
def test_usage_errors_are_short(cli, make_image, tmp_path, args, needle):
    """click's usage errors (typer's vendored click in typer >= 0.26): exit 2, a short message, no traceback."""
    argv = [make_image(), "-o", tmp_path / "o.mp4", *TINY, *args] if args else []
    result = cli(*argv)
    assert result.exception is None, repr(result.exception)
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert needle in result.stdout + result.stderr
    assert not (tmp_path / "o.mp4").exists()


def test_interrupt_exits_130(cli, make_image, tmp_path, monkeypatch):
    import animate_cli.commands.animate as command
    import animate_cli.media as media

    calls = []

    def interrupted(path):
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(media, "load_image", interrupted)
    monkeypatch.setattr(command, "load_image", interrupted, raising=False)
    result = cli(make_image(), "-o", tmp_path / "o.mp4", *FAST)
    if not calls:  # not an AssertionError: the xfail must not hide a test that no longer interrupts anything
        pytest.fail("the image was not loaded through load_image; update this test")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr


def test_os_environment_is_offline():
    """Guard for the whole suite: nothing here may reach the network or the real cache."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    assert constants.HF_HOME == os.environ["HF_HOME"]
    assert "animate-tests-hf-" in constants.HF_HUB_CACHE


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_failure_after_frames_reached_the_encoder_leaves_no_file(cli, make_image, tmp_path, monkeypatch, error):
    """The video is written while it decodes: a Ctrl-C or an error after the first chunk went to the encoder
    stops it and removes its temporary file; an existing output is kept."""
    import animate_cli.pipeline as pipeline

    real, chunks = pipeline.decode, []

    def decode(model, latents, chunk, sink=None):
        def first_then_fail(video, frames):
            sink(video, frames)
            chunks.append(len(frames))
            raise error("stopped after the first chunk")

        return real(model, latents, chunk, first_then_fail)

    monkeypatch.setattr(pipeline, "decode", decode)
    out = tmp_path / "o.mp4"
    out.write_bytes(b"old")
    result = cli(make_image("photo.png"), "-o", out, *FAST, "--overwrite")
    assert chunks, "the frames did not reach the encoder through the decode's sink"
    assert result.exit_code == (130 if error is KeyboardInterrupt else 1), result.stderr
    assert leftovers(tmp_path, {"photo.png", "o.mp4"}) == []
    assert out.read_bytes() == b"old"
