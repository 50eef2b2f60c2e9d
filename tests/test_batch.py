"""Batch mode (`animate INPUT... -o OUTDIR`): bad inputs, naming, seeds, resume, interrupts, batching, safety.

Everything runs on random:tiny at 64x32, 4 frames, 2 steps, float32 on the CPU, mostly in-process
through animate_cli.cli.main; one test interrupts a real subprocess.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image

from animate_cli import batch
from animate_cli.batch import (
    MANIFEST_NAME,
    Job,
    Manifest,
    assign_outputs,
    collect_inputs,
    derive_seed,
    read_manifest,
)
from animate_cli.errors import AnimateError

os.environ["HF_HUB_OFFLINE"] = "1"  # never the network, whatever conftest.py does
TINY = ["--model", "random:tiny", "--preset", "fp32", "--frames", "4", "--steps", "2"]


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: no thread thrash
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the `animate` command line in-process: (exit code, stdout, stderr)."""
    from animate_cli.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["animate", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def noise_image(size=(80, 40), seed=0, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name]


def digest_tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def by_status(records, status):
    return [r for r in records if r["status"] == status]


def good_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i}.png"
        noise_image(seed=i).save(path)
        paths.append(path)
    return paths


# The done-when folder: good images in odd modes, bad files, sub-folders, a shared stem


def make_mixed_folder(root: Path) -> tuple[dict, dict]:
    """(good: name -> expected output below OUTDIR, bad: name -> words its error must hold)."""
    (root / "sub" / "deeper").mkdir(parents=True)
    noise_image(seed=1).save(root / "rgb.jpg", quality=90)
    noise_image(seed=2).save(root / "dup.jpg")  # same stem as dup.png
    noise_image(seed=3).save(root / "dup.png")
    noise_image(seed=4, mode="L").save(root / "gray.bmp")
    Image.fromarray(np.arange(80 * 40, dtype=np.uint16).reshape(40, 80) * 20).save(root / "sixteen.png")  # I;16
    noise_image(seed=5, mode="LA").save(root / "sub" / "alpha.png")
    p = noise_image(seed=6, mode="P")
    p.info["transparency"] = 0
    p.save(root / "sub" / "palette.png", transparency=0)
    noise_image(seed=7, mode="CMYK").save(root / "sub" / "cmyk.jpg")
    noise_image(seed=8, mode="RGBA").save(root / "sub" / "deeper" / "rgba.webp")
    noise_image(seed=9, mode="1").save(root / "sub" / "deeper" / "bits.tiff")
    Image.fromarray(np.full((40, 80), 0.5, dtype=np.float32)).save(root / "float.tif")  # mode F
    frames = [noise_image(seed=10 + i, size=(40, 80)) for i in range(3)]  # portrait, animated: first frame
    frames[0].save(root / "sub" / "anim.gif", save_all=True, append_images=frames[1:])
    noise_image(seed=13).save(root / "sub" / "rgb.jpg")  # same name as the top one, other folder: no clash
    good = {
        "rgb.jpg": "rgb.mp4", "dup.jpg": "dup.jpg.mp4", "dup.png": "dup.png.mp4", "gray.bmp": "gray.mp4",
        "sixteen.png": "sixteen.mp4", "sub/alpha.png": "sub/alpha.mp4", "sub/palette.png": "sub/palette.mp4",
        "sub/cmyk.jpg": "sub/cmyk.mp4", "sub/deeper/rgba.webp": "sub/deeper/rgba.mp4",
        "sub/deeper/bits.tiff": "sub/deeper/bits.mp4", "float.tif": "float.mp4", "sub/anim.gif": "sub/anim.mp4",
        "sub/rgb.jpg": "sub/rgb.mp4",
    }
    whole = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "text.png").write_text("this is not a picture\n")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image suffix: never listed\n")
    (root / ".hidden.png").write_text("hidden: never listed\n")
    bad = {"truncated.jpg": "truncated", "text.png": "not an image", "empty.jpg": "not an image"}
    return good, bad


