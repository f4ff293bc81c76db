"""The public names and the error tree."""
from __future__ import annotations

import errno
import importlib.metadata
import inspect

import anyio
import pytest

import aiofabric
from aiofabric import errors

ERROR_CLASSES = [
    obj for _, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
]


@pytest.mark.parametrize("name", aiofabric.__all__)
def test_every_public_name_exists(name: str) -> None:
    assert getattr(aiofabric, name) is not None


def test_all_has_no_duplicates_and_covers_the_errors() -> None:
    assert len(set(aiofabric.__all__)) == len(aiofabric.__all__)
    assert set(errors.__all__) <= set(aiofabric.__all__)
    assert {c.__name__ for c in ERROR_CLASSES} == set(errors.__all__)


def test_version_matches_the_distribution() -> None:
    assert aiofabric.__version__ == importlib.metadata.version("aiofabric")


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_is_a_fabric_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, aiofabric.FabricError)
    assert getattr(aiofabric, cls.__name__) is cls


@pytest.mark.parametrize("name", ["ClosedResourceError", "BrokenResourceError", "BusyResourceError"])
def test_resource_errors_are_also_anyio_errors(name: str) -> None:
    ours, theirs = getattr(aiofabric, name), getattr(anyio, name)
    assert ours is not theirs
    assert issubclass(ours, theirs) and issubclass(ours, aiofabric.FabricError)
    with pytest.raises(theirs):
        raise ours("x")


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(aiofabric.ProtocolError, ValueError)
    with pytest.raises(ValueError):
        raise aiofabric.ProtocolError("bad bytes")


def test_completion_errors() -> None:
    assert issubclass(aiofabric.RemoteAccessError, aiofabric.CompletionError)
    e = aiofabric.CompletionError("write", 5, 7)
    assert (e.errno, e.prov_errno, str(e)) == (5, 7, "write")
    assert isinstance(errors.completion_error("w", errno.ECONNRESET, 0, "reset"), aiofabric.BrokenResourceError)
    e = errors.completion_error("w", errno.EACCES, 3, "denied")
    assert isinstance(e, aiofabric.RemoteAccessError) and (e.errno, e.prov_errno) == (errno.EACCES, 3)
    e = errors.completion_error("w", errno.EIO, 0, "io")
    assert type(e) is aiofabric.CompletionError and "errno 5" in str(e)
