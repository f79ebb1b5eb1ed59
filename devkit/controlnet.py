"""A ControlNet with the module tree and state_dict keys of ``cldm.ControlNet`` (sd-webui-controlnet's
``scripts/cldm.py``), built on the encoder half of :mod:`devkit.ldm_unet`'s UNet.

The tiny presets pair with the tiny UNets: the same input blocks, so each of the ``len(input_blocks) + 1`` outputs
(one zero conv per input block, then the middle block's) has the shape of the skip or middle activation it is added
to. The hint block downsamples by 8 like the real one (pixel-space hint, latent-space output) with narrower convs
at the real key indices (``input_hint_block.{0,2,...,14}``).
"""

from __future__ import annotations

import torch
from torch import nn

from .ldm_unet import (
    PRESETS,
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    UNetConfig,
    timestep_embedding,
    zero_module,
)

TINY_HINT_WIDTHS = (8, 8, 16, 16, 16, 16, 32)
REAL_HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)


class ControlNet(nn.Module):
    def __init__(self, config: UNetConfig, hint_channels: int = 3, hint_widths: tuple[int, ...] = TINY_HINT_WIDTHS,
                 hint_halvings: int = 3):
        """``hint_halvings``: 3 for a latent-space UNet (the hint is the image, 8 pixels a latent cell), 0 for a
        pixel-space one (the hint at the UNet's own resolution)."""
        super().__init__()
        cfg = self.config = config
        mc = cfg.model_channels
        ted = mc * 4
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )
        hint: list[nn.Module] = []
        widths = (hint_channels, *hint_widths)
        for i in range(len(hint_widths)):
            stride = 2 if i in (2, 4, 6)[:hint_halvings] else 1  # three halvings: pixels to latent
            hint += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, stride=stride), nn.SiLU()]
        hint.append(zero_module(nn.Conv2d(widths[-1], mc, 3, padding=1)))
        self.input_hint_block = TimestepEmbedSequential(*hint)

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)

        def zero_conv(ch: int) -> nn.Module:
            return TimestepEmbedSequential(zero_module(nn.Conv2d(ch, ch, 1)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        self.zero_convs = nn.ModuleList([zero_conv(mc)])
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.zero_convs.append(zero_conv(ch))
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.zero_convs.append(zero_conv(ch))
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted), transformer(ch, cfg.transformer_depth[-1]), ResBlock(ch, ted)
        )
        self.middle_block_out = zero_conv(ch)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, **kwargs) -> list[torch.Tensor]:
        """cldm's forward: inputs cast to the model's dtype, outputs back to ``x``'s."""
        original = x.dtype
        x, hint, timesteps, context = (t.to(self.dtype) for t in (x, hint, timesteps, context))
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.dtype))
        guided_hint = self.input_hint_block(hint, emb, context)
        if self.config.adm_in_channels is not None:
            emb = emb + self.label_emb(y.to(self.dtype))
        outs, h = [], x
        for i, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = module(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return [o.to(original) for o in outs]


def build_controlnet(family: str, size: str = "tiny") -> ControlNet:
    """A ControlNet for ``PRESETS[family][size]``'s UNet; the full size has the real hint convs too."""
    return ControlNet(PRESETS[family][size], hint_widths=REAL_HINT_WIDTHS if size == "full" else TINY_HINT_WIDTHS)


def fill_zero_convs(net: ControlNet, generator: torch.Generator, scale: float = 1.0) -> ControlNet:
    """Random weights make a fresh ControlNet output exactly zero (its zero convs, and the resblock and proj_out
    tensors a default init zeroes): refill them with fan-in-scaled noise so that the control really moves the
    image."""
    from .families import fill_zero_tensors

    with torch.no_grad():
        fill_zero_tensors(net, generator, scale)
    return net
