"""Preemption safety through the real ``deepspeed`` launcher at world size 2 on CPU: exact resume, signals,
SIGKILL, crashes and failures during a save, damaged checkpoints, retention, non-finite steps, export.

Every run uses LoRA dropout, so an exact resume also proves the per-rank RNG states come back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import rundir
from pipeline.optim.schedule import multiplier
from pipeline.train import checkpoint
from tests.conftest import REPO, ds_config, read_metrics, run_train, train_command, trained_after

pytestmark = pytest.mark.launcher

STEPS = 12
LR = 1e-3
COMMON = [f"train.max_steps={STEPS}", "train.micro_batch_size=2", f"optim.lr={LR}", "seed=7", "lora.dropout=0.1",
          "train.save_every=4", "schedule.warmup_steps=2"]
TOL = 1e-6

_REFS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


def args(stage: str, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", *COMMON, "--deepspeed_config", ds_config(stage), *extra]


def reference(root: Path, stage: str) -> list[dict]:
    """The uninterrupted 12-step run (once per module); the ZeRO-3 one also keeps only 2 checkpoints."""
    if stage not in _REFS:
        out = root / f"ref-{stage}"
        run_train(args(stage, out, *(["train.keep_last=2"] if stage == "zero3" else [])), nprocs=2)
        _REFS[stage] = out
    return read_metrics(_REFS[stage])


def assert_same_losses(rows: list[dict], ref: list[dict], tol: float = TOL) -> float:
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), [r["step"] for r in rows]
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, ref))
    assert diff <= tol, f"max loss difference {diff:.3g} after resume"
    return diff


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------------------------------------
# Exact resume after a SIGTERM at a known step (the fault hook raises SIGTERM in rank 0 during step 8)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_stopped_at_8_and_resumed_matches_the_uninterrupted_run(root, stage):
    out = root / f"sigterm-{stage}"
    proc = run_train(args(stage, out), nprocs=2, check=False, env={"LORAPLUS_FAULT": "sigterm@8"})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "stopped by SIGTERM after step 8" in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))
    assert rundir.latest_name(out) == "step-8" and checkpoint.verify(out / "checkpoints" / "step-8") is None

    proc = run_train(args(stage, out), nprocs=2)
    assert "resumed from step-8" in proc.stdout and "RNG states restored per rank" in proc.stdout
    diff = assert_same_losses(read_metrics(out), reference(root, stage))
    print(f"{stage}: max loss difference after resume {diff:.3g}")
    # Same adapter at the end, too.
    a = load_file(out / "checkpoints/step-12/adapter/adapter_model.safetensors")
    b = load_file(_REFS[stage] / "checkpoints/step-12/adapter/adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_retention_keeps_the_newest_k(root):
    reference(root, "zero3")
    ckpts = sorted(p.name for p in (_REFS["zero3"] / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-12", "step-8"], ckpts  # step-4 deleted once step-12 was complete
    assert rundir.latest_name(_REFS["zero3"]) == "step-12"


def test_finished_run_is_left_alone_and_a_raised_max_steps_continues_it(root, tmp_path):
    reference(root, "zero2")
    out = tmp_path / "run"
    shutil.copytree(_REFS["zero2"], out)
    before = (out / "metrics.jsonl").read_text()
    proc = run_train(args("zero2", out), check=False)  # one process: it stops before any rank-specific check
    assert proc.returncode == 0 and "nothing to do" in proc.stdout and "train.max_steps" in proc.stdout
    assert (out / "metrics.jsonl").read_text() == before
    proc = run_train(args("zero2", out, "train.max_steps=14"), nprocs=2)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 15)) and "resumed from step-12" in proc.stdout
    # The schedule is the new one from the first resumed step on.
    m = multiplier("cosine", 12, 2, 14, 0.0)
    assert math.isclose(rows[12]["lr_groups"]["lora_A"], LR * m, rel_tol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Signals and kills from outside, as SLURM or a dying node would deliver them


def start(cmd_args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start the launcher in its own process group, like a batch job step."""
    return subprocess.Popen(train_command(cmd_args, nprocs=2), cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_rows(out: Path, proc: subprocess.Popen, rows: int, timeout: float = 300) -> None:
    path = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= rows:
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {rows} metrics rows after {timeout} s")


def wait_group_gone(proc: subprocess.Popen, timeout: float = 120) -> float:
    """Seconds until no process of the launcher's group is running (zombies awaiting their parent don't count)."""
    import psutil

    def running() -> bool:
        proc.poll()  # reap the launcher itself
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) == proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.Error):
                pass
        return False

    t0 = time.monotonic()
    pgid = proc.pid
    while time.monotonic() - t0 < timeout:
        if not running():
            return time.monotonic() - t0
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError(f"processes still alive {timeout} s after the signal")


