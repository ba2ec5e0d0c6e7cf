"""Reliability of `cvt train` when things go wrong: a run SIGKILLed and resumed ends with the weights of a run never
stopped; a write killed half-way leaves the checkpoint intact; a non-finite loss stops the run without touching the
last checkpoint; Ctrl-C (SIGINT to the process group, DataLoader workers included) and an outside SIGTERM stop with a
checkpoint; under DDP the skipped files of every rank are counted, and with `sync_bn` two processes train as one."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cvt
from conftest import TINY, TINY_ARGS, make_image, write_image_folder
from cvt import engine
from cvt.cli import main

# Every augmentation there is: per-image RandAugment and flips (in the DataLoader), mixup/cutmix and random erasing
# (on the batch), EMA on top.
AUGMENT = ["--ema-decay", "0.9", "--set", "mixup=0.8", "--set", "cutmix=1.0", "--set",
           "randaugment=rand-m9-mstd0.5-inc1", "--set", "reprob=0.25"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """12 images a class in train/ (9 steps an epoch at batch 4), 2 a class in val/."""
    return write_image_folder(tmp_path_factory.mktemp("many"), 2, {"train": 12, "val": 2}, classes=("a", "b", "c"))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """6 large JPEGs a class (2048 px: ~45 ms each to decode and crop), so that training waits on its workers."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(4)
    for split, n in (("train", 6), ("val", 1)):
        for c, name in enumerate(("a", "b", "c")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                small = Image.fromarray(make_image(rng, c, (48, 48)))
                small.resize((2048, 2048) if split == "train" else (48, 48)).save(d / f"{i}.jpg", quality=90)
    return root


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--data", f"imagefolder:{data}", "--img-size", "32", "--batch-size", "4",
            "--out", str(out), *extra]


