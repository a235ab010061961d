"""Live progress of a search (public/search/progress.py), tested through its events: hand-made
events with fake times, a fake driver clock, no sleeping, no Ray, no screen scraping."""
import importlib
import importlib.util
import io
import pickle
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load():
    """public.search.progress once public/search/ is the package; until then (public/search.py
    is still a module) the file itself, registered under its own name so pickle finds it."""
    spec = importlib.util.find_spec('public.search')
    if spec is not None and spec.submodule_search_locations:
        return importlib.import_module('public.search.progress')
    name = 'atml_search_progress'
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / 'public/search/progress.py')
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


P = _load()
KEY = 'AFNet@0.003'


class Clock:
    """The driver's clock, moved by hand."""
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def run_epochs(progress, key, epochs, seconds, max_epochs=30, start=0.0, losses=(0.5, 0.6)):
    progress.handle(P.TrialStarted(key, max_epochs, start))
    for e in range(1, epochs + 1):
        progress.handle(P.EpochDone(key, e, max_epochs, losses[0], losses[1],
                                    start + e * seconds))


def test_trial_eta_after_two_epochs_of_ten_seconds_is_at_most_280_s():
    progress = P.Progress(clock=Clock())
    run_epochs(progress, KEY, epochs=2, seconds=10.0)
    state = progress.running[KEY]
    assert (state.epoch, state.max_epochs) == (2, 30)
    assert state.epoch_seconds() == pytest.approx(10.0)
    assert state.eta() == pytest.approx(280.0)
    line = P.trial_line(state)
    assert line == f"{KEY}  epoch 2/30  loss 0.500/0.600  ETA \u2264 4m40s"
    # counted down on the driver's clock since the latest epoch arrived, never below 0
    assert state.eta(now=progress.clock() + 30) == pytest.approx(250.0)
    assert state.eta(now=progress.clock() + 1e6) == 0.0


def test_trial_before_first_epoch_and_after_last():
    progress = P.Progress(clock=Clock())
    progress.handle(P.TrialStarted(KEY, 3, 0.0))
    state = progress.running[KEY]
    assert state.eta() is None
    assert 'starting' in P.trial_line(state)
    for e in (1, 2, 3):
        progress.handle(P.EpochDone(KEY, e, 3, 0.1, 0.2, 5.0 * e))
    assert state.eta() == 0.0
    assert 'ETA' not in P.trial_line(state) and 'epoch 3/3' in P.trial_line(state)


def test_overall_counts_skipped_as_decided_and_ignores_late_events():
    clock = Clock()
    progress = P.Progress(workers=1, clock=clock, label='stage 1')
    progress.handle(P.PlanChanged(planned=8, skipped=0))
    assert P.overall_line(progress.overall()).startswith('stage 1  trials 0/8 done')
    progress.handle(P.PlanChanged(skipped=2))            # avoid.txt decided two
    assert (progress.planned, progress.finished) == (8, 2)
    run_epochs(progress, 'A@0.003', 2, 5.0)
    progress.handle(P.TrialEnded('A@0.003', 'ok', 12.0))
    run_epochs(progress, 'B@0.003', 1, 5.0, start=12.0)
    progress.handle(P.TrialEnded('B@0.003', 'failed', 20.0))
    progress.handle(P.TrialEnded('B@0.003', 'failed', 20.5))   # driver's copy: ignored
    progress.handle(P.EpochDone('B@0.003', 2, 30, 1.0, 1.0, 19.0))  # late from a queue
    overall = progress.overall()
    assert (overall.finished, overall.planned, overall.running) == (4, 8, 0)
    assert overall.statuses == {'ok': 1, 'failed': 1}
    assert progress.durations == [12.0, 8.0]
    line = P.overall_line(overall)
    assert 'trials 4/8 done (2 skipped, 1 failed)' in line and '0 running' in line
    # the same key started again (a retry) runs afresh
    progress.handle(P.TrialStarted('B@0.003', 30, 30.0))
    assert 'B@0.003' in progress.running and progress.running['B@0.003'].epoch == 0


