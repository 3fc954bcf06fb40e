"""The exception types that mean "the user's input is wrong" (or "the run cannot go on"), the entry-point wrapper
that prints them as one line, and the exit status of a rank that lost a peer."""

EXIT_PEER_LOST = 75  # not 0, 1 (a Python error), 2 (bad input) or 128+N (a signal): "another rank died"


class UserError(Exception):
    """Bad input from the user: a config key, a file, a CLI argument.

    Entry points print ``error: <message>`` on one line, without a traceback, and exit with status 2.
    The message names what is wrong and where, and where possible how to fix it.
    """

    exit_code = 2
    #: Who prints it under a multi-rank launcher: None, rank 0 (every rank raised the same error); "here", this
    #: process, whatever its rank (it alone found it, e.g. while building the data cache); "elsewhere", nobody
    #: here (another process found and printed it). The launcher may kill the others as soon as one exits.
    printed: str | None = None


class RunError(UserError):
    """The run cannot go on for a reason outside the code (a full disk, a non-finite loss with
    ``train.on_nonfinite=stop``). Reported like :class:`UserError`, one line, but with exit status 1."""

    exit_code = 1


def exit_on_user_error(main):
    """Decorate an entry point: a :class:`UserError` becomes one ``error: ...`` line on stderr and its exit status.

    Under a multi-rank launcher every rank raises the same error (inputs are validated on all ranks), so only
    rank 0 prints it. Anything else is a bug and keeps its traceback.
    """
    import functools
    import os
    import sys

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        code: int | str | None = 0
        result = None
        try:
            result = main(*args, **kwargs)
        except UserError as e:
            if e.printed == "here" or (e.printed is None and os.environ.get("RANK", "0") == "0"):
                print(f"error: {e}", file=sys.stderr, flush=True)
            code = e.exit_code
        except SystemExit as e:
            code = e.code
        except Exception as e:  # noqa: BLE001
            if not lost_peer(e):
                raise
            # Not a bug of ours: another rank died (its node's launcher ends the rest there) and this one's
            # collective failed. One line, and no process-group teardown, which can hang on a dead peer.
            import re

            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first)[:300]  # gloo's "[.../pair.cc:537] "
            rank = os.environ.get("RANK", "0")
            dist = sys.modules.get("torch.distributed")
            if dist is not None and dist.is_available() and dist.is_initialized():
                what = f"a collective failed because another rank is gone ({first})"
            else:
                where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                what = (f"the rendezvous at {where} failed ({first}): check MASTER_ADDR and MASTER_PORT, that node 0 "
                        f"is up, and that every node was started")
            print(f"error: rank {rank}: {what}; ending this rank (exit {EXIT_PEER_LOST}); the job resumes from its "
                  f"newest checkpoint when it is started again", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_PEER_LOST)
        finally:
            distributed = _leave_process_group()
        if isinstance(code, str):  # sys.exit("message"): printed, status 1, as Python does
            print(code, file=sys.stderr, flush=True)
            code = 1
        if distributed:
            # Everything is written and closed by now (checkpoints are atomic, metrics flushed per step). About
            # once in 60 CPU runs, a native thread of the training stack (not gloo's: the process group is gone)
            # aborted during interpreter teardown ("terminate called without an active exception", status 134),
            # turning a finished run or a saved preemption into a crash. Leaving without that teardown avoids it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
        if code:
            sys.exit(code)
        return result

    return wrapper


#: What torch.distributed's backends say when a peer process died or its connection broke mid-collective.
LOST_PEER_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
                     "ncclRemoteError", "NCCL communicator was aborted", "remote process exited")


def lost_peer(e: BaseException) -> bool:
    """Whether an exception from the training stack means a peer rank is gone (and not a bug here)."""
    if type(e).__name__ in ("DistBackendError", "DistNetworkError"):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in LOST_PEER_MARKERS)


def _leave_process_group() -> bool:
    """Tear down the process group, if one was started, before the process exits (normally, on an error or on a
    signal): left to interpreter shutdown, gloo's threads can abort the process. Returns whether there was one."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False
