"""SIGTERM (what SLURM and Kubernetes send before preempting a job) and SIGINT (Ctrl-C).

Inside `deferred()` (training, generation) a signal is only recorded: training saves a step checkpoint
at the next step boundary, generation stops between batches, and either raises `Stopped`. Outside it,
SIGINT raises KeyboardInterrupt as usual and, once `install()` ran, SIGTERM raises `Stopped` at once.
main_fractalgen.py prints a `Stopped` as one line and exits with `EXIT_CODES` (128 + the signal's
number, what a shell reports for a process the signal killed)."""
import contextlib
import os
import signal
import threading

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
SIGNALS = tuple(EXIT_CODES)

_deferring = False
_received = None


class Stopped(BaseException):
    """A stop signal, acted on at a safe point (or at once outside `deferred()`). Like KeyboardInterrupt it
    is not an Exception, so that code catching bad data (an image that does not decode, a failed download)
    never takes a stop for it."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 1)


def name(signum):
    return signal.Signals(signum).name


def _on_signal(signum, frame):
    global _received
    if _deferring and _received is None:
        _received = signum
        if os.environ.get("RANK", "0") == "0":
            hint = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            os.write(2, f"{name(signum)} received: stopping at the next safe point{hint}\n".encode())
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(signum, f"stopped by {name(signum)}")


def install():
    """SIGTERM raises Stopped at once outside `deferred()` (instead of killing the process silently)."""
    signal.signal(signal.SIGTERM, _on_signal)


def requested():
    """The stop signal received inside `deferred()` (a signal number), or 0."""
    return _received or 0


@contextlib.contextmanager
def deferred():
    """Record SIGTERM and SIGINT instead of acting on them; the code inside checks `requested()` at its
    safe points. Previous handlers come back afterwards (signals can only be handled in the main thread)."""
    global _deferring, _received
    if _deferring or threading.current_thread() is not threading.main_thread():  # nested: the outer one rules
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _deferring, _received = True, None
    for s in SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        _deferring, _received = False, None
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_in_worker(worker_id=None):
    """DataLoader workers ignore stop signals: the main process decides when to stop, and its workers end
    with it (a Ctrl-C reaches the whole process group, and a worker it killed would fail the next batch)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
