"""Delta Sampling for the Stable Diffusion WebUIs.

The core modules (``args``, ``schedule``, ``spaces``, ``guidance``, ``lora``) import torch only and never the
WebUI; host adapters live in ``lib_delta.hosts``.
"""
