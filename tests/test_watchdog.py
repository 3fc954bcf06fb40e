"""The peer watch (pipeline/distributed/watchdog.py) against a real TCPStore in this process, and the lost-peer exit of
pipeline/errors.py: which rank is declared dead, when, and what the others do. The launcher-level tests (a frozen
rank through node.sh, a SIGKILLed rank under SLURM) are in tests/test_multinode.py."""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.distributed import watchdog
from pipeline.errors import lost_peer
from tests.conftest import REPO


def serve_store():
    """A TCPStore server on a free port, as rank 0 serves the job's; (store, port)."""
    from torch.distributed import TCPStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=10)), port


@pytest.fixture
def store():
    return serve_store()


def watch(rank: int, world: int, port: int, timeout: float = 1.5) -> tuple[watchdog.PeerWatch, list, threading.Event]:
    """A PeerWatch whose end is recorded instead of ending this process."""
    w = watchdog.PeerWatch(rank, world, timeout, "127.0.0.1", port, interval=0.25)
    ended: list[tuple[float, str]] = []
    event = threading.Event()

    def end(message):
        ended.append((time.monotonic(), message))
        event.set()
        w._stop.set()  # the watch thread ends at its next beat, as the process would have at once

    w._end = end
    return w, ended, event


def beat(server, rank: int, stop: threading.Event) -> threading.Thread:
    def run():
        while not stop.wait(0.2):
            server.add(watchdog.PeerWatch._key(rank), 1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_rank0_names_the_silent_rank_within_the_timeout_and_leaves_a_note(store):
    server, port = store
    stop = threading.Event()
    beat(server, 1, stop)  # rank 1 beats, rank 2 never does, rank 3 beats and then stops
    beat(server, 3, stop3 := threading.Event())
    w, ended, event = watch(0, 4, port)
    started = time.monotonic()
    w.start()
    assert event.wait(10)
    stop.set()
    stop3.set()
    at, message = ended[0]
    assert "rank 2 has not been heard from" in message and "LORAPLUS_PEER_TIMEOUT=1.5" in message, message
    assert 1.5 <= at - started <= 1.5 + 3 * 0.25 + 1 + 1  # + rank 0's wait for the others to read the note
    assert "rank 2 has not been heard from" in server.get(watchdog.ABORT).decode()


def test_a_rank_that_left_is_not_waited_for_and_beating_ranks_are_fine(store):
    server, port = store
    stop = threading.Event()
    beat(server, 1, stop)
    server.set(watchdog.PeerWatch._key(2), watchdog.LEFT)  # rank 2 is done (finished or stopped by a signal)
    w, ended, event = watch(0, 3, port)
    w.start()
    assert not event.wait(3), ended  # twice the timeout: nobody is declared dead
    w.leave()
    stop.set()
    assert server.get(watchdog.PeerWatch._key(0)) == watchdog.LEFT


def test_the_others_end_on_rank0s_note_and_when_its_store_is_gone(store):
    server, port = store
    stop = threading.Event()
    beat(server, 0, stop)
    w, ended, event = watch(1, 2, port)
    w.start()
    server.set(watchdog.ABORT, "rank 5 (on n2) has not been heard from for 60 s")
    assert event.wait(5)
    assert ended[0][1].startswith("rank 5 (on n2) has not been heard from for 60 s; ending rank 1 too")

    # rank 0 beats no more: a silent rank 0 is dead too
    stop.set()
    w2, ended2, event2 = watch(2, 3, port)
    w2.start()
    assert event2.wait(8)
    assert "rank 5 (on n2)" in ended2[0][1]  # the note is read first, while the store is up


def test_a_store_that_stops_answering_ends_a_rank_after_the_timeout():
    server, port = serve_store()  # not the fixture's: this test drops the last reference to close it
    stop = threading.Event()
    beat(server, 0, stop)
    w, ended, event = watch(1, 2, port, timeout=2.0)
    w.start()
    time.sleep(0.6)
    stop.set()
    time.sleep(0.3)
    del server  # rank 0's process, and the store it serves, is gone
    import gc

    gc.collect()
    assert event.wait(15)
    assert "rendezvous store (127.0.0.1:" in ended[0][1] and "has not answered" in ended[0][1], ended


@pytest.mark.parametrize("value,ok", [("60", 60.0), ("0", 0.0), ("7.5", 7.5), ("2", None), ("soon", None),
                                      ("-1", None)])
def test_peer_timeout_from_the_environment(monkeypatch, value, ok):
    from pipeline.errors import UserError

    monkeypatch.setenv("LORAPLUS_PEER_TIMEOUT", value)
    if ok is None:
        with pytest.raises(UserError, match=f"LORAPLUS_PEER_TIMEOUT={value} is not a number of seconds"):
            watchdog.timeout_from_env()
    else:
        assert watchdog.timeout_from_env() == ok


def test_bad_peer_timeout_is_one_line_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), f"output_dir={tmp_path / 'run'}"],
                          env={**__import__("os").environ, "LORAPLUS_PEER_TIMEOUT": "1"}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: LORAPLUS_PEER_TIMEOUT=1 is not a number of seconds from 5 to 86400 (or 0: no watch)"], proc.stderr
    assert not (tmp_path / "run").exists()


def test_which_errors_mean_a_lost_peer():
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9653: Connection reset by peer")
    assert lost_peer(gloo)
    assert lost_peer(type("DistBackendError", (RuntimeError,), {})("NCCL error: remote process exited"))
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_peer(ValueError("Connection reset by peer"))  # only the backends' RuntimeErrors
