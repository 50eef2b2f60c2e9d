"""Frame-quality measures in plain torch: PSNR and SSIM per frame."""

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB of uint8 frames [F, H, W, 3]; inf where frames are identical."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-frame SSIM (Wang et al. 2004) of uint8 frames [F, H, W, 3]: Gaussian window, per channel, averaged.
    The Gaussian blur runs as two 1-D passes in float32, a frame at a time: the same window as the 2-D one, and
    seconds rather than minutes for 25 frames at 1024x576 on a CPU."""
    side = min(a.shape[1:3])
    window = min(window, side if side % 2 else side - 1)  # odd, and no larger than the frame
    coords = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).float().to(a.device)
    rows, cols = g.view(1, 1, window, 1).expand(3, 1, window, 1), g.view(1, 1, 1, window).expand(3, 1, 1, window)

    def blur(t):
        return F.conv2d(F.conv2d(t, rows, groups=3), cols, groups=3)

    c1, c2 = 0.01**2, 0.03**2
    scores = []
    for fa, fb in zip(a, b, strict=True):
        x, y = (f.permute(2, 0, 1).unsqueeze(0).float() / 255.0 for f in (fa, fb))  # [1, 3, H, W]
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        scores.append(s.double().mean())
    return torch.stack(scores)


def drift(frames: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far `frames` moved from `reference` (both uint8 [F, H, W, 3]): PSNR and SSIM, mean and worst frame."""
    p, s = psnr(frames, reference), ssim(frames, reference)
    finite = p[torch.isfinite(p)]
    return {
        "psnr_mean_db": finite.mean().item() if len(finite) else float("inf"),
        "psnr_worst_db": p.min().item(),
        "ssim_mean": s.mean().item(),
        "ssim_worst": s.min().item(),
    }
