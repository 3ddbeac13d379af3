"""``torchrun`` with the gloo backend on CPU, 2 processes: the ranks stay identical (weights, EMA
teacher, BatchNorm statistics, centroids), and a 2 x 1-image run equals a 1 x 2-image run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import run, torchrun

TINY = ("data.synthetic_train_images=8", "data.synthetic_val_images=3", "data.num_workers=0", "train.log_every=1",
        "data.crop=[48, 96]", "warmup.visualize_every=0")
# batch-split independent model: no dropout, BatchNorm on its running statistics
SPLIT_FREE = ("model.dropout=0", "model.freeze_bn_stats=true")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")]


def _weights(path):
    return load_file(str(path))


def _assert_close(a, b, what):
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-4, atol=1e-5), f"{what}: {key}"


def test_ranks_stay_identical_through_warmup_and_self_training(tmp_path):
    warmup = tmp_path / "warmup"
    done = torchrun(tmp_path, "train", "warmup", "--out", warmup, "--iters", "3", "data.batch_size=2", *TINY)
    assert done.stdout.count("run folder:") == 1  # rank 0 reports for all
    ranks = json.loads((warmup / "ranks.json").read_text())
    assert ranks["world"] == 2 and ranks["identical"], ranks
    steps = [json.loads(line)["step"] for line in (warmup / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # one writer: three log steps and the final evaluation

    self_run = tmp_path / "self"
    torchrun(tmp_path, "train", "self", "--init", warmup, "--out", self_run, "--iters", "2", "data.batch_size=2", *TINY,
             "self_training.forward=grouped")  # the official grouping: two student forwards in one DDP call
    ranks = json.loads((self_run / "ranks.json").read_text())
    assert ranks["identical"] and {"student", "teacher", "centroids"} <= set(ranks["fingerprints"]), ranks
    assert len(list((self_run / "pseudo_labels" / "labels").glob("*.png"))) == 8  # both shards written
    initial = torch.load(self_run / "initial_centroids.pt")["centroids"]
    assert not torch.equal(initial, torch.load(self_run / "centroids.pt")["centroids"])


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, capsys):
    single, double = tmp_path / "single", tmp_path / "double"
    code, _, err = run(capsys, "train", "warmup", "--out", single / "warmup", "--iters", "3", "data.batch_size=2",
                       *TINY, *SPLIT_FREE)
    assert code == 0, err
    torchrun(tmp_path, "train", "warmup", "--out", double / "warmup", "--iters", "3", "data.batch_size=1", *TINY, *SPLIT_FREE)
    for name in ("student", "teacher"):
        _assert_close(_weights(single / "warmup" / f"{name}.safetensors"),
                      _weights(double / "warmup" / f"{name}.safetensors"), f"warm-up {name}")
    evals = [json.loads((d / "warmup" / "eval.json").read_text()) for d in (single, double)]
    assert evals[0]["miou"] == pytest.approx(evals[1]["miou"])  # sharded evaluation, counts summed

    # self-training from the same warm-up: sharded pseudo-labels and centroids, gathered centroid updates
    init = single / "warmup"
    code, _, err = run(capsys, "train", "self", "--init", init, "--out", single / "self", "--iters", "2",
                       "data.batch_size=2", *TINY, *SPLIT_FREE)
    assert code == 0, err
    torchrun(tmp_path, "train", "self", "--init", init, "--out", double / "self", "--iters", "2", "data.batch_size=1",
             *TINY, *SPLIT_FREE)
    _assert_close(_weights(single / "self" / "student.safetensors"), _weights(double / "self" / "student.safetensors"),
                  "self-training student")
    for name in ("initial_centroids.pt", "centroids.pt"):
        a, b = (torch.load(d / "self" / name)["centroids"] for d in (single, double))
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


def test_translator_two_processes_equal_one_process(tmp_path, capsys):
    options = ("--iters", "2", "data.synthetic_train_images=8", "data.num_workers=0", "translator.crop=[32, 64]")
    code, _, err = run(capsys, "train", "translator", "--out", tmp_path / "single", "data.batch_size=2", *options)
    assert code == 0, err
    torchrun(tmp_path, "train", "translator", "--out", tmp_path / "double", "data.batch_size=1", *options)
    # Compared through what they compute, loosely: Adam's first steps are ~lr * sign(grad), so
    # float-noise gradients (e.g. conv biases in front of an InstanceNorm) move weights by a full step
    # in either direction. Measured 3e-4; averaging the edge loss per rank instead of over all edge
    # pixels gave 1.9e-2. The float noise depends on the CPU: max 3e-4 on one 2-core VM, max 2.6e-3
    # (mean 4.1e-4) on an AMD EPYC VM, so the bound sits between that noise and the bug.
    from diga_fast.models.io import load_translator_generator

    image = torch.rand(2, 3, 40, 72, generator=torch.Generator().manual_seed(0))
    single, double = (load_translator_generator(tmp_path / d)(image) for d in ("single", "double"))
    difference = (single - double).abs()
    assert difference.max() < 8e-3 and difference.mean() < 1.5e-3, (difference.max(), difference.mean())


def _workers(parent: int) -> list[int]:
    """The PIDs whose parent is ``parent`` (torchrun's worker processes)."""
    from pathlib import Path

    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def test_a_frozen_rank_stops_the_others_with_a_named_collective(tmp_path):
    """SIGSTOP one of two gloo ranks: the other stops within train.dist_timeout_minutes with one line
    naming the collective it waited in, and torchrun exits with a failure instead of hanging."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diga_fast.cli.main",
         "train", "source", "--out", str(out), "--iters", "100000", *TINY, "data.batch_size=2",
         "train.dist_timeout_minutes=0.25", "train.save_every=2"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "state.pt").is_file():
            assert launcher.poll() is None and time.time() < deadline, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        workers = _workers(launcher.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGSTOP)  # one rank freezes
        stopped = time.time()
        _, err = launcher.communicate(timeout=180)
        assert launcher.returncode != 0
        assert "no answer from every rank within 0.25 min" in err, err[-3000:]
        assert time.time() - stopped < 150
    finally:
        for pid in _workers(launcher.pid) if launcher.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
