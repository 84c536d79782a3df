"""Sizes in bytes as people write them: ``65536``, ``64K``, ``512KiB``, ``1.5 MiB``, ``1 PiB``.

Shared by every entry point that takes a size (the profiler's intervals, the command
line's ``--sample-interval``, the pytest marker's limits)."""

from __future__ import annotations

import re

__all__ = ["parse_size"]

# a number, then a unit letter with an optional B or iB, or B alone (bytes)
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?:(?P<unit>[kmgtp])(?:i?b)?|b)?", re.IGNORECASE)
_UNIT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str | int, *, allow_zero: bool = False) -> int:
    """A size in bytes from ``65536``, ``64K``, ``512KiB``, ``1M``, ``1.5 MiB``...

    Units are binary whatever their spelling (``K``, ``KB`` and ``KiB`` are all 1024 bytes).
    Returns a positive integer (or 0, with ``allow_zero``); raises ``ValueError`` with a
    readable message otherwise.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(str(text).strip())
        if match is None:
            if str(text).strip().startswith("-"):
                raise ValueError(f"{text!r} is negative; a size must be {'0 or ' if allow_zero else ''}"
                                 "a positive number of bytes")
            raise ValueError(f"invalid size {text!r}; use bytes or a binary unit (K, M, G, T, P), e.g. 65536, 64K, 512KiB, 1M")
        number, unit = match["number"], _UNIT[(match["unit"] or "").lower()]
        whole, _, frac = number.partition(".")
        # exact arithmetic: 1.5K is 1536 bytes, 1.5 (bytes) is not a size
        scaled = int(whole) * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        if frac and int(frac) * unit % 10 ** len(frac):
            raise ValueError(f"{text!r} is not a whole number of bytes")
        value = scaled
    if value < (0 if allow_zero else 1):
        raise ValueError(f"{text!r} is not a {'' if allow_zero else 'positive '}number of bytes")
    return value
