"""The MP4 write stage with x264 presets: seconds, file size and PSNR against the frames written.

Three 25-frame clips at 1024x576: `noise` (uniform random pixels, what random-weight models produce), `smooth`
(random 72x128 frames upsampled bilinearly) and `pan` (a slow zoom and pan over examples/coffee.jpg, like real
output). Each written at CRF 15 (`--quality 70`, the default) with imageio's ffmpeg, as animate_cli.media does;
the median of three writes is reported. PSNR is read back from the file (yuv420p caps it near 42 dB).

    python benchmarks/x264_presets.py --presets medium,veryfast,ultrafast

--x264-params 'A;B' writes each clip once per set of x264 options as well (';' between sets, an empty set is
x264's own for the preset: ';sliced-threads=1' compares the two). --pace SECONDS writes the clips as a run does
instead, through animate_cli.media.VideoStream, one frame every SECONDS (the decoder's pace), and reports the wait
after the last frame: what the streamed write adds to a run once the frames are decoded.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image

from animate_cli import media


def clips() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    noise = (torch.rand(25, 576, 1024, 3) * 255).to(torch.uint8).numpy()
    smooth = torch.nn.functional.interpolate(torch.rand(25, 3, 72, 128), size=(576, 1024), mode="bilinear")
    smooth = smooth.permute(0, 2, 3, 1).mul(255).to(torch.uint8).contiguous().numpy()
    image = Image.open(Path(__file__).parent.parent / "examples" / "coffee.jpg").convert("RGB")
    w, h = image.size
    pan = []
    for i in range(25):
        s = 1 + 0.01 * i
        cw, ch = int(w / s), int(h / s)
        x, y = (w - cw) // 2 + i, (h - ch) // 2
        pan.append(np.array(image.crop((x, y, x + cw, y + ch)).resize((1024, 576), Image.BICUBIC)))
    return {"noise": noise, "smooth": smooth, "pan": np.stack(pan)}


def psnr(path: Path, frames: np.ndarray) -> float:
    reader = imageio.get_reader(path, format="FFMPEG")
    back = []
    for frame in reader:
        back.append(frame)
        if len(back) == len(frames):
            break
    reader.close()
    mse = ((np.stack(back).astype(np.float32) - frames.astype(np.float32)) ** 2).mean()
    return float(10 * np.log10(255**2 / mse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="medium,veryfast,ultrafast")
    parser.add_argument("--quality", type=int, default=70)
    parser.add_argument("--x264-params", default="", help="';'-separated sets of x264 options ('' = none)")
    parser.add_argument("--pace", type=float, default=None, metavar="SECONDS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="x264-") as scratch:
        run(args, Path(scratch))


def run(args: argparse.Namespace, folder: Path) -> None:
    for name, frames in clips().items():
        for preset in args.presets.split(","):
            for i, extra in enumerate(args.x264_params.split(";")):
                media.X264_PRESET, media.X264_PARAMS = preset, extra or None
                path = folder / f"{name}-{preset}-{i}.mp4"
                times = [write(frames, path, args.quality, args.pace) for _ in range(3)]
                what = "wait after the last frame" if args.pace is not None else "write"
                print(f"{name:6} {preset:9} {extra or '-':28} {what} {statistics.median(times):.3f} s  "
                      f"{path.stat().st_size / 1e6:6.2f} MB  PSNR {psnr(path, frames):.2f} dB", flush=True)


def write(frames: np.ndarray, path: Path, quality: int, pace: float | None) -> float:
    """Seconds to write the whole clip (pace None), or from the last frame given to the file in place."""
    if pace is None:
        start = time.perf_counter()
        media.write_mp4(frames, path, 7, quality)
        return time.perf_counter() - start
    with media.VideoStream(path, "mp4", 7, quality, size=(frames.shape[2], frames.shape[1])) as stream:
        for i, frame in enumerate(frames):
            if i:
                time.sleep(pace)
            stream.append(frame[None])
        start = time.perf_counter()
        stream.close()
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
