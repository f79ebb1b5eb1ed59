"""sd-webui-controlnet ``annotator/annotator_path.py``: the annotator models folder (set by the stand-in's
installer; the real one reads the ``control_net_modules_path`` option or defaults to ``annotator/downloads``)."""

models_path = ""
