"""modules.scripts: the Script base class and the runner's guarded dispatch of always-on scripts."""

from __future__ import annotations

from modules import errors

AlwaysVisible = object()


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None
    api_info = None
    sorting_priority = 0

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def post_sample(self, p, ps, *args):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        return f"script_{self.title().lower().replace(' ', '_')}_{item_id}"


_HOOKS = ("before_process", "process", "before_process_batch", "process_batch", "process_before_every_sampling",
          "before_hr", "post_sample", "postprocess_batch", "postprocess")


class ScriptRunner:
    """Calls each always-on script's overridden hook with its slice of ``p.script_args``; errors are printed
    and swallowed, as in the WebUI."""

    def __init__(self, scripts):
        self.alwayson_scripts = list(scripts)
        for s in self.alwayson_scripts:
            s.alwayson = True

    def _run(self, name, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            if getattr(type(script), name, None) is getattr(Script, name, None):
                continue
            try:
                args = p.script_args[script.args_from:script.args_to]
                getattr(script, name)(p, *extra, *args, **kwargs)
            except Exception:
                errors.report(f"Error running {name}: {script.filename}", exc_info=True)

    def __getattr__(self, name):
        if name in _HOOKS:
            return lambda p, *extra, **kwargs: self._run(name, p, *extra, **kwargs)
        raise AttributeError(name)

    def on_mask_blend(self, p, mba):
        pass