def test_sigterm_to_the_job_saves_a_checkpoint_and_exits(root, tmp_path):
    out = tmp_path / "run"
    proc = start(args("zero2", out, "train.save_every=0"))
    wait_for_rows(out, proc, 3)
    os.killpg(proc.pid, signal.SIGTERM)  # what scancel / SLURM preemption does: every process of the step
    seconds = wait_group_gone(proc)
    log = proc.stdout.read()
    print(f"SIGTERM to exit: {seconds:.2f} s")
    assert "received SIGTERM" in log and "stopped by SIGTERM" in log, log[-3000:]
    rows = read_metrics(out)
    last = rows[-1]["step"]
    assert last < STEPS and rundir.latest_name(out) == f"step-{last}"
    assert checkpoint.verify(out / "checkpoints" / f"step-{last}") is None
    run_train(args("zero2", out), nprocs=2)
    assert_same_losses(read_metrics(out), reference(root, "zero2"))


def test_sigkill_while_training_then_resume(root, tmp_path):
    out = tmp_path / "run"
    proc = start(args("zero2", out))
    wait_for_rows(out, proc, 6)  # step-4 is sealed by then
    os.killpg(proc.pid, signal.SIGKILL)
    wait_group_gone(proc)
    proc = run_train(args("zero2", out), nprocs=2)
    assert "resumed from step-" in proc.stdout
    assert_same_losses(read_metrics(out), reference(root, "zero2"))  # rows after the checkpoint were redone


def test_crash_during_a_save_leaves_the_previous_checkpoint(root, tmp_path):
    out = tmp_path / "run"
    proc = run_train(args("zero2", out), nprocs=2, check=False, env={"LORAPLUS_FAULT": "save-kill@8"})
    assert proc.returncode != 0
    assert (out / "checkpoints" / ".step-8.tmp").is_dir() and not (out / "checkpoints" / "step-8").exists()
    assert rundir.latest_name(out) == "step-4"
    proc = run_train(args("zero2", out), nprocs=2)
    assert "removed .step-8.tmp" in proc.stdout and "resumed from step-4" in proc.stdout
    assert_same_losses(read_metrics(out), reference(root, "zero2"))


def test_damaged_checkpoints_are_skipped_with_the_reason(root, tmp_path):
    reference(root, "zero2")
    out = tmp_path / "run"
    shutil.copytree(_REFS["zero2"], out)
    ckpts = out / "checkpoints"
    shard = sorted((ckpts / "step-12" / "deepspeed").iterdir())[-1]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk or a killed copy
    adapter = ckpts / "step-8" / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-5] ^= 0xFF  # same size, one corrupt byte
    adapter.write_bytes(bytes(data))
    proc = run_train(args("zero2", out, "train.max_steps=12"), nprocs=2)
    assert "skipped step-12" in proc.stdout and "truncated" in proc.stdout
    assert "skipped step-8" in proc.stdout and "sha256" in proc.stdout
    assert "resumed from step-4" in proc.stdout
    assert (ckpts / "step-12.damaged").is_dir() and (ckpts / "step-8.damaged").is_dir()  # set aside, not deleted
    assert_same_losses(read_metrics(out), reference(root, "zero2"))
    assert checkpoint.verify(ckpts / "step-12") is None  # written again


def test_a_failed_save_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    # The write fails on rank 0 alone, inside DeepSpeed's save: the other rank must not be left waiting.
    out = tmp_path / "run"
    proc = run_train(args("zero2", out), nprocs=2, check=False, env={"LORAPLUS_FAULT": "save-enospc@8"})
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert "step-8 failed" in line and "No space left on device" in line and "step-4 is intact" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-4"]
    assert checkpoint.verify(out / "checkpoints" / "step-4") is None


