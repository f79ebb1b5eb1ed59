"""modules.sd_samplers: the sampler list and construction."""

from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion, *sd_samplers_timesteps.samplers_data_timesteps]
all_samplers_map = {x.name: x for x in all_samplers}


def find_sampler_config(name):
    return all_samplers_map.get(name) if name is not None else all_samplers[0]


def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
