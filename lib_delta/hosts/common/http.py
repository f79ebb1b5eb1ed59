"""How a failure leaves the extension: with the status and message the WebUI's API answers with.

A :class:`~lib_delta.errors.DeltaError` (a setting the user can fix) is a 422; anything unforeseen is a 500 whose
message names the exception. Nothing is swallowed: a generation that cannot have its delta stops.
"""

from __future__ import annotations

from ...errors import DeltaError

OUT_OF_MEMORY_WAY_OUT = ("The source model runs beside the active one: to make room, set CFG mode to cond (the "
                         "source's batch halves), lower the size or batch, or start the WebUI with --medvram.")


def out_of_memory(error: BaseException) -> bool:
    """Whether a failure is the GPU running out of memory (torch's error, or a message that says so)."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def _way_out(error: BaseException) -> str:
    """What to add to a failure's message: the ways to make room when it is the GPU's memory."""
    return f" {OUT_OF_MEMORY_WAY_OUT}" if out_of_memory(error) and OUT_OF_MEMORY_WAY_OUT not in str(error) else ""


def http_error(error: BaseException) -> BaseException:
    """Give an exception what the WebUIs' API handlers read: ``status_code`` and ``detail``."""
    if not hasattr(error, "status_code"):
        error.status_code = 422 if isinstance(error, DeltaError) else 500  # type: ignore[attr-defined]
    if not getattr(error, "detail", None):
        error.detail = f"{error}{_way_out(error)}"  # type: ignore[attr-defined]
    return error


def answered(error: BaseException) -> None:
    """:func:`http_error` for an exception that goes on as it is (a sampler's failure, raised again by the guard);
    one that takes no attributes is left alone."""
    try:
        http_error(error)
    except (AttributeError, TypeError):
        pass


def unexpected(error: BaseException, what: str = "failed") -> DeltaError:
    """An unforeseen failure inside Delta Sampling, as a 500 that names it (and, out of memory, the way out)."""
    wrapped = DeltaError(f"Delta Sampling {what}: {type(error).__name__}: {error}. The generation was stopped "
                         f"rather than finished without the delta.{_way_out(error)}")
    wrapped.status_code = 500  # type: ignore[attr-defined]
    wrapped.__cause__ = error
    return wrapped


def as_failure(error: BaseException) -> BaseException:
    """Any exception raised while preparing a generation, as the error that stops it (422 or 500)."""
    return http_error(error if isinstance(error, DeltaError) else unexpected(error))


def as_http_exception(error: BaseException) -> BaseException:
    """The same refusal as a FastAPI ``HTTPException`` too, where FastAPI is there.

    Forge's app leaves other exceptions to its catch-all handler, which answers and then re-raises to the server,
    which logs a traceback and drops the client's connection. An HTTPException is answered by FastAPI's own
    handler, ``{"detail": ...}`` with the status code, and goes no further. Outside a WebUI it stays as it is, and so
    does an exception that takes no attributes or whose type cannot be rebuilt from its message."""
    try:
        error = http_error(error)
        from fastapi import HTTPException
    except (ImportError, AttributeError, TypeError):
        return error
    if isinstance(error, HTTPException):
        return error
    try:
        class HTTPDeltaError(type(error), HTTPException):
            def __init__(self, original: BaseException) -> None:
                type(original).__init__(self, str(original))
                HTTPException.__init__(self, status_code=original.status_code, detail=original.detail)

            def __str__(self) -> str:  # the message alone, as DeltaError shows it (not HTTPException's "422: ...")
                return str(self.detail)

        HTTPDeltaError.__name__ = HTTPDeltaError.__qualname__ = type(error).__name__  # the UI prints the type's name
        refusal = HTTPDeltaError(error)
    except TypeError:  # a layout that cannot be combined, or a constructor that wants more than the message
        return error
    refusal.__cause__ = error.__cause__
    return refusal
