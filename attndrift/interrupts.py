"""Cleanups that an interrupt cannot cut short.

attndrift promises that a model is restored bit-exactly and left without hooks, also when the
user presses Ctrl-C. A ``finally`` block is not enough: the KeyboardInterrupt can land *inside*
the cleanup (e.g. halfway through removing hooks or copying weights back) and abort it.
:func:`complete` runs a cleanup to its end whatever interrupts it, then re-raises the first
interrupt; on POSIX it also keeps SIGINT and SIGTERM pending while the cleanup runs.
"""

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT / SIGTERM stay pending (delivered afterwards) inside the block (POSIX, main
    thread); elsewhere a no-op."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not (
        threading.main_thread()
    ):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def complete(cleanup: Callable[[], object]) -> None:
    """Run ``cleanup`` until it finishes, even if an interrupt lands inside it.

    ``cleanup`` must be safe to call again after a partial run (idempotent). A
    KeyboardInterrupt (or SystemExit) raised during it is held back and raised once the
    cleanup has finished.
    """
    pending: BaseException | None = None
    with _signals_deferred():
        while True:
            try:
                cleanup()
                break
            except (KeyboardInterrupt, SystemExit) as e:
                pending = pending or e
    if pending is not None:
        raise pending
