"""A host whose wall clock is off: every Python process started with this directory on
PYTHONPATH (a node and the workers it spawns) reads datetime.now() shifted by
SCXNN_TEST_CLOCK_AHEAD_SECONDS. Debian's faketime would be the real thing, but its 0.9.10 breaks
Python's timed waits (time.sleep fails with EINVAL once it leaves the monotonic clock alone,
Event.wait sleeps for the offset when it does not); the node's stored times all come from
datetime.now, so shifting it is the skew that matters."""

from __future__ import annotations

import copyreg
import datetime as _datetime_module
import os
from datetime import timedelta, tzinfo

_AHEAD = timedelta(seconds=float(os.environ.get("SCXNN_TEST_CLOCK_AHEAD_SECONDS", "0")))
_REAL = _datetime_module.datetime


class _AnyDatetime(type):
    # Code that imported the shifted class checks plain datetimes against it (pydicom's DT);
    # its own subclasses (DT itself) keep the usual checks.
    def __instancecheck__(cls, instance: object) -> bool:
        return type.__instancecheck__(_REAL if cls is _SkewedDatetime else cls, instance)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return type.__subclasscheck__(_REAL if cls is _SkewedDatetime else cls, subclass)


class _SkewedDatetime(_REAL, metaclass=_AnyDatetime):
    __slots__ = ()  # the C type's size: extension modules check it on import

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> _datetime_module.datetime:
        return _REAL.now(tz) + _AHEAD

    @classmethod
    def utcnow(cls) -> _datetime_module.datetime:
        return _REAL.now(_datetime_module.UTC).replace(tzinfo=None) + _AHEAD

    @classmethod
    def today(cls) -> _datetime_module.datetime:
        return _REAL.now() + _AHEAD


def _rebuild_datetime(*state: object) -> _datetime_module.datetime:
    return _REAL(*state)


def _reduce_datetime(value: _datetime_module.datetime) -> tuple[object, tuple[object, ...]]:
    # datetime.datetime now names the subclass, so pickle (multiprocessing) can no longer find
    # the real class by name; a plain datetime is rebuilt through this module instead.
    return _rebuild_datetime, value.__reduce__()[1]


if _AHEAD:
    _SkewedDatetime.__module__, _SkewedDatetime.__qualname__ = "datetime", "datetime"
    _SkewedDatetime.__name__ = "datetime"
    _datetime_module.datetime = _SkewedDatetime  # type: ignore[misc]
    copyreg.pickle(_REAL, _reduce_datetime)
