"""The sampler of one pass, guarded: whatever raises while it samples closes the generation's run at once.

Forge skips the scripts' ``postprocess`` when sampling raises (an out-of-memory error, another extension's failure),
so without this the run, its cloned UNet and its source would wait for the next generation. The patches are
attributes of that one sampler instance, removed by :func:`unguard`.

The exception goes on as one of its own type that FastAPI answers itself (``common.http.as_http_exception``): Forge's
catch-all handler answers any other exception (with the ``status_code`` and ``detail`` set here) and then re-raises it
to the server, which logs it as an error of the app and drops the client's connection.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from ..common.http import as_http_exception

_GUARDED = ("sample", "sample_img2img")
_MARK = "_delta_sampling_guarded"


def guard(sampler: Any, on_failure: Callable[[], None]) -> None:
    unguard(sampler)
    guarded = []
    for name in _GUARDED:
        original = getattr(sampler, name, None)
        if original is not None:
            setattr(sampler, name, _guarded(original, on_failure))
            guarded.append(name)
    vars(sampler)[_MARK] = tuple(guarded)


def unguard(sampler: Any) -> None:
    for name in vars(sampler).pop(_MARK, ()):
        vars(sampler).pop(name, None)


def _guarded(original: Callable, on_failure: Callable[[], None]) -> Callable:
    def sample(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except Exception as e:
            on_failure()
            answer = as_http_exception(e)
            try:
                if answer is e:
                    raise
                traceback.print_exception(type(e), e, e.__traceback__)  # the answer is not logged by the server
                raise answer from e
            finally:  # this frame would hold the answer, whose traceback holds the frame: the failed run with them
                del answer
        except BaseException:
            on_failure()
            raise

    return sample
