"""Project-once cross-attention for SVD's UNetSpatioTemporalConditionModel.

The UNet gets one context per video, ctx [B, T, C] (T = 1 for SVD's CLIP image token), and
hands every cross-attention (attn2) copies of it, video-major (row n belongs to video n // r):
  spatial  attn2: ctx.repeat_interleave(F, 0)                          -> [B*F,   T, C]
  temporal attn2: frame-0 row per video, broadcast over h*w and reshaped -> [B*h*w, T, C]
Stock attention runs to_k/to_v on every copy. Here K/V are projected once per video:
  T == 1: softmax over one key is exactly 1, so every query gets to_out(to_v(ctx)):
          to_q and the attention are skipped.
  T > 1:  K/V once per video; the r copies' queries are folded into one sequence per
          video (they share K/V), so nothing is expanded before attention.
B (CFG halves count as videos) is read from the UNet's `sample` [B, F, C, H, W] by a forward
pre-hook. Outside a UNet call, or whenever the shapes or settings are not the expected ones,
the stock processor runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

STOCK = (AttnProcessor, AttnProcessor2_0)


@dataclass
class VideoCount:
    n: int | None = None  # videos in the UNet call in flight; None -> stock attention


class ProjectOnceAttnProcessor:
    def __init__(self, videos: VideoCount, stock=None, check: bool = False):
        self.videos = videos  # shared by all processors of one UNet, set by its pre-hook
        self.stock = stock if stock is not None else AttnProcessor2_0()
        self.check = check  # verify the rows really are copies (costs a device sync per call)
        self.calls = {"fast": 0, "general": 0, "stock": 0}

    def count(self, path: str) -> None:
        # Not while compiling: dynamo would guard on the counter and recompile at every call.
        if not torch.compiler.is_compiling():
            self.calls[path] += 1

    def copies(self, attn: Attention, x, ctx, mask) -> int | None:
        """Rows of ctx per video (r) if the project-once path is exact here, else None."""
        b = self.videos.n
        if b is None or ctx is None or mask is not None or x.ndim != 3 or ctx.ndim != 3:
            return None
        norms = (attn.spatial_norm, attn.group_norm, attn.norm_cross, attn.norm_q, attn.norm_k)
        if attn.training or not attn.scale_qk or any(m is not None for m in norms):
            return None
        n = ctx.shape[0]
        if b <= 0 or n % b or x.shape[0] != n:
            return None
        r = n // b
        grouped = ctx.reshape(b, r, *ctx.shape[1:])  # [B, r, T, C]
        if self.check and not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
            return None
        return r

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw
    ):
        x, ctx = hidden_states, encoder_hidden_states  # [N, L, D], [N, T, C]
        r = self.copies(attn, x, ctx, attention_mask)
        if r is None:
            self.count("stock")
            return self.stock(attn, x, ctx, attention_mask, temb, *a, **kw)
        n, seq, _ = x.shape
        b = n // r
        ctx = ctx[::r]  # [B, T, C] one row per video
        if ctx.shape[1] == 1:
            self.count("fast")
            out = attn.to_out[1](attn.to_out[0](attn.to_v(ctx)))  # [B, 1, D]
            out = out.repeat_interleave(r, 0).expand(n, seq, -1)  # [N, L, D], stride 0 over L
        else:
            self.count("general")
            h = attn.heads
            q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)  # [N, L, inner], [B, T, inner] x2
            d = k.shape[-1] // h
            q = q.reshape(b, r * seq, h, d).transpose(1, 2)  # [B, H, r*L, d]
            k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (k, v))  # [B, H, T, d]
            o = F.scaled_dot_product_attention(q, k, v)  # [B, H, r*L, d]
            o = o.transpose(1, 2).reshape(n, seq, h * d).to(q.dtype)
            out = attn.to_out[1](attn.to_out[0](o))  # [N, L, D]
        if attn.residual_connection:
            out = out + x
        if attn.rescale_output_factor != 1:
            out = out / attn.rescale_output_factor
        return out


def _cross_attentions(unet):
    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def apply_project_once_attention(unet, check: bool = False) -> int:
    """Put ProjectOnceAttnProcessor on every cross-attention running a stock processor; returns how many."""
    restore_stock_attention(unet)
    videos, count = VideoCount(), 0
    for m in _cross_attentions(unet):
        if type(m.processor) in STOCK:
            m.set_processor(ProjectOnceAttnProcessor(videos, m.processor, check))
            count += 1

    def enter(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        videos.n = sample.shape[0] if isinstance(sample, torch.Tensor) and sample.ndim == 5 else None

    def leave(module, args, output):
        videos.n = None

    unet._project_once_hooks = (
        unet.register_forward_pre_hook(enter, with_kwargs=True),
        unet.register_forward_hook(leave, always_call=True),
    )
    return count


def restore_stock_attention(unet) -> int:
    """Put back the processors that apply_project_once_attention replaced; returns how many."""
    count = 0
    for m in _cross_attentions(unet):
        if isinstance(m.processor, ProjectOnceAttnProcessor):
            m.set_processor(m.processor.stock)
            count += 1
    for hook in getattr(unet, "_project_once_hooks", ()):
        hook.remove()
    unet._project_once_hooks = ()
    return count
