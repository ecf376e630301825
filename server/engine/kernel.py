"""The engine's compiled kernel (`_kernel.c`): whether this install has it, and the switch.

`pip install -e .` builds `_kernel` from `server/engine/_kernel.c` (setup.py); the build is
optional, so an install without a C compiler still works and the engine runs the
pure-Python reference (`kv.BlockPool`, `tokens.TokenSource`'s numpy draws) with the same
results, only slower: `notice()` says so once on stderr. `MEMORYWALL_PURE_PYTHON=1` picks
the reference even where the kernel is built (tests compare the two with `use`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

compiled: ModuleType | None
try:
    from memorywall.server.engine import _kernel as compiled
except ImportError:  # not built: no compiler at install time, or a source tree never installed
    compiled = None

ENV = "MEMORYWALL_PURE_PYTHON"
_enabled = compiled is not None and os.environ.get(ENV, "") in ("", "0")
_noticed = False


def enabled() -> bool:
    """Whether engines built from now on use the compiled kernel."""
    return _enabled


@contextmanager
def use(on: bool) -> Iterator[None]:
    """Build engines with (True) or without (False) the kernel inside the block; raises
    RuntimeError for True where it is not built."""
    global _enabled
    if on and compiled is None:
        raise RuntimeError("the compiled kernel is not built")
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def status() -> str:
    """One line on which path the engine takes, for `memorywall doctor`-style reports."""
    if _enabled:
        return "compiled kernel: on (server/engine/_kernel.c)"
    if compiled is not None:
        return f"compiled kernel: off ({ENV} is set): pure-Python reference, same results"
    return (
        "compiled kernel: not built: pure-Python reference, same results, several times "
        "slower offline (reinstall with a C compiler: pip install -e .)"
    )


def notice() -> None:
    """Say once per process, on stderr, when the kernel is absent (not when switched off)."""
    global _noticed
    if compiled is None and not _noticed:
        _noticed = True
        print(f"memorywall: {status()}", file=sys.stderr)