def test_stage_eta_with_two_workers():
    clock = Clock()
    progress = P.Progress(workers=2, clock=clock)
    progress.handle(P.PlanChanged(planned=10, skipped=1))
    assert progress.stage_eta() is None                   # no trial finished yet
    assert 'ETA --' in P.overall_line(progress.overall())
    for key, start, end in (('A', 0.0, 60.0), ('B', 0.0, 120.0)):
        progress.handle(P.TrialStarted(key, 30, start))
    for key, end in (('A', 60.0), ('B', 120.0)):
        progress.handle(P.TrialEnded(key, 'ok', end))
    # mean 90 s x (10 - 1 skipped - 2 ended = 7 left) / 2 workers
    assert progress.stage_eta() == pytest.approx(90.0 * 7 / 2)
    # the time running trials have already run is taken off (driver clock)
    progress.handle(P.TrialStarted('C', 30, 120.0))
    clock.now += 30.0
    assert progress.stage_eta(now=clock.now) == pytest.approx((90.0 * 7 - 30.0) / 2)
    assert 'ETA 5m' in P.overall_line(progress.overall(clock.now))
    # fewer trials left than workers: they run at once, not faster than one trial
    progress.handle(P.PlanChanged(planned=4))
    assert progress.stage_eta() == pytest.approx(90.0)


@pytest.mark.parametrize('width', [100, 60])
def test_lines_fit_the_width_for_long_keys(width):
    key = 'AVeryLongModelClassNameThatSomeoneWroteInModelPy_WithMoreWords' * 2 + '@0.0035'
    progress = P.Progress(clock=Clock(), label='stage 2: scaling ' + 'X' * 120)
    progress.handle(P.PlanChanged(planned=123456, skipped=1234))
    run_epochs(progress, key, epochs=3, seconds=1234.5, max_epochs=1000,
               losses=(123456.0, float('nan')))
    progress.handle(P.TrialEnded('other', 'diverged', 5.0))
    line = P.trial_line(progress.running[key], width=width)
    assert len(line) <= width
    assert line.endswith('ETA \u2264 341h53m')           # 997 epochs x 1234.5 s
    assert '@0.0035' in line                               # the key's end is kept
    assert 'loss 1.2e+05/nan' in line
    assert len(P.overall_line(progress.overall(1e5), width=width)) <= width


def test_format_helpers():
    assert [P.format_duration(s) for s in (None, 0, 4.4, 59.6, 112, 3599.4, 7500)] == \
        ['--', '0s', '4s', '1m00s', '1m52s', '59m59s', '2h05m']
    assert [P.format_loss(v) for v in (None, 0.41234, 12.345, float('inf'))] == \
        ['-', '0.412', '12.3', 'inf']


def _view_events(view):
    view.handle(P.PlanChanged(planned=4, skipped=1, label='stage 1'))
    view.handle(P.TrialStarted('A@0.003', 30, 0.0))
    view.handle(P.TrialStarted('B@0.003', 30, 0.0))
    view.handle(P.EpochDone('A@0.003', 1, 30, 0.5, 0.6, 10.0))


def test_view_on_a_non_terminal_draws_nothing():
    stream, logged = io.StringIO(), []
    with P.ProgressView(P.Progress(clock=Clock()), stream=stream, log=logged.append) as view:
        assert not view.enabled                            # StringIO is not a tty
        _view_events(view)
        view.refresh()
        view.write('  A lr=0.003: ok')
        assert view.bars == {} and view.overall_bar is None
    assert stream.getvalue() == ''
    assert logged == ['  A lr=0.003: ok']                 # the per-trial log line remains
    quiet = io.StringIO()
    with P.ProgressView(P.Progress(clock=Clock()), stream=quiet) as view:
        view.write('a log line')                           # no log given: printed as is
    assert quiet.getvalue() == 'a log line\n'


