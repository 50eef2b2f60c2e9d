"""ProjectOnceAttnProcessor against diffusers' stock attention, on a tiny SVD UNet (CPU, float32)."""

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from animate_cli.attention import (
    ProjectOnceAttnProcessor,
    VideoCount,
    apply_project_once_attention,
    restore_stock_attention,
)

FRAMES, CTX_DIM = 4, 32
RTOL = 1e-5  # max |out - stock| <= RTOL * max |stock|: float32 rounding of reordered matmuls


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
        layers_per_block=2,
        cross_attention_dim=CTX_DIM,
        num_attention_heads=(2, 4),
        num_frames=FRAMES,
    ).eval()


def inputs(videos, tokens, cfg):
    """UNet kwargs for `videos` videos; cfg doubles the batch as [zeros context, context] (pipeline CFG)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(videos, FRAMES, 8, 16, 16, generator=g)
    ctx = torch.randn(videos, tokens, CTX_DIM, generator=g)  # distinct per video: a wrong layout shows
    ids = torch.randn(videos, 3, generator=g)
    if cfg:
        x, ctx, ids = torch.cat([x, x]), torch.cat([torch.zeros_like(ctx), ctx]), torch.cat([ids, ids])
    return {"sample": x, "timestep": torch.tensor(10.0), "encoder_hidden_states": ctx, "added_time_ids": ids}


def run(unet, kw, positional=False):
    """positional: sample and timestep passed positionally, as the SVD pipeline does."""
    args = (kw["sample"], kw["timestep"]) if positional else ()
    kw = {k: v for k, v in kw.items() if k not in ("sample", "timestep")} if positional else kw
    with torch.no_grad():
        return unet(*args, **kw).sample


def processors(unet):
    return [p for p in unet.attn_processors.values() if isinstance(p, ProjectOnceAttnProcessor)]


def assert_close(out, ref):
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert err <= RTOL * scale, (err, scale)


def test_apply_counts_cross_attention_and_restore_is_stock(unet):
    kw = inputs(2, 1, cfg=False)
    ref = run(unet, kw)
    cross = [n for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]
    assert all(n.endswith("attn2") for n in cross)
    # 2 down + 1 mid + 3 up transformers, each with a spatial and a temporal attn2
    assert len(cross) == 12
    assert apply_project_once_attention(unet) == 12
    assert apply_project_once_attention(unet) == 12  # idempotent: re-applies over itself
    assert len(processors(unet)) == 12
    assert restore_stock_attention(unet) == 12
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert torch.equal(run(unet, kw), ref)


@pytest.mark.parametrize("videos,cfg", [(2, False), (2, True)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_unet_matches_stock(unet, tokens, videos, cfg):
    kw = inputs(videos, tokens, cfg)
    ref = run(unet, kw)
    to_q_calls = []
    hooks = [
        m.to_q.register_forward_hook(lambda *a: to_q_calls.append(1))
        for m in unet.modules()
        if isinstance(m, Attention) and m.is_cross_attention
    ]
    try:
        apply_project_once_attention(unet, check=True)  # verify each call's rows are video-major copies
        out = run(unet, kw, positional=cfg)
        calls = [p.calls for p in processors(unet)]
    finally:
        restore_stock_attention(unet)
        for h in hooks:
            h.remove()
    assert_close(out, ref)
    assert all(c["stock"] == 0 for c in calls)  # no call fell back (layout as expected at both call sites)
    if tokens == 1:
        assert all(c["fast"] == 1 and c["general"] == 0 for c in calls)
        assert not to_q_calls  # fast path skips to_q
    else:
        assert all(c["general"] == 1 and c["fast"] == 0 for c in calls)
        assert len(to_q_calls) == 12


def test_outside_unet_call_falls_back(unet):
    apply_project_once_attention(unet)
    try:
        attn = next(m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
        x, ctx = torch.randn(4, 5, attn.to_q.in_features), torch.randn(4, 1, CTX_DIM)
        with torch.no_grad():
            out = attn(x, encoder_hidden_states=ctx)
        assert attn.processor.calls == {"fast": 0, "general": 0, "stock": 1}
        with torch.no_grad():
            assert torch.equal(out, AttnProcessor2_0()(attn, x, ctx))
    finally:
        restore_stock_attention(unet)


def single(**kw):
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, **kw).eval()


@pytest.mark.parametrize("kw", [{}, {"residual_connection": True, "rescale_output_factor": 2.0}])
def test_single_attention_fast_path_exact(kw):
    attn, videos, r = single(**kw), 3, 5
    x = torch.randn(videos * r, 7, 16)
    ctx = torch.randn(videos, 1, 12).repeat_interleave(r, 0)  # [videos*r, 1, C], video-major copies
    proc = ProjectOnceAttnProcessor(VideoCount(videos))
    with torch.no_grad():
        ref, out = AttnProcessor2_0()(attn, x, ctx), proc(attn, x, ctx)
    assert proc.calls["fast"] == 1
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_single_attention_general_path():
    attn, videos, r = single(), 2, 4
    x = torch.randn(videos * r, 7, 16)
    ctx = torch.randn(videos, 3, 12).repeat_interleave(r, 0)
    proc = ProjectOnceAttnProcessor(VideoCount(videos))
    with torch.no_grad():
        ref, out = AttnProcessor2_0()(attn, x, ctx), proc(attn, x, ctx)
    assert proc.calls["general"] == 1
    assert_close(out, ref)


def test_single_attention_falls_back_when_rows_are_not_copies():
    attn = single()
    x, ctx = torch.randn(6, 7, 16), torch.randn(6, 1, 12)  # 6 distinct rows, but told 2 videos
    proc = ProjectOnceAttnProcessor(VideoCount(2), check=True)
    with torch.no_grad():
        ref, out = AttnProcessor2_0()(attn, x, ctx), proc(attn, x, ctx)
    assert proc.calls == {"fast": 0, "general": 0, "stock": 1}
    assert torch.equal(out, ref)
    proc.videos.n = 4  # 6 rows cannot hold 4 videos' copies: shapes alone force the fallback
    with torch.no_grad():
        proc(attn, x, ctx)
    assert proc.calls["stock"] == 2
