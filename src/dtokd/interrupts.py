"""Stopping a command cleanly on SIGINT, SIGTERM and SIGHUP, and holding a run folder alone.

A time limit, a job scheduler and a closed terminal stop a process with SIGTERM or SIGHUP, not
only SIGINT (Ctrl-C). Inside :func:`stop_on_signals` all three raise :class:`Interrupted` (a
``KeyboardInterrupt``), so a run stops at the same consistent point whichever arrives: the last
atomic checkpoint is kept and the command says how to resume. SIGINT is handled even where the
process was started with it ignored (a background job of a non-interactive shell, ``nohup``):
without that, Ctrl-C or a time limit's SIGINT would do nothing.

:func:`deferred_stop` is for code that must not be cut between two statements (starting a child
process and recording it): inside it the signals are only noted, and the caller polls
:attr:`StopRequest.signal` at the points where it can stop. :func:`uninterrupted` runs a block to
its end and delivers a signal that came meanwhile after it: for code that takes a lock the rest of
the shutdown needs (TensorBoard's event queue: a ``KeyboardInterrupt`` raised while its lock is
held left the lock taken, and closing the writer then waited for it forever).

:func:`hold_folder` takes an exclusive lock on a run folder (``run.lock``, released by the
operating system when the process ends, however it ends), so two processes never write one
folder at once; :func:`release_folder` lets go of it and empties the file, so that
:func:`folder_holder` can tell, without locking, which live process holds a folder;
:func:`exclusive` waits its turn for a shared cache entry instead of refusing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LOCK_FILE = "run.lock"


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGINT, SIGTERM or SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` inside the block (the previous
    handlers, an ignored SIGINT included, are restored after it)."""
    previous = {s: signal.signal(s, _raise) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopRequest:
    """The first stop signal received inside :func:`deferred_stop` (None while none came)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.signal = self.signal or signum


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Run the block to its end; a stop signal received inside is delivered again after it, to
    whatever handler was in place (raised as :class:`Interrupted` inside :func:`stop_on_signals`,
    ignored where it was ignored). Outside the main thread, where no handler can be set, the block
    just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    request: StopRequest | None = None
    try:
        with deferred_stop() as request:
            yield
    finally:  # after an error in the block too
        if request is not None and request.signal is not None:
            signal.raise_signal(request.signal)


@contextlib.contextmanager
def deferred_stop() -> Iterator[StopRequest]:
    """Inside the block a stop signal is noted in the yielded :class:`StopRequest` instead of
    raising; the caller decides where to stop."""
    request = StopRequest()
    previous = {s: signal.signal(s, request._note) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def hold_folder(folder: Path) -> IO[str]:
    """Lock ``folder`` (created if missing) for this process; returns the open lock file, which
    holds the lock until it is closed or the process ends. Raises ``FileExistsError`` naming
    the process that holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            handle.close()
            raise
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FileExistsError(
            f"{folder} is in use by another dtokd process (pid {holder}); wait for it to end or "
            "stop it before running in this folder"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def release_folder(handle: IO[str]) -> None:
    """Let go of a folder held by :func:`hold_folder`, its lock file emptied first (so that it
    names no process: :func:`folder_holder`)."""
    handle.seek(0)
    handle.truncate()
    handle.close()


def folder_holder(folder: Path) -> str | None:
    """The pid that ``folder``'s lock file (:func:`hold_folder`) names, if that process is alive,
    else None (a lock let go by :func:`release_folder` names none). It takes no lock (a probe
    that did could make a run starting at that moment refuse the folder); a process that died
    holding the folder and whose pid was reused since is its one false positive."""
    try:
        named = (folder / LOCK_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    if not named.isdigit():
        return None
    try:
        os.kill(int(named), 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return named


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created, with its folder, if missing) for the
    block, waiting while another process holds it: for work that many processes may start at
    once and only one should do (extracting an archive into a shared cache). The operating
    system releases it if the process dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