def test_mixed_folder_every_good_image_done_every_bad_one_failed(tmp_path, cli):
    src, outdir = tmp_path / "photos", tmp_path / "videos"
    good, bad = make_mixed_folder(src)
    before = digest_tree(src)
    code, stdout, stderr = cli(src, "-o", outdir, "--recursive", "--seed", 7, "--size", "64x32",
                               "--batch-size", 4, "--json", tmp_path / "summary.json", *TINY)
    assert code == 1, stderr
    assert "3 of 16 images failed" in stderr
    records = read_manifest(outdir / MANIFEST_NAME)
    assert len(records) == len(good) + len(bad)  # one line per input
    done = {r["rel"]: r for r in by_status(records, "done")}
    assert set(done) == set(good)
    for rel, expected in good.items():
        output = outdir / expected
        assert output.is_file() and output.stat().st_size > 0, rel
        assert Path(done[rel]["output"]) == output
        assert done[rel]["seed"] == derive_seed(7, PurePosixPath(rel))  # seed from --seed and relative path
        assert done[rel]["settings"]["width"] == 64 and done[rel]["settings"]["frames"] == 4
        assert done[rel]["preset"] == "fp32" and done[rel]["model"] == "random:tiny"
        assert {"preprocess", "encode", "denoise", "decode", "write", "total"} <= set(done[rel]["timing_s"])
    failed = {r["rel"]: r for r in by_status(records, "failed")}
    assert set(failed) == set(bad)
    for rel, words in bad.items():
        assert words in failed[rel]["error"], failed[rel]["error"]
        assert failed[rel]["seed"] == derive_seed(7, PurePosixPath(rel))
        assert not Path(failed[rel]["output"]).exists()
    assert partials(outdir) == [] and partials(src) == []
    assert digest_tree(src) == before  # inputs only read
    outputs = {p.relative_to(outdir).as_posix() for p in outdir.rglob("*") if p.is_file()}
    assert outputs == set(good.values()) | {MANIFEST_NAME}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == {"total": 16, "done": 13, "skipped": 0, "failed": 3, "not_run": 0}
    assert {f["input"] for f in summary["failures"]} == {str(src / b) for b in bad}
    assert "failed" in stdout and "videos/min" in stdout


def test_rerun_skips_complete_outputs_cleans_temporaries_and_overwrite_redoes(tmp_path, cli):
    src, outdir = tmp_path / "in", tmp_path / "out"
    good_images(src, 2)
    args = [src, "-o", outdir, "--size", "64x32", *TINY]
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    assert "[1/2] done" in stderr and "[2/2] done" in stderr  # plain lines when not a terminal
    first = digest_tree(outdir)
    # what a killed run leaves: a temporary video, a temporary frames folder, a half-written JSON
    (outdir / ".img0.mp4.abcd_123.partial.mp4").write_bytes(b"half")
    (outdir / ".img9.x1y2z3w4.partial").mkdir()
    (outdir / ".summary.json.partial").write_text("{")
    (outdir / ".keep").write_text("not ours")
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    assert "skipping 2 of 2" in stderr and "removed 3 temporary" in stderr
    assert "loading" not in stderr  # nothing to generate: the model is never loaded
    assert partials(outdir) == [] and (outdir / ".keep").exists()
    records = read_manifest(outdir / MANIFEST_NAME)
    assert [r["status"] for r in records] == ["done", "done", "skipped", "skipped"]
    assert {k: v for k, v in digest_tree(outdir).items() if k.endswith(".mp4")} == \
        {k: v for k, v in first.items() if k.endswith(".mp4")}
    code, _, stderr = cli(*args, "--overwrite")
    assert code == 0, stderr
    assert [r["status"] for r in read_manifest(outdir / MANIFEST_NAME)][4:] == ["done", "done"]


