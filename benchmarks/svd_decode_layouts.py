"""The SVD-XT temporal VAE decode (random weights, bfloat16, eager) in a few memory layouts and cuDNN modes.

What the decode stage of `animate bench` could gain from outside the stock modules: NCHW as diffusers
ships it, channels-last (Conv2d weights channels_last, Conv3d weights channels_last_3d), and either with
cuDNN's autotuner on. Each variant decodes the same latents; prints the median of `--repeats` timed calls
after one warm-up and the largest difference from the first variant's frames.

    python benchmarks/svd_decode_layouts.py --frames 25 --size 1024x576 --chunk 8 --json decode.json
"""

import argparse
import json
import statistics
import time

import torch

from animate_cli.models import build_random
from animate_cli.pipeline import decode


def to_layout(vae: torch.nn.Module, channels_last: bool) -> None:
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Conv3d):
            fmt = torch.contiguous_format
            if channels_last:
                fmt = torch.channels_last if module.weight.dim() == 4 else torch.channels_last_3d
            module.weight.data = module.weight.data.contiguous(memory_format=fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", default="1024x576")
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_random("svd-xt", torch.bfloat16, device)
    model.unet = None  # only the VAE is timed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, args.frames, 4, height // 8, width // 8, generator=g, device=device)
    results, reference = [], None
    for channels_last in (False, True):
        to_layout(model.vae, channels_last)
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            times = []
            with torch.inference_mode():
                for i in range(args.repeats + 1):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    frames = decode(model, latents, args.chunk)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if i:
                        times.append(time.perf_counter() - start)
            if reference is None:
                reference = frames
            diff = (frames.int() - reference.int()).abs().max().item()
            row = {"channels_last": channels_last, "cudnn_benchmark": benchmark, "median_s": statistics.median(times),
                   "times_s": times, "max_abs_diff_uint8": diff}
            results.append(row)
            print(f"channels_last={channels_last!s:5} cudnn.benchmark={benchmark!s:5} "
                  f"{row['median_s']:.3f} s  (max |diff| {diff})", flush=True)
    torch.backends.cudnn.benchmark = False
    if args.json:
        info = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "torch": torch.__version__, "frames": args.frames, "size": args.size, "chunk": args.chunk,
                "repeats": args.repeats, "rows": results}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
