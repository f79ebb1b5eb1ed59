"""sd-webui-controlnet ``scripts/preprocessor/legacy/processor.py``: the CLIP-vision encoders in memory
(``clip_encoder``), loaded by ``clip`` on first use and dropped by ``unload_clip``."""

clip_encoder = {"clip_g": None, "clip_h": None, "clip_vitl": None}
loads = 0  # how many times an encoder was built (the tests count them)


def clip(img, res=512, config="clip_vitl", low_vram=False, **kwargs):
    global loads
    if clip_encoder[config] is None:
        import sys

        clip_encoder[config] = sys.modules["annotator.clipvision"].ClipVisionDetector(config, low_vram)
        loads += 1
    return clip_encoder[config](img), False


def unload_clip(config="clip_vitl"):
    if clip_encoder[config] is not None:
        clip_encoder[config].unload_model()
        clip_encoder[config] = None
