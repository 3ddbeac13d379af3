"""Running ``diga`` in-process from tests."""

from diga_fast.cli.main import main

TINY = ("data.synthetic_train_images=8", "data.synthetic_val_images=3", "data.batch_size=2", "data.num_workers=0",
        "train.log_every=1")
FAST = (*TINY, "data.crop=[48, 96]", "warmup.visualize_every=0")


def tiny_source_run(folder):
    """A finished two-step source run in ``folder/source``, trained in a subprocess (the test process's
    RNG and torch state stay untouched)."""
    import subprocess
    import sys

    out = folder / "source"
    done = subprocess.run([sys.executable, "-m", "diga_fast.cli.main", "train", "source", "--iters", "2", "--out",
                           str(out), *FAST], capture_output=True, text=True)
    assert done.returncode == 0 and (out / "eval.json").is_file(), done.stderr[-2000:]
    return out


def run(capsys, *argv):
    """Run ``diga ARGV`` in-process; returns (exit code, stdout, stderr)."""
    try:
        main(list(map(str, argv)))
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    """Progress lines may precede it; the error itself is one line, the last, with no traceback."""
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("diga: error")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def crash_then_resume(tmp_path, capsys, monkeypatch, module, argv, options):
    """Run ``argv`` (with ``options``) for 4 steps with a NaN loss at step 4, resume, and return the run
    folder (the checkpoint of step 2 was written once step 3's loss was finite)."""
    real, calls = module.source_cross_entropy, []

    def nan_on_fourth_call(logits, labels, train):
        calls.append(1)
        return real(logits, labels, train) * (float("nan") if len(calls) == 4 else 1.0)

    out = tmp_path / "crashed"
    monkeypatch.setattr(module, "source_cross_entropy", nan_on_fourth_call)
    code, _, err = run(capsys, *argv, "--out", out, "--iters", "4", *options, "train.save_every=2")
    assert_one_line_error(code, err, "step 4", "step 2")
    monkeypatch.setattr(module, "source_cross_entropy", real)
    code, _, err = run(capsys, *argv[:2], "--out", out, "--resume")
    assert code == 0, err
    return out


def torchrun(cwd, *argv, nproc=2):
    """``torchrun --standalone --nproc_per_node NPROC -m diga_fast.cli.main ARGV`` (CPU, gloo, one thread each)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "diga_fast.cli.main", *map(str, argv)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
