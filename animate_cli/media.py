"""Images in, videos out. Every output is written under a temporary name and renamed when complete."""

import contextlib
import os
import queue
import shutil
import tempfile
import threading
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
    with temporary_path(output, fmt) as tmp:
        writer(fmt)(array, tmp, fps, quality)


@contextlib.contextmanager
def temporary_path(output: Path, fmt: str):
    """A hidden temporary path beside `output`; renamed onto it on success, removed on any failure."""
    tmp = make_temporary(output, fmt)
    try:
        yield tmp
        commit(tmp, output, fmt)
    finally:
        discard(tmp)


def make_temporary(output: Path, fmt: str) -> Path:
    parent = output.parent if str(output.parent) else Path(".")
    suffix = "" if fmt == "png" else f".{fmt}"
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=f".partial{suffix}", dir=parent)
    os.close(fd)
    tmp = Path(name)
    if fmt == "png":
        tmp.unlink()
    return tmp


def commit(tmp: Path, output: Path, fmt: str) -> None:
    """Move the finished temporary file (or folder) onto `output`."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~umask)  # mkstemp makes it private
    if fmt == "png" and output.is_dir():
        shutil.rmtree(output)
    elif output.is_dir():
        raise AnimateError(f"{output} is a folder; give a file name or --format png")
    os.replace(tmp, output)


def discard(tmp: Path) -> None:
    """Remove what is left under the temporary name (nothing, once committed)."""
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


class VideoStream:
    """One video written while its frames are still being made. Opened before the first frame exists: an MP4's
    encoder (ffmpeg) starts at once on a background thread and encodes each chunk of frames as it is appended,
    so encoding overlaps decoding; GIF, WebP and PNG frames are collected and written at close, on that thread.
    The file lives under a temporary name until close() has it complete; leaving the `with` block without
    close() (an error, an interrupt) stops the encoder and removes it.

        with VideoStream(output, "mp4", fps, quality) as stream:
            stream.append(frames)  # uint8 [f, H, W, 3], any number of times
            stream.close()  # waits for the encoder, then renames the file into place
    """

    _DONE, _ABORT = object(), object()

    def __init__(self, output: Path, fmt: str, fps: int, quality: int, size: tuple[int, int] | None = None):
        """size: (width, height) of the frames, where known, so an MP4's encoder starts before they come."""
        self.output, self.fmt, self.fps, self.quality, self.size = output, fmt, fps, quality, size
        self.frames = 0  # appended so far
        self._shape: tuple | None = None  # (H, W, 3) of the first chunk
        self._ended = False  # the encoder thread has taken close()'s or an abort's marker
        self._tmp: Path | None = None
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="animate-encoder", daemon=True)

    def __enter__(self) -> "VideoStream":
        self._tmp = make_temporary(self.output, self.fmt)
        self._thread.start()
        return self

    def append(self, frames: np.ndarray) -> None:
        """uint8 frames [f, H, W, 3]; all of one size. Raises the encoder's error if it has failed."""
        if self._error is not None:
            raise self._error
        if self._shape is not None and frames.shape[1:] != self._shape:
            raise ValueError(f"frames of size {frames.shape[1:]} after {self._shape}")
        self._shape = frames.shape[1:]
        self.frames += len(frames)
        self._queue.put(frames)

    def close(self) -> None:
        """Wait for the encoder to finish, then move the file into place."""
        if self.frames == 0:
            raise ValueError("no frames to write")
        self._queue.put(self._DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error
        commit(self._tmp, self.output, self.fmt)
        self._tmp = None

    def __exit__(self, *exc) -> None:
        if self._tmp is None:  # closed: the file is in place
            return
        if self._thread.is_alive():
            self._queue.put(self._ABORT)
            self._thread.join()
        discard(self._tmp)

    def _chunks(self):
        """The appended chunks, until close(); an abort ends the encoder with an error."""
        while True:
            chunk = self._queue.get()
            self._ended = chunk is self._DONE or chunk is self._ABORT
            if chunk is self._DONE:
                return
            if chunk is self._ABORT:
                raise _Aborted
            yield chunk

    def _run(self) -> None:
        try:
            if self.fmt == "mp4":
                encode_mp4(self._chunks(), self._tmp, self.fps, self.quality, self.size)
            else:
                frames = np.concatenate(list(self._chunks()))
                writer(self.fmt)(frames, self._tmp, self.fps, self.quality)
        except _Aborted:
            pass
        except BaseException as e:  # handed to the main thread by append() and close()
            self._error = e
            while not self._ended:  # wait for close() or the abort, dropping what comes before
                chunk = self._queue.get()
                self._ended = chunk is self._DONE or chunk is self._ABORT


class _Aborted(Exception):
    pass


def even(array: np.ndarray) -> np.ndarray:
    """Crop to even width and height: H.264 in yuv420p needs them."""
    return array[:, : array.shape[1] // 2 * 2, : array.shape[2] // 2 * 2]


X264_PRESET = "veryfast"
X264_PARAMS: str | None = None  # extra x264 options ("key=value:..."), None: x264's own for the preset


def write_mp4(frames: np.ndarray, path: Path, fps: int, quality: int) -> None:
    encode_mp4([frames], path, fps, quality)


def encode_mp4(chunks, path: Path, fps: int, quality: int, size: tuple[int, int] | None = None) -> None:
    """Chunks of uint8 frames [f, H, W, 3] (an iterable, consumed as it yields) into an H.264 MP4 at `path`.
    With size (width, height), ffmpeg starts before the first chunk is asked for."""
    import imageio_ffmpeg

    crf = round((100 - quality) * 0.51)  # quality 100 -> CRF 0 (lossless), 70 -> 15, 1 -> 50
    # x264 "veryfast": 2.1-3x faster than "medium" at the same CRF, about 5% larger and 0.35 dB lower PSNR
    # (README.md, "On an NVIDIA H200"); at 1024x576 the encode was a quarter of a distilled run on an H200.
    params = ["-crf", str(crf), "-preset", X264_PRESET, *(["-x264-params", X264_PARAMS] if X264_PARAMS else []),
              "-movflags", "+faststart"]
    encoder = None

    def start(width: int, height: int):
        frames = imageio_ffmpeg.write_frames(
            str(path), (width // 2 * 2, height // 2 * 2), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=1, output_params=params, ffmpeg_log_level="error")
        frames.send(None)  # starts ffmpeg
        return frames

    try:
        if size is not None:
            encoder = start(*size)
        for chunk in chunks:
            if size is not None and (chunk.shape[2], chunk.shape[1]) != tuple(size):
                raise ValueError(f"frames of {chunk.shape[2]}x{chunk.shape[1]} for a {size[0]}x{size[1]} video")
            if encoder is None:
                encoder = start(chunk.shape[2], chunk.shape[1])
            chunk = even(chunk)
            for frame in chunk:
                encoder.send(np.ascontiguousarray(frame))
    finally:
        if encoder is not None:
            encoder.close()  # waits for ffmpeg to finish the file


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


def writer(fmt: str):
    return {"mp4": write_mp4, "gif": write_gif, "webp": write_webp, "png": write_png}[fmt]
