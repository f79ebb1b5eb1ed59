"""k_diffusion.sampling: the devkit's samplers under k-diffusion's names and signatures (``disable`` accepted)."""

import torch

from devkit import sampling as _s
from devkit.sampling import get_sigmas_karras  # noqa: F401


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return _s.sample_euler(model, x, sigmas, extra_args, callback)


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0):
    return _s.sample_euler_ancestral(model, x, sigmas, extra_args, callback, eta=eta,
                                     generator=torch.Generator().manual_seed(1234))


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return _s.sample_heun(model, x, sigmas, extra_args, callback)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return _s.sample_dpmpp_2m(model, x, sigmas, extra_args, callback)
