"""Where Delta Sampling meets the WebUI's interface, the same in every host: the panel, its infotext fields, the
settings page and the X/Y/Z axes. gradio and ``modules`` are imported inside functions only."""
