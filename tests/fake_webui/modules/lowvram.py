"""modules.lowvram: the flags and the one-module-on-the-GPU bookkeeping (the CPU runs never swap)."""

from modules import shared

module_in_gpu = None


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to("cpu")
    module_in_gpu = None


def is_needed(sd_model):
    opts = shared.cmd_opts
    return opts.lowvram or opts.medvram or (opts.medvram_sdxl and hasattr(sd_model, "conditioner"))


def is_enabled(sd_model):
    return getattr(sd_model, "lowvram", False)
