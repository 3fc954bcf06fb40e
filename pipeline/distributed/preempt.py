"""Stopping on SIGTERM/SIGINT (SLURM preemption, ``scancel``, Ctrl-C) without losing work.

The first signal asks the run to stop: every rank finishes the step it is in, a checkpoint is written, and the
processes exit with status 128 + signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process
ended by that signal, so ``train.py && next-step`` does not run on an unfinished model. A second signal aborts at
once. The ``deepspeed`` launcher forwards the signal it receives to its ranks, so a rank often sees the same
request twice within milliseconds; only a signal at least ``REPEAT_S`` seconds after the first counts as a second.
A save in flight when the abort comes is never read (see ``pipeline.train.checkpoint``).
"""

from __future__ import annotations

import os
import signal
import time

REPEAT_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_at_once() -> None:
    """Outside the training loop (``StopRequest`` takes over within it), SIGTERM/SIGINT end the process at once with
    status 128 + signal: before the first step there is nothing to save (every file written so far is written
    atomically), after the last the checkpoint is written, and a stop while a 70B model loads must read as a stop
    (143), not as a crash, to a batch script."""

    def handler(signum, frame) -> None:
        if os.environ.get("RANK", "0") == "0":
            name = signal.Signals(signum).name
            os.write(2, f"\nreceived {name} outside the training steps: nothing to save; exiting\n".encode())
        os._exit(128 + signum)

    for s in SIGNALS:
        signal.signal(s, handler)


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set ``signum`` instead of killing the process."""

    def __init__(self, announce: bool):
        self.signum = 0
        self._first_at = 0.0
        self._announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            if self._announce:  # os.write, not print: the main thread may be inside a write to stderr right now
                os.write(2, f"\nreceived {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                            f"(send it again to abort without saving)\n".encode())
        elif now - self._first_at >= REPEAT_S:
            os._exit(128 + signum)
