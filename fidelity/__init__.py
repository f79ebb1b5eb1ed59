"""A transfer-fidelity study of Delta Sampling on a procedurally generated world.

Small pixel-space diffusion models of different architectures and parameterisations are trained on seeded images
of coloured shapes; a LoRA and a LoHa are fine-tuned on the source base only (red shapes, striped shapes), and
Delta Sampling, driven through ``lib_delta.guidance`` exactly as a host drives it, carries them to the other
models. Everything is regenerated from seeds; nothing is downloaded. ``python -m fidelity.run --help``.
"""
