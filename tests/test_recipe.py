import pytest

from diga_fast.config import Recipe, apply_overrides, load_yaml, preset_recipe, recipe_from_dict, save_yaml
from diga_fast.errors import DigaError


def test_yaml_round_trip(tmp_path):
    recipe = preset_recipe("paper", "source", source="gta5:/data/gta5", target="cityscapes:/data/cs")
    save_yaml(recipe, tmp_path / "config.yaml")
    loaded = recipe_from_dict(load_yaml(tmp_path / "config.yaml"))
    assert loaded == recipe
    assert loaded.data.crop == (512, 896) and isinstance(loaded.data.crop, tuple)
    assert loaded.digest() == recipe.digest()


def test_paper_preset_is_the_official_recipe():
    gta = preset_recipe("paper", "source", source="gta5:/x")
    assert gta.model.arch == "deeplabv2_r101"
    assert (gta.optim.lr, gta.optim.head_lr_mult, gta.optim.momentum, gta.optim.weight_decay) == (2.5e-4, 10.0, 0.9, 5e-4)
    assert gta.data.source_resize == (720, 1280) and gta.data.source_scale == (0.7, 1.0)
    assert gta.data.eval_scales == (1.0, 0.5) and gta.train.iters == 80_000
    synthia = preset_recipe("paper", "source", source="synthia:/x")
    assert synthia.data.label_space == "synthia16" and synthia.data.source_scale is None
    assert gta.train.source_loss == "ce" and synthia.train.source_loss == "ohem"
    assert (synthia.train.ohem_thresh, synthia.train.ohem_min_kept) == (0.7, 100_000)


