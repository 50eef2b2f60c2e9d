"""Images in, videos out. Every output is written under a temporary name and renamed when complete."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from animate_cli.errors import AnimateError

FORMATS = ("mp4", "gif", "webp", "png")
FITS = ("crop", "pad", "stretch")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def load_image(path: Path) -> Image.Image:
    """The image as 8-bit RGB, EXIF orientation applied, alpha composited on white, first frame of animations."""
    if not path.exists():
        raise AnimateError(f"{path}: no such file")
    if path.is_dir():
        raise AnimateError(f"{path} is a folder; give an image file")
    try:
        with Image.open(path) as image:
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise AnimateError(f"{path}: not an image Pillow can read (jpg, png, webp, bmp, tiff, gif)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise AnimateError(f"{path}: unreadable or corrupt image ({e})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit grayscale: scale the full range to 8 bits (convert("L") would clip at 255)
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        if image.mode == "F":
            top = max(a.max(), 1.0) if a.max() > 1.0 else 1.0
        image = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def resolve_size(size: str | None, image: Image.Image, native: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(width, height): --size WxH rounded to the model's multiple, else the native size in the image's orientation."""
    if size is None:
        w, h = native
        return (min(w, h), max(w, h)) if image.height > image.width else (max(w, h), min(w, h))
    w, h = parse_size(size)
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)


def parse_size(size: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height), or the error saying what is wrong."""
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise AnimateError(f"--size {size!r}: expected WIDTHxHEIGHT, for example 1024x576") from None
    if w <= 0 or h <= 0:
        raise AnimateError(f"--size {size!r}: width and height must be positive")
    return w, h


def fit_image(image: Image.Image, size: tuple[int, int], fit: str) -> Image.Image:
    """The image at exactly `size`: centre-cropped to its aspect, padded (black bars) or stretched."""
    if fit == "crop":
        return ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    if fit == "pad":
        return ImageOps.pad(image, size, Image.Resampling.LANCZOS, color=(0, 0, 0))
    if fit == "stretch":
        return image.resize(size, Image.Resampling.LANCZOS)
    raise AnimateError(f"--fit {fit!r}: choose one of {', '.join(FITS)}")


def output_format(output: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise AnimateError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
        return fmt
    suffix = output.suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    if suffix == "":
        return "png"  # a name without suffix: a folder of numbered frames
    raise AnimateError(f"-o {output}: unknown suffix .{suffix}; use .mp4, .gif, .webp, a folder, or --format")


def check_writable(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise AnimateError(f"{output} exists; pass --overwrite to replace it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise AnimateError(f"cannot write {output}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise AnimateError(f"cannot write {output}: folder {parent} is not writable")


def write_video(frames: torch.Tensor, output: Path, fmt: str, fps: int, quality: int) -> None:
    """frames: uint8 [F, H, W, 3]. Written under a hidden temporary name in the same folder, then renamed."""
    array = frames.cpu().numpy()
    writer = {"mp4": write_mp4, "gif": write_gif, "webp": write_webp, "png": write_png}[fmt]
    with temporary_path(output, fmt) as tmp:
        writer(array, tmp, fps, quality)


@contextlib.contextmanager
def temporary_path(output: Path, fmt: str):
    """A hidden temporary path beside `output`; renamed onto it on success, removed on any failure."""
    parent = output.parent if str(output.parent) else Path(".")
    suffix = "" if fmt == "png" else f".{fmt}"
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=f".partial{suffix}", dir=parent)
    os.close(fd)
    tmp = Path(name)
    if fmt == "png":
        tmp.unlink()
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~umask)  # mkstemp makes it private
        if fmt == "png" and output.is_dir():
            shutil.rmtree(output)
        elif output.is_dir():
            raise AnimateError(f"{output} is a folder; give a file name or --format png")
        os.replace(tmp, output)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def even(array: np.ndarray) -> np.ndarray:
    """Crop to even width and height: H.264 in yuv420p needs them."""
    return array[:, : array.shape[1] // 2 * 2, : array.shape[2] // 2 * 2]


X264_PRESET = "veryfast"


def write_mp4(frames: np.ndarray, path: Path, fps: int, quality: int) -> None:
    import imageio.v2 as imageio

    crf = round((100 - quality) * 0.51)  # quality 100 -> CRF 0 (lossless), 70 -> 15, 1 -> 50
    # x264 "veryfast": 2.1-3x faster than "medium" at the same CRF, about 5% larger and 0.35 dB lower PSNR
    # (README.md, "On an NVIDIA H200"); at 1024x576 the encode was a quarter of a distilled run on an H200.
    params = ["-crf", str(crf), "-preset", X264_PRESET, "-movflags", "+faststart"]
    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                            quality=None, macro_block_size=1, output_params=params,
                            ffmpeg_log_level="error") as writer:
        for frame in even(frames):
            writer.append_data(frame)


def write_gif(frames: np.ndarray, path: Path, fps: int, quality: int) -> None:
    images = [Image.fromarray(f) for f in frames]
    # One palette for the whole clip, from a mosaic of every frame, so colours do not flicker between frames.
    mosaic = Image.fromarray(np.concatenate(frames, axis=0))
    palette = mosaic.quantize(256, method=Image.Quantize.MEDIANCUT)
    paletted = [im.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG) for im in images]
    # palette=: without it Pillow gives every frame after the first a local colour table (a copy of the same one).
    paletted[0].save(path, format="GIF", save_all=True, append_images=paletted[1:], loop=0,
                     duration=round(1000 / fps), optimize=False, disposal=1, palette=bytes(palette.getpalette()))


def write_webp(frames: np.ndarray, path: Path, fps: int, quality: int) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 / fps), quality=quality, lossless=quality >= 100)


def write_png(frames: np.ndarray, path: Path, fps: int, quality: int) -> None:
    path.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(path / f"frame_{i + 1:04d}.png")
