"""The benchmark's models: devkit UNets with random weights, their conditioning, and the LoRA files on the source.

Full size on a GPU (fp16 weights, sampled under fp16 autocast as the WebUIs do), or the tiny presets on the CPU
(fp32) for ``--toy``. Text encoders are not needed: the conditioning is random tensors of the real shapes.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from devkit.denoisers import Cond, EpsDenoiser
from devkit.families import fill_zero_tensors
from devkit.ldm_unet import UNetModel, build_unet
from lib_delta.lora import DeltaPatch, LoraFile, LoraUse, build_patch, read_lora
from tests.lora.lorakit import Change, lokr_parts, lora_parts, unet_key, write_file

FAMILY_LABELS = {"sd1": "SD1.5", "sdxl": "SDXL"}
ADAPTERS = {"lora": "LoRA rank 32", "lokr": "LoKr factor 8"}
SEEDS = {("sd1", "source"): 1, ("sdxl", "target"): 2, ("sd1", "target"): 3}


@dataclass(frozen=True)
class Pair:
    """A source → target pairing at one image size."""

    key: str
    source: str
    target: str
    px: int
    latent: int  # latent side; px / 8 at full size, smaller for --toy

    @property
    def label(self) -> str:
        return f"{FAMILY_LABELS[self.source]} → {FAMILY_LABELS[self.target]}, {self.px} px"


FULL_PAIRS = (
    Pair("sd15-sdxl-512", "sd1", "sdxl", 512, 64),
    Pair("sd15-sdxl-1024", "sd1", "sdxl", 1024, 128),
    Pair("sd15-sd15-512", "sd1", "sd1", 512, 64),
)
TOY_PAIRS = (
    Pair("sd15-sdxl-512", "sd1", "sdxl", 512, 8),
    Pair("sd15-sdxl-1024", "sd1", "sdxl", 1024, 16),
    Pair("sd15-sd15-512", "sd1", "sd1", 512, 8),
)


@dataclass
class Env:
    """Where and how the models run."""

    toy: bool
    device: torch.device
    second: torch.device | None  # a second GPU for the source, when there is one

    @staticmethod
    def detect(toy: bool) -> Env:
        if toy or not torch.cuda.is_available():
            return Env(True, torch.device("cpu"), torch.device("cpu"))
        second = torch.device("cuda", 1) if torch.cuda.device_count() > 1 else None
        return Env(False, torch.device("cuda", 0), second)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.toy else torch.float16

    @property
    def size(self) -> str:
        return "tiny" if self.toy else "full"

    @property
    def tokens(self) -> int:
        return 8 if self.toy else 77

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def devices(self) -> list[torch.device]:
        return [d for d in dict.fromkeys([self.device, self.second]) if d is not None]

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """As the WebUI samples: no autograd, fp16 autocast on the GPU."""
        with torch.inference_mode():
            if self.cuda:
                with torch.autocast("cuda", dtype=torch.float16):
                    yield
            else:
                yield

    def sync(self) -> None:
        if self.cuda:
            for d in self.devices:
                torch.cuda.synchronize(d)


def nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def conditioning(unet: UNetModel, rows: int, tokens: int, seed: int, device: torch.device) -> Cond:
    """Random stand-ins for the text encoders' output, rows ``[cond, uncond]`` (SDXL: with its 2816 vector)."""
    g = torch.Generator(device).manual_seed(seed)
    cfg = unet.config
    ctx = torch.randn(rows, tokens, cfg.context_dim, generator=g, device=device)
    if cfg.adm_in_channels:
        return {"crossattn": ctx, "vector": torch.randn(rows, cfg.adm_in_channels, generator=g, device=device)}
    return ctx


def lora_targets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """kohya's default LoRA targets: the transformer blocks' linears and the transformers' proj_in/proj_out."""
    found = []
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and (".transformer_blocks." in name
                                                      or name.endswith(("proj_in", "proj_out"))):
            found.append((name, m))
    return found