def test_torn_last_manifest_line_does_not_break_the_next_run(tmp_path, cli):
    src, outdir = tmp_path / "in", tmp_path / "out"
    good_images(src, 1)
    outdir.mkdir()
    (outdir / MANIFEST_NAME).write_text('{"input": "old.jpg", "status": "done"}\n{"input": "torn.jpg", "sta')
    code, _, stderr = cli(src, "-o", outdir, "--size", "64x32", *TINY)
    assert code == 0, stderr
    lines = (outdir / MANIFEST_NAME).read_text().splitlines()
    assert lines[1] == '{"input": "torn.jpg", "sta'  # left as it was, on its own line
    records = read_manifest(outdir / MANIFEST_NAME)
    assert [r["status"] for r in records] == ["done", "done"] and records[1]["rel"] == "img0.png"


# Interrupts


def test_sigint_mid_run_then_rerun_finishes_the_rest_once(tmp_path):
    """A real subprocess, interrupted after its first image: exit 130, no temporary file; the same
    command again makes the rest, and the manifest shows every image generated exactly once."""
    src, outdir = tmp_path / "in", tmp_path / "out"
    paths = good_images(src, 5)
    cmd = [sys.executable, "-m", "animate_cli", str(src), "-o", str(outdir), "--size", "64x32", "--seed", "3",
           "--model", "random:tiny", "--preset", "fp32", "--frames", "4", "--steps", "12"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    log = []
    try:
        for line in proc.stderr:
            log.append(line)
            if "] done " in line:
                proc.send_signal(signal.SIGINT)
                break
        rest_out, rest_err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    log.append(rest_err)
    assert proc.returncode == 130, "".join(log)
    assert "interrupted (SIGINT)" in "".join(log)
    first = read_manifest(outdir / MANIFEST_NAME)
    assert {r["status"] for r in first} == {"done"}  # the abandoned image has no line
    assert 1 <= len(first) < len(paths)
    assert len(list(outdir.glob("*.mp4"))) == len(first)
    assert partials(outdir) == []

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    records = read_manifest(outdir / MANIFEST_NAME)
    done = [r["rel"] for r in by_status(records, "done")]
    assert sorted(done) == sorted(p.name for p in paths)  # each image generated exactly once
    assert sorted(r["rel"] for r in by_status(records, "skipped")) == sorted(r["rel"] for r in first)
    assert sorted(p.name for p in outdir.iterdir()) == sorted([f"img{i}.mp4" for i in range(5)] + [MANIFEST_NAME])
    assert partials(outdir) == []


def assert_sigterm_left_img0_alone(code: int, stderr: str, outdir: Path) -> None:
    """Exit 143 with the summary; image 0 done and written, nothing else: no output, line or temporary file."""
    assert code == 128 + signal.SIGTERM, stderr
    assert "interrupted (SIGTERM)" in stderr and "1 done in this run, 2 not run" in stderr
    records = read_manifest(outdir / MANIFEST_NAME)
    assert [(r["rel"], r["status"]) for r in records] == [("img0.png", "done")]
    assert sorted(p.name for p in outdir.iterdir()) == ["animate-manifest.jsonl", "img0.mp4"]


def test_sigterm_abandons_the_current_image_cleanly(tmp_path, cli, monkeypatch):
    """SIGTERM while the second image is denoising: the first stays done, the second is abandoned
    (no output, no manifest line, no temporary file), the third never starts; exit 143."""
    from animate_cli import pipeline

    src, outdir = tmp_path / "in", tmp_path / "out"
    good_images(src, 3)
    real, calls = pipeline.generate, []

    def generate(model, images, seeds, settings, timer, on_step=None):
        calls.append(seeds)

        def step(i):
            if len(calls) == 2 and i == 0:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # let the handler run
            on_step(i)

        return real(model, images, seeds, settings, timer, on_step=step)

    monkeypatch.setattr(pipeline, "generate", generate)
    code, _, stderr = cli(src, "-o", outdir, "--size", "64x32", "--seed", 1, *TINY)
    assert_sigterm_left_img0_alone(code, stderr, outdir)
    assert len(calls) == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_videos_are_written_while_the_next_image_is_generated(tmp_path, cli, monkeypatch):
    """The writer thread encodes image k while the main thread generates image k + 1; every video still gets
    its manifest line and its own write time, and a write that fails is that image's failure alone."""
    import threading

    from animate_cli import pipeline

    src, outdir = tmp_path / "in", tmp_path / "out"
    good_images(src, 3)
    events, real_generate, real_write = [], pipeline.generate, batch.write_video

    def generate(model, images, seeds, settings, timer, on_step=None):
        events.append(("generate", time.perf_counter(), threading.current_thread().name))
        return real_generate(model, images, seeds, settings, timer, on_step=on_step)

    def write_video(frames, output, *args):
        events.append(("write", time.perf_counter(), threading.current_thread().name))
        time.sleep(0.5)
        if output.stem == "img2":
            raise OSError(28, "No space left on device")
        real_write(frames, output, *args)
        events.append(("written", time.perf_counter(), output.stem))

    monkeypatch.setattr(pipeline, "generate", generate)
    monkeypatch.setattr(batch, "write_video", write_video)
    code, _, stderr = cli(src, "-o", outdir, "--size", "64x32", "--seed", 1, *TINY)
    assert code == 1, stderr  # one image failed
    starts = [t for name, t, _ in events if name == "generate"]
    first_written = next(t for name, t, stem in events if name == "written" and stem == "img0")
    assert len(starts) == 3 and starts[1] < first_written  # image 1 was generated while image 0 was written
    assert {who for name, _, who in events if name == "write"} == {"animate-writer_0"}
    records = {r["rel"]: r for r in read_manifest(outdir / MANIFEST_NAME)}
    assert [records[f"img{i}.png"]["status"] for i in range(3)] == ["done", "done", "failed"]
    assert "No space left on device" in records["img2.png"]["error"]
    assert all(records[f"img{i}.png"]["timing_s"]["write"] >= 0.5 for i in range(2))
    assert sorted(p.name for p in outdir.iterdir()) == ["animate-manifest.jsonl", "img0.mp4", "img1.mp4"]


def test_a_second_signal_while_a_video_is_written_finishes_that_write_and_reports(tmp_path, cli, monkeypatch):
    """SIGTERM while image 1 is denoising, then another while the run waits for image 0's background write:
    that write completes and gets its manifest line, nothing else is written, and the run still ends with its
    summary and exit 143."""
    import threading

    from animate_cli import pipeline

    src, outdir = tmp_path / "in", tmp_path / "out"
    good_images(src, 3)
    real_generate, real_write, calls = pipeline.generate, batch.write_video, []

    def generate(model, images, seeds, settings, timer, on_step=None):
        calls.append(seeds)

        def step(i):
            if len(calls) == 2 and i == 0:
                os.kill(os.getpid(), signal.SIGTERM)
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()  # during the wait
                time.sleep(0.05)  # let the handler run
            on_step(i)

        return real_generate(model, images, seeds, settings, timer, on_step=step)

    def write_video(*args):
        time.sleep(1.5)
        real_write(*args)

    monkeypatch.setattr(pipeline, "generate", generate)
    monkeypatch.setattr(batch, "write_video", write_video)
    code, _, stderr = cli(src, "-o", outdir, "--size", "64x32", "--seed", 1, *TINY)
    assert_sigterm_left_img0_alone(code, stderr, outdir)
    assert (outdir / "img0.mp4").stat().st_size > 0


def test_a_write_that_failed_before_an_interrupt_is_recorded_as_failed(tmp_path, cli, monkeypatch):
    """Image 0's background write fails (disk full), then SIGTERM arrives while image 1 is denoising: image 0 is
    recorded as failed with its reason when the run collects it, not taken for a write the interrupt broke."""
    import threading

    from animate_cli import pipeline

    src, outdir = tmp_path / "in", tmp_path / "out"
    good_images(src, 3)
    real_generate, calls, failed = pipeline.generate, [], threading.Event()

    def generate(model, images, seeds, settings, timer, on_step=None):
        calls.append(seeds)

        def step(i):
            if len(calls) == 2 and i == 0:
                assert failed.wait(10)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            on_step(i)

        return real_generate(model, images, seeds, settings, timer, on_step=step)

    def write_video(*args):
        failed.set()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "generate", generate)
    monkeypatch.setattr(batch, "write_video", write_video)
    code, _, stderr = cli(src, "-o", outdir, "--size", "64x32", "--seed", 1, *TINY)
    assert code == 128 + signal.SIGTERM, stderr
    records = read_manifest(outdir / MANIFEST_NAME)
    assert [(r["rel"], r["status"]) for r in records] == [("img0.png", "failed")]
    assert "No space left on device" in records[0]["error"]


