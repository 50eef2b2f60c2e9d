"""Images in (modes, EXIF, bad files, sizes, fits) and videos out (each format decoded back and checked)."""

import os
import re
import subprocess
from pathlib import Path

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from conftest import FAST, gradient, leftovers
from PIL import Image, ImageOps

import animate_cli.media as media
from animate_cli.errors import AnimateError
from animate_cli.media import fit_image, load_image, output_format, resolve_size, write_video

FPS = 7  # the presets' fps; random:tiny gives 4 frames at 64x32


# ---------------------------------------------------------------- image modes


def rgb(path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_rgba_alpha_composited_on_white(tmp_path):
    a = np.zeros((32, 64, 4), np.uint8)
    a[..., 0] = 200  # red everywhere ...
    a[:, 32:, 3] = 255  # ... opaque on the right, transparent on the left
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = rgb(tmp_path / "a.png")
    assert out.shape == (32, 64, 3)
    assert (out[:, :32] == 255).all()  # transparent -> white, not black
    assert (out[:, 32:] == (200, 0, 0)).all()


def test_la_alpha_composited_on_white(tmp_path):
    a = np.zeros((32, 64, 2), np.uint8)
    a[..., 0] = 50
    a[:, 32:, 1] = 255
    Image.fromarray(a, "LA").save(tmp_path / "la.png")
    out = rgb(tmp_path / "la.png")
    assert (out[:, :32] == 255).all()
    assert (out[:, 32:] == 50).all()


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (64, 32), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # index 0 black (transparent), 1 red
    image.paste(1, (32, 0, 64, 32))
    image.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = rgb(tmp_path / "p.png")
    assert (out[:, :32] == 255).all()  # the transparent index is white, not its black palette colour
    assert (out[:, 32:] == (255, 0, 0)).all()


def test_palette_without_transparency(tmp_path):
    image = Image.new("P", (64, 32), 0)
    image.putpalette([0, 0, 255] + [0] * (255 * 3))
    image.save(tmp_path / "p.gif")
    assert (rgb(tmp_path / "p.gif") == (0, 0, 255)).all()


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (64, 32), (255, 0, 0, 0))  # pure cyan
    image.save(tmp_path / "c.tif")
    image.save(tmp_path / "c.jpg", quality=95)
    assert (rgb(tmp_path / "c.tif") == (0, 255, 255)).all()
    out = rgb(tmp_path / "c.jpg")  # Adobe CMYK JPEG (stored inverted): still cyan
    assert out.shape == (32, 64, 3)
    assert np.abs(out.astype(int) - (0, 255, 255)).max() <= 8


def test_16_bit_grayscale_uses_the_full_8_bit_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = rgb(tmp_path / "g16.png").astype(int)
    assert out.min() == 0 and out.max() == 255  # convert("L") would clip everything above 255 to white
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    np.testing.assert_allclose(out[..., 0], ramp / 65535 * 255, atol=0.51)
    assert len(np.unique(out)) == 256  # the whole ramp, not a few clipped levels


def test_dark_16_bit_image_is_not_stretched(tmp_path):
    """Values are scaled from the 16-bit range, not from the image's own maximum: a dark picture stays dark."""
    Image.fromarray(np.full((32, 64), 1000, np.uint16)).save(tmp_path / "dark.png")
    assert (rgb(tmp_path / "dark.png") == round(1000 / 65535 * 255)).all()


def test_grayscale_and_bilevel(make_image):
    gray = rgb(make_image("g.png", mode="L"))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert len(np.unique(gray)) > 50
    bilevel = rgb(make_image("b.png", mode="1"))
    assert set(np.unique(bilevel)) == {0, 255}


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((32, 64, 3), np.uint8)
    a[:16, :32] = (255, 0, 0)  # red top-left quadrant of a 64x32 picture
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(a).save(tmp_path / "o.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "o.jpg")
    assert image.size == (32, 64)  # W x H swapped
    out = np.asarray(image).astype(int)
    # Rotated clockwise, the top-left quadrant is now the top-right one.
    assert out[:32, 16:, 0].mean() > 200 and out[:32, :16, 0].mean() < 50
    assert out[32:, :, 0].mean() < 50


def test_animated_gif_input_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert (rgb(tmp_path / "anim.gif") == (255, 0, 0)).all()


@pytest.mark.parametrize("case", ["missing", "folder", "text", "empty", "truncated"])
def test_load_image_errors(tmp_path, make_image, case):
    if case == "missing":
        path, needle = tmp_path / "nope.png", "no such file"
    elif case == "folder":
        path, needle = tmp_path, "is a folder"
    elif case == "text":
        path, needle = tmp_path / "notes.png", "not an image"
        path.write_text("not a png\n")
    elif case == "empty":
        path, needle = tmp_path / "empty.jpg", "not an image"
        path.write_bytes(b"")
    else:
        data = make_image("whole.jpg", size=(256, 128), quality=95).read_bytes()
        path, needle = tmp_path / "cut.jpg", "corrupt"
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AnimateError, match=needle) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- sizes and fits


