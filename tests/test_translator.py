"""The learned translator (Stage 0): net shapes, each loss term against a plain re-computation, a tiny
training run with resume, loading it as a CrDoMix translator, and the errors a user can hit."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diga_fast.cli.main import main
from diga_fast.config import TranslatorConfig, apply_overrides, preset_recipe
from diga_fast.errors import DigaError
from diga_fast.method import gan_losses as tt
from diga_fast.stages import translator as translator_stage
from diga_fast.method.translators import CycleGANTranslator
from diga_fast.models.io import TRANSLATOR_FILE, TRANSLATOR_FORMAT, load_translator_generator, load_vgg_features, save_translator
from diga_fast.models.translator import ImageDecoder, ImageEncoder, ImageTranslator, MultiScaleDiscriminator, VGGFeatures

TINY = ("data.synthetic_train_images=8", "data.batch_size=2", "data.num_workers=0", "train.log_every=1",
        "translator.width=4", "translator.n_res=1", "translator.crop=[16,32]")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These convs are tiny; on a shared 2-core machine a second OpenMP thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_recipe(iters, *extra):
    recipe = preset_recipe("demo", "translator")
    return apply_overrides(recipe, [*TINY, f"train.iters={iters}", *extra])


# ------------------------------------------------------------------------------------------ nets


@pytest.mark.parametrize("size", [(5, 7), (33, 18), (1, 3), (16, 32)])
def test_translator_keeps_any_size_and_range(size):
    torch.manual_seed(0)
    generator = ImageTranslator(width=4, n_res=1)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = generator(x)
    assert y.shape == x.shape
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


def test_encoder_decoder_discriminator_shapes():
    encoder, decoder = ImageEncoder(width=4, n_res=2), ImageDecoder(width=4, n_res=2)
    code = encoder(torch.rand(2, 3, 24, 40) * 2 - 1)
    assert code.shape == (2, 16, 6, 10)
    out = decoder(code).detach()
    assert out.shape == (2, 3, 24, 40) and float(out.abs().max()) <= 1.0
    scores = MultiScaleDiscriminator(width=4)(torch.rand(2, 3, 64, 96))
    assert [tuple(s.shape) for s in scores] == [(2, 1, 4, 6), (2, 1, 2, 3), (2, 1, 1, 1)]
    assert len(MultiScaleDiscriminator(width=4)(torch.rand(2, 3, 16, 24))) == 1  # coarser scales too small


def test_paper_preset_sizes():
    recipe = preset_recipe("paper", "translator", source="gta5:/x", target="cityscapes:/y")
    cfg = recipe.translator
    assert (cfg.width, cfg.n_res, tuple(cfg.crop), cfg.identity_weight) == (64, 4, (512, 896), 0.001)
    assert (recipe.train.iters, recipe.data.batch_size) == (50_000, 2)
    assert (cfg.adv_weight, cfg.cycle_weight, cfg.edge_weight, cfg.perceptual_weight) == (0.5, 10.0, 20.0, 0.1)
    assert cfg.lr == 1e-4 and tuple(cfg.betas) == (0.5, 0.999)
    synthia = preset_recipe("paper", "translator", source="synthia:/x", target="cityscapes:/y")
    assert synthia.translator.identity_weight == 0.025 and synthia.train.iters == 50_000
    assert preset_recipe("demo", "translator").train.iters == 300


# ------------------------------------------------------------------------------------------ losses


def test_lsgan_losses():
    torch.manual_seed(0)
    real = [torch.randn(2, 1, 4, 6), torch.randn(2, 1, 2, 3)]
    fake = [torch.randn(2, 1, 4, 6), torch.randn(2, 1, 2, 3)]
    expect_g = sum(((f - 1) ** 2).sum() / f.numel() for f in fake)
    expect_d = sum(((r - 1) ** 2).sum() / r.numel() + (f ** 2).sum() / f.numel() for r, f in zip(real, fake))
    torch.testing.assert_close(tt.lsgan_generator_loss(fake), expect_g)
    torch.testing.assert_close(tt.lsgan_discriminator_loss(real, fake), expect_d)


def _edges_by_hand(labels: np.ndarray) -> np.ndarray:
    """|24 * centre - sum of the other 24 values of the 5x5 window| > 0.1, border replicated."""
    b, h, w = labels.shape
    padded = np.pad(labels.astype(np.float64), ((0, 0), (2, 2), (2, 2)), mode="edge")
    out = np.zeros((b, h, w), dtype=bool)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                window = padded[n, i:i + 5, j:j + 5]
                response = 25 * window[2, 2] - window.sum()
                out[n, i, j] = abs(response) > 0.1
    return out


def test_semantic_edges_and_edge_l1():
    rng = np.random.default_rng(0)
    labels = np.zeros((2, 11, 13), dtype=np.int64)
    labels[0, :, 7:] = 2
    labels[0, 3:5, 2:4] = 255
    labels[1] = rng.integers(0, 3, (11, 13))
    edges = tt.semantic_edges(torch.from_numpy(labels))
    np.testing.assert_array_equal(edges.numpy(), _edges_by_hand(labels))
    assert edges[0, :, 5:9].all() and not edges[0, :, 9:].any()  # within 2 pixels of the step at column 7

    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 11, 13), torch.rand(2, 3, 11, 13)
    mask = torch.from_numpy(_edges_by_hand(labels))
    diffs = [(a[n, c] - b[n, c]).abs()[mask[n]] for n in range(2) for c in range(3)]
    expect = torch.cat(diffs).mean()
    torch.testing.assert_close(tt.semantic_edge_l1(a, b, torch.from_numpy(labels)), expect)
    flat = torch.zeros(2, 11, 13, dtype=torch.long)
    assert float(tt.semantic_edge_l1(a, b, flat)) == 0.0


def test_perceptual_loss_matches_torchvision_style_slices(monkeypatch):
    torch.manual_seed(0)
    vgg = VGGFeatures("vgg19")
    assert vgg.taps == (1, 6, 11, 20, 29)  # relu1_1 .. relu5_1 in torchvision's vgg19().features
    x, y = torch.rand(1, 3, 16, 20) * 2 - 1, torch.rand(1, 3, 16, 20) * 2 - 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def slices(image):
        h, out = ((image + 1) / 2 - mean) / std, []
        for start, stop in ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30)):
            for layer in vgg.features[start:stop]:
                h = layer(h)
            out.append(h)
        return out

    expect = sum(w * (a - b).abs().mean() for w, a, b in zip((1 / 32, 1 / 16, 1 / 8, 1 / 4, 1), slices(x), slices(y)))
    torch.testing.assert_close(tt.perceptual_loss(vgg, x, y), expect)
    monkeypatch.setattr(tt, "VGG_MAX_WIDTH", 16)  # images wider than this are 2x2 average-pooled first
    wide_x, wide_y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    pooled = tt.perceptual_loss(vgg, F.avg_pool2d(wide_x, 2), F.avg_pool2d(wide_y, 2))
    torch.testing.assert_close(tt.perceptual_loss(vgg, wide_x, wide_y), pooled)


def test_generator_losses_match_plain_recomputation():
    torch.manual_seed(0)
    nets = tt.TranslatorNets(width=4, n_res=1)
    x_s, x_t = torch.rand(2, 3, 16, 24) * 2 - 1, torch.rand(2, 3, 16, 24) * 2 - 1
    y_s = torch.randint(0, 4, (2, 16, 24))
    vgg = VGGFeatures("vgg16")
    cfg = TranslatorConfig(identity_weight=0.025)
    images = tt.generator_forward(nets, x_s, x_t)
    total, terms = tt.generator_losses(nets, images, x_s, y_s, x_t, cfg, vgg)

    enc_s, dec_s2t, enc_t, dec_t2s = nets.s2t.encoder, nets.s2t.decoder, nets.t2s.encoder, nets.t2s.decoder
    s2t, t2s = dec_s2t(enc_s(x_s)), dec_t2s(enc_t(x_t))
    l1 = lambda a, b: (a - b).abs().mean()  # noqa: E731
    expect = {
        "adv": tt.lsgan_generator_loss(nets.dis_s2t(s2t)) + tt.lsgan_generator_loss(nets.dis_t2s(t2s)),
        "cycle": l1(dec_t2s(enc_t(s2t)), x_s) + l1(dec_s2t(enc_s(t2s)), x_t),
        "edge": tt.semantic_edge_l1(s2t, x_s, y_s),
        "identity": l1(dec_t2s(enc_s(x_s)), x_s) + l1(dec_s2t(enc_t(x_t)), x_t),
        "perceptual": tt.perceptual_loss(vgg, s2t, x_s) + tt.perceptual_loss(vgg, t2s, x_t),
    }
    for name, value in expect.items():
        torch.testing.assert_close(terms[name], value, msg=name)
    weighted = (0.5 * expect["adv"] + 10 * expect["cycle"] + 20 * expect["edge"] + 0.1 * expect["perceptual"]
                + 0.025 * expect["identity"])
    torch.testing.assert_close(total, weighted)
    _, no_vgg = tt.generator_losses(nets, images, x_s, y_s, x_t, cfg, None)
    assert "perceptual" not in no_vgg

    d = tt.discriminator_loss(nets, images, x_s, x_t)
    expect_d = (tt.lsgan_discriminator_loss(nets.dis_s2t(x_t), nets.dis_s2t(s2t))
                + tt.lsgan_discriminator_loss(nets.dis_t2s(x_s), nets.dis_t2s(t2s)))
    torch.testing.assert_close(d, expect_d)


# ------------------------------------------------------------------------------------------ VGG file


def test_vgg_weights_load_from_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(0)
    source = VGGFeatures("vgg16")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's head: ignored
    torch.save(state, tmp_path / "vgg16.pth")
    loaded = load_vgg_features(tmp_path / "vgg16.pth")
    assert loaded.variant == "vgg16"
    torch.testing.assert_close(loaded.features[0].weight, source.features[0].weight)

    state["features.2.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(DigaError, match="features.2.weight"):
        load_vgg_features(tmp_path / "bad.pth")
    with pytest.raises(DigaError, match="not found"):
        load_vgg_features(tmp_path / "missing.pth")


def test_missing_vgg_file_stops_before_the_run_starts(tmp_path):
    recipe = tiny_recipe(1, f"translator.vgg_weights={tmp_path / 'nope.pth'}")
    with pytest.raises(DigaError, match="vgg_weights: file not found"):
        translator_stage.train_translator(recipe, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("translator") / "run"
    summary = translator_stage.train_translator(tiny_recipe(3), out, device="cpu")
    return out, summary


def test_training_writes_a_translator_run(trained):
    out, summary = trained
    assert summary == {"translator": str(out / TRANSLATOR_FILE), "iters": 3, "perceptual": False}
    assert {"config.yaml", TRANSLATOR_FILE, "state.pt", "metrics.jsonl", "preview.png"} <= {p.name for p in out.iterdir()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "perceptual loss off" in records[0]["note"]
    steps = [r for r in records if "loss_g" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert {"adv", "cycle", "edge", "identity", "loss_d", "lr"} <= set(steps[0])


def test_resume_continues_exactly(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    translator_stage.train_translator(tiny_recipe(5, "train.save_every=3"), straight, device="cpu")

    interrupted = tmp_path / "interrupted"
    calls = {"n": 0}
    real_discriminator_loss = tt.discriminator_loss

    def crash_at_step_4(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_discriminator_loss(*args)

    monkeypatch.setattr(translator_stage, "discriminator_loss", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        translator_stage.train_translator(tiny_recipe(5, "train.save_every=3"), interrupted, device="cpu")
    monkeypatch.setattr(translator_stage, "discriminator_loss", real_discriminator_loss)
    translator_stage.train_translator(tiny_recipe(5, "train.save_every=3"), interrupted, device="cpu", resume=True)

    a, b = load_file(str(straight / TRANSLATOR_FILE)), load_file(str(interrupted / TRANSLATOR_FILE))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3, 4, 5]


def test_cyclegan_translator_loads_and_translates(trained):
    out, _ = trained
    translator = CycleGANTranslator(out)
    x = torch.rand(2, 3, 21, 30)
    y = translator(x)
    assert y.shape == x.shape and y.dtype == x.dtype and not y.requires_grad
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    from_file = load_translator_generator(out / TRANSLATOR_FILE, "cpu")
    torch.testing.assert_close(from_file(x), y)
    state = torch.load(out / "state.pt", weights_only=False)["extras"]["nets"]
    reference = ImageTranslator(4, 1)
    reference.load_state_dict({k[len("s2t."):]: v for k, v in state.items() if k.startswith("s2t.")})
    torch.testing.assert_close(reference(x), y)


def test_cli_train_translator(tmp_path, capsys):
    out = tmp_path / "cli"
    try:
        main(["train", "translator", "--out", str(out), "--iters", "1", *TINY])
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"translator saved: {out / TRANSLATOR_FILE}" in captured.out.replace("\n", "")
    assert "perceptual loss off" in captured.err


# ------------------------------------------------------------------------------------------ errors


def test_translator_checkpoint_errors(tmp_path, trained):
    out, _ = trained
    with pytest.raises(DigaError, match="not found"):
        load_translator_generator(tmp_path / "nothing.safetensors")
    with pytest.raises(DigaError, match=f"holds no {TRANSLATOR_FILE}"):
        load_translator_generator(tmp_path)

    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DigaError, match="not a translator checkpoint"):
        load_translator_generator(tmp_path / "garbage.safetensors")

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"), metadata={"format": "diga-fast/1"})
    with pytest.raises(DigaError, match="not a translator checkpoint"):
        CycleGANTranslator(tmp_path / "model.safetensors")

    tensors = load_file(str(out / TRANSLATOR_FILE))
    key = "decoder.layers.0.body.0.1.weight"
    assert key in tensors
    tensors[key] = torch.zeros(3, 3, 3, 3)
    metadata = {"format": TRANSLATOR_FORMAT, "kind": "cyclegan", "width": "4", "n_res": "1"}
    save_file(tensors, str(tmp_path / "wrong_shape.safetensors"), metadata=metadata)
    with pytest.raises(DigaError, match=f"'{key}' has shape"):
        load_translator_generator(tmp_path / "wrong_shape.safetensors")

    save_translator(tmp_path / "wide.safetensors", ImageTranslator(6, 1))
    tensors = load_file(str(tmp_path / "wide.safetensors"))
    save_file(tensors, str(tmp_path / "mislabelled.safetensors"), metadata=metadata)
    with pytest.raises(DigaError, match="has shape"):
        CycleGANTranslator(tmp_path / "mislabelled.safetensors")