def write_adapter(unet: nn.Module, kind: str, folder: Path) -> LoraFile:
    """A kohya-keyed file written with the tests' LoRA writer and read back through lib_delta.lora."""
    g = torch.Generator().manual_seed(11 if kind == "lora" else 12)
    changes = []
    for name, m in lora_targets(unet):
        w = m.weight.detach()
        if kind == "lora":
            parts = lora_parts(g, w, rank=32, alpha=8.0)  # ΔW·x about 13 % of W·x: a strong style LoRA
        else:
            parts = lokr_parts(g, w, factor=8, w2_low=False)  # LyCORIS "full matrix" LoKr: dense after kron
        changes.append(Change("unet", name, unet_key(name), parts))
    return read_lora(write_file(folder, f"bench_{kind}.safetensors", changes))


@dataclass
class Models:
    """Every UNet, LoRA file, patch and merged copy the run needs, built once and shared between pairs."""

    env: Env
    _unets: dict = field(default_factory=dict)
    _loras: dict = field(default_factory=dict)
    _patches: dict = field(default_factory=dict)
    _merged: dict = field(default_factory=dict)
    _folder: tempfile.TemporaryDirectory = field(default_factory=tempfile.TemporaryDirectory)

    def unet(self, family: str, role: str, device: torch.device | None = None, dtype: torch.dtype | None = None
             ) -> UNetModel:
        """The model of ``role``; ``dtype=torch.float32`` gives the same weights before their fp16 rounding."""
        device, dtype = device or self.env.device, dtype or self.env.dtype
        key = (family, role, device, dtype)
        if key not in self._unets:
            if role == "source" and device != self.env.device:  # the same weights on the second GPU
                self._unets[key] = self._copy(self.unet(family, role, dtype=dtype)).to(device)
            else:
                seed = SEEDS[family, role]
                torch.manual_seed(seed)
                unet = build_unet(family, self.env.size, device=device)
                fill_zero_tensors(unet, torch.Generator(device).manual_seed(seed + 7919))
                self._unets[key] = unet.to(dtype).eval().requires_grad_(False)
        return self._unets[key]

    def denoiser(self, unet: nn.Module) -> EpsDenoiser:
        return EpsDenoiser(unet).to(next(unet.parameters()).device)

    def lora(self, kind: str) -> LoraFile:
        if kind not in self._loras:
            self._loras[kind] = write_adapter(self.unet("sd1", "source"), kind, Path(self._folder.name))
        return self._loras[kind]

    def patch(self, kind: str, device: torch.device | None = None) -> DeltaPatch:
        """The functional LoRA on the source UNet (on ``device``'s copy of it)."""
        device = device or self.env.device
        if (kind, device) not in self._patches:
            self._patches[kind, device] = build_patch({"unet": self.unet("sd1", "source", device)}, "sd1",
                                                      [[LoraUse(self.lora(kind))]])
        return self._patches[kind, device]

    def _copy(self, unet: UNetModel) -> UNetModel:
        ids = {id(m) for m in unet.modules()}
        if any(p.attached and ids & {id(m) for m in p.modules} for p in self._patches.values()):
            raise RuntimeError("detach the LoRA patch before copying its model: a copy keeps the patched forwards")
        return copy.deepcopy(unet)

    def merged(self, kind: str, dtype: torch.dtype | None = None) -> UNetModel:
        """A second copy of the source with the LoRA merged into its weights (the reference scheme's model)."""
        dtype = dtype or self.env.dtype
        if (kind, dtype) not in self._merged:
            unet = self._copy(self.unet("sd1", "source", dtype=dtype))
            build_patch({"unet": unet}, "sd1", [[LoraUse(self.lora(kind))]]).merge_into(0)
            self._merged[kind, dtype] = unet
        return self._merged[kind, dtype]


def latent(pair: Pair, sigma: Tensor, device: torch.device, seed: int = 5) -> Tensor:
    g = torch.Generator(device).manual_seed(seed)
    return torch.randn(1, 4, pair.latent, pair.latent, generator=g, device=device) * sigma
