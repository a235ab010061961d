"""Clean interruption: SIGINT (Ctrl+C) and SIGTERM become KeyboardInterrupt, except inside
a critical section (writing a results row + avoid.txt + a result folder), where the signal
is held until the section ends, so bookkeeping is never left half-done.

    with GracefulInterrupts() as interrupts:
        ...
        with interrupts.critical():
            table.append(row); avoid.add(lr, model)
"""
import contextlib
import signal


class GracefulInterrupts:
    def __init__(self):
        self._depth = 0
        self._pending = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self._depth:
            self._pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
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
                raise KeyboardInterrupt(signal.Signals(signum).name)


class NoInterrupts:
    """Stand-in for library use and tests that drive the search without signal handlers."""

    @contextlib.contextmanager
    def critical(self):
        yield
