"""Forge's sampler guard: a failure while sampling closes the generation's run and goes on as an exception FastAPI
answers itself (status, message, the ways to make room): Forge's catch-all handler answers any other exception and
then re-raises it, and the server drops the client's connection.
FastAPI is not among the test dependencies: a stand-in of its ``HTTPException`` (starlette's signature) is put in
its place."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lib_delta.hosts.common.http import OUT_OF_MEMORY_WAY_OUT
from lib_delta.hosts.forge import guard as forge_guard


class HTTPException(Exception):  # starlette.exceptions.HTTPException, which fastapi re-exports
    def __init__(self, status_code: int, detail: str | None = None, headers: dict | None = None) -> None:
        self.status_code, self.detail, self.headers = status_code, detail, headers


@pytest.fixture
def fastapi(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", types.SimpleNamespace(HTTPException=HTTPException))


class Sampler:  # a pass's sampler: both of its entry points raise what the sampling met
    def __init__(self, error: Exception) -> None:
        self.error = error

    def sample(self, *args, **kwargs):
        raise self.error

    def sample_img2img(self, *args, **kwargs):
        raise self.error


def _guarded(error: Exception) -> tuple[Sampler, list]:
    closed: list = []
    sampler = Sampler(error)
    forge_guard.guard(sampler, lambda: closed.append(True))
    return sampler, closed


@pytest.mark.parametrize("entry", ["sample", "sample_img2img"])
def test_out_of_memory_is_answered_with_its_message_and_the_way_out(fastapi, entry):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 MiB.")
    sampler, closed = _guarded(oom)
    with pytest.raises(HTTPException) as caught:
        getattr(sampler, entry)()
    e = caught.value
    assert closed == [True]
    assert isinstance(e, torch.OutOfMemoryError) and type(e).__name__ == "OutOfMemoryError"  # as the UI names it
    assert e.status_code == 500 and e.detail.startswith("CUDA out of memory.") and OUT_OF_MEMORY_WAY_OUT in e.detail
    assert str(e) == e.detail and e.__cause__ is oom


def test_another_failure_is_answered_as_a_500_naming_it(fastapi):
    sampler, closed = _guarded(ValueError("an extension's hook failed"))
    with pytest.raises(HTTPException) as caught:
        sampler.sample()
    assert closed == [True] and isinstance(caught.value, ValueError)
    assert caught.value.status_code == 500 and caught.value.detail == "an extension's hook failed"


class Unrebuildable(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(f"{code}: {why}")


def test_a_type_that_cannot_be_rebuilt_goes_on_as_it_is(fastapi):
    error = Unrebuildable(7, "out of memory in a plug-in")
    sampler, closed = _guarded(error)
    with pytest.raises(Unrebuildable) as caught:
        sampler.sample()
    assert caught.value is error and closed == [True]
    assert error.status_code == 500 and OUT_OF_MEMORY_WAY_OUT in error.detail


def test_without_fastapi_the_exception_goes_on_unchanged_but_answerable(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fails: outside a WebUI
    error = RuntimeError("CUDA out of memory")
    sampler, closed = _guarded(error)
    with pytest.raises(RuntimeError) as caught:
        sampler.sample()
    assert caught.value is error and closed == [True] and error.status_code == 500
