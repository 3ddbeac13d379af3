"""``benchmarks/ablation.py``'s runner: every run after the runs it starts from, never more than
``--jobs`` at a time, the ``--set`` overrides on every command (the real runs train; here a fake
process stands in for ``diga``)."""

from diga_fast.benchmarks import ablation


def test_runs_wait_for_their_parents_and_respect_jobs(tmp_path, monkeypatch):
    configs = {
        "base": (["train", "warmup"], None),
        "translator": (["train", "translator"], None),
        "with translator": (["train", "warmup", "translator.kind=cyclegan"], {"translator.checkpoint": "translator"}),
        "round": (["train", "self"], "base"),
    }
    launched, running, peak = [], set(), [0]

    class FakeProcess:
        def __init__(self, argv, stdout=None):
            self.argv, self.polls, self.returncode = argv, 0, None
            launched.append(argv)
            running.add(id(self))
            peak[0] = max(peak[0], len(running))

        def poll(self):
            self.polls += 1
            if self.polls >= 2:  # finishes on its second poll
                self.returncode = 0
                running.discard(id(self))
            return self.returncode

    monkeypatch.setattr(ablation.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(ablation.time, "sleep", lambda s: None)
    runs = [(name, seed) for name in configs for seed in (0, 1)]
    for name, seed in runs:
        (tmp_path / f"{ablation.slug(name)}_s{seed}").mkdir()
    walls = ablation.run_all(configs, runs, tmp_path, jobs=2, overrides=["data.batch_size=2"])
    assert set(walls) == set(runs) and peak[0] <= 2 and len(launched) == len(runs)
    order = [(argv[argv.index("--out") + 1], argv) for argv in launched]
    position = {out: i for i, (out, _) in enumerate(order)}
    for seed in (0, 1):
        assert position[str(tmp_path / f"base_s{seed}")] < position[str(tmp_path / f"round_s{seed}")]
        assert position[str(tmp_path / f"translator_s{seed}")] < position[str(tmp_path / f"with_translator_s{seed}")]
    round_argv = next(argv for out, argv in order if out.endswith("round_s1"))
    assert round_argv[round_argv.index("--init") + 1] == str(tmp_path / "base_s1")
    assert all(argv[-1] == "data.batch_size=2" for argv in launched)
    with_translator = next(argv for out, argv in order if out.endswith("with_translator_s0"))
    assert f"translator.checkpoint={tmp_path / 'translator_s0'}" in with_translator
