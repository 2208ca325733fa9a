"""Cleanups that an interrupt cannot cut short.

attndrift promises that a model is restored bit-exactly and left without hooks, also when the
user presses Ctrl-C. A ``finally`` block is not enough: the KeyboardInterrupt can land *inside*
the cleanup (e.g. halfway through removing hooks or copying weights back) and abort it.
:func:`complete` runs a cleanup to its end whatever interrupts it, then re-raises the first
interrupt; on POSIX it also keeps SIGINT and SIGTERM pending while the cleanup runs. And the
interrupt can land on the very first line of a ``finally`` block, before any cleanup is
called: :func:`on_exit` calls it from two nested ``finally`` blocks. ``tests/test_faults.py``
interrupts editing at hundreds of random lines and checks that nothing is left behind.
"""

import _signal  # the C functions: signal.pthread_sigmask is Python (an interrupt could land in it)
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_MAIN_THREAD = threading.main_thread().ident
_DEFERRED = {signal.SIGINT, signal.SIGTERM}


def complete(cleanup: Callable[[], object]) -> None:
    """Run ``cleanup`` until it finishes, even if an interrupt lands inside it.

    ``cleanup`` must be safe to call again after a partial run (idempotent). A
    KeyboardInterrupt (or SystemExit) raised during it is held back and raised once the
    cleanup has finished. On POSIX (main thread) SIGINT and SIGTERM stay pending while it
    runs; the signal mask is set and restored by C calls inside the retried block, so an
    interrupt at any line cannot leave the signals blocked.
    """
    pending: BaseException | None = None
    old: set | None = None
    done = False
    mask = hasattr(_signal, "pthread_sigmask") and threading.get_ident() == _MAIN_THREAD
    while True:
        try:
            if mask and old is None:
                old = _signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
            if not done:
                cleanup()
                done = True
            if old is not None:
                _signal.pthread_sigmask(signal.SIG_SETMASK, old)
            break
        except (KeyboardInterrupt, SystemExit) as e:
            pending = pending or e
    if pending is not None:
        try:
            raise pending
        finally:
            pending = None  # no frame -> exception -> traceback -> frame cycle


@contextmanager
def on_exit(cleanup: Callable[[], object]) -> Iterator[None]:
    """Run ``cleanup`` (idempotent) when the block exits, however it exits.

    An interrupt may land anywhere, also on the first line of a ``finally`` block, before the
    cleanup is even called; so the cleanup is called from two nested ``finally`` blocks (the
    second runs it only if the first did not finish) and each call is :func:`complete`. (An
    interrupt inside ``contextlib``'s own ``__exit__`` leaves the generator suspended: Python
    closes it, running the cleanup, when the interrupt's traceback is released.)
    """
    finished: list[bool] = []

    def run() -> None:
        if not finished:
            cleanup()
            finished.append(True)

    try:
        try:
            yield
        finally:
            complete(run)
    finally:
        complete(run)


@contextmanager
def grad_mode_kept() -> Iterator[None]:
    """torch's grad mode back to what it was on entry when the block exits: a ``no_grad``
    block cannot restore it when an interrupt lands in its own exit."""
    grad = torch.is_grad_enabled()
    with on_exit(lambda: torch.set_grad_enabled(grad)):
        yield


def keeps_grad_mode(fn: Callable) -> Callable:
    """Decorator: ``fn`` leaves torch's grad mode as it found it, also after an interrupt."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with grad_mode_kept():
            return fn(*args, **kwargs)

    return wrapper
