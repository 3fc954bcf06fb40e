"""A dead rank ends the whole job within ``LORAPLUS_PEER_TIMEOUT`` seconds (default 60), on every node.

Why: when a rank dies (out-of-memory kill, segfault, a node lost), the ``deepspeed`` launcher of its node ends
that node's other ranks, but the ranks on the other nodes wait inside their next collective: with NCCL until the
process-group timeout (``DEEPSPEED_TIMEOUT``, 10 minutes by default; often for ever when a node vanished without
closing its connections). gloo notices a closed connection within seconds, but not a machine that is gone.

How: every rank beats (an increasing counter) into the job's rendezvous store, the TCPStore that rank 0 serves at
``MASTER_ADDR:MASTER_PORT``, every ``interval`` seconds from a thread of its own (store calls release the GIL, so a
rank blocked in a collective still beats). Rank 0 reads all beats; a rank whose beat has not changed for
``timeout`` seconds is dead: rank 0 leaves a note in the store, prints one line and exits. The other ranks read
rank 0's beat and the note: the note, a silent rank 0, or a store that stays unreachable for ``timeout`` seconds
(rank 0's process is gone) ends them with one line too. So the job is over at most ``timeout`` + 2 ``interval``
seconds after a death, plus the launchers' own clean-up (DeepSpeed's kills what is left 30 s after its SIGTERM).
Store traffic: one counter per rank and interval, and rank 0 one read of all of them.

Exits are ``os._exit(EXIT_PEER_LOST)``: the main thread may be blocked in a collective that never returns, and a
checkpoint half-written at that moment is never read (a checkpoint counts only once rank 0 has sealed it, see
``pipeline.train.checkpoint``). A rank that is done (finished, stopped by a signal, failed on its own) says so first
with ``leave``, so the ranks still finishing (rank 0 scoring MMLU at the end) are not mistaken for orphans.

A hang that keeps the process alive (a deadlock, a stuck GPU) keeps beating: that is the process-group timeout's
case (``DEEPSPEED_TIMEOUT``, minutes; it also bounds a rank that waits for one that hangs).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time

from pipeline.errors import EXIT_PEER_LOST, UserError

PREFIX = "loraplus/watch/"
ABORT = PREFIX + "abort"
LEFT = b"left"


def timeout_from_env() -> float:
    """``LORAPLUS_PEER_TIMEOUT`` in seconds (default 60; 0 turns the watch off)."""
    raw = os.environ.get("LORAPLUS_PEER_TIMEOUT", "60")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value != 0 and not 5 <= value <= 86400:
        raise UserError(f"LORAPLUS_PEER_TIMEOUT={raw} is not a number of seconds from 5 to 86400 (or 0: no watch)")
    return value


class PeerWatch:
    """Start with ``start()`` after the process group exists; ``leave()`` when this rank is done."""

    def __init__(self, rank: int, world_size: int, timeout: float, host: str, port: int,
                 interval: float | None = None, describe=None):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.interval = interval or max(1.0, min(5.0, timeout / 6))
        self.host, self.port = host, port
        self.describe = describe or (lambda r: f"rank {r}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None

    @classmethod
    def from_env(cls, rank: int, world_size: int, timeout: float | None = None) -> "PeerWatch":
        timeout = timeout_from_env() if timeout is None else timeout
        return cls(rank, world_size, timeout, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                   int(os.environ.get("MASTER_PORT", "29500")))

    @property
    def active(self) -> bool:
        return self.timeout > 0 and self.world_size > 1

    def start(self) -> "PeerWatch":
        if not self.active:
            return self
        from torch.distributed import TCPStore

        # A client of its own, not the process group's: that one belongs to the main thread.
        self._store = TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=max(self.interval, 5.0)))
        self._store.set(f"{PREFIX}host/{self.rank}", socket.gethostname())
        self._store.add(self._key(self.rank), 1)
        self._thread = threading.Thread(target=self._run, name="loraplus-peer-watch", daemon=True)
        self._thread.start()
        return self

    def leave(self) -> None:
        """This rank is done: stop watching, and tell rank 0 not to wait for its beat."""
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 5)
        try:
            self._store.set(self._key(self.rank), LEFT)
        except Exception:  # noqa: BLE001  (rank 0, and the store with it, may be gone already)
            pass

    @staticmethod
    def _key(rank: int) -> str:
        return f"{PREFIX}beat/{rank}"

    def _read(self, ranks: list[int]) -> list[bytes]:
        keys = [self._key(r) for r in ranks]
        if self._store.check(keys):
            return self._store.multi_get(keys)
        return [str(self._store.add(k, 0)).encode() for k in keys]  # a rank that has not beaten yet reads 0

    def _run(self) -> None:
        store = self._store
        watched = [r for r in range(1, self.world_size)] if self.rank == 0 else [0]
        last_value: dict[int, bytes] = {}
        last_change = {r: time.monotonic() for r in watched}
        last_contact = time.monotonic()
        while watched and not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                store.add(self._key(self.rank), 1)
                if self.rank != 0 and store.check([ABORT]):
                    self._end(f"{store.get(ABORT).decode()}; ending {self.describe(self.rank)} too")
                values = self._read(watched)
                last_contact = now
            except Exception as e:  # noqa: BLE001  (connection refused or reset, a timeout: rank 0 is gone?)
                if now - last_contact > self.timeout:
                    self._end(f"the job's rendezvous store ({self.host}:{self.port}, served by rank 0) has not "
                              f"answered for {now - last_contact:.0f} s ({type(e).__name__}): rank 0 is gone; "
                              f"ending {self.describe(self.rank)}")
                continue
            for r, value in zip(list(watched), values):
                if value == LEFT:
                    watched.remove(r)
                elif value != last_value.get(r):
                    last_value[r], last_change[r] = value, now
                elif now - last_change[r] > self.timeout:
                    self._dead(r, now - last_change[r])

    def _dead(self, rank: int, silent_s: float) -> None:
        note = (f"{self._where(rank)} has not been heard from for {silent_s:.0f} s (LORAPLUS_PEER_TIMEOUT="
                f"{self.timeout:g}): it died or its node is gone")
        if self.rank == 0:
            try:  # the others read the note at their next beat; stay (and serve the store) until they can
                self._store.set(ABORT, note)
                time.sleep(self.interval + 1)
            except Exception:  # noqa: BLE001
                pass
        self._end(f"{note}; ending {self.describe(self.rank)}")

    def _where(self, rank: int) -> str:
        key = f"{PREFIX}host/{rank}"
        try:  # a rank that never started its watch has no host here (and get() would wait for one)
            return f"{self.describe(rank)} (on {self._store.get(key).decode()})" if self._store.check([key]) \
                else self.describe(rank)
        except Exception:  # noqa: BLE001
            return self.describe(rank)

    def _end(self, message: str) -> None:
        os.write(2, f"\nerror: {message} (exit {EXIT_PEER_LOST}); the job resumes from its newest checkpoint when "
                    f"it is started again\n".encode())
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)