def picture(w, h):
    return Image.fromarray(gradient((w, h)))


@pytest.mark.parametrize("image_size, expected", [((800, 600), (1024, 576)), ((600, 800), (576, 1024)),
                                                  ((500, 500), (1024, 576)), ((64, 4000), (576, 1024))])
def test_native_size_follows_the_image_orientation(image_size, expected):
    assert resolve_size(None, picture(*image_size), (1024, 576), 64) == expected


@pytest.mark.parametrize("size, expected", [("1024x576", (1024, 576)), ("500x300", (512, 320)),
                                            ("1000X700", (1024, 704)), ("10x10", (64, 64)), ("576x1024", (576, 1024))])
def test_size_rounded_to_the_model_multiple(size, expected):
    w, h = resolve_size(size, picture(64, 32), (1024, 576), 64)
    assert (w, h) == expected
    assert w % 64 == 0 and h % 64 == 0


@pytest.mark.parametrize("size", ["wide", "1024", "1024x", "x576", "0x576", "1024x-64", "1x2x3", "10.5x20", ""])
def test_bad_size_strings(size):
    with pytest.raises(AnimateError, match="--size"):
        resolve_size(size, picture(64, 32), (1024, 576), 64)


@pytest.mark.parametrize("fit", ["crop", "pad", "stretch"])
@pytest.mark.parametrize("target", [(64, 64), (64, 32), (32, 64), (48, 20)])
def test_fit_gives_the_exact_size(fit, target):
    image = fit_image(picture(100, 50), target, fit)
    assert image.size == target and image.mode == "RGB"


def test_pad_keeps_the_whole_image():
    a = np.full((50, 100, 3), 255, np.uint8)
    a[:, :5] = (255, 0, 0)  # red left edge and blue right edge: a crop would lose them
    a[:, -5:] = (0, 0, 255)
    image = Image.fromarray(a)
    padded = np.asarray(fit_image(image, (64, 64), "pad")).astype(int)
    assert (padded[:16] == 0).all() and (padded[48:] == 0).all()  # black bars above and below
    band = np.asarray(image.resize((64, 32), Image.Resampling.LANCZOS)).astype(int)
    np.testing.assert_array_equal(padded[16:48], band)  # the whole picture, scaled to fit
    assert padded[16:48, 0, 0].mean() > 200 and padded[16:48, -1, 2].mean() > 200


def test_crop_takes_the_centre():
    a = np.full((50, 100, 3), 255, np.uint8)
    a[:, :25] = (255, 0, 0)
    a[:, 75:] = (0, 0, 255)
    cropped = np.asarray(fit_image(Image.fromarray(a), (50, 50), "crop"))
    assert (cropped == 255).all()  # only the white centre square remains


def test_stretch_keeps_every_column():
    a = np.full((50, 100, 3), 255, np.uint8)
    a[:, :10] = (255, 0, 0)
    stretched = np.asarray(fit_image(Image.fromarray(a), (64, 64), "stretch")).astype(int)
    assert (stretched[:, 0] == (255, 0, 0)).all()  # the red edge runs the full height: no bars, no crop


def test_bad_fit():
    with pytest.raises(AnimateError, match="--fit 'zoom'"):
        fit_image(picture(64, 32), (64, 32), "zoom")


@pytest.mark.parametrize("name, fmt, expected", [("a.mp4", None, "mp4"), ("a.GIF", None, "gif"),
                                                 ("a.webp", None, "webp"), ("frames", None, "png"),
                                                 ("a.mp4", "gif", "gif"), ("a.avi", "webp", "webp")])
