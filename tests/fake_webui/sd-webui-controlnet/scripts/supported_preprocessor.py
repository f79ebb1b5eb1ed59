"""sd-webui-controlnet ``scripts/supported_preprocessor.py``: the registry and ``cached_call``; a few of its
preprocessors (``none``, ``canny``, ``invert`` and ``shuffle`` need no model; ``depth_midas`` and ``inpaint_only``
stand for those Delta Sampling refuses); and the IP-Adapter encoders, legacy preprocessors that run a CLIP-vision
model (``ip-adapter_clip_sd15``, labelled ``ip-adapter_clip_h``; ``ip-adapter_clip_sdxl``, ``ip-adapter_clip_g``) and
the FaceID one, which needs insightface."""

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np


@dataclass
class PreprocessorParameter:
    minimum: float = 0.0
    maximum: float = 1.0
    value: float = 0.0
    visible: bool = True


class Preprocessor:
    name: str = ""
    slider_resolution = PreprocessorParameter(64, 2048, 512)
    slider_1 = PreprocessorParameter(visible=False)
    slider_2 = PreprocessorParameter(visible=False)
    returns_image: bool = True
    do_not_need_model = False
    calls: ClassVar[int] = 0

    all_processors: ClassVar[dict[str, "Preprocessor"]] = {}
    all_processors_by_name: ClassVar[dict[str, "Preprocessor"]] = {}

    class Result(NamedTuple):
        value: Any
        display_images: list

    @property
    def label(self):
        return self.name

    @classmethod
    def add_supported_preprocessor(cls, p):
        cls.all_processors[p.label] = p
        cls.all_processors_by_name[p.name] = p

    @classmethod
    def get_preprocessor(cls, name):
        return cls.all_processors.get(name, cls.all_processors_by_name.get(name, None))

    def cached_call(self, input_image, *args, **kwargs):
        Preprocessor.calls += 1
        result = self(input_image, *args, **kwargs)
        return Preprocessor.Result(value=result, display_images=[result if self.returns_image else input_image])


class PreprocessorNone(Preprocessor):
    name = "none"
    do_not_need_model = True

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, **kwargs):
        return input_image


class PreprocessorCanny(Preprocessor):
    name = "canny"
    do_not_need_model = True
    slider_1 = PreprocessorParameter(1, 255, 100)
    slider_2 = PreprocessorParameter(1, 255, 200)

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, **kwargs):
        # an edge map by gradient magnitude (the real one is cv2.Canny at `resolution`)
        g = input_image.astype(np.float32).mean(axis=2)
        gy, gx = np.gradient(g)
        mag = np.hypot(gx, gy) * 4
        return np.where(mag > slider_1, 255, 0).astype(np.uint8)[..., None].repeat(3, axis=2)


class PreprocessorInvert(Preprocessor):
    name = "invert"
    do_not_need_model = True

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, **kwargs):
        return 255 - input_image


class PreprocessorShuffle(Preprocessor):
    name = "shuffle"
    do_not_need_model = True

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, **kwargs):
        # draws from numpy's global generator, which the extension seeds from p before each call
        return input_image[np.random.permutation(input_image.shape[0])]


class PreprocessorDepth(Preprocessor):
    name = "depth_midas"

    def __call__(self, *args, **kwargs):
        raise RuntimeError("would download a depth model")


class PreprocessorInpaint(Preprocessor):
    name = "inpaint_only"

    def __call__(self, input_image, *args, **kwargs):
        return input_image


class PreprocessorClip(Preprocessor):
    """A legacy preprocessor: ``unload`` drops its model once it ran (``active_with_model``)."""

    returns_image = False

    def __init__(self, name, label, config):
        self.name, self._label, self.config = name, label, config
        self.active_with_model = False

    @property
    def label(self):
        return self._label

    def __call__(self, input_image, resolution=512, slider_1=None, slider_2=None, low_vram=False, **kwargs):
        import sys

        result, _ = sys.modules["scripts.preprocessor.legacy.processor"].clip(input_image, config=self.config,
                                                                              low_vram=low_vram)
        self.active_with_model = True
        return result

    def unload(self):
        if self.active_with_model:
            import sys

            sys.modules["scripts.preprocessor.legacy.processor"].unload_clip(self.config)
            self.active_with_model = False
            return True
        return False


class PreprocessorFaceId(Preprocessor):
    name = "ip-adapter_face_id"
    returns_image = False

    def __call__(self, *args, **kwargs):
        raise RuntimeError("would download insightface's face model")


for _p in (PreprocessorClip("ip-adapter_clip_sd15", "ip-adapter_clip_h", "clip_h"),
           PreprocessorClip("ip-adapter_clip_sdxl", "ip-adapter_clip_g", "clip_g"), PreprocessorFaceId()):
    Preprocessor.add_supported_preprocessor(_p)

for _p in (PreprocessorNone, PreprocessorCanny, PreprocessorInvert, PreprocessorShuffle, PreprocessorDepth,
           PreprocessorInpaint):
    Preprocessor.add_supported_preprocessor(_p())
