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