def _spawn(argv: list[str], workers_by_forkserver: bool = False, **kwargs) -> subprocess.Popen:
    """`cvt train` in a child process that imports this checkout's cvt (CI: the editable install, here: src/).
    `workers_by_forkserver`: DataLoader workers start as on Python >= 3.14 (Linux) or like spawn on macOS, not
    forked from the main process, so they inherit none of its signal handlers."""
    src = str(Path(cvt.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cvt.cli"]
    if workers_by_forkserver:
        cmd = [sys.executable, "-c", "import multiprocessing as mp, sys; mp.set_start_method('forkserver'); "
               "mp.set_forkserver_preload(['cvt.data']); from cvt.cli import main; sys.exit(main(sys.argv[1:]))"]
    return subprocess.Popen([*cmd, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **kwargs)


@contextlib.contextmanager
def _child(argv: list[str], **kwargs):
    proc = _spawn(argv, **kwargs)
    watchdog = threading.Timer(120, proc.kill)  # a hung child fails the test instead of hanging it
    watchdog.start()
    try:
        yield proc
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
        proc.stderr.close()


def _wait_for_line(proc: subprocess.Popen, prefix: str) -> list[str]:
    """Read the child's log until a line starts with `prefix` (progress lines come once a step here)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    proc.wait()
    raise AssertionError(f"the run ended (rc {proc.returncode}) before '{prefix}':\n{''.join(seen)}")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _resume_matches(straight: Path, run: Path, loss_tolerance: float = 0.0) -> None:
    """`--resume` the killed 3-epoch `run`: it ends with the weights and epoch losses of the run never stopped."""
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert _max_diff(load_file(straight / "model.safetensors"), load_file(run / "model.safetensors")) <= 1e-6
    losses = [[json.loads(x)["train_loss"] for x in open(r / "metrics.jsonl")] for r in (straight, run)]
    assert len(losses[1]) == 3 and losses[1] == pytest.approx(losses[0], rel=0, abs=loss_tolerance)


# ---------------------------------------------------------------------------------------------------------------
# 1. SIGKILL mid-epoch, --resume: the weights of the uninterrupted run
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, many):
    extra = ["--epochs", "3", *AUGMENT]
    assert main(_argv(many, tmp_path / "straight", *extra)) == 0

    run = tmp_path / "killed"
    with _child(_argv(many, run, *extra)) as proc:
        # 36 images, batch 4: 9 steps an epoch. Step 4 of epoch 2 is logged after the epoch-1 checkpoint was
        # written and long before the run can end (5 + 9 more steps, two evaluations, plots).
        _wait_for_line(proc, "epoch 2/3 step 4/9")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed: the test proved nothing"
    assert not (run / "summary.json").exists()
    state, _ = engine.load_state(run)  # the SIGKILL left a loadable epoch-end checkpoint ...
    assert (state["epoch"], state["step"]) == (1, 0)
    assert [n for n in os.listdir(run) if ".tmp" in n] == []  # ... and no half-written file beside it

    _resume_matches(tmp_path / "straight", run)


@pytest.mark.slow
def test_periodic_checkpoints_within_epochs_change_nothing_and_survive_sigkill(tmp_path, many):
    """`checkpoint_minutes`: here a checkpoint after every step. The run pauses for each and goes on; killed
    outright mid-epoch, it resumes from the last step saved and ends with the weights of a run that never paused."""
    extra = ["--epochs", "3", *AUGMENT]
    assert main(_argv(many, tmp_path / "straight", *extra, "--checkpoint-minutes", "0")) == 0

    run = tmp_path / "killed"
    with _child(_argv(many, run, *extra, "--checkpoint-minutes", "1e-9")) as proc:
        seen = _wait_for_line(proc, "epoch 2/3 step 6/9")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed: the test proved nothing"
    assert any("checkpoint at epoch 2, step 5/9" in line for line in seen), "".join(seen)
    state, _ = engine.load_state(run)
    assert state["epoch"] == 1 and state["step"] in (5, 6, 7)  # mid-epoch, not the epoch-end checkpoint
    assert state["partial"]["taken"] == state["step"]

    # each epoch's loss is the mean of its steps, summed in parts here: equal up to float rounding
    _resume_matches(tmp_path / "straight", run, loss_tolerance=2e-5)


def test_a_run_folder_is_never_replaced_by_mistake(tmp_path, folder, capsys):
    run, moved = tmp_path / "run", tmp_path / "moved"
    assert main(_argv(folder, run)) == 0
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()

    # The same command again (a forgotten --resume) is refused before anything is written.
    assert main(_argv(folder, run)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvt train: error:") and "already holds a run" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files

    # A moved run resumes where it now is; the folder its checkpoint names (and its recipe's `out`) is untouched.
    import shutil

    shutil.copytree(run, moved)
    assert main(["train", "--resume", str(moved), "--epochs", "2"]) == 0
    assert json.loads((moved / "summary.json").read_text())["epochs"] == 2
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files

    # A resumed run keeps its model: another one would be recorded in recipe.yaml without being what trains.
    moved_files = {p.name: p.read_bytes() for p in moved.iterdir() if p.is_file()}
    capsys.readouterr()
    for change in (["--set", "model_args.drop_path_rate=0.3"], ["--model", "cvt_13"]):
        assert main(["train", "--resume", str(moved), "--epochs", "3", *change]) == 2
        err = capsys.readouterr().err.strip()
        assert "a resumed run keeps its model" in err and "differs from the run's" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in moved.iterdir() if p.is_file()} == moved_files

    # --overwrite with a mistake in the model or the data loses nothing of the old run, best/ included.
    best = {p.name: p.read_bytes() for p in (run / "best").iterdir()}
    assert "model.safetensors" in best
    for mistake in (["--model", "cvt_13x"], ["--data", f"imagefolder:{tmp_path / 'none'}"]):
        assert main(_argv(folder, run, "--overwrite", *mistake)) == 2
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
        assert {p.name: p.read_bytes() for p in (run / "best").iterdir()} == best

    # --overwrite starts over: once the new model and data are built, the old run's summary and best weights go (a
    # new run stopped before its first evaluation must not leave them beside its own files) ...
    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "_tensorboard", lambda out: (_ for _ in ()).throw(RuntimeError("stopped after the clean-up")))
        with pytest.raises(RuntimeError, match="stopped after the clean-up"):
            main(_argv(folder, run, "--overwrite", "--seed", "1"))
    assert not (run / "summary.json").exists() and list((run / "best").iterdir()) == []
    # ... and the new run writes its own.
    assert main(_argv(folder, run, "--overwrite", "--seed", "1")) == 0
    assert (run / "model.safetensors").read_bytes() != files["model.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# 2. A write killed half-way
# ---------------------------------------------------------------------------------------------------------------
def test_atomic_write_fsyncs_file_then_folder(tmp_path, monkeypatch):
    from cvt.utils import atomic_write

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "x.bin", lambda p: p.write_bytes(b"new"))
    assert events == ["fsync file", "replace", "fsync folder"]
    assert (tmp_path / "x.bin").read_bytes() == b"new" and os.listdir(tmp_path) == ["x.bin"]


def _killed_mid_write(path: str) -> None:
    from cvt.utils import atomic_write

    def half_then_die(tmp):  # as if SIGKILLed while torch.save was writing
        tmp.write_bytes(b"PK\x03\x04 half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(Path(path), half_then_die)


@pytest.mark.slow
def test_write_killed_halfway_leaves_checkpoint_and_resume_cleans_up(tmp_path, folder):
    run = tmp_path / "run"
    assert main(_argv(folder, run, "--epochs", "1")) == 0
    before = (run / "checkpoint.pt").read_bytes()

    child = multiprocessing.get_context("fork").Process(target=_killed_mid_write, args=(str(run / "checkpoint.pt"),))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    stale = run / f".checkpoint.pt.tmp{child.pid}"
    assert stale.exists() and (run / "checkpoint.pt").read_bytes() == before  # the old file, whole

    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert not stale.exists()  # removed by the next save
    assert [n for n in os.listdir(run) if ".tmp" in n] == []
    state, _ = engine.load_state(run)
    assert state["epoch"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 3. Non-finite loss
# ---------------------------------------------------------------------------------------------------------------
def _poison_loss_at(monkeypatch, epoch: int, step: int, seen: dict) -> None:
    """Make the loss NaN at optimizer step `step` (0-based) of `epoch` (0-based); note checkpoint.pt's bytes then."""
    real = engine.train_one_epoch

    def train_one_epoch(t, loader, ep, steps, start_step=0, *args, **kwargs):
        criterion, calls = t.task.criterion, [start_step]

        def poisoned(logits, y):
            loss = criterion(logits, y)
            if ep == epoch and calls[0] == step:
                ckpt = Path(seen["run"]) / "checkpoint.pt"
                seen["checkpoint"] = ckpt.read_bytes() if ckpt.exists() else None
                loss = loss * float("nan")
            calls[0] += 1
            return loss

        t.task.criterion = poisoned
        try:
            return real(t, loader, ep, steps, start_step, *args, **kwargs)
        finally:
            t.task.criterion = criterion

    monkeypatch.setattr(engine, "train_one_epoch", train_one_epoch)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, folder, monkeypatch, capsys):
    run = tmp_path / "run"
    seen = {"run": run}
    _poison_loss_at(monkeypatch, epoch=1, step=2, seen=seen)
    writers = []
    real_tensorboard = engine._tensorboard
    monkeypatch.setattr(engine, "_tensorboard", lambda out: writers.append(real_tensorboard(out)) or writers[-1])
    assert main(_argv(folder, run, "--epochs", "2")) == 2
    assert len(writers) == 1 and writers[0].all_writers is None  # closed by the failure too (SummaryWriter.close)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cvt train: error: non-finite loss/gradients at epoch 2, step 3 of 4"), err[-1]
    assert "Traceback" not in "".join(err)
    assert (run / "checkpoint.pt").read_bytes() == seen["checkpoint"]  # byte for byte the epoch-1 state
    assert engine.load_state(run)[0]["epoch"] == 1
    assert len(open(run / "metrics.jsonl").readlines()) == 1 and not (run / "summary.json").exists()


def test_non_finite_loss_under_fp16_skips_the_step(tmp_path, folder, monkeypatch):
    """With a GradScaler (fp16) a non-finite step is skipped and the scale halved, as scalers do; training goes on."""
    run = tmp_path / "run"
    _poison_loss_at(monkeypatch, epoch=0, step=1, seen={"run": run})
    assert main(_argv(folder, run, "--epochs", "1", "--amp", "fp16")) == 0
    state, _ = engine.load_state(run)
    assert state["scaler"]["scale"] == 2.0**16 / 2  # one step skipped (no growth within 2000 steps)
    assert np.isfinite(json.loads(open(run / "metrics.jsonl").readline())["train_loss"])  # over the steps taken


# ---------------------------------------------------------------------------------------------------------------
# 4, 5. Ctrl-C (SIGINT to the process group, DataLoader workers included), SIGTERM from outside
# ---------------------------------------------------------------------------------------------------------------
def test_dataloader_workers_ignore_stop_signals(folder):
    from cvt.data import Preprocess, build_data, ignore_stop_signals

    data = build_data(f"imagefolder:{folder}", Preprocess.default_for(3, 32), batch_size=4, num_workers=1)
    assert data.train.worker_init_fn is ignore_stop_signals and data.val.worker_init_fn is ignore_stop_signals

    class Handlers(torch.utils.data.Dataset):  # reports, from inside a worker, what SIGINT/SIGTERM do there
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.tensor([signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
                                 signal.getsignal(signal.SIGTERM) == signal.SIG_IGN])

    # Forked: the worker would otherwise inherit this process's handlers (Python's KeyboardInterrupt for SIGINT).
    ctx = multiprocessing.get_context("fork")
    loader = torch.utils.data.DataLoader(Handlers(), num_workers=1, worker_init_fn=ignore_stop_signals,
                                         multiprocessing_context=ctx)
    assert next(iter(loader)).tolist() == [[True, True]]


@pytest.mark.slow
def test_ctrl_c_to_process_group_with_workers_checkpoints_and_resumes(tmp_path, big):
    """The case that crashed: the main process waits for a batch when Ctrl-C reaches it and the workers. Large
    images make it wait most of the time; workers started by a fork server (Python >= 3.14 on Linux; spawn on
    macOS) inherit no handler from the main process, so without `ignore_stop_signals` they die of the SIGINT and
    the main process fails with "DataLoader worker ... exited unexpectedly" instead of writing its checkpoint."""
    run = tmp_path / "run"
    # 18 images, batch 4: 4 steps an epoch; two workers (the default for image folders is > 0).
    argv = _argv(big, run, "--epochs", "3", "--num-workers", "2")
    with _child(argv, workers_by_forkserver=True, start_new_session=True) as proc:
        _wait_for_line(proc, "epoch 2/3 step 1/4")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the group
        err = proc.stderr.read()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "stopped by SIGINT at epoch 2" in err and "exited unexpectedly" not in err, err
    state, _ = engine.load_state(run)
    assert state["epoch"] == 1 and state["step"] >= 1  # mid-epoch 2: the steps done so far are kept

    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert [json.loads(x)["epoch"] for x in open(run / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_from_outside_checkpoints_and_resumes(tmp_path, fake_fmnist):
    run = tmp_path / "run"
    argv = ["train", *TINY, "--data-dir", str(fake_fmnist), "--batch-size", "8", "--epochs", "2", "--out", str(run)]
    with _child(argv) as proc:
        _wait_for_line(proc, "epoch 1/2 step 3/8")
        proc.send_signal(signal.SIGTERM)  # a scheduler's pre-emption notice, to the main process only
        err = proc.stderr.read()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at epoch 1" in err, err
    state, _ = engine.load_state(run)
    assert state["epoch"] == 0 and state["step"] >= 3
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert json.load(open(run / "summary.json"))["epochs"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 6, 7. DDP: skipped files of every rank; two processes with sync_bn train as one process
# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_jobs(rank: int, world: int, jobs: list[tuple[int, str, object]]) -> None:
    """One rank of torchrun's world, running several jobs in turn (one spawn pays the imports once): "fit" a
    TrainConfig, or check "bn", `sync_batch_norm` against one BatchNorm over the whole batch."""
    torch.set_num_threads(1)
    import torch.distributed as dist

    from cvt.recipe import TrainConfig

    for port, kind, arg in jobs:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if kind == "fit":
            engine.fit(TrainConfig(**arg))
            continue
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            torch.save(_sync_bn_case(rank, world), f"{arg}/rank{rank}.pt")
        finally:
            dist.destroy_process_group()


def _sync_bn_case(rank: int, world: int) -> dict:
    """This rank's share of a batch through `sync_batch_norm`, and the same batch through F.batch_norm in one go."""
    from cvt.layers import sync_batch_norm

    g = torch.Generator().manual_seed(0)  # the same whole batch on every rank
    x = (torch.randn(12, 6, 5, 7, generator=g) * 2 + 5).requires_grad_()  # mean >> std: no cancellation allowed
    weight = torch.randn(12, 6, 5, 7, generator=g)  # a loss that weighs every output differently
    bn, ref = torch.nn.BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        for m in (bn, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
    mine = slice(rank * 12 // world, (rank + 1) * 12 // world)
    x_mine = x.detach()[mine].clone().requires_grad_()
    y = sync_batch_norm(x_mine, bn, 0.1)
    (y * weight[mine]).sum().backward()
    y_ref = ref(x)
    (y_ref * weight).sum().backward()
    return {"y": y.detach(), "y_ref": y_ref.detach()[mine], "dx": x_mine.grad, "dx_ref": x.grad[mine],
            "dw": bn.weight.grad, "db": bn.bias.grad, "dw_ref": ref.weight.grad, "db_ref": ref.bias.grad,
            "running": torch.stack([bn.running_mean, bn.running_var]),
            "running_ref": torch.stack([ref.running_mean, ref.running_var])}


def _equivalence_cfg(data_dir, out, sync_bn: bool) -> dict:
    # Nothing random that depends on the rank: no flips/shifts (in-memory data), erasing, mixup, dropout, drop path.
    return dict(model="cvt_tiny", model_args={**TINY_ARGS, "drop_path_rate": 0.0}, data="fashion-mnist",
                data_dir=str(data_dir), batch_size=16, epochs=2, lr=3e-3, warmup_epochs=0.5, hflip=0.0, shift=0,
                reprob=0.0, num_workers=0, device="cpu", sync_bn=sync_bn, out=str(out))


@pytest.fixture(scope="module")
def broken_split(tmp_path_factory):
    """24 training files, 4 of them unreadable, and the rank (of 2) that reads each in epoch 1 at batch 8."""
    root = write_image_folder(tmp_path_factory.mktemp("broken_split"), 3, {"train": 8, "val": 1},
                              classes=("a", "b", "c"))
    broken = [str(root / "train" / name / f"{i}.png") for i, name in enumerate(("a", "b", "c", "c"))]
    for path in broken:
        Path(path).write_bytes(b"not a PNG")
    from cvt.data import EpochBatches, scan_image_folder

    samples, _ = scan_image_folder(root, "train")
    reader = {}
    for rank in (0, 1):  # the batches of 4 each rank reads in epoch 1, as the engine's sampler makes them
        batches = EpochBatches(len(samples), 4, rank, 2, seed=0)
        batches.set_epoch(0)
        reader.update({samples[i][0]: rank for batch in batches for i in batch if samples[i][0] in broken})
    return root, reader


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, fake_fmnist, broken_split):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    skipped = dict(model="cvt_tiny", model_args=dict(TINY_ARGS), data=f"imagefolder:{broken_split[0]}",
                   img_size=32, batch_size=8, epochs=1, num_workers=0, device="cpu", out=str(tmp / "skipped"),
                   checkpoint_minutes=1e-9)  # and a periodic checkpoint after every step: the ranks agree on each
    (tmp / "bn").mkdir()
    jobs = [(_free_port(), "fit", skipped), (_free_port(), "bn", str(tmp / "bn")),
            (_free_port(), "fit", _equivalence_cfg(fake_fmnist, tmp / "sync", True)),
            (_free_port(), "fit", _equivalence_cfg(fake_fmnist, tmp / "nosync", False))]
    mp.start_processes(_ddp_jobs, args=(2, jobs), nprocs=2, start_method="spawn")
    return tmp


@pytest.mark.slow
def test_ddp_summary_counts_skipped_files_of_every_rank(ddp_runs, broken_split):
    _, reader = broken_split
    assert len(reader) == 4 and set(reader.values()) == {0, 1}  # both ranks meet unreadable files
    summary = json.load(open(ddp_runs / "skipped" / "summary.json"))
    assert summary["processes"] == 2
    assert summary["skipped_files"] == 4 and summary["skipped"] == sorted(reader)
    state, _ = engine.load_state(ddp_runs / "skipped")  # the checkpoint carries them too, for a resumed summary
    assert sorted(state["skipped"]) == sorted(reader)


@pytest.mark.slow
def test_sync_batch_norm_is_batch_norm_of_the_whole_batch(ddp_runs):
    """Two ranks with half a batch each: outputs, input gradients, the summed parameter gradients (what DDP
    all-reduces) and the running statistics are those of one BatchNorm over the whole batch."""
    r = [torch.load(ddp_runs / "bn" / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    for i in (0, 1):
        torch.testing.assert_close(r[i]["y"], r[i]["y_ref"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r[i]["dx"], r[i]["dx_ref"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r[i]["running"], r[i]["running_ref"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r[0]["dw"] + r[1]["dw"], r[0]["dw_ref"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r[0]["db"] + r[1]["db"], r[0]["db_ref"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_ddp_with_sync_bn_trains_as_one_process(ddp_runs, fake_fmnist):
    """2 processes x 8 images with sync_bn vs 1 process x 16 images (8 AdamW steps): the same run up to float
    rounding; without sync_bn each rank normalises its own 8 images and the run is another one."""
    one = ddp_runs / "one"
    engine.fit(cvt.recipe.TrainConfig(**_equivalence_cfg(fake_fmnist, one, False)))
    ref = load_file(one / "model.safetensors")
    synced = _max_diff(ref, load_file(ddp_runs / "sync" / "model.safetensors"))
    unsynced = _max_diff(ref, load_file(ddp_runs / "nosync" / "model.safetensors"))
    # Measured on weights and BatchNorm statistics of magnitude ~1: 9e-5 with sync_bn, which is float rounding
    # (gradients all-reduced vs summed in one go) grown by AdamW's division by small second moments: one process
    # run with 2 threads instead of 1 differs from itself by as much (1.1e-4). Without sync_bn: 3e-2.
    assert synced <= 5e-4, synced
    assert unsynced >= 5e-3, unsynced
    losses = {name: [json.loads(x)["train_loss"] for x in open(path / "metrics.jsonl")]
              for name, path in (("one", one), ("sync", ddp_runs / "sync"), ("nosync", ddp_runs / "nosync"))}
    assert np.allclose(losses["sync"], losses["one"], atol=2e-5), losses  # metrics keep 5 decimals
    assert not np.allclose(losses["nosync"], losses["one"], atol=1e-3), losses
