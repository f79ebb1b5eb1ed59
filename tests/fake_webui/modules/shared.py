"""modules.shared: options, job state and the active model."""

from types import SimpleNamespace

from modules import devices

OPTION_DEFAULTS = {
    "enable_quantization": False,
    "skip_early_cond": 0.0,
    "s_min_uncond_all": False,
    "use_old_scheduling": False,
    "batch_cond_uncond": True,
    "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False,
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0,
    "CLIP_stop_at_last_layers": 1,
    "disable_mmap_load_safetensors": False,
    "refiner_switch_by_sample_steps": False,
    "img2img_fix_steps": False,
    "hires_fix_refiner_pass": "second pass",
}


class Options(SimpleNamespace):
    """Attribute access to settings; unknown settings raise AttributeError like the WebUI's Options."""

    def reset(self):
        self.__dict__.clear()
        self.__dict__.update(OPTION_DEFAULTS)


opts = Options(**OPTION_DEFAULTS)
cmd_opts = SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=False, no_half=True, ckpt_dir=None,
                           disable_safe_unpickle=False, no_hashing=False, do_not_download_clip=False)


class State:
    def __init__(self):
        self.reset()

    def reset(self):
        self.interrupted = False
        self.skipped = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.job = ""


state = State()
device = devices.device
weight_load_location = None
sd_model = None  # the active model; in the WebUI a property over sd_models.model_data
parallel_processing_allowed = True