def test_view_enabled_creates_and_removes_one_bar_per_running_trial():
    stream, clock = io.StringIO(), Clock()
    progress = P.Progress(workers=2, clock=clock)
    view = P.ProgressView(progress, stream=stream, enabled=True)
    _view_events(view)
    assert set(view.bars) == {'A@0.003', 'B@0.003'} and view.overall_bar is not None
    assert sorted(abs(bar.pos) for bar in view.bars.values()) == [1, 2]
    view.handle(P.TrialEnded('A@0.003', 'ok', 20.0))
    assert set(view.bars) == {'B@0.003'}
    view.handle(P.TrialStarted('C@0.003', 30, 20.0))     # takes the freed line
    assert abs(view.bars['C@0.003'].pos) == 1 and len(view.bars) == 2
    view.write('  A lr=0.003: ok, 1 epoch')
    clock.now += 5.0
    view.refresh()
    view.close()
    view.close()                                          # idempotent
    assert view.bars == {} and view.overall_bar is None
    text = stream.getvalue()
    assert '  A lr=0.003: ok, 1 epoch\n' in text
    assert 'stage 1  trials 2/4 done (1 skipped)' in text and 'C@0.003  epoch 0/30' in text
    view.write('after close')                             # plain print once closed
    assert stream.getvalue().endswith('after close\n')


def test_view_redraws_epochs_at_most_every_min_interval():
    stream, clock = io.StringIO(), Clock()
    view = P.ProgressView(P.Progress(clock=clock), stream=stream, enabled=True,
                          min_interval=2.0)
    with view:
        view.handle(P.TrialStarted(KEY, 30, 0.0))
        drawn = view._drawn_at
        clock.now = 1.0
        view.handle(P.EpochDone(KEY, 1, 30, 0.5, 0.6, 1.0))
        assert view._drawn_at == drawn                     # too soon: not redrawn
        clock.now = 3.0
        view.handle(P.EpochDone(KEY, 2, 30, 0.5, 0.6, 3.0))
        assert view._drawn_at == 3.0
        view.refresh()                                      # the driver's wait loop: always
        assert 'epoch 2/30' in view.bars[KEY].desc


def test_view_tick_thread_refreshes_without_events():
    view = P.ProgressView(P.Progress(), stream=io.StringIO(), enabled=True, tick=0.01)
    with view:
        view.handle(P.TrialStarted(KEY, 30))
        first = view._drawn_at
        for _ in range(200):                                # up to 2 s on a loaded machine
            if view._drawn_at > first:
                break
            view._stop.wait(0.01)
        assert view._drawn_at > first
    assert not view._thread.is_alive()


def test_events_pickle_round_trip():
    events = [P.TrialStarted(KEY, 30, 1.5), P.EpochDone(KEY, 4, 30, 0.412, None, 2.5),
              P.TrialEnded(KEY, 'pruned', 3.5), P.PlanChanged(16, 2, 'stage 1')]
    for event in events:
        assert pickle.loads(pickle.dumps(event)) == event
    assert P.TrialStarted(KEY, 30).time > 0                # stamped when built
    with pytest.raises(TypeError):
        P.Progress().handle('not an event')


def test_reporter_throttles_but_keeps_the_last_epoch():
    clock, sent = Clock(), []
    reporter = P.EpochReporter(KEY, sent.append, min_interval=0.5, clock=clock)
    reporter.started(30)
    for e in range(1, 8):                                   # 7 epochs of 0.1 s each
        clock.now += 0.1
        reporter.epoch(e, 30, 0.5, 0.6)
    epochs = [ev.epoch for ev in sent if isinstance(ev, P.EpochDone)]
    assert epochs == [1, 6]                                 # 0.1 s, then 0.6 s
    clock.now += 0.1
    reporter.ended('ok')                                    # early stop after epoch 7
    assert [type(ev).__name__ for ev in sent[-2:]] == ['EpochDone', 'TrialEnded']
    assert sent[-2].epoch == 7 and sent[-2].time == pytest.approx(0.7)
    assert sent[-1] == P.TrialEnded(KEY, 'ok', pytest.approx(0.8))
    # the final epoch is never held back
    sent.clear()
    reporter = P.EpochReporter('c1-f1', sent.append, clock=clock)
    reporter.started(2)
    reporter.epoch(1, 2, 0.5, 0.6)
    reporter.epoch(2, 2, 0.4, 0.5)
    assert [ev.epoch for ev in sent if isinstance(ev, P.EpochDone)] == [1, 2]


