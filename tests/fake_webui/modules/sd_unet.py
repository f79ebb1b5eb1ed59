"""modules.sd_unet: the global ``sd_hijack.hijack`` sets, and the alternative-UNet switch (None: off)."""

original_forward = None
current_unet = None
current_unet_option = None