def test_no_verifiable_checkpoint_is_refused_and_nothing_changes(root, tmp_path):
    reference(root, "zero2")
    out = tmp_path / "run"
    shutil.copytree(_REFS["zero2"], out)
    for manifest in (out / "checkpoints").glob("step-*/manifest.json"):
        manifest.unlink()  # as a save that never finished, or a checkpoint of an older version
    before = sorted(p.name for p in (out / "checkpoints").iterdir()), (out / "metrics.jsonl").read_text()
    proc = run_train(args("zero2", out), check=False)
    [line] = error_lines(proc)
    assert proc.returncode == 2 and "no checkpoint" in line and "step-12: no manifest.json" in line
    assert "--overwrite" in line and "Traceback" not in proc.stderr
    assert (sorted(p.name for p in (out / "checkpoints").iterdir()), (out / "metrics.jsonl").read_text()) == before


def test_a_run_in_progress_locks_its_output_dir(tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as rank 0 of a running job does
        proc = run_train(args("zero0", out), check=False)
    [line] = error_lines(proc)
    assert proc.returncode == 2 and "in use by another run" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_filesystem_without_flock_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(checkpoint, "_held_lock", None)
    monkeypatch.setattr(checkpoint.dist, "on_rank0", lambda fn, rank: fn())  # one rank, no process group
    checkpoint.probe_output_dir(tmp_path / "run", rank=0)
    assert "warning: cannot lock" in capsys.readouterr().err and checkpoint._held_lock is not None
    os.close(checkpoint._held_lock)


# ----------------------------------------------------------------------------------------------------------
# Non-finite steps


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_nonfinite_step_is_skipped_and_counted(tmp_path, stage):
    out = tmp_path / "run"
    proc = run_train(args(stage, out, "train.max_steps=5", "train.save_every=1"), nprocs=2,
                     env={"LORAPLUS_FAULT": "nonfinite@3"})
    assert "step 3: non-finite loss or gradients" in proc.stdout and "update skipped (1 so far)" in proc.stdout
    rows = read_metrics(out)
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert rows[2]["loss"] is None and [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2)
    # No update at step 3: its adapter equals step 2's; the schedule still moved on (step N is batch N).
    a2, a3, a5 = (load_file(out / f"checkpoints/step-{s}/adapter/adapter_model.safetensors") for s in (2, 3, 5))
    assert all(torch.equal(a2[k], a3[k]) for k in a2)
    assert all(torch.isfinite(a5[k]).all() for k in a5) and any(not torch.equal(a3[k], a5[k]) for k in a3)
    assert math.isclose(rows[3]["lr_groups"]["lora_A"], LR * multiplier("cosine", 3, 2, 5, 0.0), rel_tol=1e-9)
    assert json.loads((out / "checkpoints/step-5/trainer_state.json").read_text())["nonfinite_steps"] == 1


def test_nonfinite_step_stops_the_run_when_configured(tmp_path):
    out = tmp_path / "run"  # ZeRO-0 as one process: the loop's own skip path (no DeepSpeed overflow check)
    proc = run_train(args("zero0", out, "train.on_nonfinite=stop", "train.save_every=1"), check=False,
                     env={"LORAPLUS_FAULT": "nonfinite@3"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert "step 3" in line and "on_nonfinite=stop" in line
    assert rundir.latest_name(out) == "step-2" and read_metrics(out)[-1]["skipped"] is True


def test_nonfinite_step_skipped_under_zero0(tmp_path):
    out = tmp_path / "run"
    run_train(args("zero0", out, "train.max_steps=4", "train.save_every=1"), env={"LORAPLUS_FAULT": "nonfinite@3"})
    a2, a3, a4 = (load_file(out / f"checkpoints/step-{s}/adapter/adapter_model.safetensors") for s in (2, 3, 4))
    assert all(torch.equal(a2[k], a3[k]) for k in a2) and all(torch.isfinite(a4[k]).all() for k in a4)
    assert [r["skipped"] for r in read_metrics(out)] == [False, False, True, False]


# ----------------------------------------------------------------------------------------------------------
# Export


def test_export_adapter_and_merged_model_from_a_zero3_checkpoint(root, tmp_path):
    import subprocess
    import sys

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference(root, "zero3")
    ckpt = _REFS["zero3"] / "checkpoints" / "step-12"
    export = [sys.executable, str(REPO / "launch" / "export.py"), "--checkpoint"]
    subprocess.run([*export, str(_REFS["zero3"]), "--out", str(tmp_path / "adapter")], check=True)
    subprocess.run([*export, str(ckpt), "--out", str(tmp_path / "merged"), "--merge"], check=True)
    refused = subprocess.run([*export, str(ckpt), "--out", str(tmp_path / "merged"), "--merge"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "already exists" in refused.stderr

    base_dir = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        merged = merged_model(ids).logits
    assert merged_model.dtype == AutoModelForCausalLM.from_pretrained(base_dir).dtype
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert float((merged - with_adapter).abs().max()) < 1e-4
    # The adapter moved the model: the comparison is not between two copies of the base.
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
    assert float((merged - plain).abs().max()) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Another world size: DeepSpeed's universal checkpoint, with the ZeRO-3 group repair


NO_DROPOUT = "lora.dropout=0"  # another world size cannot replay per-rank dropout masks


def checkpoint_at_8(root: Path, stage: str, dest: Path) -> tuple[Path, list[dict]]:
    """A copy of a dropout-free reference run as it stood after step 8 (written on 2 ranks), and its metrics."""
    key = f"{stage}-nodrop"
    if key not in _REFS:
        out = root / f"ref-{key}"
        run_train(args(stage, out, NO_DROPOUT), nprocs=2)
        _REFS[key] = out
    shutil.copytree(_REFS[key], dest)
    shutil.rmtree(dest / "checkpoints" / "step-12")
    return dest, read_metrics(_REFS[key])


# Grow (2 -> 4) under both of DeepSpeed's ZeRO optimizers: ZeRO-2 (DeepSpeedZeroOptimizer, which ZeRO-1 is too
# in fp32) and ZeRO-3 (the universal load with the group repair), each re-partitioning the saved state four ways;
# shrink (2 -> 1, one partition, train.grad_accum rescaled) under ZeRO-0 (loaded directly) and ZeRO-3.
# tests/test_distributed.py resumes bf16 ZeRO-1 and ZeRO-3 on 1 rank.
@pytest.mark.parametrize("stage,world", [("zero0", 1), ("zero2", 4), ("zero3", 1), ("zero3", 4)])
def test_resume_on_another_world_size(root, tmp_path, stage, world):
    out, ref = checkpoint_at_8(root, stage, tmp_path / "run")
    extra = [NO_DROPOUT]
    if world == 4:
        if stage == "zero2":  # 4 samples per step cannot be 2 per rank on 4 ranks: the run says what would work
            # (once: the batch split is settled before anything that depends on the ZeRO stage)
            proc = run_train(args(stage, out, *extra), nprocs=4, check=False)
            [line] = error_lines(proc)
            assert proc.returncode == 2 and "global batch of 4" in line and "train.micro_batch_size=1" in line
        extra.append("train.micro_batch_size=1")
    proc = run_train(args(stage, out, *extra), nprocs=world)
    via = "directly" if stage == "zero0" else "through DeepSpeed's universal checkpoint"  # ZeRO-0 state is whole
    assert "resumed from step-8" in proc.stdout and f"loaded on {world} {via}" in proc.stdout
    if world == 1:
        assert "train.grad_accum 1 -> 2 keeps the global batch of 4" in proc.stdout
    rows, ref = trained_after(read_metrics(out), ref, 8)  # steps 9-12, trained on the new world size
    assert [r["step"] for r in rows] == list(range(9, STEPS + 1))
    # Same global batches, same updates; only the order of float sums over ranks differs.
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, ref, strict=True))
    assert diff <= 1e-4, f"max loss difference {diff:.3g} after resume"
    print(f"{stage} saved on 2 ranks, resumed on {world}: max loss difference {diff:.3g}")
    ratio = {r["lr_groups"]["lora_B"] / r["lr_groups"]["lora_A"] for r in rows}
    assert all(math.isclose(x, 16.0, rel_tol=1e-9) for x in ratio), ratio  # the LoRA+ ratio survived the load
    assert checkpoint.verify(out / "checkpoints" / "step-12") is None
    assert not list((out / "checkpoints").glob(".universal-*"))


def test_changed_data_and_pre_cache_checkpoints_are_refused():
    from pipeline.errors import UserError
    from pipeline.train.resume import check_compatible

    state = {"zero_stage": 2, "precision": "fp32", "data_fingerprint": "a" * 24, "num_samples": 2000}
    check_compatible(state, 2, "fp32", "a" * 24, 2000, "step-5")  # the same cache key: fine
    with pytest.raises(UserError, match="training data changed since step-5 .2000 samples then, 1800 now"):
        check_compatible(state, 2, "fp32", "b" * 24, 1800, "step-5")
    with pytest.raises(UserError, match="written before the data cache"):
        check_compatible({**state, "data_fingerprint": "c" * 64}, 2, "fp32", "a" * 24, 2000, "step-5")
