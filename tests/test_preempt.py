"""The signal handler itself, in-process: the first signal is a request, a repeat within the launcher's
forwarding window is the same request, a later one aborts; and before the loop, a signal exits at once."""

from __future__ import annotations

import os
import signal

from pipeline.distributed import preempt


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


def test_a_signal_before_the_first_step_exits_at_once_as_a_stop(tmp_path):
    """SIGTERM while the run is still starting (here: after the data, before the model): status 143 at once, so a
    batch script reads a stop, not a crash; nothing is left half-written."""
    import subprocess
    import sys

    from tests.conftest import TRAIN

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(TRAIN), f"output_dir={out}", "eval.mmlu.every_checkpoint=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    for line in proc.stdout:
        if line.startswith("data: "):
            proc.send_signal(signal.SIGTERM)
            break
    rc = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert rc == 143, stderr
    assert "received SIGTERM outside the training steps: nothing to save; exiting" in stderr
    assert "Traceback" not in stderr
    assert not (out / "checkpoints").exists()
