"""Live progress of a search: events, the driver-side model, a tqdm view, a worker-side reporter.

Whoever runs a trial reports it as small events (plain, picklable dataclasses, so a Ray
worker can send them to the driver through a queue or an actor):

    TrialStarted(key, max_epochs, time)                         the trial begins training
    EpochDone(key, epoch, max_epochs, train_loss, val_loss, time)   an epoch finished
    TrialEnded(key, status, time)                               it finished (any status)
    PlanChanged(planned, skipped, label)                        the stage's plan: how many
                                                                trials, how many skipped so far

`time` is `time.time()` of whoever builds the event; only differences of times of one trial
are used (epoch and trial durations), so the clocks of worker and driver need not agree.

The driver feeds every event to `Progress.handle` (directly, or through
`ProgressView.handle`, which also redraws). `Progress` keeps one `TrialState` per running
trial and the stage's counts; `trial_line` and `overall_line` are pure functions that format
them (at most `width` columns, 100 by default):

    AFNet@0.003  epoch 4/30  loss 0.412/0.455  ETA ≤ 1m52s
    stage 1  trials 5/16 done (2 skipped)  2 running  elapsed 3m02s  ETA 4m10s

A trial's ETA is its mean epoch time so far times the epochs left, counted down since its
last event; early stopping may end it sooner, hence "≤". The stage's ETA is the mean wall
time of the trials finished so far times the trials left, less what the running ones have
already done, over the workers that can run them at once (None until a trial finishes).

`ProgressView` draws those lines with tqdm, one for the stage and one per running trial,
when its stream is a terminal, and nothing otherwise (the search's own per-trial log lines
remain); its `write(line)` prints a log line above the bars. `EpochReporter` is the
worker-side helper that builds the events and calls a pluggable `send(event)`, at most one
EpochDone per trial per `min_interval` seconds and never dropping the last epoch.

Standard library and tqdm only: no ATML imports.
"""
import io
import math
import os
import queue as _queue
import sys
import threading
import time as _time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from tqdm import tqdm

__all__ = ['TrialStarted', 'EpochDone', 'TrialEnded', 'PlanChanged', 'TrialState', 'Overall',
           'Progress', 'ProgressView', 'EpochReporter', 'trial_line', 'overall_line',
           'format_duration', 'format_loss', 'drain', 'WIDTH']

WIDTH = 100                  # the most columns a progress line takes
LE = '\u2264'                # "≤": the trial may stop early, sooner than its ETA
ELLIPSIS = '\u2026'          # "…": a key shortened to fit the width


# ---------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TrialStarted:
    """A trial begins training, for at most `max_epochs` epochs."""
    key: str
    max_epochs: int
    time: float = field(default_factory=_time.time)


@dataclass(frozen=True)
class EpochDone:
    """Epoch `epoch` (1-based) of `max_epochs` of trial `key` finished at `time`, with these
    mean train and validation losses (None when unknown)."""
    key: str
    epoch: int
    max_epochs: int
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    time: float = field(default_factory=_time.time)


@dataclass(frozen=True)
class TrialEnded:
    """Trial `key` finished: `status` is the search's word for how ('ok', 'failed',
    'pruned', 'diverged', ...). Both the worker and the driver may send one: a second one
    for a trial that is no longer running is ignored."""
    key: str
    status: str = 'ok'
    time: float = field(default_factory=_time.time)


@dataclass(frozen=True)
class PlanChanged:
    """The stage's plan: `planned` trials in all (skipped ones included), `skipped` of them
    decided as not to be run so far (avoid.txt, a target already met, a smaller candidate
    met first, ...). Absolute numbers, not increments; None leaves a number as it was.
    `label` (e.g. 'stage 1' or 'AFNet') starts the overall line; None leaves it."""
    planned: Optional[int] = None
    skipped: Optional[int] = None
    label: Optional[str] = None


EVENTS = (TrialStarted, EpochDone, TrialEnded, PlanChanged)


