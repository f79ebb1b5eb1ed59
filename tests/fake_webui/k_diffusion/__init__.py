"""Stand-in for the pinned ``k_diffusion`` package: ``external`` wrappers and ``sampling`` functions."""

from k_diffusion import external, sampling  # noqa: F401