def test_reporter_feeds_progress_serially_and_never_fails_the_trial():
    clock = Clock()
    progress = P.Progress(clock=clock)
    with P.EpochReporter(KEY, progress.handle, min_interval=0, clock=clock) as reporter:
        reporter.started(30)
        clock.now = 10.0
        reporter.epoch(1, 30, 0.5, 0.6)
        assert progress.running[KEY].epoch == 1
    assert progress.statuses == {'ok': 1} and KEY not in progress.running
    with pytest.raises(RuntimeError):
        with P.EpochReporter('B', progress.handle, clock=clock) as reporter:
            reporter.started(30)
            raise RuntimeError('trial broke')
    assert progress.statuses == {'ok': 1, 'failed': 1}

    def broken(event):
        raise ConnectionError('queue gone')
    reporter = P.EpochReporter(KEY, broken, clock=clock)
    reporter.started(30)
    reporter.epoch(1, 30, 0.5, 0.6)
    assert reporter.errors == 2 and isinstance(reporter.error, ConnectionError)


def test_drain_hands_over_everything_waiting():
    import queue
    source, progress = queue.Queue(), P.Progress(clock=Clock())
    source.put(P.TrialStarted(KEY, 30, 0.0))
    source.put(P.EpochDone(KEY, 1, 30, 0.5, 0.6, 10.0))
    assert P.drain(source, progress.handle) == 2
    assert P.drain(source, progress.handle) == 0
    assert progress.running[KEY].epoch == 1

    class Batched:                                         # like ray.util.queue.Queue
        def __init__(self, items):
            self.items = list(items)

        def qsize(self):
            return len(self.items)

        def get_nowait_batch(self, n):
            batch, self.items = self.items[:n], self.items[n:]
            return batch
    assert P.drain(Batched([P.TrialEnded(KEY, 'ok', 20.0)]), progress.handle) == 1
    assert progress.statuses == {'ok': 1}


# --------------------------------------------------------------- wired into the search
def _stage_one_events(settings, prepared, executor=None):
    from conftest import TinyNet
    from public.core.interrupts import NoInterrupts
    from public.search.stage_one import run_stage_one
    events, lines = [], []
    run_stage_one(settings, prepared, [TinyNet], NoInterrupts(), log=lines.append,
                  progress=False, executor=executor, on_event=events.append)
    return events, lines


def _check_stage_one_events(events, trained, skipped, epochs):
    started = [e.key for e in events if isinstance(e, P.TrialStarted)]
    ended = [e.key for e in events if isinstance(e, P.TrialEnded)]
    assert sorted(started) == sorted(trained) and set(ended) == set(trained)
    for key in trained:
        assert [e.epoch for e in events if isinstance(e, P.EpochDone) and e.key == key] \
            == list(range(1, epochs + 1))
    plans = [e for e in events if isinstance(e, P.PlanChanged)]
    assert plans[0].planned == len(trained) + skipped
    assert max(e.skipped or 0 for e in plans) == skipped
    progress = P.Progress()
    for event in events:
        progress.handle(event)
    assert progress.finished == progress.planned and not progress.running


def test_a_serial_stage_one_reports_every_trial_epoch_and_skip(prepared, make_settings, tmp_path):
    # 0.004 is within 2*STEP of avoid.txt's 0.006: skipped, counted as decided
    (tmp_path / 'avoid.txt').write_text('0.006 TinyNet\n')
    settings = make_settings(LR_MIN=0.002, LR_MAX=0.004, STEP=0.001, NUM_EPOCHS=2, PATIENCE=5)
    events, lines = _stage_one_events(settings, prepared)
    _check_stage_one_events(events, ['TinyNet@0.002', 'TinyNet@0.003'], skipped=1, epochs=2)
    assert any('TinyNet lr=0.003: ok' in line for line in lines)   # log lines stay as they were