# ------------------------------------------------------------------------------- the model
@dataclass
class TrialState:
    """What the driver knows of one running trial. Event times (`t0`, `last`) are the
    sender's clock; `start_seen` and `seen` are the driver's clock when the trial's start
    and its latest event arrived. Epoch times are measured from (`t0`, `epoch0`): the
    trial's start, or the first epoch seen when its start was not."""
    key: str
    max_epochs: int = 0
    epoch: int = 0
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    started: Optional[float] = None       # TrialStarted.time, when seen
    t0: Optional[float] = None
    epoch0: int = 0
    last: Optional[float] = None          # EpochDone.time of the latest epoch
    start_seen: Optional[float] = None
    seen: Optional[float] = None

    def epoch_seconds(self):
        """Mean seconds per epoch so far, or None before an epoch could be timed."""
        if self.t0 is None or self.last is None or self.epoch <= self.epoch0:
            return None
        return max(0.0, self.last - self.t0) / (self.epoch - self.epoch0)

    def epochs_left(self):
        return max(0, self.max_epochs - self.epoch)

    def eta(self, now=None):
        """Seconds until the trial has trained all its epochs: mean epoch time so far x
        epochs left (capped by max epochs), less the time since its latest event when `now`
        (the driver's clock) is given. An upper bound: early stopping may end it sooner.
        None before the first epoch."""
        per_epoch = self.epoch_seconds()
        if per_epoch is None:
            return None
        left = per_epoch * self.epochs_left()
        if now is not None and self.seen is not None:
            left -= max(0.0, now - self.seen)
        return max(0.0, left)


@dataclass(frozen=True)
class Overall:
    """A snapshot of the stage. `finished` = trials that ended + skipped ones; `statuses`
    counts the ended ones by status; `eta` is None until a trial has finished."""
    label: str = ''
    planned: Optional[int] = None
    skipped: int = 0
    finished: int = 0
    running: int = 0
    statuses: dict = field(default_factory=dict)
    elapsed: Optional[float] = None
    eta: Optional[float] = None