# Batching, seeds, summary


def test_batch_size_2_gives_the_same_frames_as_one_at_a_time(tmp_path, cli):
    """Three landscape and two portrait images (two output sizes, so two groups), PNG frames so nothing
    is lost to a codec: batched and one-at-a-time agree to float rounding (at most 1 of 255, on a few
    pixels), while another seed changes everything."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        noise_image(size=(80, 40) if i < 3 else (40, 80), seed=i).save(src / f"p{i}.png")
    common = ["--seed", 11, "--format", "png", *TINY]
    code, stdout, stderr = cli(src, "-o", tmp_path / "b2", "--batch-size", 2, "--json", tmp_path / "b2.json", *common)
    assert code == 0, stderr
    code, _, stderr = cli(src, "-o", tmp_path / "b1", "--batch-size", 1, *common)
    assert code == 0, stderr
    code, _, stderr = cli(src, "-o", tmp_path / "other", "--batch-size", 1, *common[2:], "--seed", 12)
    assert code == 0, stderr

    b2 = read_manifest(tmp_path / "b2" / MANIFEST_NAME)
    assert sorted(r["batch"] for r in b2) == [1, 2, 2, 2, 2]  # (p0, p1), (p2) landscape; (p3, p4) portrait
    assert {r["rel"]: r["seed"] for r in b2} == {r["rel"]: r["seed"] for r in
                                                 read_manifest(tmp_path / "b1" / MANIFEST_NAME)}
    for i in range(5):
        names = sorted(p.name for p in (tmp_path / "b1" / f"p{i}").iterdir())
        assert names == [f"frame_{k:04d}.png" for k in range(1, 5)]
        for name in names:
            one = np.asarray(Image.open(tmp_path / "b1" / f"p{i}" / name), dtype=np.int16)
            two = np.asarray(Image.open(tmp_path / "b2" / f"p{i}" / name), dtype=np.int16)
            other = np.asarray(Image.open(tmp_path / "other" / f"p{i}" / name), dtype=np.int16)
            assert one.shape == two.shape == ((32, 64, 3) if i < 3 else (64, 32, 3))
            assert np.abs(one - two).max() <= 1 and (one != two).mean() < 0.01, (i, name)
            assert (one != other).mean() > 0.5

    summary = json.loads((tmp_path / "b2.json").read_text())
    assert summary["images"]["done"] == 5 and summary["batch_size"] == 2
    assert summary["videos_per_minute"] == pytest.approx(5 / summary["wall_s"] * 60)
    assert summary["videos_per_minute"] > 0
    for stage in ("encode", "denoise", "decode", "write"):
        s = summary["stages_s"][stage]
        assert s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["max"]
    assert "videos/min" in stdout and f"{summary['videos_per_minute']:.2f}" in stdout
    assert "median" in stdout and "denoise" in stdout


def test_derived_seeds_depend_on_seed_and_relative_path_only():
    a = derive_seed(5, PurePosixPath("sub/a.jpg"))
    assert a == derive_seed(5, PurePosixPath("sub/a.jpg")) and 0 <= a < 2**31
    assert a == int.from_bytes(hashlib.sha256(b"5:sub/a.jpg").digest()[:8], "big") % 2**31
    assert len({a, derive_seed(6, PurePosixPath("sub/a.jpg")), derive_seed(5, PurePosixPath("a.jpg"))}) == 3


# Naming


def names(jobs, outdir):
    return {j.source.as_posix(): j.output.relative_to(outdir).as_posix() for j in jobs}


def test_output_names_are_distinct_deterministic_and_inside_outdir(tmp_path):
    outdir = tmp_path / "out"

    def jobs():
        return [Job(tmp_path / "a" / "photo.jpg", PurePosixPath("photo.jpg")),
                Job(tmp_path / "a" / "photo.png", PurePosixPath("photo.png")),
                Job(tmp_path / "b" / "photo.jpg", PurePosixPath("photo.jpg")),  # same rel, other folder
                Job(tmp_path / "a" / "Solo.JPG", PurePosixPath("Solo.JPG")),
                Job(tmp_path / "a" / "solo.webp", PurePosixPath("deep/solo.webp")),
                Job(tmp_path / "a" / "Case.png", PurePosixPath("Case.png")),
                Job(tmp_path / "a" / "case.bmp", PurePosixPath("case.bmp")),  # differs from Case only in case
                Job(tmp_path / "a" / "animate-manifest.jsonl.png", PurePosixPath("animate-manifest.jsonl.png"))]

    first = jobs()
    assign_outputs(first, outdir, "mp4")
    got = names(first, outdir)
    h = batch.path_digest(tmp_path / "a" / "photo.jpg")[:10]
    h2 = batch.path_digest(tmp_path / "b" / "photo.jpg")[:10]
    assert got[(tmp_path / "a" / "photo.jpg").as_posix()] == f"photo.jpg.{h}.mp4"
    assert got[(tmp_path / "b" / "photo.jpg").as_posix()] == f"photo.jpg.{h2}.mp4"
    assert got[(tmp_path / "a" / "photo.png").as_posix()] == "photo.png.mp4"
    assert got[(tmp_path / "a" / "Solo.JPG").as_posix()] == "Solo.mp4"
    assert got[(tmp_path / "a" / "solo.webp").as_posix()] == "deep/solo.mp4"
    assert got[(tmp_path / "a" / "Case.png").as_posix()] == "Case.png.mp4"
    assert got[(tmp_path / "a" / "case.bmp").as_posix()] == "case.bmp.mp4"
    # png (frames folder, no suffix) must not take the manifest's name
    frames = jobs()
    assign_outputs(frames, outdir, "png")
    assert names(frames, outdir)[(tmp_path / "a" / "animate-manifest.jsonl.png").as_posix()] == \
        "animate-manifest.jsonl.png"
    assert len({o.lower() for o in got.values()}) == len(got)
    for _ in range(5):  # any order: the same names
        shuffled = jobs()
        random.shuffle(shuffled)
        assign_outputs(shuffled, outdir, "mp4")
        assert names(shuffled, outdir) == got


def test_output_never_replaces_an_input_in_outdir(tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    noise_image().save(outdir / "clip.gif")
    jobs = [Job(outdir / "clip.gif", PurePosixPath("clip.gif"))]
    assign_outputs(jobs, outdir, "gif")
    assert jobs[0].output == outdir / "clip.gif.gif"


def test_listing_folders_globs_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = Path("src")
    good_images(src / "x" / "y", 1)
    good_images(src, 2)
    (src / "readme.md").write_text("no")
    outdir = src / "out"  # inside the input folder: its files are never inputs
    good_images(outdir, 1, start=7)
    flat = collect_inputs([src], recursive=False, outdir=outdir, fmt="mp4")
    assert [j.rel.as_posix() for j in flat] == ["img0.png", "img1.png"]
    deep = collect_inputs([src], recursive=True, outdir=outdir, fmt="mp4")
    assert [j.rel.as_posix() for j in deep] == ["img0.png", "img1.png", "x/y/img0.png"]
    globbed = collect_inputs([Path("src/**/*.png")], recursive=True, outdir=outdir, fmt="mp4")
    assert sorted(j.rel.as_posix() for j in globbed) == ["img0.png", "img1.png", "x/y/img0.png"]
    named = collect_inputs([src / "x" / "y" / "img0.png", src / "img0.png", src / "img0.png"], False, outdir, "mp4")
    assert [j.rel.as_posix() for j in named] == ["img0.png", "img0.png"]  # named files: bare names, once each
    with pytest.raises(AnimateError, match="no file matches"):
        collect_inputs([Path("src/*.jpeg")], False, outdir, "mp4")
    with pytest.raises(AnimateError, match="no such file"):
        collect_inputs([Path("missing.png")], False, outdir, "mp4")
    with pytest.raises(AnimateError, match="would be read as images"):
        collect_inputs([src], False, src, "gif")


# Failures: out of memory


def test_out_of_memory_retries_with_half_the_decode_chunk_then_fails_naming_the_knobs(tmp_path, cli, monkeypatch):
    from animate_cli import pipeline

    src, outdir = tmp_path / "in", tmp_path / "out"
    good_images(src, 3)
    real, chunks = pipeline.generate, []

    def generate(model, images, seeds, settings, timer, on_step=None):
        chunks.append((len(images), settings.decode_chunk))
        if len(chunks) in (1, 2, 5, 6):  # the batch; img0 at chunk 4; img2 at chunk 4 and at 2
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (call {len(chunks)})")
        return real(model, images, seeds, settings, timer, on_step)

    monkeypatch.setattr(pipeline, "generate", generate)
    code, _, stderr = cli(src, "-o", outdir, "--size", "64x32", "--batch-size", 3, "--seed", 2, *TINY)
    assert code == 1, stderr
    # the batch of 3 ran out of memory and was split; img0 needed the retry at chunk 2; img1 ran at chunk 4;
    # img2 ran out twice
    assert chunks == [(3, 4), (1, 4), (1, 2), (1, 4), (1, 4), (1, 2)]
    records = {r["rel"]: r for r in read_manifest(outdir / MANIFEST_NAME)}
    assert records["img0.png"]["status"] == "done" and records["img0.png"]["retried_smaller_decode_chunk"]
    assert records["img0.png"]["settings"]["decode_chunk"] == 2
    assert records["img1.png"]["status"] == "done" and records["img1.png"]["settings"]["decode_chunk"] == 4
    assert records["img2.png"]["status"] == "failed"
    for knob in ("--decode-chunk", "--frames", "--size", "--batch-size"):
        assert knob in records["img2.png"]["error"]
    assert not (outdir / "img2.mp4").exists() and partials(outdir) == []


# Usage errors and safety


@pytest.mark.parametrize("case", ["no -o", "-o file", "-o video name", "missing", "no match", "bad size",
                                  "empty folder", "json folder missing"])
def test_usage_errors_exit_2_and_write_nothing(tmp_path, cli, case):
    src = tmp_path / "in"
    good_images(src, 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    args = {
        "no -o": [src],
        "-o file": [src, "-o", tmp_path / "file.txt"],
        "-o video name": [src, "-o", tmp_path / "out.mp4"],
        "missing": [src, tmp_path / "missing.jpg", "-o", tmp_path / "out"],
        "no match": [tmp_path / "in" / "*.jpeg", "-o", tmp_path / "out"],
        "bad size": [src, "-o", tmp_path / "out", "--size", "big"],
        "empty folder": [tmp_path / "empty", "-o", tmp_path / "out"],
        "json folder missing": [src, "-o", tmp_path / "out", "--json", tmp_path / "nope" / "s.json"],
    }[case]
    code, _, stderr = cli(*args, *TINY)
    assert code == 2, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.mp4").exists()


def test_outputs_never_leave_outdir(tmp_path, cli, monkeypatch):
    """Inputs named with .. and absolute paths, a symlinked input folder, and a sub-folder of OUTDIR that
    is a symlink to elsewhere: everything lands inside OUTDIR or fails, nothing is written elsewhere."""
    monkeypatch.chdir(tmp_path)
    work, outdir, elsewhere = tmp_path / "work", tmp_path / "out", tmp_path / "elsewhere"
    good_images(tmp_path / "photos" / "sub", 1)
    good_images(tmp_path / "photos", 1, start=1)
    good_images(tmp_path / "other", 1, start=5)
    (tmp_path / "photos" / "link").symlink_to(tmp_path / "photos" / "sub")  # symlinked folder: not followed
    elsewhere.mkdir()
    outdir.mkdir()
    (outdir / "sub").symlink_to(elsewhere)
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, stderr = cli("../photos", f"{tmp_path}/other/img5.png", "-o", outdir, "--recursive",
                          "--size", "64x32", *TINY)
    assert code == 1, stderr
    assert list(elsewhere.iterdir()) == []
    records = {r["input"]: r for r in read_manifest(outdir / MANIFEST_NAME)}
    assert records["../photos/img1.png"]["status"] == "done"
    assert records[f"{tmp_path}/other/img5.png"]["status"] == "done"  # named: bare name, top of OUTDIR
    assert records[f"{tmp_path}/other/img5.png"]["output"] == str(outdir / "img5.mp4")
    assert records["../photos/sub/img0.png"]["status"] == "failed"  # out/sub leads elsewhere
    assert "leads outside" in records["../photos/sub/img0.png"]["error"]
    assert len(records) == 3  # photos/link/ was not followed
    for r in records.values():
        assert os.path.abspath(r["output"]).startswith(str(outdir) + os.sep)


def test_a_second_run_on_the_same_outdir_is_refused(tmp_path):
    first = Manifest(tmp_path / MANIFEST_NAME)
    try:
        with pytest.raises(AnimateError, match="another animate run"):
            Manifest(tmp_path / MANIFEST_NAME)
    finally:
        first.close()
    Manifest(tmp_path / MANIFEST_NAME).close()  # free again once closed


def test_one_image_is_still_single_mode(tmp_path, cli):
    noise_image().save(tmp_path / "photo.jpg")
    code, _, stderr = cli(tmp_path / "photo.jpg", "-o", tmp_path / "clip.mp4", "--size", "64x32", *TINY)
    assert code == 0, stderr
    assert (tmp_path / "clip.mp4").is_file() and not (tmp_path / MANIFEST_NAME).exists()


def test_the_cleanup_pattern_matches_every_temporary_name_we_make(tmp_path):
    """remove_temporaries must know media.temporary_path's names (and report.write_json's), and no others."""
    from animate_cli.media import temporary_path

    for fmt, name in (("mp4", "a.mp4"), ("gif", "b.gif"), ("webp", "c.webp"), ("png", "frames")):
        with temporary_path(tmp_path / name, fmt) as tmp:
            assert batch.TEMPORARY.match(tmp.name), tmp.name
            (tmp.mkdir() if fmt == "png" else tmp.write_bytes(b"x"))
    assert batch.TEMPORARY.match(".summary.json.partial")
    for name in ("a.mp4", ".keep", "x.partial", ".x.partial.txt", MANIFEST_NAME):
        assert not batch.TEMPORARY.match(name), name