def test_output_format(tmp_path, name, fmt, expected):
    assert output_format(tmp_path / name, fmt) == expected


@pytest.mark.parametrize("name, fmt, needle", [("a.avi", None, "unknown suffix .avi"), ("a.mp4", "mov", "--format")])
def test_output_format_errors(tmp_path, name, fmt, needle):
    with pytest.raises(AnimateError, match=re.escape(needle)):
        output_format(tmp_path / name, fmt)


# ---------------------------------------------------------------- reading the outputs back


def ffmpeg_stream_line(path) -> str:
    """The video stream line of `ffmpeg -i FILE` (ffprobe may be absent; imageio-ffmpeg ships ffmpeg)."""
    proc = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                          text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if "Stream" in line and "Video:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def mp4_frames(path) -> np.ndarray:
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack(list(reader.iter_data()))


def animated_frames(path) -> list[np.ndarray]:
    with Image.open(path) as image:
        frames = []
        for i in range(image.n_frames):
            image.seek(i)
            frames.append(np.asarray(image.convert("RGB")))
        return frames


def webp_durations(path) -> list[int]:
    with Image.open(path) as image:
        durations = []
        for i in range(image.n_frames):
            image.seek(i)
            image.load()
            durations.append(image.info["duration"])
        return durations


def gif_structure(data: bytes) -> tuple[bool, list[bool]]:
    """(has a global colour table, [has a local colour table] per image), read from the GIF block structure."""
    assert data[:6] in (b"GIF87a", b"GIF89a")
    packed = data[10]
    has_global = bool(packed & 0x80)
    pos = 13 + (3 * 2 ** ((packed & 7) + 1) if has_global else 0)
    local = []

    def skip_sub_blocks(pos):
        while data[pos]:
            pos += data[pos] + 1
        return pos + 1

    while True:
        block = data[pos]
        if block == 0x3B:  # trailer
            return has_global, local
        if block == 0x21:  # extension: label, then data sub-blocks
            pos = skip_sub_blocks(pos + 2)
        elif block == 0x2C:  # image descriptor: x, y, w, h (2 bytes each), packed flags
            flags = data[pos + 9]
            local.append(bool(flags & 0x80))
            pos += 10
            if flags & 0x80:
                pos += 3 * 2 ** ((flags & 7) + 1)
            pos = skip_sub_blocks(pos + 1)  # LZW minimum code size, then image data
        else:
            raise AssertionError(f"unexpected GIF block 0x{block:02x} at {pos}")


def nearest_frames(decoded, reference) -> list[int]:
    """For each decoded frame, the index of the reference frame it is closest to (mean absolute difference)."""
    reference = np.asarray(reference).astype(int)
    return [int(np.argmin([np.abs(d.astype(int) - r).mean() for r in reference])) for d in decoded]


@pytest.fixture
def captured(monkeypatch):
    """The uint8 frames [F, H, W, 3] of each video the command writes, as handed to media.VideoStream."""
    videos, chunks = [], []
    real_append, real_close = media.VideoStream.append, media.VideoStream.close

    def append(self, frames):
        chunks.append(np.array(frames))
        return real_append(self, frames)

    def close(self):
        videos.append(torch.from_numpy(np.concatenate(chunks)))
        chunks.clear()
        return real_close(self)

    monkeypatch.setattr(media.VideoStream, "append", append)
    monkeypatch.setattr(media.VideoStream, "close", close)
    return videos


def run_format(cli, make_image, tmp_path, captured, name, *extra):
    out = tmp_path / name
    result = cli(make_image("photo.png"), "-o", out, *FAST, "--seed", "11", *extra)
    assert result.exit_code == 0, result.stderr
    assert len(captured) == 1, "the video was not written through animate_cli.media.VideoStream"
    frames = captured[0].numpy()
    assert frames.shape == (4, 32, 64, 3) and frames.dtype == np.uint8
    assert leftovers(tmp_path, {"photo.png", name}) == []
    return out, frames


