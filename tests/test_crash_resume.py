"""A run killed with SIGKILL mid-training and resumed ends bit-identical to an uninterrupted one, and
an --out that cannot hold a run fails before training with one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, assert_one_line_error, run
from safetensors.torch import load_file

TINY_STAGE = (*TINY, "data.crop=[48, 96]", "warmup.visualize_every=0")
KILL_AFTER = 4  # SIGKILL once state.pt holds a checkpoint at this step or later
RUN_FILES = {"config.yaml", "state.pt", "student.safetensors", "teacher.safetensors", "metrics.jsonl", "eval.json"}


def _diga(*argv):
    """``diga ARGV`` as a command line for a child process."""
    return [sys.executable, "-m", "diga_fast.cli.main", *map(str, argv)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # TRITON_INTERPRET (no GPU) comes from conftest


def _train(out, iters, *extra):
    return _diga("train", "warmup", "--out", out, "--iters", iters, *TINY_STAGE, "train.save_every=2", *extra)


def _saved_step(out):
    """The step of ``out/state.pt``, or None before the first checkpoint (it is renamed into place whole)."""
    try:
        return int(torch.load(out / "state.pt", map_location="cpu", weights_only=False)["step"])
    except FileNotFoundError:
        return None


def _start_and_kill(out, iters, log):
    """Start a run and SIGKILL it once a checkpoint at step >= KILL_AFTER exists; returns the step
    state.pt holds after the kill, or None when the run ended before it could be killed."""
    with open(log, "wb") as sink:
        child = subprocess.Popen(_train(out, iters), stdout=sink, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline, seen = time.monotonic() + 120, None
        while time.monotonic() < deadline and child.poll() is None:
            state = out / "state.pt"
            stamp = state.stat().st_mtime_ns if state.exists() else None
            if stamp is not None and stamp != seen:
                seen = stamp
                if (_saved_step(out) or 0) >= KILL_AFTER:
                    os.kill(child.pid, signal.SIGKILL)
                    break
            time.sleep(0.01)
        else:
            if child.poll() is None:
                pytest.fail(f"no checkpoint at step {KILL_AFTER} within 120 s: {log.read_text()[-2000:]}")
        code = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if code != -signal.SIGKILL:
        assert code == 0, log.read_text()[-2000:]
        return None
    return _saved_step(out)


def _killed_mid_run(out, log):
    """(the step state.pt holds, the run's iterations) of a run SIGKILLed mid-run: 40 iterations, long
    enough that the kill lands before the end, or 160 if this machine outran it."""
    for iters in (40, 160):
        step = _start_and_kill(out, iters, log)
        if step is not None:
            return step, iters
        shutil.rmtree(out)
    pytest.fail("every run finished before it could be killed")


def _records(out):
    """metrics.jsonl without the timing column."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "it_per_s"} for line in lines]


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identical(tmp_path):
    crashed, straight = tmp_path / "crashed", tmp_path / "straight"
    step, iters = _killed_mid_run(crashed, tmp_path / "crashed.log")
    assert KILL_AFTER <= step < iters
    assert not (crashed / "eval.json").exists()  # it really died mid-run
    left = {p.name for p in crashed.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")}

    resumed = subprocess.run(_diga("train", "warmup", "--resume", "--out", crashed, *TINY_STAGE), env=_env(),
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = subprocess.run(_train(straight, iters), env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]

    for name in ("student.safetensors", "teacher.safetensors"):
        first, second = load_file(str(crashed / name)), load_file(str(straight / name))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), f"{name} differs after kill -9 and --resume"
    assert _saved_step(crashed) == iters
    assert _records(crashed) == _records(straight)  # the resumed log continues the killed one, step for step
    names = {p.name for p in crashed.iterdir()} - {".lock"}  # the run folder's lock file, in both
    assert RUN_FILES <= names and {n for n in names if not n.startswith(".")} == {p.name for p in straight.iterdir() if not p.name.startswith(".")}
    hidden = {n for n in names if n.startswith(".")}
    assert not hidden, f"temporary files left: {hidden} (the kill left {left})"  # the resumed start removes them


@pytest.mark.parametrize("case", ["read-only parent", "parent is a file", "out is a file"])
def test_unwritable_out_fails_before_training(tmp_path, capsys, case):
    if case == "read-only parent":
        if os.geteuid() == 0:
            pytest.skip("root writes into a chmod 0o500 folder anyway (the 'parent is a file' case runs)")
        parent = tmp_path / "locked"
        parent.mkdir()
        parent.chmod(0o500)
        out, fragment = parent / "run", "is not writable"
    elif case == "parent is a file":
        (tmp_path / "file").write_text("")
        out, fragment = tmp_path / "file" / "run", "is not a folder"
    else:
        (tmp_path / "run").write_text("")
        out, fragment = tmp_path / "run", "is a file"  # click's own check of --out
    try:
        code, _, err = run(capsys, "train", "warmup", "--out", out, "--iters", "1", *TINY_STAGE)
    finally:
        if case == "read-only parent":
            parent.chmod(0o700)
    assert_one_line_error(code, err, fragment, str(out))
    assert code == 2
    assert not out.is_dir()


def test_nearly_full_disk_fails_before_training(tmp_path, capsys, monkeypatch):
    from diga_fast.engine import run as checkpoint

    real, asked = checkpoint.shutil.disk_usage, []

    def ten_mib_free(path):
        asked.append(path)
        return real(path)._replace(free=10 * 2**20)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", ten_mib_free)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "warmup", "--out", out, "--iters", "1", *TINY_STAGE)
    assert_one_line_error(code, err, str(out), "10.0 MiB free", f"{checkpoint.MIN_FREE_BYTES // 2**20} MiB")
    assert code == 2 and asked
    assert not (out / "config.yaml").exists() and not (out / "state.pt").exists()

    monkeypatch.setattr(checkpoint, "MIN_FREE_BYTES", 2**20)  # the same disk with a lower floor: the run goes ahead
    code, _, err = run(capsys, "train", "warmup", "--out", out, "--iters", "1", *TINY_STAGE)
    assert code == 0, err
    assert (out / "state.pt").is_file()


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(tmp_path):
    from diga_fast.engine.logging import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.write(step, loss=1.0 / step)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')  # the kill landed mid-write
    log.truncate_after(2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    from diga_fast.utils.io import atomic_write

    atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_run_holds_the_folder(tmp_path, capsys):
    """A run holds an OS lock on its folder (fcntl.flock on .lock): a second run there, with or without
    --force, and a --resume of it get one line naming the PID, exit 2, and touch nothing; once the holder
    is killed (the kernel drops the lock), --resume continues the run."""
    out = tmp_path / "run"
    first = subprocess.Popen(_diga("train", "warmup", "--out", out, "--iters", "100000", *TINY_STAGE, "train.save_every=2"),
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (out / "state.pt").is_file():
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        holder = (out / ".lock").read_text().strip()
        assert holder == str(first.pid)
        # the holder keeps checkpointing: its own .tmp files come and go, everything else must stay
        settled = lambda: {p.name for p in out.iterdir() if not p.name.endswith(".tmp")}
        before = settled()
        for extra in ((), ("--force",)):
            code, _, err = run(capsys, "train", "warmup", "--out", out, "--iters", "1", *TINY_STAGE, *extra)
            assert_one_line_error(code, err, "in use", holder)
            assert code == 2
        code, _, err = run(capsys, "train", "warmup", "--out", out, "--resume")
        assert_one_line_error(code, err, "in use", holder)
        assert settled() >= before and (out / "state.pt").is_file()
    finally:
        first.kill()
        first.wait()
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    code, _, err = run(capsys, "train", "warmup", "--out", out, "--resume", "--iters", str(step + 1))
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGUSR1, 0), (signal.SIGINT, 2)],
                         ids=["SIGTERM", "SIGINT", "SIGUSR1", "ctrl-c-to-the-process-group-with-loader-workers"])
def test_a_stop_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, capsys, signum, workers):
    """Preemption (SIGTERM from SLURM or Kubernetes, SLURM's --signal=USR1, Ctrl-C): the step in progress
    ends, the checkpoint of that step is written, one line names it and the --resume command, and the
    exit status is 128 + the signal; --resume then continues from that step. Ctrl-C in a terminal
    signals the whole process group, DataLoader workers included: the same."""
    out = tmp_path / "run"
    child = subprocess.Popen(_diga("train", "warmup", "--out", out, "--iters", "100000", *TINY_STAGE,
                                   "train.save_every=1000", f"data.num_workers={workers}"),
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().count("\n") >= 3:
        assert child.poll() is None and time.time() < deadline, child.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    if workers:
        os.killpg(child.pid, signum)
    else:
        child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    err = err.decode()
    assert child.returncode == 128 + signum, err[-2000:]
    line = [text for text in err.splitlines() if "stopped after step" in text]
    assert len(line) == 1 and "Traceback" not in err, err[-2000:]
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    assert f"stopped after step {step} of 100000" in line[0] and f"diga train warmup --resume --out {out}" in line[0]
    code, _, err = run(capsys, "train", "warmup", "--out", out, "--resume", "--iters", str(step + 2))
    assert code == 0, err
    assert torch.load(out / "state.pt", weights_only=True)["step"] == step + 2


@pytest.mark.slow
def test_a_torchelastic_restart_resumes_by_itself(tmp_path):
    """torchrun --max-restarts repeats the first launch's command line (no --resume) with
    TORCHELASTIC_RESTART_COUNT > 0: the restarted worker continues the run from its checkpoint; the
    same command on a first launch is still refused."""
    out = tmp_path / "run"
    _, iters = _killed_mid_run(out, tmp_path / "first.log")
    again = subprocess.run(_train(out, iters), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "holds a run" in again.stderr
    restarted = subprocess.run(_train(out, iters), env={**_env(), "TORCHELASTIC_RESTART_COUNT": "1"},
                               capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "torchelastic restart: resuming" in restarted.stderr
    assert _saved_step(out) == iters and (out / "eval.json").is_file()


def _worker_of_rank(agent_pid, rank):
    """The PID of the torchrun worker (a child of the agent ``agent_pid``) whose RANK is ``rank``, or None."""
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc (Linux)")
def test_torchrun_max_restarts_continues_after_a_rank_is_killed(tmp_path):
    """The real thing: `torchrun --max-restarts 1` with two workers; rank 1 is SIGKILLed once a
    checkpoint exists. The agent stops rank 0, starts both again with the same command line, and they
    resume from the checkpoint by themselves and finish: exit 0, every step logged once after it."""
    out, iters = tmp_path / "run", 200  # long enough that a starved test process still kills it mid-run
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
               *_train(out, iters)[1:]]
    with open(tmp_path / "torchrun.log", "w+") as log:
        agent = subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while (_saved_step(out) or 0) < KILL_AFTER:
                assert agent.poll() is None and time.time() < deadline, "the run ended before a checkpoint"
                time.sleep(0.05)
            killed_at = _saved_step(out)
            os.kill(_worker_of_rank(agent.pid, 1), signal.SIGKILL)
            code = agent.wait(timeout=300)
        finally:
            agent.kill()
        log.seek(0)
        output = log.read()
    assert code == 0, output[-5000:]
    assert killed_at < iters and "failed (exitcode: -9) local_rank: 1" in output, output[-3000:]
    assert "torchelastic restart: resuming" in output, output[-3000:]
    assert _saved_step(out) == iters and (out / "eval.json").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [*range(1, iters + 1), iters]  # the steps after the checkpoint logged again, once


def test_a_disk_that_fills_while_saving_keeps_the_last_checkpoint_whole(tmp_path, capsys, monkeypatch):
    """ENOSPC while state.pt of step 4 is written: one line says so and that step 2's checkpoint is intact;
    the weights and state.pt both still hold step 2, no temporary file is left, and --resume continues."""
    import errno

    real, calls = torch.save, []

    def fills_up(obj, target, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            with open(target, "wb") as partial:
                partial.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, target, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", fills_up)
    code, _, err = run(capsys, "train", "warmup", "--out", out, "--iters", "6", *TINY_STAGE, "train.save_every=2")
    assert_one_line_error(code, err, "no space left on device writing", "the checkpoint of step 2 is intact")
    monkeypatch.setattr(torch, "save", real)
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2
    student = load_file(str(out / "student.safetensors"))
    assert all(torch.equal(student[k], state["modules"]["student"][k]) for k in student)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    code, _, err = run(capsys, "train", "warmup", "--out", out, "--resume")
    assert code == 0, err
