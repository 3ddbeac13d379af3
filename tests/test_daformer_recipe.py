"""The ``paper-daformer`` preset, ``--model daformer_*`` on real data and the built-in pair, and the
AdamW optimiser with DAFormer's warm-up-then-poly schedule."""

import pytest
from diga_fast.stages.recipes import resolve_recipe

from diga_fast.config import preset_recipe, validate_recipe
from diga_fast.engine.optim import build_optimizer, lr_factor
from diga_fast.errors import DigaError
from diga_fast.models import build_model

OPTIONS = {"config_file": None, "pretrained": None, "iters": None, "seed": None, "bf16": None, "resume": False, "out": "",
           "overrides": ()}


def test_paper_daformer_is_daformers_training_on_top_of_paper():
    recipe = preset_recipe("paper-daformer", "warmup", "gta5:/g", "cityscapes:/c")
    paper = preset_recipe("paper", "warmup", "gta5:/g", "cityscapes:/c")
    assert recipe.model.arch == "daformer_mitb5"
    o = recipe.optim
    assert (o.name, o.lr, o.head_lr_mult, o.weight_decay, o.warmup_iters, o.poly_power) == ("adamw", 6e-5, 10.0, 0.01,
                                                                                            1500, 1.0)
    d = recipe.data
    assert (d.crop, d.batch_size, d.source_resize, d.target_resize, d.rare_class_sampling) == (
        (512, 512), 2, (720, 1280), (512, 1024), True)
    assert d.source_sizes is None and d.source_scale is None
    for section in ("warmup", "self_training", "translator"):  # DiGA's method is paper's
        assert getattr(recipe, section) == getattr(paper, section)
    assert recipe.train == paper.train
    synthia = preset_recipe("paper-daformer", "warmup", "synthia:/s", "cityscapes:/c")
    assert synthia.data.source_resize == (760, 1280) and synthia.train.source_loss == "ohem"


def test_real_data_refuses_to_start_without_mit_weights_and_model_picks_the_preset(tmp_path):
    source, target = f"gta5:{tmp_path}", f"cityscapes:{tmp_path}"
    with pytest.raises(DigaError, match="paper-daformer recipe starts from ImageNet weights.*mit_bX.pth"):
        resolve_recipe("warmup", source=source, target=target, preset=None, arch="daformer_mitb5",
                       check=True, **{**OPTIONS, "overrides": ("translator.kind=fda",)})
    recipe = resolve_recipe("warmup", source=source, target=target, preset=None, arch="daformer_mitb5",
                            **{**OPTIONS, "overrides": ("translator.kind=fda", "model.pretrained=none")})
    assert recipe.preset == "paper-daformer" and recipe.optim.name == "adamw"
    demo = resolve_recipe("warmup", source=None, target=None, preset=None, arch="daformer_mitb0", **OPTIONS)
    assert demo.preset == "demo" and demo.optim.name == "adamw" and demo.optim.warmup_iters == 50
    explicit = resolve_recipe("warmup", source=None, target=None, preset="paper", arch="daformer_mitb0",
                              **{**OPTIONS, "overrides": ("translator.kind=fda", "model.pretrained=none")})
    assert explicit.optim.name == "sgd"  # an explicit preset keeps its optimiser


def test_warm_up_then_poly():
    assert lr_factor(0, 100, 1.0, warmup_iters=10, warmup_ratio=1e-6) == pytest.approx(1e-6)
    assert lr_factor(5, 100, 1.0, 10, 1e-6) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert lr_factor(10, 100, 1.0, 10) == pytest.approx(0.9)
    assert lr_factor(50, 100, 0.9) == pytest.approx(0.5 ** 0.9)


def test_adamw_groups_head_lr_and_no_decay_on_encoder_norms():
    recipe = validate_recipe(preset_recipe("demo", "warmup"))
    recipe.optim = preset_recipe("paper-daformer", "warmup", "gta5:/g", "cityscapes:/c").optim
    model = build_model("daformer_mitb0", 19)
    optimizer = build_optimizer(model, recipe)
    backbone, norms, head = optimizer.param_groups
    assert (backbone["lr"], norms["lr"], head["lr"]) == pytest.approx((6e-5, 6e-5, 6e-4))
    assert (backbone["weight_decay"], norms["weight_decay"], head["weight_decay"]) == (0.01, 0.0, 0.01)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
