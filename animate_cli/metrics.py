"""Frame-quality measures in plain torch: PSNR and SSIM per frame."""

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB of uint8 frames [F, H, W, 3]; inf where frames are identical."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-frame SSIM (Wang et al. 2004) of uint8 frames [F, H, W, 3]: Gaussian window, per channel, averaged."""
    x, y = (t.double().permute(0, 3, 1, 2) / 255.0 for t in (a, b))  # [F, 3, H, W]
    side = min(x.shape[-2:])
    window = min(window, side if side % 2 else side - 1)  # odd, and no larger than the frame
    coords = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


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