class Progress:
    """The driver-side model of one stage's progress, fed with events by `handle(event)`.

    `workers`: how many trials can run at once (1 serial; the executor's worker count).
    `clock`: the driver's clock (time.time), injectable for tests. Events for a trial that
    has ended (a late EpochDone from a queue, a second TrialEnded) are ignored; a new
    TrialStarted for the same key starts it afresh (a retry)."""

    def __init__(self, workers=1, clock=_time.time, label=''):
        self.workers = max(1, int(workers or 1))
        self.clock = clock
        self.label = label
        self.planned = None
        self.skipped = 0
        self.running = {}                 # key -> TrialState, in start order
        self.statuses = Counter()         # trials that ended, by status
        self.durations = []               # wall seconds of the trials that ended
        self.ended = set()
        self.first_seen = None            # driver clock at the first event
        self.changes = 0                  # bumped when a trial starts or ends

    def handle(self, event):
        """Take one event into account. Anything but the four event types: TypeError."""
        now = self.clock()
        if self.first_seen is None:
            self.first_seen = now
        if isinstance(event, EpochDone):
            self._epoch(event, now)
        elif isinstance(event, TrialStarted):
            self.ended.discard(event.key)
            self.running.pop(event.key, None)
            self.running[event.key] = TrialState(
                key=event.key, max_epochs=int(event.max_epochs), started=event.time,
                t0=event.time, start_seen=now, seen=now)
            self.changes += 1
        elif isinstance(event, TrialEnded):
            self._ended(event)
        elif isinstance(event, PlanChanged):
            if event.planned is not None:
                self.planned = max(0, int(event.planned))
            if event.skipped is not None:
                self.skipped = max(0, int(event.skipped))
            if event.label is not None:
                self.label = event.label
        else:
            raise TypeError(f"not a progress event: {event!r}")

    def _epoch(self, event, now):
        state = self.running.get(event.key)
        if state is None:
            if event.key in self.ended:   # arrived after the trial's end: stale
                return
            # its start was not seen (the view opened late): time epochs from this one on
            state = self.running[event.key] = TrialState(
                key=event.key, t0=event.time, epoch0=int(event.epoch), start_seen=now)
            self.changes += 1
        elif event.epoch < state.epoch:   # out of order: keep the newer one
            return
        state.max_epochs = int(event.max_epochs)
        state.epoch = int(event.epoch)
        state.train_loss, state.val_loss = event.train_loss, event.val_loss
        state.last, state.seen = event.time, now

    def _ended(self, event):
        state = self.running.pop(event.key, None)
        if state is None and event.key in self.ended:
            return                        # the same run's second TrialEnded
        self.ended.add(event.key)
        self.statuses[event.status] += 1
        if state is not None and state.started is not None:
            self.durations.append(max(0.0, event.time - state.started))
        self.changes += 1

    @property
    def finished(self):
        """Trials decided so far: those that ended plus the skipped ones."""
        return sum(self.statuses.values()) + self.skipped

    def trial_seconds(self):
        """Mean wall seconds of the trials that ended so far (start to end), or None."""
        return sum(self.durations) / len(self.durations) if self.durations else None

    def stage_eta(self, now=None):
        """Seconds until all planned trials have finished: mean trial wall time so far x
        trials left (running ones included) / how many can run at once (the workers, or
        fewer when fewer are left). With `now` (driver clock) the time the running ones have
        already run is taken off, each at most one mean trial time. None until a trial has
        finished, or while the plan is unknown."""
        mean = self.trial_seconds()
        if mean is None or self.planned is None:
            return None
        left = max(0, self.planned - self.finished)
        if left == 0:
            return 0.0
        work = mean * left
        if now is not None:
            for state in self.running.values():
                if state.start_seen is not None:
                    work -= min(mean, max(0.0, now - state.start_seen))
        return max(0.0, work) / min(self.workers, left)

    def overall(self, now=None):
        """The stage's `Overall` snapshot (elapsed and the count-down need `now`)."""
        elapsed = (None if now is None or self.first_seen is None
                   else max(0.0, now - self.first_seen))
        return Overall(label=self.label, planned=self.planned, skipped=self.skipped,
                       finished=self.finished, running=len(self.running),
                       statuses=dict(self.statuses), elapsed=elapsed,
                       eta=self.stage_eta(now))


# ------------------------------------------------------------------------------ formatting
def format_duration(seconds):
    """'42s', '1m52s', '2h05m'; '--' for None (not known yet)."""
    if seconds is None or not math.isfinite(seconds):
        return '--'
    total = int(round(max(0.0, seconds)))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    minutes = (total + 30) // 60
    return f"{minutes // 60}h{minutes % 60:02d}m"


def format_loss(value):
    """A loss rounded for reading: '0.412', '12.3', '1.2e+04', 'nan', '-' for None."""
    if value is None:
        return '-'
    try:
        value = float(value)
    except (TypeError, ValueError):
        return '?'
    if math.isnan(value):
        return 'nan'
    if math.isinf(value):
        return 'inf' if value > 0 else '-inf'
    if abs(value) < 10:
        return f"{value:.3f}"
    if abs(value) < 1000:
        return f"{value:.1f}"
    return f"{value:.1e}"


def _shorten(text, limit):
    """`text` in at most `limit` characters, its middle replaced by '…': a key's end (the
    learning rate, '@0.003', kept whole when it fits) tells trials apart as much as its start."""
    if len(text) <= limit:
        return text
    if limit <= 1:
        return text[:max(0, limit)]
    tail = (limit - 1) // 2
    at = text.rfind('@')                  # 'Model@lr': keep the whole '@lr' when it fits
    if at > 0:
        tail = max(tail, min(len(text) - at, limit - 4))
    return text[:limit - 1 - tail] + ELLIPSIS + (text[-tail:] if tail else '')


