"""Run by the WebUI at start-up and after "Install from URL".

Delta Sampling needs only what every WebUI already ships (torch, safetensors, numpy, gradio), so this installs
nothing. It only checks, and it never stops the WebUI from starting.
"""

try:
    import launch

    for _package in ("safetensors", "numpy"):
        if not launch.is_installed(_package):
            print(f"[Delta Sampling] '{_package}' is missing from the WebUI's environment; the extension needs it.")
except Exception as _e:  # an installer must never break the WebUI's start
    print(f"[Delta Sampling] install check skipped: {_e}")
