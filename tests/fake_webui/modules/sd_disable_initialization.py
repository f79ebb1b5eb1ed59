"""modules.sd_disable_initialization: build layers on the meta device, then take their weights from the state
dict (``assign``), converting dtypes by key prefix like the WebUI."""

import torch


class DisableInitialization:
    def __init__(self, disable_clip=True):
        self.disable_clip = disable_clip

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


class InitializeOnMeta:
    """Linear, Conv2d and MultiheadAttention are created on ``meta`` (as in the WebUI); the rest is created
    normally and overwritten by the state dict."""

    classes = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)

    def __enter__(self):
        self.saved = [(c, c.__init__) for c in self.classes]
        for cls, init in self.saved:
            def on_meta(module, *args, _init=init, **kwargs):
                kwargs["device"] = "meta"
                _init(module, *args, **kwargs)
            cls.__init__ = on_meta
        return self

    def __exit__(self, *args):
        for cls, init in self.saved:
            cls.__init__ = init
        return False


class LoadStateDictOnMeta:
    """As in the WebUI: a parameter still on ``meta`` is created with the *file's* dtype and filled from the state
    dict; existing parameters are copied into (keeping their dtype). ``weight_dtype_conversion`` changes only the
    copied value, so a model loaded from an fp16 file is fp16 where it was built on meta: callers cast afterwards.
    """

    def __init__(self, state_dict, device, weight_dtype_conversion=None):
        self.state_dict = state_dict
        self.device = device

    def __enter__(self):
        self.original = torch.nn.Module.load_state_dict
        device = self.device

        def load_state_dict(module, state_dict, strict=True, assign=False):
            for name, value in state_dict.items():
                owner_name, _, attr = name.rpartition(".")
                try:
                    owner = module.get_submodule(owner_name)
                except AttributeError:
                    continue
                if attr in owner._parameters and owner._parameters[attr] is not None:
                    param = owner._parameters[attr]
                    if param.is_meta:
                        owner._parameters[attr] = torch.nn.Parameter(value.to(device).clone(),
                                                                     requires_grad=param.requires_grad)
                    else:
                        param.data.copy_(value)
                elif attr in owner._buffers:
                    owner._buffers[attr] = value.to(device).clone()

        torch.nn.Module.load_state_dict = load_state_dict
        return self

    def __exit__(self, *args):
        torch.nn.Module.load_state_dict = self.original
        return False