def test_mp4(cli, make_image, tmp_path, captured):
    out, frames = run_format(cli, make_image, tmp_path, captured, "clip.mp4")
    count, seconds = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert count == 4
    with imageio.get_reader(out, format="FFMPEG") as reader:
        meta = reader.get_meta_data()
    assert meta["size"] == (64, 32)
    assert meta["fps"] == pytest.approx(FPS)
    assert meta["codec"] == "h264"
    stream = ffmpeg_stream_line(out)
    assert "h264" in stream and "yuv420p" in stream and "64x32" in stream and f"{FPS} fps" in stream
    decoded = mp4_frames(out)
    assert decoded.shape == (4, 32, 64, 3)
    # Lossy (and 4:2:0 chroma), but each decoded frame is nearest to the frame it came from, in order.
    assert nearest_frames(decoded, frames) == [0, 1, 2, 3]
    assert np.abs(decoded.astype(int) - frames).mean() < 20
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's private 0o600


def test_gif(cli, make_image, tmp_path, captured):
    out, frames = run_format(cli, make_image, tmp_path, captured, "clip.gif")
    with Image.open(out) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 4 and gif.is_animated
        assert gif.size == (64, 32)
        assert gif.info["loop"] == 0  # loop forever
        assert gif.info["duration"] == pytest.approx(1000 / FPS, abs=10)  # GIF stores centiseconds
    has_global, local = gif_structure(out.read_bytes())
    # One shared palette: a global colour table and no frame with a local one (no flicker between frames).
    assert has_global and len(local) == 4 and not any(local)
    decoded = animated_frames(out)
    assert nearest_frames(decoded, frames) == [0, 1, 2, 3]
    assert np.abs(np.stack(decoded).astype(int) - frames).mean() < 15  # 256 colours, dithered


def test_webp(cli, make_image, tmp_path, captured):
    out, frames = run_format(cli, make_image, tmp_path, captured, "clip.webp", "--quality", "100")
    with Image.open(out) as webp:
        assert webp.format == "WEBP"
        assert webp.n_frames == 4 and webp.is_animated
        assert webp.size == (64, 32)
    assert webp_durations(out) == [round(1000 / FPS)] * 4
    np.testing.assert_array_equal(np.stack(animated_frames(out)), frames)  # quality 100 is lossless


def test_png_folder(cli, make_image, tmp_path, captured):
    out, frames = run_format(cli, make_image, tmp_path, captured, "frames")
    assert out.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:04d}.png" for i in range(1, 5)]
    decoded = []
    for i in range(1, 5):
        with Image.open(out / f"frame_{i:04d}.png") as png:
            assert png.size == (64, 32) and png.mode == "RGB"
            decoded.append(np.asarray(png))
    np.testing.assert_array_equal(np.stack(decoded), frames)  # lossless: exactly what the pipeline produced


def test_format_overrides_the_suffix(cli, make_image, tmp_path, captured):
    out, _ = run_format(cli, make_image, tmp_path, captured, "clip.mp4", "--format", "gif")
    assert out.read_bytes()[:6] == b"GIF89a"
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 4


# ---------------------------------------------------------------- writing, directly


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def noise_frames(frames=3, height=17, width=33, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8))


def test_mp4_odd_size_is_cropped_to_even(tmp_path):
    write_video(noise_frames(), tmp_path / "odd.mp4", "mp4", 10, 70)
    stream = ffmpeg_stream_line(tmp_path / "odd.mp4")
    assert "32x16" in stream and "yuv420p" in stream and "10 fps" in stream
    assert imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "odd.mp4"))[0] == 3


@pytest.mark.parametrize("fmt, name", [("mp4", "o.mp4"), ("gif", "o.gif"), ("webp", "o.webp"), ("png", "o")])
def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path, monkeypatch, fmt, name):
    """A writer that dies half-way: the temporary file (or folder) is removed and an existing output is kept."""
    out = tmp_path / name
    if fmt == "png":
        out.mkdir()
        (out / "frame_0001.png").write_bytes(b"old")
    else:
        out.write_bytes(b"old")
    real = getattr(media, f"write_{fmt}")

    def dies(frames, path, fps, quality):
        real(frames[:1], path, fps, quality)  # something on disk under the temporary name ...
        assert path.name.startswith(f".{name}.") and "partial" in path.name
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(media, f"write_{fmt}", dies)
    with pytest.raises(OSError, match="disk full"):
        write_video(noise_frames(), out, fmt, 7, 70)
    assert leftovers(tmp_path, {name}) == []
    if fmt == "png":
        assert (out / "frame_0001.png").read_bytes() == b"old"
    else:
        assert out.read_bytes() == b"old"


