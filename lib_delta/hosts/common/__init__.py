"""What every host shares: name resolution, the source pool, the run slot, error shaping, safe file reading.

Nothing here imports a WebUI module at import time; functions that need one import it when called.
"""
