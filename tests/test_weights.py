"""Loading weights that were not written by `cvt.save_weights` for this exact model: settings a file records,
another input channel count, training checkpoints of timm and of cvt (EMA first), transformers' encoder without
its classifier, stripped BatchNorm counters, and how a foreign checkpoint's images are prepared."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch

import cvt
from cvt.data import preprocess_for
from cvt.weights import STATE_FORMAT, CheckpointError, from_ours

SMALL = dict(depths=(1, 1, 1))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's


def _model(**kw) -> cvt.CvT:
    torch.manual_seed(0)
    return cvt.create_model("cvt_13", **SMALL, **kw).eval()


def _logits(model: cvt.CvT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_settings_the_file_records_survive_a_variant_name(tmp_path):
    """act, stride_kv and layer_norm_eps change the outputs, not the shapes: the file's win over the variant's."""
    model = _model(act="gelu", stride_kv=1, layer_norm_eps=1e-6, num_classes=5)
    cvt.save_weights(model.state_dict(), model.cfg, tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 64, 64)
    named = cvt.create_model("cvt_13", **SMALL, pretrained=tmp_path / "w.safetensors")
    assert (named.cfg.act, named.cfg.stride_kv, named.cfg.layer_norm_eps) == ("gelu", 1, 1e-6)
    assert torch.equal(_logits(named, x), _logits(model, x))
    # what the caller sets explicitly still wins
    asked = cvt.create_model("cvt_13", **SMALL, act="quick_gelu", pretrained=tmp_path / "w.safetensors")
    assert asked.cfg.act == "quick_gelu" and not torch.allclose(_logits(asked, x), _logits(model, x))


def test_gelu_survives_the_hugging_face_round_trip(tmp_path):
    model = _model(act="gelu", num_classes=4)
    cvt.save_weights(model.state_dict(), model.cfg, tmp_path / "hf", fmt="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "gelu"
    back = cvt.from_pretrained(tmp_path / "hf")
    assert back.cfg.act == "gelu"
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(back, x), _logits(model, x))
    # a config.json from the Hub has no hidden_act: the released models' QuickGELU
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["hidden_act"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert cvt.from_pretrained(tmp_path / "hf").cfg.act == "quick_gelu"
    # ... which does not say the model's activation: a variant's name then keeps the variant's (cvt_tiny: GELU)
    tiny = cvt.create_model("cvt_tiny", depths=(1, 1, 1), num_classes=4).eval()
    cvt.save_weights(tiny.state_dict(), tiny.cfg, tmp_path / "tiny", fmt="hf")
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    del cfg["hidden_act"]
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(cfg))
    named = cvt.create_model("cvt_tiny", depths=(1, 1, 1), pretrained=tmp_path / "tiny")
    assert named.cfg.act == "gelu" and torch.equal(_logits(named, x), _logits(tiny, x))
    # an activation transformers ignores and cvt does not build is ignored too, with a warning
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_new"}))
    with pytest.warns(UserWarning, match="hidden_act 'gelu_new'.*ignored"):
        assert cvt.create_model("cvt_tiny", depths=(1, 1, 1), pretrained=tmp_path / "tiny").cfg.act == "gelu"


def test_first_convolution_adapts_to_the_channel_count(tmp_path):
    rgb = _model(num_classes=3)
    path = tmp_path / "CvT-rgb.pth"
    torch.save(from_ours(rgb.state_dict(), "authors"), path)
    grey = torch.rand(2, 1, 64, 64)
    for build in (lambda: cvt.create_model("cvt_13", **SMALL, in_chans=1, pretrained=path),
                  lambda: cvt.from_pretrained(path, in_chans=1)):
        with pytest.warns(UserWarning, match="takes 3 input channels, the model 1.*summed"):
            model = build()
        assert model.cfg.in_chans == 1
        # a grey image through the summed kernel = the same image as three equal channels through the original
        assert torch.allclose(_logits(model, grey), _logits(rgb, grey.expand(-1, 3, -1, -1)), atol=1e-5)
    with pytest.warns(UserWarning, match="tiled and rescaled"):
        six = cvt.from_pretrained(path, in_chans=6)
    assert torch.allclose(_logits(six, grey.expand(-1, 6, -1, -1)), _logits(rgb, grey.expand(-1, 3, -1, -1)), atol=1e-5)
    # without in_chans, a model takes the file's channel count, whatever the variant says: no adaptation
    cvt.save_weights(six.state_dict(), six.cfg, tmp_path / "six.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cvt.create_model("cvt_13", **SMALL, pretrained=tmp_path / "six.safetensors").cfg.in_chans == 6


@pytest.mark.parametrize("torch_2_4", [False, True])
def test_timm_training_checkpoint_loads_its_ema(tmp_path, monkeypatch, torch_2_4):
    if torch_2_4:  # no safe_globals context manager before torch 2.5 (pyproject allows 2.4)
        monkeypatch.delattr(torch.serialization, "safe_globals")
    raw, ema = _model(num_classes=3), _model(num_classes=3)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    ckpt = {"epoch": 9, "arch": "cvt_13", "state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict(),
            "optimizer": {"state": {}, "param_groups": []}, "version": 2, "metric": 81.6,
            "args": argparse.Namespace(model="cvt_13", lr=5e-4, drop_path=0.1)}
    torch.save(ckpt, tmp_path / "checkpoint-9.pth.tar")
    x = torch.randn(1, 3, 64, 64)
    loaded = cvt.create_model("cvt_13", **SMALL, pretrained=tmp_path / "checkpoint-9.pth.tar")
    assert torch.equal(_logits(loaded, x), _logits(ema, x))
    del ckpt["state_dict_ema"]
    torch.save(ckpt, tmp_path / "no_ema.pth")
    assert torch.equal(_logits(cvt.create_model("cvt_13", **SMALL, pretrained=tmp_path / "no_ema.pth"), x),
                       _logits(raw, x))


def test_cvt_training_checkpoint_says_what_it_holds(tmp_path):
    """checkpoint.pt of a run: its model config (a custom depth no variant has) and class names, EMA weights."""
    model = cvt.create_model("cvt_tiny", depths=(1, 1, 3), in_chans=1, num_classes=3).eval()
    ema = cvt.create_model("cvt_tiny", depths=(1, 1, 3), in_chans=1, num_classes=3).eval()
    torch.save({"format": STATE_FORMAT, "version": 1, "epoch": 3, "model": model.state_dict(),
                "ema": ema.state_dict(), "model_config": model.cfg.to_dict(), "classes": ["a", "b", "c"]},
               tmp_path / "checkpoint.pt")
    loaded = cvt.from_pretrained(tmp_path / "checkpoint.pt")
    assert loaded.cfg == model.cfg and loaded.class_names == ["a", "b", "c"]
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(_logits(loaded, x), _logits(ema, x))


def test_transformers_encoder_without_its_classifier(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # (depth i + 1 in stage i: the port indexes each stage's drop-path rates by the stage number)
    hf = transformers.CvtModel(transformers.CvtConfig(depth=[1, 2, 3], drop_path_rate=[0.0, 0.0, 0.1]),
                               add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path / "encoder")
    x = torch.randn(1, 3, 64, 64)
    # a backbone needs no classifier: no warning, and its last map is the encoder's output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = cvt.create_model("cvt_13", depths=(1, 2, 3), act="gelu", pretrained=tmp_path / "encoder",
                                    features_only=True, out_indices=(2,)).eval()
    with torch.no_grad():
        assert torch.allclose(backbone(x)[0], hf(x).last_hidden_state, atol=1e-5)
    with pytest.warns(UserWarning, match="holds no classifier"):
        classifier = cvt.create_model("cvt_13", depths=(1, 2, 3), act="gelu", pretrained=tmp_path / "encoder",
                                      num_classes=7)
    assert classifier.num_classes == 7 and torch.isfinite(_logits(classifier, x)).all()
    assert classifier.fresh_classifier
    # its random head answers nothing: eval and predict refuse it in one line
    from cvt.cli import main

    for argv in (["predict", "--checkpoint", str(tmp_path / "encoder"), "any.png"],
                 ["eval", "--checkpoint", str(tmp_path / "encoder"), "--data", "imagefolder:nowhere"]):
        with pytest.warns(UserWarning, match="holds no classifier"):
            assert main(argv) == 2
        assert "holds no trained classifier" in capsys.readouterr().err


def test_state_dict_without_batchnorm_counters_loads(tmp_path):
    model = _model(num_classes=3)
    stripped = {k: v for k, v in from_ours(model.state_dict(), "authors").items() if "num_batches_tracked" not in k}
    torch.save(stripped, tmp_path / "stripped.pth")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(cvt.create_model("cvt_13", **SMALL, pretrained=tmp_path / "stripped.pth"), x),
                       _logits(model, x))
    del stripped["stage0.patch_embed.proj.bias"]  # anything else missing is still an error
    torch.save(stripped, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="1 missing key.*stages.0.patch_embed.proj.bias"):
        cvt.create_model("cvt_13", **SMALL, pretrained=tmp_path / "broken.pth")


class _Gadget:
    pass


def test_refused_pickle_names_what_it_imports_and_how_to_go_on(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "gadget": _Gadget()}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as err:
        cvt.from_pretrained(tmp_path / "odd.pth")
    message = str(err.value)
    assert "names test_weights._Gadget" in message and "weights_only=False" in message
    assert "\x1b" not in message and "\n" not in message


@pytest.mark.parametrize("name,size,crop", [
    ("CvT-13-384x384-IN-1k.pth", 384, 1.0), ("CvT-w24-384x384-IN-22k.pth", 384, 1.0),
    ("CvT-13-224x224-IN-1k.pth", 224, 0.875), ("weights.pth", 224, 0.875), ("ckpt_100x1000.pth", 224, 0.875),
    ("run_2024x2024x.pth", 224, 0.875),
])
def test_foreign_checkpoints_get_the_authors_evaluation_protocol(tmp_path, name, size, crop):
    """At 224: resize, centre-crop 87.5%; at 384: resize to 384, no crop (REFERENCE: training recipe)."""
    (tmp_path / name).write_bytes(b"")
    pre = preprocess_for(tmp_path / name, 3)
    assert (pre.img_size, pre.crop_pct) == (size, crop)
    assert (preprocess_for(tmp_path / "weights.pth", 3, img_size=384).crop_pct,
            preprocess_for(tmp_path / "weights.pth", 3, img_size=288).crop_pct) == (1.0, 0.875)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 384}}))
    assert (preprocess_for(tmp_path / "hf", 3).img_size, preprocess_for(tmp_path / "hf", 3).crop_pct) == (384, 1.0)


def test_no_crop_at_384_keeps_the_whole_image():
    """"No crop" is the whole image resized to 384 x 384: a wide image keeps its left and right edges."""
    import numpy as np
    from PIL import Image

    from cvt.data import file_transform

    arr = np.full((300, 400, 3), 128, np.uint8)
    arr[:, :50], arr[:, -50:] = 0, 255
    pre = preprocess_for("CvT-13-384x384-IN-1k.pth", 3)
    out = file_transform(pre, train=False)(Image.fromarray(arr))
    assert out.shape == (3, 384, 384) and pre.crop_mode == "squash"
    assert out[:, :, 0].float().mean() < 10 and out[:, :, -1].float().mean() > 245
    # the 224 protocol crops: the edges are gone
    out = file_transform(preprocess_for("CvT-13-224x224-IN-1k.pth", 3), train=False)(Image.fromarray(arr))
    assert out.shape == (3, 224, 224) and 100 < out[:, :, 0].float().mean() < 160


def test_convert_warns_when_the_format_cannot_carry_the_model(tmp_path, capsys):
    from cvt.cli import main

    odd = cvt.create_model("cvt_small", in_chans=1, num_classes=10, act="gelu", patch_strides=(1, 2, 2))
    cvt.save_weights(odd.state_dict(), odd.cfg, tmp_path / "odd.safetensors")
    assert main(["convert", str(tmp_path / "odd.safetensors"), str(tmp_path / "odd.pth")]) == 0
    err = capsys.readouterr().err
    assert "cannot carry this model's patch_strides, act" in err and "patch_strides=(2, 2, 2)" in err
    assert main(["convert", str(tmp_path / "odd.safetensors"), str(tmp_path / "odd_hf")]) == 0
    assert capsys.readouterr().err == ""  # Hugging Face's config.json carries them all
    plain = _model()
    cvt.save_weights(plain.state_dict(), plain.cfg, tmp_path / "plain.safetensors")
    assert main(["convert", str(tmp_path / "plain.safetensors"), str(tmp_path / "plain.pth")]) == 0
    assert capsys.readouterr().err == ""
