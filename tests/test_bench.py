"""The benchmark (benchmarks/: harness, contestants, report, bench) at a tiny size: it runs end to end and reports
every figure, for any contestant. No timing is asserted here (a test machine's speed proves nothing); the figures
themselves live in benchmarks/RESULTS.md. conftest.py puts benchmarks/ on sys.path."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import bench
import contestants
import harness
from cvt.cli import main
from harness import BenchConfig, run_benchmark
from report import section_key, to_markdown, write_markdown_section

pytest.importorskip("transformers")

# cvt_small at 32 px: the port builds it too (it needs more than i blocks in stage i). One thread: on a shared
# machine every multi-threaded op of a small model can wait a scheduler tick for its second thread.
TINY = dict(model="cvt_small", img_size=32, infer_batches=(1, 2), train_batch=2, rounds=1, min_time=0.0,
            matmul_size=128, threads=1, memory_rounds=2)
TINY_ARGS = ["--model", "cvt_small", "--img-size", "32", "--batch-sizes", "2", "--train-batch", "2", "--rounds", "1",
             "--min-time", "0", "--threads", "1", "--memory-rounds", "1"]


@pytest.fixture(scope="module")
def result():
    return run_benchmark(BenchConfig(**TINY), command="pytest")


def test_every_figure_is_there_and_positive(result):
    json.dumps(result)  # plain data
    assert result["max_abs_logit_diff"]["hf"] <= 1e-4  # the two implementations compute the same function
    assert result["model"]["macs_per_image"] > 0 and result["model"]["params"] > 0
    assert result["config"]["baseline"] == "hf" and list(result["contestants"]) == ["ours", "hf"]
    for batch in ("1", "2"):
        row = result["infer"][batch]
        for impl in ("ours", "hf"):
            assert row[impl]["images_per_s"] > 0
            assert row[impl]["page_faults_per_call"] >= 0 and row[impl]["kernel_s_per_call"] >= 0
        ratio = row["ours"]["speedup_vs"]["hf"]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]  # the median with its spread over the rounds
        assert "speedup_vs" not in row["hf"]  # the baseline
        assert row["ours"]["fraction_of_matmul"] > 0
    train = result["train"]["2"]
    assert train["ours"]["images_per_s"] > 0 and train["hf"]["images_per_s"] > 0
    assert train["ours"]["speedup_vs"]["hf"]["median"] > 0
    assert train["ours"]["fraction_of_matmul"] > 0 and "fraction_of_matmul" not in train["hf"]  # ours' MFU only
    assert result["matmul"]["macs_per_s"] > 0
    mem = result["memory"]
    for impl in ("ours", "hf"):
        assert mem[impl]["peak_rss_bytes"] >= mem[impl]["rss_before_steps_bytes"] > 0
    ratio = mem["ours"]["ratio_vs"]["hf"]
    assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"] and "ratio_vs" not in mem["hf"]
    assert len(mem["ours"]["samples_bytes"]) == result["config"]["memory_rounds"]
    machine = result["machine"]
    assert machine["cpu"] and machine["torch_threads"] >= 1 and machine["torch"] and machine["transformers"]


def test_markdown_section_replaces_itself_and_keeps_notes(result, tmp_path):
    text = to_markdown(result)
    assert "| inference | 1 | cvt (ours) |" in text and "peak RSS" in text and "`pytest`" in text
    assert "x** transformers port (" in text and "| ratio cvt (ours) / transformers port | **" in text
    # the targets against the port, judged by the medians: forward, training step, peak memory
    targets = [line for line in text.splitlines() if line.startswith(("| forward, batch", "| training step, batch",
                                                                      "| training-step peak memory"))]
    assert len(targets) == 3 and all(line.rstrip(" |").endswith(("yes", "**no**", "(not in every round)"))
                                     for line in targets)
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nhand-written notes\n")
    write_markdown_section(path, "k", text)
    write_markdown_section(path, "k", "second run")
    write_markdown_section(path, "other", "another setting")
    content = path.read_text()
    assert "hand-written notes" in content and "second run" in content and "another setting" in content
    assert "cvt (ours)" not in content and content.count("<!-- bench:k -->") == 1


def test_a_timm_contestant_runs_through_the_same_path(tmp_path):
    """ResNet from timm beside ours: its rows, its ratio against the baseline (ours, without the port), its memory
    and its share of the matmul rate come from the contestant list alone, and the run gets its own section."""
    out, md = tmp_path / "r.json", tmp_path / "R.md"
    argv = [*TINY_ARGS, "--impls", "ours,timm:resnet18", "--matmul-size", "64", "--json", str(out),
            "--markdown", str(md)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["config"]["baseline"] == "ours"
    assert data["contestants"]["timm:resnet18"]["label"] == "timm resnet18"
    assert data["contestants"]["timm:resnet18"]["macs_per_image"] > 0
    for task in ("infer", "train"):
        e = data[task]["2"]["timm:resnet18"]
        assert e["images_per_s"] > 0 and e["speedup_vs"]["ours"]["median"] > 0 and e["fraction_of_matmul"] > 0
    assert data["memory"]["timm:resnet18"]["ratio_vs"]["ours"]["median"] > 0
    text = md.read_text()
    row = text.split("| inference | 2 | timm resnet18 |")[1].splitlines()[0]
    assert "x** cvt (ours) (" in row and "% of matmul rate" in row
    assert "| ratio timm resnet18 / cvt (ours) | **" in text
    assert "-b2-timm-resnet18 -->" in text  # its own section, not the default run's


def test_contestants_of_every_family_build_for_the_same_images():
    import torch

    setting = contestants.Setting.of("cvt_small", 32)
    x = torch.randn(2, 3, 32, 32)
    for name in ("ours", "hf", "timm:resnet18", "timm:vit_tiny_patch16_224", "tv:resnet18", "tv:vit_b_32"):
        with torch.inference_mode():
            assert contestants.build(contestants.parse(name), setting)(x).shape == (2, 10), name
    c = contestants.parse("hf+compile")
    assert c.compiled and c.base == "hf" and c.same_function_as == "ours+compile"
    assert c.label == "transformers port + torch.compile"
    for bad in ("resnet18", "ours:cvt_13", "timm", "tv:"):
        with pytest.raises(ValueError, match="unknown contestant"):
            contestants.parse(bad)
    with pytest.raises(ValueError, match="timm has no model 'resnet1800'"):
        contestants.build(contestants.parse("timm:resnet1800"), setting)


def test_baseline_and_contestants_are_checked():
    assert BenchConfig(impls=("ours",)).baseline == "ours"  # without the port, the first contestant
    assert BenchConfig(impls=("timm:resnet18", "ours"), baseline="ours").contestants() == ("timm:resnet18", "ours")
    assert BenchConfig(compile=True, compile_port=True).contestants() == ("ours", "hf", "ours+compile", "hf+compile")
    for kwargs, message in ((dict(baseline="tv:resnet50"), "baseline 'tv:resnet50' is not among the contestants"),
                            (dict(impls=("ours", "ours")), "impls must name each contestant once"),
                            (dict(impls=("hf+compile",)), "hf\\+compile is timed beside hf"),
                            (dict(impls=("ours", "fly")), "unknown contestant 'fly'")):
        with pytest.raises(ValueError, match=message):
            BenchConfig(**kwargs)


def test_cpu_sections_name_the_cpu():
    from report import cpu_tag

    assert cpu_tag("AMD EPYC 9R14 96-Core Processor") == "amd-epyc"
    assert cpu_tag("Intel(R) Xeon(R) Processor") == "intel-xeon" and cpu_tag("") == "cpu"
    cfg = dict(model="cvt_13", img_size=224, device="cuda:1", dtype="bf16", train_batch=64,
               tasks=("infer", "train", "memory", "matmul"))
    assert section_key(cfg) == "cvt_13-224-cuda-bf16-b64"  # a GPU's section as before
    assert section_key(dict(cfg, device="cpu", dtype="fp32")).startswith("cvt_13-224-cpu-")
    # a saved result is keyed by the machine it ran on, not the one reading it
    amd = {"cpu": "AMD EPYC 9R14 96-Core Processor", "allocator_env": {"MALLOC_MMAP_MAX_": "0"}}
    assert section_key(dict(cfg, device="cpu", dtype="fp32"), amd) == "cvt_13-224-cpu-amd-epyc-fp32-b64-malloc-env"
    # ours and the port (or either alone) keep the keys the committed results have; other contestants get their own
    default = dataclasses.asdict(BenchConfig())
    assert section_key(default, amd) == "cvt_13-224-cpu-amd-epyc-fp32-b32-malloc-env"
    assert section_key(dataclasses.asdict(BenchConfig(impls=("ours",))), amd) == section_key(default, amd)
    wider = dataclasses.asdict(BenchConfig(impls=("ours", "hf", "timm:resnet18", "tv:vit_b_16"), baseline="ours"))
    assert section_key(wider, amd) == "cvt_13-224-cpu-amd-epyc-fp32-b32-malloc-env-timm-resnet18+tv-vit_b_16-vs-ours"


def test_page_faults_of_a_call_are_counted():
    import mmap

    import numpy as np
    import torch

    if harness.resource is None:
        pytest.skip("no resource module (Windows)")
    def fresh_64mb():
        # 16,384 pages fresh from the kernel, as a 64 MB tensor gets them from glibc's mmap. Not torch.ones itself:
        # after the benchmarks above, glibc's heap can hold a free chunk that large and serve it without a fault.
        region = mmap.mmap(-1, 64 << 20)
        pages = np.frombuffer(region, dtype=np.uint8)
        pages[:: mmap.PAGESIZE] = 1
        del pages
        region.close()

    seconds, faults, kernel = harness.per_call(fresh_64mb, torch.device("cpu"), 0.0)
    assert seconds > 0 and kernel >= 0
    assert faults > 10_000
    _, few, _ = harness.per_call(lambda: torch.ones(16), torch.device("cpu"), 0.0)
    assert few < 100


def test_allocator_settings_are_recorded_and_get_their_own_section(result, monkeypatch):
    for k in list(harness.allocator_env()):
        monkeypatch.delenv(k)
    assert "allocator: the system's defaults" in to_markdown(result)
    default = section_key(result["config"])
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert section_key(result["config"]) == default + "-malloc-env"  # does not replace the default run's section
    tuned = dict(result, machine=dict(result["machine"], allocator_env=harness.allocator_env()))
    assert "allocator: `MALLOC_MMAP_MAX_=0`" in to_markdown(tuned)


def test_script_writes_json(tmp_path):
    out = tmp_path / "r.json"
    argv = [*TINY_ARGS, "--tasks", "infer,matmul", "--matmul-size", "64", "--json", str(out),
            "--markdown", str(tmp_path / "R.md")]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["matmul"]["n"] == 64  # the reference product's size is the user's to set (a GPU needs a big one)
    assert data["infer"]["2"]["ours"]["images_per_s"] > 0 and "train" not in data
    assert "cvt_small" in (tmp_path / "R.md").read_text()
    assert data["command"].startswith("python benchmarks/bench.py --model cvt_small")


def test_cvt_bench_runs_the_checkouts_script(monkeypatch, capsys, tmp_path):
    """`cvt bench ARGS` is `python benchmarks/bench.py ARGS` of the checkout (an editable install); without one,
    one line says where to run it."""
    from cvt.commands import bench as command

    ran = []
    monkeypatch.setattr(command.subprocess, "run", lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 3))
    assert main(["bench", "--quick", "--impls", "ours,timm:resnet18", "--help"]) == 3  # the script's exit status
    assert ran == [[sys.executable, str(command.script()), "--quick", "--impls", "ours,timm:resnet18", "--help"]]
    assert command.script() == harness.HERE / "bench.py"
    monkeypatch.setattr(command, "script", lambda: tmp_path / "benchmarks" / "bench.py")
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "runs benchmarks/bench.py of a source checkout" in err and len(err.strip().splitlines()) == 1


def test_script_passes_compile_mode_to_torch_compile(tmp_path, monkeypatch):
    # The wiring only: a real compile takes a minute here, and its speed is the benchmark's to measure.
    modes = []

    def fake_compile(model, mode=None, dynamic=None):
        modes.append(mode)
        assert dynamic is False  # static shapes: torch 2.11's Inductor crashed on a dynamic batch (GPU_NOTES.md)
        return model

    monkeypatch.setattr(harness.torch, "compile", fake_compile)
    out = tmp_path / "r.json"
    argv = [*TINY_ARGS, "--tasks", "infer,train", "--compile", "--compile-mode", "reduce-overhead",
            "--json", str(out), "--markdown", str(tmp_path / "R.md")]
    assert bench.main(argv) == 0
    assert modes == ["reduce-overhead", "reduce-overhead"]  # the inference model and the training copy
    data = json.loads(out.read_text())
    for task, batch in (("infer", "2"), ("train", "2")):
        e = data[task][batch]["ours+compile"]
        assert e["images_per_s"] > 0 and e["speedup_vs"]["hf"]["median"] > 0 and e["speedup_vs"]["ours"]["median"] > 0
    text = (tmp_path / "R.md").read_text()
    assert "torch.compile mode reduce-overhead" in text and "cvt (ours) + torch.compile" in text
    assert "x eager" in text and "compile=reduce-overhead" in text  # its own section, beside a default-mode run's


def test_compile_port_times_the_compiled_port_beside_ours(tmp_path, monkeypatch):
    """--compile-port compiles the port as well: a fourth contestant, and ours compiled against it compiled."""
    compiled = []

    def fake_compile(model, mode=None, dynamic=None):
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(harness.torch, "compile", fake_compile)
    out, md = tmp_path / "r.json", tmp_path / "R.md"
    argv = [*TINY_ARGS, "--tasks", "infer,train", "--compile", "--compile-port", "--json", str(out),
            "--markdown", str(md)]
    assert bench.main(argv) == 0
    assert sorted(compiled) == ["CvT", "CvT", "_Logits", "_Logits"]  # each for inference and a training copy
    data = json.loads(out.read_text())
    for task in ("infer", "train"):
        row = data[task]["2"]
        assert row["hf+compile"]["images_per_s"] > 0 and "compile_s" in row["hf+compile"]
        assert row["ours+compile"]["speedup_vs"]["hf+compile"]["median"] > 0
        assert row["hf+compile"]["speedup_vs"]["hf"]["median"] > 0
    text = md.read_text()
    assert "transformers port + torch.compile" in text and "x** transformers port + torch.compile (" in text
    assert "compile+port" in text  # its own section


def test_failed_memory_measurement_is_a_user_error(monkeypatch):
    """The child's error, not RuntimeError (which the command leaves to a traceback)."""

    def failed_child(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory")

    monkeypatch.setattr(harness.subprocess, "run", failed_child)
    with pytest.raises(ValueError, match="memory measurement of ours failed: torch.OutOfMemoryError: CUDA out of"):
        harness.measure_memory({"impl": "ours"})


def test_script_rejects_bad_options(capsys, monkeypatch):
    assert bench.main(["--tasks", "infer,fly"]) == 2
    assert "unknown fly" in capsys.readouterr().err
    for argv, message in ((["--device", "foo"], "--device must be cpu, cuda or cuda:N, got 'foo'"),
                          (["--threads", "0"], "threads and the matmul size must be >= 1"),
                          (["--matmul-size", "-1"], "threads and the matmul size must be >= 1"),
                          (["--compile-port"], "compile_port (--compile-port) needs compile (--compile)"),
                          (["--impls", "ours,resnet"], "unknown contestant 'resnet'; choose from ours, hf, timm:"),
                          (["--baseline", "tv:resnet50"], "baseline 'tv:resnet50' is not among the contestants")):
        assert bench.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # transformers is an extra (cvt[bench]), not a dependency: without it, one line says what to install.
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert bench.main(["--model", "cvt_small", "--img-size", "32", "--tasks", "infer", "--rounds", "1", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs the package transformers" in err and "pip install 'cvt[bench]'" in err
    assert len(err.strip().splitlines()) == 1
    assert bench.main(["--model", "cvt_14", "--tasks", "infer", "--quick"]) == 2
    assert "unknown model 'cvt_14'" in capsys.readouterr().err


def test_port_refuses_depths_it_cannot_build():
    # transformers indexes stage i's drop-path rates with i, so it needs more than i blocks in stage i
    from cvt import create_model

    ours = create_model("cvt_tiny", depths=(1, 1, 2))
    with pytest.raises(ValueError, match="transformers' port cannot build depths"):
        contestants.build_hf("", contestants.Setting.of("cvt_tiny", 32), ours)


def test_train_step_script_times_each_variant_against_eager(tmp_path, monkeypatch):
    """benchmarks/train_step.py: every variant asked for gets images/s over its rounds and a ratio to eager, the
    QuickGELU variant on a model built with QuickGELU."""
    import statistics

    import train_step

    built = []
    create = train_step.cvt.create_model

    def spy(*args, **kwargs):
        built.append(kwargs.get("act"))
        return create(*args, **kwargs)

    monkeypatch.setattr(train_step.cvt, "create_model", spy)
    out = tmp_path / "step.json"
    assert train_step.main(["--batches", "2", "--pairs", "2", "--min-time", "0", "--quick-gelu",
                            "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"]["2"]
    assert set(row) == {"eager", "quick_gelu"}
    assert len(row["eager"]["samples"]) == 2 and row["eager"]["images_per_s"] > 0
    assert "speedup" not in row["eager"]
    assert built == ["gelu", "quick_gelu"]
    ratios = [q / e for e, q in zip(row["eager"]["samples"], row["quick_gelu"]["samples"], strict=True)]
    assert row["quick_gelu"]["speedup"] == {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
