"""Per-step cost of Delta Sampling against its alternatives, on full-size UNets with random weights.

``python -m bench.run`` on a CUDA machine (``--toy`` on the CPU in seconds) drives the project's own core
(:class:`lib_delta.guidance.DeltaGuidance`, the functional LoRA of :mod:`lib_delta.lora`) with devkit's UNets and
writes docs/performance.md; see that page for what each scheme is.
"""
