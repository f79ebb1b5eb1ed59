"""A stand-in for ``omegaconf.OmegaConf.load``: the fake configs are JSON, which is valid YAML."""

import json


class DictConfig(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def _wrap(v):
    if isinstance(v, dict):
        return DictConfig({k: _wrap(x) for k, x in v.items()})
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


class OmegaConf:
    @staticmethod
    def load(path):
        with open(path, encoding="utf8") as f:
            return _wrap(json.load(f))
