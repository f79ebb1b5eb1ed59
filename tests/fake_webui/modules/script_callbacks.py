"""modules.script_callbacks: the per-step callback parameter classes and their dispatch.

As in the WebUI, each callback runs inside ``try/except Exception`` that only reports the error, and
``clear_callbacks`` (run when scripts reload) empties every list.
"""

from __future__ import annotations

import inspect
from collections import namedtuple

from modules import errors

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


callback_map = {
    "callbacks_cfg_denoiser": [],
    "callbacks_cfg_denoised": [],
    "callbacks_cfg_after_cfg": [],
    "callbacks_ui_settings": [],
    "callbacks_script_unloaded": [],
    "callbacks_model_loaded": [],
}


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


def add_callback(callbacks, fun, *, name=None, category="unknown"):
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"
    callbacks.append(ScriptCallback(filename, fun, name or f"{filename}/{category}"))


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def _dispatch(key, job, *args):
    for c in list(callback_map[key]):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, job)


def cfg_denoiser_callback(params):
    _dispatch("callbacks_cfg_denoiser", "cfg_denoiser_callback", params)


def cfg_denoised_callback(params):
    _dispatch("callbacks_cfg_denoised", "cfg_denoised_callback", params)


def cfg_after_cfg_callback(params):
    _dispatch("callbacks_cfg_after_cfg", "cfg_after_cfg_callback", params)


def model_loaded_callback(sd_model):
    _dispatch("callbacks_model_loaded", "model_loaded_callback", sd_model)


def script_unloaded_callback():
    for c in reversed(callback_map["callbacks_script_unloaded"]):
        try:
            c.callback()
        except Exception:
            report_exception(c, "script_unloaded")


def on_cfg_denoiser(callback, *, name=None):
    add_callback(callback_map["callbacks_cfg_denoiser"], callback, name=name, category="cfg_denoiser")


def on_cfg_denoised(callback, *, name=None):
    add_callback(callback_map["callbacks_cfg_denoised"], callback, name=name, category="cfg_denoised")


def on_cfg_after_cfg(callback, *, name=None):
    add_callback(callback_map["callbacks_cfg_after_cfg"], callback, name=name, category="cfg_after_cfg")


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")
