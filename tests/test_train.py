"""End-to-end tests of `cvt train / eval / predict` at toy sizes: a generated image folder, fake Fashion-MNIST IDX
files, resume after an interruption, and two-process DistributedDataParallel on CPU (gloo)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import cvt
import cvt.data  # cvt.data.* below; `import cvt` alone does not load it
from conftest import CLASSES, TINY, TINY_ARGS, sigterm_at
from cvt.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tmp, folder, *extra: str, out: str = "run") -> tuple[int, str]:
    run = str(tmp / out)
    argv = ["train", *TINY, "--data", f"imagefolder:{folder}", "--img-size", "32", "--batch-size", "4",
            "--out", run, *extra]
    return main(argv), run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder):
    tmp = tmp_path_factory.mktemp("trained")
    rc, run = _train(tmp, folder, "--epochs", "2", "--lr", "3e-3", "--ema-decay", "0.9")
    assert rc == 0
    return run


# ---------------------------------------------------------------------------------------------------------------
def test_run_directory(trained):
    files = set(os.listdir(trained))
    for name in ("metrics.jsonl", "summary.json", "model.safetensors", "config.json", "checkpoint.pt",
                 "preprocess.json", "recipe.yaml", "curves.png", "confusion_matrix.png", "tensorboard"):
        assert name in files, name
    lines = [json.loads(line) for line in open(os.path.join(trained, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert set(r) >= {"epoch", "train_loss", "val_top1", "val_top5", "lr", "images_per_s", "seconds"}
        assert np.isfinite(r["train_loss"]) and 0 <= r["val_top1"] <= r["val_top5"] <= 100
    summary = json.load(open(os.path.join(trained, "summary.json")))
    assert summary["epochs"] == 2 and summary["final_top1"] == lines[-1]["val_top1"]
    assert summary["best_top1"] == max(r["val_top1"] for r in lines)
    assert summary["val_images"] == 9 and summary["classes"] == 3
    # the broken JPEG is skipped and counted; the hidden file and the .txt are not images at all
    assert summary["skipped_files"] == 1 and summary["skipped"][0].endswith("broken.jpg")
    model = cvt.create_model("cvt_tiny", pretrained=os.path.join(trained, "model.safetensors"), **TINY_ARGS)
    assert summary["params"] == cvt.param_count(model) and model.num_classes == 3
    assert cvt.from_pretrained(os.path.join(trained, "model.safetensors")).class_names == CLASSES
    state = torch.load(os.path.join(trained, "checkpoint.pt"), weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 0 and state["ema"] is not None
    assert os.listdir(os.path.join(trained, "tensorboard"))[0].startswith("events.out.tfevents")
    for png in ("curves.png", "confusion_matrix.png"):
        assert open(os.path.join(trained, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the saved weights are the evaluated ones (EMA on): the EMA in the checkpoint matches model.safetensors
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in state["ema"].items() if k in saved)


def test_best_weights_folder(tmp_path, folder, monkeypatch, capsys):
    """RUN/best/ holds the weights of the evaluation with the highest top-1 (timm's model_best), loadable alone:
    here the evaluations are made to score 50, 80, 80, 60, so the best is epoch 2 (the first of equals)."""
    from cvt import engine
    from cvt.tasks import classification

    real, scores, seen = classification.evaluate, iter([50.0, 80.0, 80.0, 60.0]), []

    def scripted(model, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})  # the weights being evaluated
        return dataclasses.replace(real(model, *args, **kwargs), top1=next(scores))

    monkeypatch.setattr(classification, "evaluate", scripted)
    rc, run = _train(tmp_path, folder, "--epochs", "4", "--lr", "3e-3", "--ema-decay", "0.9")
    assert rc == 0
    summary = json.load(open(f"{run}/summary.json"))
    assert (summary["best_top1"], summary["best_epoch"], summary["best_weights"]) == (80.0, 2, f"{run}/best")
    assert f"(best 80.00% at epoch 2, weights in {run}/best)" in capsys.readouterr().out
    assert sorted(os.listdir(f"{run}/best")) == ["best.json", "config.json", "model.safetensors", "preprocess.json"]
    assert json.load(open(f"{run}/best/best.json")) == {"epoch": 2, "val_top1": 80.0}
    best = cvt.from_pretrained(f"{run}/best").state_dict()
    assert all(torch.equal(best[k], seen[1][k]) for k in seen[1])  # epoch 2's weights ...
    assert not all(torch.equal(best[k], seen[3][k]) for k in seen[3])  # ... not the final ones
    monkeypatch.setattr(classification, "evaluate", real)
    assert main(["eval", "--checkpoint", f"{run}/best", "--data", f"imagefolder:{folder}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 9

    # best.json that does not match the history (a run from before best/ existed, or one killed between writing
    # best/ and its checkpoint): the summary does not name the folder
    (Path(run) / "best" / "best.json").write_text(json.dumps({"epoch": 3, "val_top1": 80.0}))
    assert engine._best_weights(Path(run), {"epoch": 2, "val_top1": 80.0}) is None
    (Path(run) / "best" / "best.json").unlink()
    assert engine._best_weights(Path(run), {"epoch": 2, "val_top1": 80.0}) is None


def test_eval_and_predict(trained, folder, capsys):
    assert main(["eval", "--checkpoint", f"{trained}/model.safetensors", "--data", f"imagefolder:{folder}",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.load(open(f"{trained}/summary.json"))
    assert report["images"] == 9 and report["classes"] == CLASSES
    assert sum(map(sum, report["confusion"])) == 9
    assert report["top1"] == pytest.approx(summary["final_top1"], abs=1e-6)  # the same weights, the same data
    assert set(report["per_class_top1"]) == set(CLASSES)
    assert os.path.exists(f"{trained}/eval/confusion_matrix.png")
    # the same report for people: figures, one line per class, the confusion matrix with a row per class
    assert main(["eval", "--checkpoint", f"{trained}/model.safetensors", "--data", f"imagefolder:{folder}"]) == 0
    text = capsys.readouterr().out
    assert f"top-1 {report['top1']:.2f}%" in text and "per-class top-1:" in text and "confusion matrix" in text
    rows = [line for line in text.splitlines() if line.split()[:2] in ([str(i), c] for i, c in enumerate(CLASSES))]
    assert len(rows) == 3 and [sum(map(int, r.split()[2:])) for r in rows] == list(map(sum, report["confusion"]))

    good, broken = f"{folder}/val/dog/0.png", f"{folder}/train/cat/broken.jpg"
    rc = main(["predict", "--checkpoint", trained, good, broken, "--top-k", "2", "--json"])
    captured = capsys.readouterr()
    assert rc == 1  # one file failed; the other was still answered
    out = json.loads(captured.out)
    assert out[0]["image"] == good and len(out[0]["predictions"]) == 2
    probs = [p["probability"] for p in out[0]["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert {p["class"] for p in out[0]["predictions"]} <= set(CLASSES)
    assert "error" in out[1] and "broken.jpg" in captured.err
    assert main(["predict", "--checkpoint", f"{trained}/model.safetensors", f"{folder}/val/cat"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.split(": ")[1].split()[0] in CLASSES for line in lines)


def test_eval_and_predict_with_hflip_tta(trained, folder, capsys):
    """--tta hflip reports the mean over each image and its mirror, in eval_hflip/ beside the single-view eval/."""
    data = ["--data", f"imagefolder:{folder}", "--json"]
    assert main(["eval", "--checkpoint", trained, *data]) == 0
    single = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", trained, *data, "--tta", "hflip"]) == 0
    tta = json.loads(capsys.readouterr().out)
    assert single["tta"] == "none" and tta["tta"] == "hflip" and tta["images"] == single["images"] == 9
    assert json.load(open(f"{trained}/eval/eval.json"))["tta"] == "none"  # not overwritten by the TTA report
    assert json.load(open(f"{trained}/eval_hflip/eval.json")) == tta
    assert single["loss"] != tta["loss"]  # the mirror views changed the probabilities
    image = f"{folder}/val/dog/0.png"
    model = cvt.from_pretrained(trained).eval()
    pre = cvt.data.preprocess_for(trained, model.cfg.in_chans, None, 224)
    x = cvt.data.BatchTransform(pre)(cvt.data.file_transform(pre, train=False)(cvt.data.open_image(image, 3))[None])
    with torch.no_grad():
        expected = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1))[0] / 2
    assert main(["predict", "--checkpoint", trained, image, "--top-k", "3", "--json", "--tta", "hflip"]) == 0
    got = {p["index"]: p["probability"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]}
    assert got == pytest.approx({i: round(expected[i].item(), 6) for i in range(3)}, abs=2e-6)


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, folder):
    """SIGTERM mid-epoch writes a checkpoint; --resume then ends with exactly the weights of a run that was
    never stopped (data order, RandAugment, mixup, random erasing, EMA, optimizer, schedule all restored)."""
    extra = ["--epochs", "2", "--ema-decay", "0.9", "--set", "mixup=0.8", "--set", "cutmix=1.0",
             "--set", "randaugment=rand-m9-mstd0.5-inc1", "--set", "reprob=0.25"]
    rc, straight = _train(tmp_path, folder, *extra, out="straight")
    assert rc == 0

    with sigterm_at(epoch=1, step=2):  # the user presses Ctrl-C / the scheduler sends SIGTERM
        rc, resumed = _train(tmp_path, folder, *extra, out="resumed")
    assert rc == 128 + signal.SIGTERM
    state = torch.load(f"{resumed}/checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    assert main(["train", "--out", resumed, "--resume"]) == 0
    assert torch.load(f"{resumed}/checkpoint.pt", weights_only=True)["config"]["ema_warmup"] is False

    a = torch.load(f"{straight}/checkpoint.pt", weights_only=True)
    b = torch.load(f"{resumed}/checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        diff = max((a[key][k].double() - b[key][k].double()).abs().max().item() for k in a[key])
        assert diff <= 1e-6, (key, diff)
    ma = [json.loads(x) for x in open(f"{straight}/metrics.jsonl")]
    mb = [json.loads(x) for x in open(f"{resumed}/metrics.jsonl")]
    assert [r["val_top1"] for r in ma] == [r["val_top1"] for r in mb] and len(mb) == 2
    # The interrupted epoch's line covers the whole epoch (the steps before the stop came with the checkpoint).
    assert state["partial"]["taken"] == 2 and state["partial"]["images"] > 0
    assert abs(ma[1]["train_loss"] - mb[1]["train_loss"]) <= 1e-4 and mb[1]["images_per_s"] > 0


def test_resume_refuses_renamed_class_folders(tmp_path, folder, capsys):
    """Labels are positions in the sorted class list: a class folder renamed between the run and its resume
    would silently relabel images, so the resume stops with one line instead."""
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    rc, run = _train(tmp_path, data, "--epochs", "1")
    assert rc == 0
    for split in ("train", "val"):
        os.rename(data / split / "cat", data / split / "zebra")  # bird, cat, dog -> bird, dog, zebra
    capsys.readouterr()
    assert main(["train", "--out", run, "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "has classes ['bird', 'dog', 'zebra']" in err and "expected ['bird', 'cat', 'dog']" in err


# ---------------------------------------------------------------------------------------------------------------
def test_fashion_mnist_files(tmp_path, fake_fmnist):
    images, labels = cvt.data.load_fashion_mnist("train", fake_fmnist)
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.uint8 and labels.tolist()[:3] == [0, 1, 2]
    rc = main(["train", *TINY, "--data-dir", str(fake_fmnist), "--batch-size", "16", "--epochs", "2",
               "--set", "shift=2", "--out", str(tmp_path / "fm")])
    assert rc == 0
    summary = json.load(open(tmp_path / "fm" / "summary.json"))
    assert summary["val_images"] == 20 and summary["img_size"] == 28 and summary["classes"] == 10
    # trained on whole 28x28 images: predict must not crop a file either
    assert json.load(open(tmp_path / "fm" / "preprocess.json"))["crop_pct"] == 1.0
    model = cvt.from_pretrained(tmp_path / "fm" / "model.safetensors")
    assert model.cfg.in_chans == 1 and model.class_names == cvt.data.FASHION_MNIST_CLASSES
    # a truncated file and a missing folder are one clear line each
    broken = tmp_path / "broken"
    shutil.copytree(fake_fmnist, broken)
    data = gzip.decompress((broken / "t10k-images-idx3-ubyte.gz").read_bytes())
    (broken / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        cvt.data.load_fashion_mnist("test", broken)
    (broken / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:10]))  # cut inside the header
    with pytest.raises(ValueError, match="truncated inside its header"):
        cvt.data.load_fashion_mnist("test", broken)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        cvt.data.load_fashion_mnist("test", tmp_path / "nowhere")


def test_compile_flag_and_mode_reach_torch_compile(tmp_path, fake_fmnist, monkeypatch):
    """`--compile` with `compile_mode` wraps the trained model in torch.compile with that mode (recorded here, not
    compiled: a real compile takes minutes on this CPU)."""
    calls = []

    def fake_compile(module, **kwargs):
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    rc = main(["train", *TINY, "--data-dir", str(fake_fmnist), "--batch-size", "16", "--epochs", "1", "--compile",
               "--set", "compile_mode=reduce-overhead", "--out", str(tmp_path / "c")])
    assert rc == 0 and calls == [{"mode": "reduce-overhead", "dynamic": False}]


def test_finetune_pretrained_new_head_and_size(tmp_path, trained, fake_fmnist):
    """3-class RGB weights at 32 px -> Fashion-MNIST (grey, 10 classes) at 40 px: new head, channels converted."""
    rc = main(["train", "--pretrained", f"{trained}/model.safetensors", "--data-dir", str(fake_fmnist),
               "--img-size", "40", "--batch-size", "16", "--epochs", "1", "--lr", "1e-9", "--warmup-epochs", "0",
               "--set", "min_lr=0", "--set", "weight_decay=0", "--num-workers", "0", "--out", str(tmp_path / "ft")])
    assert rc == 0
    before = cvt.from_pretrained(f"{trained}/model.safetensors").state_dict()
    after = cvt.from_pretrained(tmp_path / "ft" / "model.safetensors")
    assert after.num_classes == 10 and after.cfg.in_chans == 3
    assert json.load(open(tmp_path / "ft" / "preprocess.json"))["img_size"] == 40
    # at lr ~0 the backbone is the pretrained one (BatchNorm running statistics aside)
    w = "stages.2.blocks.0.mlp.fc1.weight"
    assert torch.allclose(after.state_dict()[w], before[w], atol=1e-6)


def test_recipe_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nepochz: 3\n")
    out = ["--out", str(tmp_path / "run")]  # none is written; a mistake must not reach ./runs either
    assert main(["train", "--config", str(bad), *out]) == 2
    err = capsys.readouterr().err
    assert "epochz" in err and "epochs" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad.write_text("lr: -1\n")
    assert main(["train", "--config", str(bad), *out]) == 2
    assert "lr must be a positive number" in capsys.readouterr().err
    assert main(["train", "--data", "imagefolder:" + str(tmp_path / "none"), "--epochs", "1", *out]) == 2
    assert "does not exist" in capsys.readouterr().err
    # flags are checked the same way (model_args values: tests/test_errors.py)
    for flag, value, message in (("--lr", "0", "lr must be a positive number, got 0.0"),
                                 ("--batch-size", "0", "batch_size must be an integer >= 1, got 0")):
        assert main(["train", flag, value, *out]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_recipes_in_configs_are_valid():
    from cvt.recipe import TrainConfig, load_recipe

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    recipes = sorted(f for f in os.listdir(root) if f.endswith(".yaml"))
    assert len(recipes) >= 3
    for name in recipes:
        cfg = TrainConfig(**load_recipe(os.path.join(root, name)))
        cvt.create_model(cfg.model or "cvt_tiny", **cfg.model_args)  # the model it names builds


def test_exponent_only_numbers_are_numbers_in_recipes_and_flags(tmp_path):
    # PyYAML alone reads `5e-4` (no dot) as the string '5e-4', which the config then refused as not a number.
    from cvt.commands.train import parse_settings
    from cvt.recipe import build_config, load_recipe, write_yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 5e-4\nmin_lr: 1E-6\nwarmup_lr: 1.0e-7\nepochs: 3\nmodel_args: {layer_norm_eps: 1e-6}\n")
    flags = parse_settings(["weight_decay=2e-2", "model_args.drop_path_rate=[0, 0, 1e-1]", "seed=7", "data=1e3x"])
    cfg = build_config(load_recipe(recipe), flags)
    assert (cfg.lr, cfg.min_lr, cfg.warmup_lr, cfg.weight_decay) == (5e-4, 1e-6, 1e-7, 2e-2)
    assert cfg.model_args == {"layer_norm_eps": 1e-6, "drop_path_rate": [0, 0, 0.1]}
    assert (cfg.epochs, cfg.seed, cfg.data) == (3, 7, "1e3x")  # ints stay ints, other words stay strings
    # what a run writes as recipe.yaml reads back to the same settings, a path that looks like a number included
    cfg = build_config(load_recipe(recipe), {"out": "1e-3", "data_dir": "2e5"})
    (tmp_path / "recipe.yaml").write_text(write_yaml(cfg.to_dict()))
    assert build_config(load_recipe(tmp_path / "recipe.yaml")) == cfg
    # `model_args:` with every field commented out is no model_args
    recipe.write_text("model_args:\n  # depths: [1, 2, 4]\n")
    assert build_config(load_recipe(recipe)).model_args == {}


def test_a_home_relative_data_path_is_expanded(tmp_path, monkeypatch, fake_fmnist):
    # `--data imagefolder:~/x` reaches the program with its `~` (the shell expands only a word's first character),
    # and a recipe's paths are never expanded by a shell
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(fake_fmnist, tmp_path / "fm")
    assert cvt.data.parse_data("imagefolder:~/pets") == ("imagefolder", str(tmp_path / "pets"))
    assert cvt.data.find_fashion_mnist("~/fm") == tmp_path / "fm"
    from cvt.recipe import build_config

    cfg = build_config({"out": "~/runs/a", "data_dir": "~/fm", "pretrained": "~/w.safetensors"})
    expanded = tuple(str(tmp_path / p) for p in ("runs/a", "fm", "w.safetensors"))
    assert (cfg.out, cfg.data_dir, cfg.pretrained) == expanded
    model = cvt.create_model("cvt_tiny", **TINY_ARGS)
    cvt.save_weights(model.state_dict(), model.cfg, tmp_path / "w.safetensors")
    assert cvt.read_checkpoint("~/w.safetensors").path == str(tmp_path / "w.safetensors")


# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cvt import engine
    from cvt.recipe import TrainConfig

    seen = {}
    real = engine.train_one_epoch

    def spy(t, *args, **kwargs):  # keep a handle on this rank's model
        seen["model"] = t.model
        return real(t, *args, **kwargs)

    engine.train_one_epoch = spy
    cfg = TrainConfig(model="cvt_tiny", model_args=dict(TINY_ARGS), data=f"imagefolder:{folder}", img_size=32,
                      batch_size=4, epochs=2, num_workers=0, out=out, device="cpu", mixup=0.8)
    summary = engine.fit(cfg)
    torch.save({"params": dict(seen["model"].named_parameters()), "summary": summary}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path, folder, capsys):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp")
    os.makedirs(out)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(folder), out), nprocs=2, start_method="spawn")
    r0 = torch.load(f"{out}/rank0.pt", weights_only=True)
    r1 = torch.load(f"{out}/rank1.pt", weights_only=True)
    assert r0["summary"]["processes"] == 2
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    # rank 0 saved exactly what the ranks trained
    saved = cvt.from_pretrained(f"{out}/model.safetensors").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in r0["params"].items())
    # the two ranks evaluated disjoint halves: 9 val images counted once each
    assert r0["summary"]["val_images"] == 9
    # ... each with the BatchNorm statistics of the saved model (rank 0's), not its own last update
    assert main(["eval", "--checkpoint", f"{out}/model.safetensors", "--data", f"imagefolder:{folder}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["loss"] == pytest.approx(r0["summary"]["final_loss"], abs=2e-5)


def test_runs_from_before_ema_warmup_resume_with_it_on(tmp_path, folder, monkeypatch):
    """Checkpoints written before `ema_warmup` existed had timm's warm-up always on; a resume keeps it on. They
    predate tasks too (no `task` entry): they resume as classification."""
    rc, run = _train(tmp_path, folder, "--epochs", "1", "--ema-decay", "0.9")
    assert rc == 0
    state = torch.load(f"{run}/checkpoint.pt", weights_only=True)
    assert state["task"] == state["config"]["task"] == "classification"
    del state["config"]["ema_warmup"], state["config"]["task"], state["task"]
    torch.save(state, f"{run}/checkpoint.pt")
    from timm.utils import ModelEmaV3

    seen = []
    real_init = ModelEmaV3.__init__
    monkeypatch.setattr(ModelEmaV3, "__init__",
                        lambda self, *a, **kw: (seen.append(kw.get("use_warmup")), real_init(self, *a, **kw))[1])
    assert main(["train", "--out", run, "--resume", "--epochs", "2"]) == 0
    assert seen == [True]
    state = torch.load(f"{run}/checkpoint.pt", weights_only=True)
    assert state["config"]["ema_warmup"] is True
    assert state["task"] == state["config"]["task"] == "classification"
    assert json.load(open(f"{run}/summary.json"))["task"] == "classification"
