"""Tests of public/core/interrupts.py: SIGINT/SIGTERM become KeyboardInterrupt, held inside a
critical section until its bookkeeping is complete."""
import os
import signal

import pytest

from public.core.interrupts import GracefulInterrupts, NoInterrupts


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_interrupts_at_once_outside_a_critical_section(sig):
    with pytest.raises(KeyboardInterrupt, match=signal.Signals(sig).name):
        with GracefulInterrupts():
            os.kill(os.getpid(), sig)
            for _ in range(10_000_000):           # the handler runs between bytecodes
                pass
            pytest.fail('the signal did not interrupt')


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_critical_section_waits_for_its_end(sig):
    done = []
    with pytest.raises(KeyboardInterrupt, match=signal.Signals(sig).name):
        with GracefulInterrupts() as interrupts:
            with interrupts.critical():
                os.kill(os.getpid(), sig)
                for i in range(200_000):
                    pass
                done.append('row')
                with interrupts.critical():     # nested: still held
                    done.append('avoid')
                done.append('folder')
            done.append('after')                 # never reached
    assert done == ['row', 'avoid', 'folder']


def test_handlers_are_restored_and_no_signal_means_no_interrupt():
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with GracefulInterrupts() as interrupts:
        assert signal.getsignal(signal.SIGINT) != before[0]
        with interrupts.critical():
            pass
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_no_interrupts_has_a_critical_section_that_does_nothing():
    with NoInterrupts().critical():
        value = 1
    assert value == 1