def _fit(name, parts, width):
    """`name` then `parts`, two spaces apart, in at most `width` columns: the name is
    shortened first, then trailing parts dropped."""
    parts = [p for p in parts if p]
    while True:
        rest = ''.join('  ' + p for p in parts)
        room = width - len(rest)
        if room >= min(len(name), 12) or not parts:
            return (_shorten(name, max(room, 0)) + rest)[:width]
        parts.pop()


def trial_line(state, width=WIDTH, now=None):
    """One running trial in at most `width` columns, e.g.
    'AFNet@0.003  epoch 4/30  loss 0.412/0.455  ETA ≤ 1m52s' (losses: train/validation).
    `now` (driver clock) counts the ETA down since the trial's latest event."""
    total = state.max_epochs or '?'
    if state.epoch <= 0 and state.last is None:
        return _fit(state.key, [f"epoch 0/{total}", 'starting'], width)
    eta = state.eta(now)
    if state.max_epochs and state.epoch >= state.max_epochs:
        when = 'last epoch done'
    else:
        when = f"ETA {LE} {format_duration(eta)}"
    return _fit(state.key, [f"epoch {state.epoch}/{total}",
                            f"loss {format_loss(state.train_loss)}/{format_loss(state.val_loss)}",
                            when], width)


def overall_line(overall, width=WIDTH):
    """The stage in at most `width` columns, e.g.
    'stage 1  trials 5/16 done (2 skipped, 1 failed)  2 running  elapsed 3m02s  ETA 4m10s'.
    `overall` is a `Progress.overall()` snapshot (or a Progress, taken without a clock)."""
    if isinstance(overall, Progress):
        overall = overall.overall()
    planned = '?' if overall.planned is None else overall.planned
    notes = [f"{overall.skipped} skipped"] if overall.skipped else []
    notes += [f"{n} {status}" for status, n in sorted(overall.statuses.items())
              if n and status not in ('ok', 'done')]
    done = f"trials {overall.finished}/{planned} done" + (f" ({', '.join(notes)})" if notes else '')
    parts = [done, f"{overall.running} running"]
    if overall.elapsed is not None:
        parts.append(f"elapsed {format_duration(overall.elapsed)}")
    parts.append(f"ETA {format_duration(overall.eta)}")
    label = overall.label or ''
    if not label:
        return _fit(parts[0], parts[1:], width)
    return _fit(label, parts, width)