def test_overrides_are_typed():
    recipe = apply_overrides(Recipe(), ["optim.lr=0.05", "data.crop=[64, 128]", "train.bf16=true", "model.pretrained=null"])
    assert recipe.optim.lr == 0.05 and recipe.data.crop == (64, 128) and recipe.train.bf16 is True
    assert apply_overrides(Recipe(), ["optim.lr=1e-3"]).optim.lr == 1e-3
    recipe = apply_overrides(Recipe(), ["optim.lr=1"])
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown recipe key 'optim.lrr'"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("train.iters=1.5", "train.iters: expected an integer"),
        ("data.crop=[1, 2, 3]", "data.crop: expected 2 values"),
        ("optim=3", "optim: expected a mapping"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(DigaError, match=message.replace("[", r"\[").replace("(", r"\(")):
        apply_overrides(Recipe(), [override])


def test_bad_config_file(tmp_path):
    with pytest.raises(DigaError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(DigaError, match="must hold a mapping"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(DigaError, match="unknown preset"):
        preset_recipe("huge", "source")


def test_paper_refuses_random_init_and_a_missing_translator():
    from diga_fast.config import validate_recipe

    warmup = preset_recipe("paper", "warmup", source="gta5:/x", target="cityscapes:/y")
    assert warmup.translator.kind == "cyclegan"
    with pytest.raises(DigaError, match="pass --pretrained FILE"):
        validate_recipe(warmup)
    warmup.model.pretrained = "none"  # on purpose: accepted (the stage prints why it is unusual)
    with pytest.raises(DigaError, match="diga train translator"):
        validate_recipe(warmup)
    validate_recipe(apply_overrides(warmup, ["translator.kind=fda"]))
    validate_recipe(apply_overrides(warmup, ["translator.kind=cyclegan", "translator.checkpoint=/runs/t"]))
    self_stage = preset_recipe("paper", "self", source="gta5:/x", target="cityscapes:/y")  # starts from --init
    validate_recipe(apply_overrides(self_stage, ["translator.checkpoint=/runs/t"]))
    demo = preset_recipe("demo", "warmup")
    assert demo.translator.kind == "fda" and validate_recipe(demo)


def test_paper_takes_the_official_switches_demo_keeps_its_own():
    paper = preset_recipe("paper", "self", source="gta5:/x")
    assert (paper.train.ce_normalizer, paper.warmup.teacher_mode, paper.self_training.forward,
            paper.self_training.source_beta, paper.self_training.feat_upsample) == ("all", "train", "grouped", 0.3, "scores")
    demo = preset_recipe("demo", "self")  # the official teacher mode and forwards (measured: docs/results.md), its own rest
    assert (demo.train.ce_normalizer, demo.warmup.teacher_mode, demo.self_training.forward,
            demo.self_training.source_beta, demo.self_training.feat_upsample) == ("valid", "train", "grouped", None, "nearest")
    synthia = preset_recipe("paper", "warmup", source="synthia:/x")
    assert synthia.data.batch_size == 4 and synthia.train.source_loss == "ohem"


def test_self_training_inherits_what_the_init_runs_command_set():
    """Everything the warm-up's command changed from its preset (optimiser included), not its stage or
    length; the self stage's own preset values stay where the warm-up kept its preset's."""
    from diga_fast.config import inherit_run

    warmup = apply_overrides(preset_recipe("demo", "warmup"), ["translator.kind=cyclegan", "translator.checkpoint=/t",
                                                                "data.crop=[64, 128]", "optim.lr=0.5", "train.iters=7"])
    recipe = preset_recipe("demo", "self")
    taken = inherit_run(recipe, warmup.to_dict())
    assert recipe.translator.kind == "cyclegan" and recipe.data.crop == (64, 128) and recipe.optim.lr == 0.5
    assert recipe.stage == "self" and recipe.train.iters == preset_recipe("demo", "self").train.iters
    assert sorted(taken) == ["data.crop=[64, 128]", "optim.lr=0.5", "translator.checkpoint='/t'", "translator.kind='cyclegan'"]


def _saved_run(folder, recipe):
    folder.mkdir(parents=True)
    save_yaml(recipe, folder / "config.yaml")
    return str(folder)


@pytest.mark.parametrize("preset", ["paper", "paper-daformer"])
def test_train_self_init_continues_the_warmup_runs_preset_and_recipe(tmp_path, capsys, preset):
    """`diga train self --init WARMUP` with no --preset on a paper / paper-daformer warm-up: that preset's
    self-training recipe (its optimiser, sampling, batch geometry), the warm-up's translator (the paper
    check passes), and a line each for what was taken and what this command changed."""
    from diga_fast.stages.recipes import resolve_recipe

    source, target = "gta5:/data/gta5", "cityscapes:/data/cs"
    warmup = apply_overrides(preset_recipe(preset, "warmup", source, target),
                             ["translator.checkpoint=/runs/translator", "model.pretrained=/w/imagenet.pth"])
    init = _saved_run(tmp_path / "warmup", warmup)
    recipe = resolve_recipe("self", source=None, target=None, preset=None, config_file=None, arch=None, pretrained=None,
                            iters=None, seed=None, bf16=None, resume=False, out="", overrides=("data.crop=[256, 256]",),
                            init=init)
    own = preset_recipe(preset, "self", source, target)
    assert recipe.preset == preset and recipe.stage == "self" and recipe.optim == own.optim
    assert recipe.model.arch == own.model.arch and recipe.data.rare_class_sampling == own.data.rare_class_sampling
    assert recipe.data.source_sizes == own.data.source_sizes and recipe.data.batch_size == own.data.batch_size
    assert recipe.translator.checkpoint == "/runs/translator" and recipe.data.crop == (256, 256)
    assert (recipe.data.source, recipe.data.target) == (source, target)
    err = capsys.readouterr().err
    assert f"the {preset} recipe (its preset), with " in err and "translator.checkpoint='/runs/translator'" in err
    assert "changed by this command: data.crop: " in err and "-> [256, 256]" in err


def test_labelling_commands_check_only_what_they_use(tmp_path):
    """pseudo-label / centroids on a paper warm-up run that names no translator: its recipe resolves
    (the translator and ImageNet weights are the training's starting points, not labelling's)."""
    from diga_fast.stages.recipes import labelling_recipe

    warmup = preset_recipe("paper", "warmup", "gta5:/data/gta5", "cityscapes:/data/cs")
    recipe = labelling_recipe(_saved_run(tmp_path / "warmup", warmup), None, None, None, None, ())
    assert recipe.preset == "paper" and recipe.data.target == "cityscapes:/data/cs"
    assert recipe.self_training.pseudo_label_scales == warmup.self_training.pseudo_label_scales


def test_readme_fidelity_table_is_the_generated_one():
    """Change a `paper` field and this fails until docs/fidelity.md's table is regenerated (`diga recipe table`)."""
    from pathlib import Path

    from diga_fast.fidelity import fidelity_table

    readme = (Path(__file__).resolve().parents[1] / "docs" / "fidelity.md").read_text()
    begin, end = "<!-- fidelity-table:begin -->\n", "<!-- fidelity-table:end -->"
    assert readme[readme.index(begin) + len(begin):readme.index(end)] == fidelity_table()


def test_recipe_show_prints_the_resolved_recipe(capsys):
    import yaml

    from cli_helpers import run

    code, stdout, err = run(capsys, "recipe", "show", "--preset", "paper", "--stage", "self", "train.iters=7")
    assert code == 0, err
    shown = yaml.safe_load(stdout)
    assert shown["train"]["iters"] == 7 and shown["train"]["ce_normalizer"] == "all"
    assert shown["translator"]["kind"] == "cyclegan" and shown["model"]["arch"] == "deeplabv2_r101"


def test_train_threads_sets_the_stage_cpu_threads(tmp_path):
    """``train.threads`` (the demo's 1) is what a stage's torch ops run with; 0 leaves torch's default."""
    import torch

    from diga_fast.config import validate_recipe
    from diga_fast.stages.common import Stage

    assert preset_recipe("demo", "warmup").train.threads == 1 and preset_recipe("paper", "warmup").train.threads == 0
    recipe = preset_recipe("demo", "source")
    recipe.train.threads = -1
    with pytest.raises(DigaError, match="train.threads"):
        validate_recipe(recipe)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        recipe.train.threads = 0
        Stage(recipe, tmp_path / "run", "cpu", resume=False)
        assert torch.get_num_threads() == 2
        recipe.train.threads = 1
        Stage(recipe, tmp_path / "run", "cpu", resume=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_train_kernels_choices_and_older_true_false():
    """train.kernels names a backend; config.yaml files of older runs (and older commands) say true/false."""
    from diga_fast.config import validate_recipe

    assert Recipe().train.kernels == "auto"
    assert apply_overrides(Recipe(), ["train.kernels=compile"]).train.kernels == "compile"
    assert apply_overrides(Recipe(), ["train.kernels=false"]).train.kernels == "torch"
    assert recipe_from_dict({"train": {"kernels": True}}).train.kernels == "auto"
    with pytest.raises(DigaError, match="train.kernels"):
        validate_recipe(apply_overrides(Recipe(), ["train.kernels=inductor"]))


def test_a_warmup_batch_change_brings_its_size_rows_along():
    """A SYNTHIA warm-up run with data.batch_size=2 (its preset: 4, no per-size target rows) continued by
    self-training (its preset: 3, with rows adding up to 3): the batch and both size lists come from the
    run together, so the self-training recipe checks."""
    from diga_fast.config import inherit_run, validate_recipe

    warmup = apply_overrides(preset_recipe("paper", "warmup", "synthia:/s", "cityscapes:/c"),
                             ["data.batch_size=2", "data.source_sizes=null"])
    recipe = preset_recipe("paper", "self", "synthia:/s", "cityscapes:/c")
    inherit_run(recipe, warmup.to_dict())
    assert (recipe.data.batch_size, recipe.data.source_sizes, recipe.data.target_sizes) == (2, None, None)
    validate_recipe(recipe, starting_points=False)
