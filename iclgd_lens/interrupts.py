"""Ctrl-C and SIGTERM that are never lost.

Python delivers a signal by raising KeyboardInterrupt at the next bytecode the main thread runs.
When that bytecode belongs to a destructor (a `__del__`, a weakref callback, both common inside
torch and transformers), the interpreter prints "Exception ignored in ..." and carries on: the
interrupt is lost, and a sweep or report runs to the end and exits 0 as if nobody had asked it to
stop. Under `handled()` the handler also remembers that the signal came, and `check()` raises it
again at the next safe point: between two sweep cells, before an output folder is put in place,
before the CLI says it finished.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_pending = False


def _interrupt(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def _quiet_swallowed(unraisable) -> None:
    """sys.unraisablehook: the KeyboardInterrupt a destructor swallowed is not printed as a
    traceback (`check()` raises it again); everything else goes to the previous hook."""
    if _pending and isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    _previous_hook(unraisable)


_previous_hook = sys.unraisablehook


def _forget_unhandled() -> None:
    """Clear CPython's record of an unhandled KeyboardInterrupt. A KeyboardInterrupt that leaves
    code run by `exec` of a string (dataclasses, namedtuples and many libraries make functions
    so) sets a flag that Python checks after it exits: under `python -m`, the process then ends
    by SIGINT (exit status -2) even though the interrupt was handled and `sys.exit(130)` called.
    Each `exec` of a string starts by clearing that flag and leaves it clear when it succeeds."""
    exec("None")


def check() -> None:
    """Raise KeyboardInterrupt if a signal came under `handled()` (also one a destructor swallowed)."""
    if _pending:
        raise KeyboardInterrupt


@contextmanager
def handled() -> Iterator[None]:
    """For the block, SIGINT and SIGTERM raise KeyboardInterrupt (SIGTERM unwinds like Ctrl-C, so
    temporary folders are removed) and are remembered for `check()`. Only in the main thread and
    only over Python's own defaults: handlers of a notebook kernel or of the caller are left alone.
    Nested blocks share the outermost one's handlers."""
    global _pending, _previous_hook
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            current = signal.getsignal(sig)
            if current is default:
                installed[sig] = current
                signal.signal(sig, _interrupt)
    if installed:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_swallowed
    try:
        yield
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)
        if installed:
            sys.unraisablehook = _previous_hook
            _pending = False
            _forget_unhandled()  # handled here: the exit status is the caller's (130), not SIGINT's


__all__ = ["check", "handled"]