# ------------------------------------------------------------------------------------ view
def _isatty(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _terminal_size(stream):
    """(columns, rows) of the terminal behind `stream`, or None."""
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None


def _encodable(text, stream):
    """`text` as `stream`'s encoding can write it ('≤' -> '<=', '…' -> '...' if need be)."""
    encoding = getattr(stream, 'encoding', None) or 'utf-8'
    try:
        text.encode(encoding)
        return text
    except (UnicodeEncodeError, LookupError):
        text = text.replace(LE, '<=').replace(ELLIPSIS, '...')
        try:
            return text.encode(encoding, 'replace').decode(encoding)
        except LookupError:
            return text.encode('ascii', 'replace').decode('ascii')


class ProgressView:
    """Draws a `Progress` with tqdm: line 0 is the stage (`overall_line`), one line below it
    per running trial (`trial_line`), created and removed as trials start and end.

    `stream`: where to draw (sys.stdout when None). `enabled`: None draws only when
    `stream.isatty()`; when disabled nothing is drawn and `write` hands lines to `log`
    (printing to `stream` when `log` is None). `min_interval`: the least seconds between two
    redraws caused by epochs (a trial starting or ending redraws at once). `tick`: seconds
    between redraws by a background thread, for a driver that cannot call `refresh()`
    itself (serial mode: trials train in the driver's thread); None: no thread. `width`:
    the most columns (min(100, terminal width - 1) when None). `max_lines`: the most trial
    lines (terminal rows - 2 when None); the overall line still counts every running trial.

    Use as a context manager, or call `close()`: the bars are removed, no line is left half
    drawn. While it is open, print log lines with `write(line)`, never with print()."""

    def __init__(self, progress, stream=None, enabled=None, log=None, min_interval=0.5,
                 tick=None, width=None, max_lines=None, clock=None):
        self.progress = progress
        self.stream = sys.stdout if stream is None else stream
        self.enabled = _isatty(self.stream) if enabled is None else bool(enabled)
        self.log = log
        self.min_interval = min_interval
        self.width, self.max_lines = width, max_lines
        self.clock = clock or progress.clock
        self.bars = {}                    # key -> tqdm bar of a running trial
        self.overall_bar = None
        self.closed = False
        self._lock = threading.RLock()
        self._drawn_at = None
        self._changes = None
        self._stop = threading.Event()
        self._thread = None
        if self.enabled and tick:
            self._thread = threading.Thread(target=self._ticking, args=(float(tick),),
                                            name='atml-progress', daemon=True)
            self._thread.start()

    # -- feeding
    def handle(self, event):
        """progress.handle(event), then redraw (at once when a trial started or ended)."""
        with self._lock:
            self.progress.handle(event)
            self.refresh(force=False)

    __call__ = handle

    def refresh(self, force=True):
        """Redraw every line, with ETAs counted down to now. The driver calls it from its
        wait loop (every second or so); `force=False` redraws only when a trial started or
        ended or `min_interval` has passed since the last redraw."""
        if not self.enabled or self.closed:
            return
        with self._lock:
            if self.closed:
                return
            now = self.clock()
            changed = self.progress.changes != self._changes
            if (not force and not changed and self._drawn_at is not None
                    and now - self._drawn_at < self.min_interval):
                return
            self._draw(now)
            self._drawn_at, self._changes = now, self.progress.changes

    def _limits(self):
        size = _terminal_size(self.stream)
        width = self.width or (min(WIDTH, size[0] - 1) if size and size[0] > 20 else WIDTH)
        lines = self.max_lines or (max(1, size[1] - 2) if size else 20)
        return width, lines

    def _bar(self, position):
        return tqdm(total=None, position=position, leave=False, file=self.stream,
                    bar_format='{desc}', dynamic_ncols=False, disable=False,
                    mininterval=0, maxinterval=float('inf'), miniters=1, delay=0)

    def _draw(self, now):
        width, lines = self._limits()
        shown = list(self.progress.running.items())[:lines]
        keys = {key for key, _ in shown}
        for key in [k for k in self.bars if k not in keys]:
            self.bars.pop(key).close()
        if self.overall_bar is None:
            self.overall_bar = self._bar(0)
        used = {abs(bar.pos) for bar in self.bars.values()}
        for key, state in shown:
            if key not in self.bars:
                position = next(p for p in range(1, len(used) + 2) if p not in used)
                used.add(position)
                self.bars[key] = self._bar(position)
        self._set(self.overall_bar, overall_line(self.progress.overall(now), width))
        for key, state in shown:
            bar = self.bars[key]
            bar.total, bar.n = state.max_epochs or None, state.epoch
            self._set(bar, trial_line(state, width, now))

    def _set(self, bar, text):
        bar.set_description_str(_encodable(text, self.stream), refresh=False)
        bar.refresh()

    def _ticking(self, every):
        while not self._stop.wait(every):
            try:
                self.refresh()
            except (OSError, ValueError):  # the stream broke or closed: stop drawing
                return
            except Exception:             # e.g. progress fed outside handle(): next tick
                continue

    # -- log lines
    def write(self, line):
        """A log line above the bars (tqdm.write, so the bars are redrawn below it); when
        the view is disabled or closed, `log(line)` (or a print to the stream)."""
        with self._lock:
            if self.enabled and not self.closed:
                tqdm.write(_encodable(str(line), self.stream), file=self.stream)
                try:
                    self.stream.flush()
                except (AttributeError, ValueError, OSError):
                    pass
            elif self.log is not None:
                self.log(line)
            else:
                print(line, file=self.stream, flush=True)

    # -- closing
    def close(self):
        """Remove every bar (trial lines from the bottom up, then the overall line), leaving
        the cursor at the start of a clean line. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for key in sorted(self.bars, key=lambda k: -abs(self.bars[k].pos)):
                self.bars.pop(key).close()
            if self.overall_bar is not None:
                self.overall_bar.close()
                self.overall_bar = None
            try:
                self.stream.flush()
            except (AttributeError, ValueError, OSError):
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# -------------------------------------------------------------------------- worker side
def _number(value):
    """A plain float of a loss (a tensor or numpy scalar is converted), or None."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class EpochReporter:
    """Builds one trial's events and hands them to `send(event)`: the driver's
    `ProgressView.handle` (or `Progress.handle`) in serial mode, a queue's put (e.g.
    ray.util.queue.Queue.put_nowait) or an actor method in a Ray worker.

    At most one EpochDone per `min_interval` seconds: an epoch in between is held and sent
    with the next one due, by `flush()` or by `ended()`, so the last epoch is never lost;
    the final epoch (epoch == max_epochs) is sent at once. A failing `send` never fails
    the trial: its errors are counted in `errors` (the first kept in `error`).

    As a context manager it sends TrialEnded('failed', or 'interrupted' on Ctrl+C) when
    the block raises before `ended()` was called, and TrialEnded(`default_status`) when it
    did not."""

    def __init__(self, key, send, min_interval=0.5, clock=_time.time, default_status='ok'):
        self.key, self.send = key, send
        self.min_interval = min_interval
        self.clock = clock
        self.default_status = default_status
        self.max_epochs = 0
        self.pending = None               # an EpochDone held back by the throttle
        self.sent_at = None
        self.done = False
        self.errors, self.error = 0, None

    def _send(self, event):
        try:
            self.send(event)
        except Exception as exc:          # progress is a nicety: never fail the trial
            self.errors += 1
            if self.error is None:
                self.error = exc

    def started(self, max_epochs):
        self.max_epochs = int(max_epochs)
        self.done = False
        self._send(TrialStarted(self.key, self.max_epochs, self.clock()))

    def epoch(self, epoch, max_epochs=None, train_loss=None, val_loss=None):
        """Epoch `epoch` (1-based) just finished with these losses."""
        if max_epochs is not None:
            self.max_epochs = int(max_epochs)
        now = self.clock()
        event = EpochDone(self.key, int(epoch), self.max_epochs, _number(train_loss),
                          _number(val_loss), now)
        if (self.sent_at is None or now - self.sent_at >= self.min_interval
                or (self.max_epochs and epoch >= self.max_epochs)):
            self.pending = None
            self.sent_at = now
            self._send(event)
        else:
            self.pending = event

    def flush(self):
        """Send the epoch held back by the throttle, if any."""
        if self.pending is not None:
            event, self.pending = self.pending, None
            self.sent_at = event.time
            self._send(event)

    def ended(self, status='ok'):
        """The trial finished (any status): the held epoch first, then TrialEnded."""
        self.flush()
        self.done = True
        self._send(TrialEnded(self.key, str(status), self.clock()))

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if not self.done:
            if kind is None:
                self.ended(self.default_status)
            else:
                self.ended('interrupted' if issubclass(kind, KeyboardInterrupt) else 'failed')
        return False


def drain(source, handle, limit=10000):
    """Hand every event waiting in `source` to `handle` without blocking; returns how many.
    `source` is a queue.Queue, a multiprocessing queue or a ray.util.queue.Queue (taken in
    one batch when it has qsize() and get_nowait_batch(), so one actor call, not one per
    event); its Empty must derive from queue.Empty (ray's does)."""
    count = 0
    batch = getattr(source, 'get_nowait_batch', None)
    if batch is not None and hasattr(source, 'qsize'):
        waiting = min(int(source.qsize()), limit)
        if waiting:
            try:
                items = batch(waiting)
            except _queue.Empty:
                items = []
            for item in items:
                handle(item)
            count = len(items)
        return count
    while count < limit:
        try:
            item = source.get_nowait()
        except _queue.Empty:
            break
        handle(item)
        count += 1
    return count