def test_png_overwrite_replaces_the_folder(tmp_path):
    out = tmp_path / "frames"
    out.mkdir()
    (out / "frame_0009.png").write_bytes(b"stale")
    write_video(noise_frames(frames=2), out, "png", 7, 70)
    assert sorted(p.name for p in out.iterdir()) == ["frame_0001.png", "frame_0002.png"]  # no stale frame
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~current_umask()
    assert leftovers(tmp_path, {"frames"}) == []


def test_file_output_onto_a_folder_is_refused(tmp_path):
    (tmp_path / "clip.gif").mkdir()
    with pytest.raises(AnimateError, match="is a folder"):
        write_video(noise_frames(), tmp_path / "clip.gif", "gif", 7, 70)
    assert (tmp_path / "clip.gif").is_dir()
    assert leftovers(tmp_path, {"clip.gif"}) == []


def test_gif_palette_is_shared_for_very_different_frames(tmp_path):
    """Frames of unrelated colours still share the one global palette."""
    frames = torch.stack([torch.full((16, 16, 3), 0, dtype=torch.uint8),
                          torch.full((16, 16, 3), 255, dtype=torch.uint8),
                          noise_frames(frames=1, height=16, width=16)[0]])
    frames[0, ..., 0] = 255  # red, white, noise
    write_video(frames, tmp_path / "x.gif", "gif", 5, 70)
    has_global, local = gif_structure((tmp_path / "x.gif").read_bytes())
    assert has_global and len(local) == 3 and not any(local)


def test_gif_structure_parser_sees_local_tables(tmp_path):
    """The parser itself: Pillow writes a local colour table for a frame whose palette differs."""
    a = Image.new("P", (8, 8), 0)
    a.putpalette([255, 0, 0] * 256)
    b = Image.new("P", (8, 8), 0)
    b.putpalette([0, 0, 255] * 256)
    a.save(tmp_path / "lct.gif", save_all=True, append_images=[b])
    has_global, local = gif_structure((tmp_path / "lct.gif").read_bytes())
    assert has_global and local == [False, True]


def test_exif_transpose_is_pillow_s(tmp_path):
    """Every EXIF orientation 1..8 gives what ImageOps.exif_transpose gives (sizes swap for 5..8)."""
    base = Image.fromarray(gradient((40, 20)))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        base.save(path, exif=exif)
        expected = ImageOps.exif_transpose(Image.open(path))
        loaded = load_image(path)
        assert loaded.size == ((20, 40) if orientation >= 5 else (40, 20))
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected.convert("RGB")))


def test_mp4_is_x264_veryfast_at_the_quality_crf(tmp_path):
    """x264 writes its settings into the stream: the preset (veryfast: subme=2, ref=1) and CRF = 0.51 x (100 - q)."""
    import torch

    from animate_cli.media import write_video

    frames = torch.randint(0, 256, (4, 64, 96, 3), dtype=torch.uint8)
    write_video(frames, tmp_path / "a.mp4", "mp4", 7, 70)
    data = (tmp_path / "a.mp4").read_bytes()
    settings = data[data.index(b"x264 - core"):].split(b"\x00")[0].decode()
    assert " subme=2 " in settings and " ref=1 " in settings and " crf=15.0 " in settings
    assert " bframes=3 " in settings and " rc_lookahead=10 " in settings  # x264's own for veryfast


def test_mp4_takes_extra_x264_options(tmp_path, monkeypatch):
    import torch

    from animate_cli import media

    monkeypatch.setattr(media, "X264_PARAMS", "bframes=1:rc-lookahead=5")
    media.write_video(torch.randint(0, 256, (4, 64, 96, 3), dtype=torch.uint8), tmp_path / "a.mp4", "mp4", 7, 70)
    data = (tmp_path / "a.mp4").read_bytes()
    settings = data[data.index(b"x264 - core"):].split(b"\x00")[0].decode()
    assert " bframes=1 " in settings and " rc_lookahead=5 " in settings and " subme=2 " in settings


# Streaming: frames encoded as they are decoded


