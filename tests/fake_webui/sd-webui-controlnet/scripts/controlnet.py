"""sd-webui-controlnet ``scripts/controlnet.py``: the always-on ``Script`` ("ControlNet").

Its static ``detectmap_proc`` (fit a control map to a size: Just Resize, Crop and Resize, Resize and Fill, as a
``[1, 3, h, w]`` float tensor in [0, 1]) and ``get_target_dimensions``, and the user's own units: its script args
hold a list of unit dicts (``model``, ``image`` HWC uint8, ``module``, ``weight``, ``guidance_start``,
``guidance_end``, ``resize_mode``); ``process`` hooks the active model's UNet (``UnetHook``) and ``postprocess``
restores it, as ``controlnet_main_entry`` does. The WebUI loads this file as a module of its own name."""

import sys

import numpy as np
import torch
from modules import devices, scripts
from PIL import Image


def set_numpy_seed(p):
    seed = (int(p.seed) + int(getattr(p, "subseed", 0) or 0)) & 0xFFFFFFFF
    np.random.seed(seed)
    return seed


def get_pytorch_control(x):
    y = torch.from_numpy(x).float() / 255.0
    return y.permute(2, 0, 1)[None].clone().to(devices.device)


def _ext(name):
    return sys.modules[name]


class Script(scripts.Script):
    latest_network = None

    def title(self):
        return "ControlNet"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    @staticmethod
    def get_target_dimensions(p):
        h, w = p.height // 8 * 8, p.width // 8 * 8
        if getattr(p, "enable_hr", False):
            return h, w, int(p.height * p.hr_scale) // 8 * 8, int(p.width * p.hr_scale) // 8 * 8
        return h, w, h, w

    @staticmethod
    def detectmap_proc(detected_map, module, resize_mode, h, w):
        mode = _ext("internal_controlnet.external_code").resize_mode_from_value(resize_mode).value
        img = Image.fromarray(np.ascontiguousarray(detected_map).astype(np.uint8))
        old_w, old_h = img.size
        if mode == "Just Resize":
            out = np.asarray(img.resize((w, h), Image.BILINEAR))
        elif mode == "Crop and Resize":
            k = max(h / old_h, w / old_w)
            big = np.asarray(img.resize((max(w, round(old_w * k)), max(h, round(old_h * k))), Image.BILINEAR))
            top, left = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
            out = big[top:top + h, left:left + w]
        else:  # Resize and Fill
            k = min(h / old_h, w / old_w)
            small = np.asarray(img.resize((max(1, round(old_w * k)), max(1, round(old_h * k))), Image.BILINEAR))
            out = np.zeros((h, w, 3), dtype=np.uint8)
            top, left = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
            out[top:top + small.shape[0], left:left + small.shape[1]] = small
        out = np.ascontiguousarray(out.copy())
        return get_pytorch_control(out), out

    def process(self, p, units=(), *args):
        self._restore()
        _ext("scripts.ipadapter.plugable_ipadapter").clear_all_ip_adapter()  # as clear_all_secondary_control_models
        units = [u for u in (units or []) if u.get("enabled", True)]
        if not units:
            return
        gs = _ext("scripts.global_state")
        guess = _ext("scripts.controlnet_model_guess")
        pre_cls = _ext("scripts.supported_preprocessor").Preprocessor
        hook_mod = _ext("scripts.hook")
        unet = p.sd_model.model.diffusion_model
        h, w, hr_h, hr_w = self.get_target_dimensions(p)
        params, ips = [], []
        for u in units:
            from modules import sd_models

            built = guess.build_model_by_guess(sd_models.read_state_dict(gs.cn_models[u["model"]]), unet,
                                               gs.cn_models[u["model"]])
            pre = pre_cls.get_preprocessor(u.get("module", "none"))
            if built.type.name == "IPAdapter":
                embeds = pre.cached_call(u["image"]).value
                ips.append((built.model, embeds, u))
                continue
            set_numpy_seed(p)
            detected = pre.cached_call(u["image"], resolution=pre.slider_resolution.value,
                                       slider_1=pre.slider_1.value, slider_2=pre.slider_2.value).value
            mode = u.get("resize_mode", "Crop and Resize")
            hint, _ = self.detectmap_proc(detected, pre.name, mode, h, w)
            hr_hint = self.detectmap_proc(detected, pre.name, mode, hr_h, hr_w)[0] if (hr_h, hr_w) != (h, w) else None
            params.append(hook_mod.ControlParams(
                control_model=built.model, preprocessor={"name": pre.name}, hint_cond=hint, weight=u.get("weight", 1.0),
                guidance_stopped=False, start_guidance_percent=u.get("guidance_start", 0.0),
                stop_guidance_percent=u.get("guidance_end", 1.0), advanced_weighting=None,
                control_model_type=built.type, hr_hint_cond=hr_hint, global_average_pooling=False,
                soft_injection=False, cfg_injection=False))
        self.latest_network = hook_mod.UnetHook()
        self.latest_network.hook(model=unet, sd_ldm=p.sd_model, control_params=params, process=p)
        self.latest_unet = unet
        for ip, embeds, u in ips:
            ip.hook(model=unet, preprocessor_outputs=embeds, weight=u.get("weight", 1.0),
                    start=u.get("guidance_start", 0.0), end=u.get("guidance_end", 1.0))

    def postprocess(self, p, processed, *args):
        self._restore()
        _ext("scripts.ipadapter.plugable_ipadapter").clear_all_ip_adapter()

    def _restore(self):
        if self.latest_network is not None:
            self.latest_network.restore(self.latest_unet)
            self.latest_network = None
