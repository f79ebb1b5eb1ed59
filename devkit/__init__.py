"""Pure-torch stand-ins for the models the WebUIs run: tiny (and full-shape) UNets with the real ldm/sgm key
layout, text encoders with the real names, a flow DiT, k-diffusion-style denoiser wrappers and samplers.

Used by the tests, the benchmark and the fidelity study; nothing here imports a WebUI or downloads weights.
"""
