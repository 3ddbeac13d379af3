"""The DAFormer network through the CLI on the built-in pair: every training stage with
``--model daformer_mitb0`` (tiny data, one or two steps each; rare-class sampling in one), evaluation."""

import json

import yaml
from cli_helpers import TINY, run

TINY_STAGE = (*TINY, "data.crop=[48, 64]", "warmup.visualize_every=0", "data.synthetic_train_images=4",
              "data.eval_max_images=2")


def test_every_stage_trains_the_daformer_network(tmp_path, capsys):
    code, _, err = run(capsys, "train", "source", "--model", "daformer_mitb0", "--out", tmp_path / "source",
                       "--iters", "1", *TINY_STAGE, "data.rare_class_sampling=true", "data.rcs_min_pixels=200")
    assert code == 0, err
    assert (tmp_path / "source" / "rare_class_stats.json").is_file()
    warmup = tmp_path / "warmup"
    code, _, err = run(capsys, "train", "warmup", "--model", "daformer_mitb0", "--out", warmup, "--iters", "2",
                       *TINY_STAGE)
    assert code == 0, err
    recipe = yaml.safe_load((warmup / "config.yaml").read_text())
    assert recipe["model"]["arch"] == "daformer_mitb0" and recipe["optim"]["name"] == "adamw"
    lrs = [json.loads(line)["lr"] for line in (warmup / "metrics.jsonl").read_text().splitlines() if "lr" in line]
    assert 0 < lrs[0] < lrs[1] < 6e-4 / 25  # linear warm-up from 1e-6 x over 50 steps

    out = tmp_path / "self"  # no --model: the network and its optimiser come from the warm-up run
    code, _, err = run(capsys, "train", "self", "--init", warmup, "--out", out, "--iters", "1", *TINY_STAGE)
    assert code == 0, err
    recipe = yaml.safe_load((out / "config.yaml").read_text())
    assert recipe["model"]["arch"] == "daformer_mitb0" and recipe["optim"]["name"] == "adamw"
    assert (out / "pseudo_labels").is_dir() and (out / "centroids.pt").is_file()

    code, _, err = run(capsys, "eval", "--checkpoint", out, "--target", "synthetic", "--synthetic-images", "2",
                            "--json", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["num_classes"] == 19


def test_demo_takes_the_network_and_daformers_batch(tmp_path, capsys):
    """``diga demo --model daformer_mitb0``: every stage trains that network with AdamW and batch 2."""
    out = tmp_path / "demo"
    code, stdout, err = run(capsys, "demo", "--model", "daformer_mitb0", "--out", out, "--rounds", "1", "--no-export",
                            "--device", "cpu", *(o for o in TINY if not o.startswith("data.batch_size")),
                            "data.crop=[48, 64]", "train.iters=2", "warmup.visualize_every=0", "data.eval_max_images=2")
    assert code == 0, err
    assert "daformer_mitb0 network" in stdout
    for stage in ("source_only", "warmup", "self_training_round1"):
        recipe = yaml.safe_load((out / stage / "config.yaml").read_text())
        assert (recipe["model"]["arch"], recipe["optim"]["name"], recipe["data"]["batch_size"]) == (
            "daformer_mitb0", "adamw", 2), stage
    code, _, err = run(capsys, "demo", "--model", "daformer_mitb0", "--pretrained", tmp_path / "missing.pth",
                       "--out", tmp_path / "other")
    assert code != 0 and "--pretrained: file not found" in err and not (tmp_path / "other").exists()
