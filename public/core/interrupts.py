"""Clean interruption: SIGINT (Ctrl+C) and SIGTERM become KeyboardInterrupt, except inside
a critical section (writing a results row + avoid.txt + a result folder), where the signal
is held until the section ends, so bookkeeping is never left half-done.

    with GracefulInterrupts() as interrupts:
        ...
        with interrupts.critical():
            table.append(row); avoid.add(lr, model)

The KeyboardInterrupt carries the signal's name ('SIGINT', 'SIGTERM'). Code that calls into
a library which catches a KeyboardInterrupt and raises a bare one of its own (Ray's C++
calls do: ray.wait, ray.get) restores the name with `named_interrupt(exc)`.
"""
import contextlib
import signal

_LAST = [None]           # the name of the signal a GracefulInterrupts turned into an interrupt


def last_interrupt():
    """The name of the signal ('SIGINT', 'SIGTERM') that an active GracefulInterrupts last
    turned into a KeyboardInterrupt, or None."""
    return _LAST[0]


def named_interrupt(exc):
    """exc (a KeyboardInterrupt) if it names its signal, else a KeyboardInterrupt named
    after the signal GracefulInterrupts last received (exc itself when there was none)."""
    if exc.args or _LAST[0] is None:
        return exc
    return KeyboardInterrupt(_LAST[0]).with_traceback(exc.__traceback__)


def _interrupt(signum):
    name = signal.Signals(signum).name
    _LAST[0] = name
    return KeyboardInterrupt(name)


class GracefulInterrupts:
    def __init__(self):
        self._depth = 0
        self._pending = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self._depth:
            self._pending = signum
            return
        raise _interrupt(signum)

    def __enter__(self):
        _LAST[0] = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        _LAST[0] = None
        return False

    @contextlib.contextmanager
    def critical(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending is not None:
                signum, self._pending = self._pending, None
                raise _interrupt(signum)


class NoInterrupts:
    """Stand-in for library use and tests that drive the search without signal handlers."""

    @contextlib.contextmanager
    def critical(self):
        yield
