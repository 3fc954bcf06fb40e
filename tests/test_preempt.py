"""The signal handler itself, in-process: the first signal is a request, a repeat within the launcher's
forwarding window is the same request, a later one aborts."""

from __future__ import annotations

import os
import signal

from pipeline import preempt


def test_first_signal_asks_a_repeat_is_ignored_a_later_one_aborts(monkeypatch):
    exits = []
    clock = [100.0]
    monkeypatch.setattr(preempt.os, "_exit", exits.append)
    monkeypatch.setattr(preempt.time, "monotonic", lambda: clock[0])
    before = signal.getsignal(signal.SIGTERM)
    with preempt.StopRequest(announce=False) as stop:
        assert stop.signum == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and exits == []
        clock[0] += 0.01  # the launcher forwarding the same SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == []
        clock[0] += preempt.REPEAT_S
        os.kill(os.getpid(), signal.SIGINT)  # a real second request: abort at once
        assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored after training