def read_back(path: Path) -> np.ndarray:
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack([np.asarray(f) for f in reader])


def test_stream_in_chunks_writes_the_same_mp4_as_the_whole_video(tmp_path):
    frames = noise_frames(frames=7).numpy()
    write_video(torch.from_numpy(frames), tmp_path / "whole.mp4", "mp4", 7, 70)
    with media.VideoStream(tmp_path / "chunks.mp4", "mp4", 7, 70, (33, 17)) as stream:
        for start in (0, 3, 6):  # chunks of 3, 3 and 1 frames, odd size cropped to even as a whole write does
            stream.append(frames[start : start + 3])
        stream.close()
    assert leftovers(tmp_path, {"whole.mp4", "chunks.mp4"}) == []
    whole, chunks = read_back(tmp_path / "whole.mp4"), read_back(tmp_path / "chunks.mp4")
    assert chunks.shape == (7, 16, 32, 3)
    assert np.array_equal(whole, chunks)


def test_stream_starts_the_encoder_before_the_first_frame(tmp_path, monkeypatch):
    """With the size known, ffmpeg starts when the stream opens (during the denoising), not at the first frame."""
    import threading

    started, real = threading.Event(), imageio_ffmpeg.write_frames

    def write_frames(*args, **kwargs):
        started.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", write_frames)
    with media.VideoStream(tmp_path / "o.mp4", "mp4", 7, 70, (33, 17)) as stream:
        assert started.wait(timeout=30), "ffmpeg did not start before any frame was appended"
        stream.append(noise_frames().numpy())
        stream.close()
    assert imageio_ffmpeg.count_frames_and_secs(str(tmp_path / "o.mp4"))[0] == 3


@pytest.mark.parametrize("fmt, name", [("gif", "o.gif"), ("webp", "o.webp"), ("png", "o")])
def test_stream_other_formats_equal_a_whole_write(tmp_path, fmt, name):
    frames = noise_frames(frames=4).numpy()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_video(torch.from_numpy(frames), tmp_path / "a" / name, fmt, 7, 70)
    with media.VideoStream(tmp_path / "b" / name, fmt, 7, 70) as stream:
        stream.append(frames[:3])
        stream.append(frames[3:])
        stream.close()
    a, b = tmp_path / "a" / name, tmp_path / "b" / name
    if fmt == "png":
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        assert all((a / p.name).read_bytes() == (b / p.name).read_bytes() for p in a.iterdir())
    else:
        assert a.read_bytes() == b.read_bytes()
    assert leftovers(tmp_path / "b", {name}) == []


def test_stream_encoder_failure_reaches_the_caller_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"old")
    real = media.encode_mp4

    def dies(chunks, path, fps, quality, size=None):
        real([next(iter(chunks))], path, fps, quality, size)  # a real file under the temporary name ...
        raise OSError("disk full")  # ... then the failure

    monkeypatch.setattr(media, "encode_mp4", dies)
    with pytest.raises(OSError, match="disk full"):
        with media.VideoStream(out, "mp4", 7, 70, (33, 17)) as stream:
            for _ in range(50):  # the failure surfaces at an append or at close, whichever comes after it
                stream.append(noise_frames().numpy())
            stream.close()
    assert leftovers(tmp_path, {"o.mp4"}) == []
    assert out.read_bytes() == b"old"


@pytest.mark.parametrize("fmt, name", [("mp4", "o.mp4"), ("gif", "o.gif")])
def test_stream_left_without_close_stops_the_encoder_and_leaves_nothing(tmp_path, fmt, name):
    """An error or an interrupt while the frames are still being made: no file, the old output kept."""
    out = tmp_path / name
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with media.VideoStream(out, fmt, 7, 70, (33, 17)) as stream:
            stream.append(noise_frames().numpy())
            raise KeyboardInterrupt
    assert not stream._thread.is_alive()
    assert leftovers(tmp_path, {name}) == []
    assert out.read_bytes() == b"old"


def test_stream_refuses_frames_of_another_size(tmp_path):
    with pytest.raises(ValueError, match="size"):
        with media.VideoStream(tmp_path / "o.mp4", "mp4", 7, 70) as stream:
            stream.append(noise_frames().numpy())
            stream.append(noise_frames(height=20).numpy())
    assert leftovers(tmp_path, set()) == []
