"""SVD-XT's temporal convolutions (k x 1 x 1 Conv3d) against the same sums in other forms (time_conv).

Three measurements on random weights in bfloat16, eager (no torch.compile), each the median of `--repeats`
timed calls after one warm-up:
  convs:  one convolution alone at each shape SVD-XT runs at 1024x576 (UNet levels: 25 frames; VAE decoder
          levels: 8 frames, a decode chunk): nn.Conv3d as diffusers ships it, the same with channels_last_3d
          weights and input, and animate_cli.time_conv.TimeConv;
  unet:   one UNet call, batch 1, 25 frames, with the stock Conv3d, time_conv = "conv2d" and "channels_last";
  decode: the 25-frame VAE decode in chunks of 8, likewise.
Prints a line per row; --json writes them all with the largest difference from the stock result.

    python benchmarks/svd_time_conv.py --json time-conv.json [--parts convs,unet,decode]
"""

import argparse
import json
import statistics
import time

import torch

from animate_cli.time_conv import TimeConv, apply_channels_last, apply_time_conv

# (where, channels, frames, height, width, calls per video at 25 frames): a temporal res block has two convs
SHAPES = (
    ("unet level 0", 320, 25, 72, 128, 8 * 10),  # 8 steps x 5 blocks x 2 convs
    ("unet level 1", 640, 25, 36, 64, 8 * 10),
    ("unet level 2", 1280, 25, 18, 32, 8 * 10),
    ("decoder full size", 128, 8, 576, 1024, 25 / 8 * 6),  # chunks x 3 blocks x 2 convs
    ("decoder 1/2", 256, 8, 288, 512, 25 / 8 * 6),
    ("decoder 1/4", 512, 8, 144, 256, 25 / 8 * 6),
)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    times, out = [], None
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def convs(device, repeats: int, scale: int) -> list[dict]:
    rows = []
    for where, c, f, h, w, calls in SHAPES:
        h, w = max(1, h // scale), max(1, w // scale)
        conv = torch.nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)).to(device, torch.bfloat16)
        x = torch.randn(1, c, f, h, w, device=device, dtype=torch.bfloat16)
        with torch.inference_mode():
            stock_s, stock = timed(lambda conv=conv, x=x: conv(x), repeats, device)
            fast_s, fast = timed(lambda m=TimeConv(conv), x=x: m(x), repeats, device)
            cl = torch.nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)).to(device, torch.bfloat16)
            cl.load_state_dict(conv.state_dict())
            cl.weight.data = cl.weight.data.contiguous(memory_format=torch.channels_last_3d)
            xl = x.contiguous(memory_format=torch.channels_last_3d)
            cl_s, _ = timed(lambda cl=cl, xl=xl: cl(xl), repeats, device)
        row = {"where": where, "shape": [1, c, f, h, w], "calls_per_video": calls, "conv3d_s": stock_s,
               "conv3d_channels_last_s": cl_s, "time_conv_s": fast_s,
               "max_abs_diff": (stock.float() - fast.float()).abs().max().item()}
        print(f"{where:18} {str(row['shape']):26} Conv3d {stock_s * 1e3:8.3f} ms  channels-last {cl_s * 1e3:8.3f} ms"
              f"  TimeConv {fast_s * 1e3:8.3f} ms", flush=True)
        rows.append(row)
    per_video = {k: sum(r[k] * r["calls_per_video"] for r in rows) for k in
                 ("conv3d_s", "conv3d_channels_last_s", "time_conv_s")}
    print(f"per video (calls x time): {', '.join(f'{k} {v:.3f} s' for k, v in per_video.items())}", flush=True)
    return rows + [{"where": "per video", **per_video}]


def whole(part: str, device, repeats: int, frames: int, width: int, height: int) -> list[dict]:
    from animate_cli.models import build_random
    from animate_cli.pipeline import decode

    rows, reference = [], None
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, frames, 4, height // 8, width // 8, generator=g, device=device)
    # the UNet's inputs, the same for every form
    x = torch.cat([latents, latents], dim=2).to(torch.bfloat16)
    embeds = torch.randn(1, 1, 1024, generator=g, device=device).to(torch.bfloat16)
    ids = torch.tensor([[6.0, 127.0, 0.02]], device=device, dtype=torch.bfloat16)
    t = torch.tensor([0.5], device=device)
    for variant in ("conv3d", "conv2d", "channels_last"):
        model = build_random("svd-xt", torch.bfloat16, device)  # the same weights (seed 0) for each form
        if part == "decode":
            model.unet = None
        target = model.vae if part == "decode" else model.unet
        replaced = {"conv3d": lambda m: 0, "conv2d": apply_time_conv, "channels_last": apply_channels_last}[
            variant](target)
        with torch.inference_mode():
            if part == "decode":
                seconds, out = timed(lambda model=model: decode(model, latents, 8), repeats, device)
            else:
                seconds, out = timed(lambda unet=model.unet: unet(
                    x, t, encoder_hidden_states=embeds, added_time_ids=ids, return_dict=False)[0], repeats, device)
        out = out.float()
        diff = None if reference is None else (out - reference).abs().max().item()
        reference = out if reference is None else reference
        row = {"part": part, "time_conv": variant, "median_s": seconds, "max_abs_diff": diff,
               "max_abs": reference.abs().max().item(), "replaced": replaced}
        print(f"{part:6} {variant}: {seconds:.4f} s" + ("" if diff is None else
              f" (max difference {diff:.3g}, largest value {row['max_abs']:.3g})"), flush=True)
        rows.append(row)
        model = target = None  # free the weights before the next form
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="convs,unet,decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", default="1024x576")
    parser.add_argument("--scale", type=int, default=1, help="divide the convs' heights and widths (CPU trials)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "dtype": "bfloat16",
              "repeats": args.repeats, "rows": []}
    for part in args.parts.split(","):
        if part == "convs":
            result["rows"] += convs(device, args.repeats, args.scale)
        else:
            result["rows"] += whole(part, device, args.repeats, args.frames, width, height)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
