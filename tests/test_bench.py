"""The benchmark at a tiny size: it runs end to end and reports every figure. No timing is asserted here (a test
machine's speed proves nothing); the figures themselves live in benchmarks/RESULTS.md."""

from __future__ import annotations

import contextlib
import copy
import json
import sys

import pytest

from cvt.bench import BenchConfig, build_hf, build_ours, run_benchmark, to_markdown, write_markdown_section
from cvt.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def result():
    # cvt_small at 32 px: the port builds it too (it needs more than i blocks in stage i). One thread: on a
    # shared machine every multi-threaded op of a small model can wait a scheduler tick for its second thread.
    cfg = BenchConfig(
        model="cvt_small", img_size=32, infer_batches=(1, 2), train_batch=2, rounds=1, min_time=0.0, matmul_size=128,
        threads=1,
    )
    return run_benchmark(cfg, command="pytest")


def test_every_figure_is_there_and_positive(result):
    json.dumps(result)  # plain data
    assert result["max_abs_logit_diff"] <= 1e-4  # the two implementations compute the same function
    assert result["model"]["macs_per_image"] > 0 and result["model"]["params"] > 0
    for batch in ("1", "2"):
        row = result["infer"][batch]
        for impl in ("ours", "hf"):
            assert row[impl]["images_per_s"] > 0
            assert row[impl]["page_faults_per_call"] >= 0 and row[impl]["kernel_s_per_call"] >= 0
        assert row["speedup_vs_hf"] > 0 and row["ours"]["fraction_of_matmul"] > 0
    train = result["train"]["2"]
    assert train["ours"]["images_per_s"] > 0 and train["hf"]["images_per_s"] > 0 and train["speedup_vs_hf"] > 0
    assert train["ours"]["fraction_of_matmul"] > 0 and "fraction_of_matmul" not in train["hf"]  # ours' MFU only
    assert result["matmul"]["macs_per_s"] > 0
    mem = result["memory"]
    for impl in ("ours", "hf"):
        assert mem[impl]["peak_rss_bytes"] >= mem[impl]["rss_before_steps_bytes"] > 0
    assert mem["ratio"] > 0
    machine = result["machine"]
    assert machine["cpu"] and machine["torch_threads"] >= 1 and machine["torch"] and machine["transformers"]


def test_markdown_section_replaces_itself_and_keeps_notes(result, tmp_path):
    text = to_markdown(result)
    assert "| inference | 1 | cvt (ours) |" in text and "peak RSS" in text and "`pytest`" in text
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nhand-written notes\n")
    write_markdown_section(path, "k", text)
    write_markdown_section(path, "k", "second run")
    write_markdown_section(path, "other", "another setting")
    content = path.read_text()
    assert "hand-written notes" in content and "second run" in content and "another setting" in content
    assert "cvt (ours)" not in content and content.count("<!-- bench:k -->") == 1


def test_cpu_sections_name_the_cpu():
    from cvt.bench import cpu_tag, section_key

    assert cpu_tag("AMD EPYC 9R14 96-Core Processor") == "amd-epyc"
    assert cpu_tag("Intel(R) Xeon(R) Processor") == "intel-xeon" and cpu_tag("") == "cpu"
    cfg = dict(model="cvt_13", img_size=224, device="cuda:1", dtype="bf16", train_batch=64,
               tasks=("infer", "train", "memory", "matmul"))
    assert section_key(cfg) == "cvt_13-224-cuda-bf16-b64"  # a GPU's section as before
    assert section_key(dict(cfg, device="cpu", dtype="fp32")).startswith("cvt_13-224-cpu-")
    # a saved result is keyed by the machine it ran on, not the one reading it
    amd = {"cpu": "AMD EPYC 9R14 96-Core Processor", "allocator_env": {"MALLOC_MMAP_MAX_": "0"}}
    assert section_key(dict(cfg, device="cpu", dtype="fp32"), amd) == "cvt_13-224-cpu-amd-epyc-fp32-b64-malloc-env"


def test_page_faults_of_a_call_are_counted():
    import torch

    from cvt import bench

    if bench.resource is None:
        pytest.skip("no resource module (Windows)")
    # 64 MB, above glibc's largest mmap threshold: every call gets its 16,384 pages fresh from the kernel
    seconds, faults, kernel = bench._per_call(lambda: torch.ones(16 << 20), torch.device("cpu"), 0.0)
    assert seconds > 0 and kernel >= 0
    assert faults > 10_000 or bench.allocator_env()  # a tuned allocator (MALLOC_MMAP_MAX_=0) may reuse them
    _, few, _ = bench._per_call(lambda: torch.ones(16), torch.device("cpu"), 0.0)
    assert few < 100


def test_allocator_settings_are_recorded_and_get_their_own_section(result, monkeypatch):
    from cvt.bench import allocator_env, section_key

    for k in list(allocator_env()):
        monkeypatch.delenv(k)
    assert "allocator: the system's defaults" in to_markdown(result)
    default = section_key(result["config"])
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert section_key(result["config"]) == default + "-malloc-env"  # does not replace the default run's section
    tuned = dict(result, machine=dict(result["machine"], allocator_env=allocator_env()))
    assert "allocator: `MALLOC_MMAP_MAX_=0`" in to_markdown(tuned)


def test_cli_writes_json(tmp_path):
    out = tmp_path / "r.json"
    argv = ["bench", "--model", "cvt_small", "--img-size", "32", "--batch-sizes", "2", "--rounds", "1",
            "--tasks", "infer,matmul", "--matmul-size", "64", "--min-time", "0", "--threads", "1", "--json", str(out),
            "--markdown", str(tmp_path / "R.md")]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["matmul"]["n"] == 64  # the reference product's size is the user's to set (a GPU needs a big one)
    assert data["infer"]["2"]["ours"]["images_per_s"] > 0 and "train" not in data
    assert "cvt_small" in (tmp_path / "R.md").read_text()


def test_cli_passes_compile_mode_to_torch_compile(tmp_path, monkeypatch):
    # The wiring only: a real compile takes a minute here, and its speed is the benchmark's to measure.
    modes = []

    def fake_compile(model, mode=None, dynamic=None):
        modes.append(mode)
        assert dynamic is False  # static shapes: torch 2.11's Inductor crashed on a dynamic batch (GPU_NOTES.md)
        return model

    monkeypatch.setattr("cvt.bench.torch.compile", fake_compile)
    out = tmp_path / "r.json"
    argv = ["bench", "--model", "cvt_small", "--img-size", "32", "--batch-sizes", "2", "--train-batch", "2",
            "--rounds", "1", "--tasks", "infer,train", "--min-time", "0", "--threads", "1", "--compile",
            "--compile-mode", "reduce-overhead", "--json", str(out), "--markdown", str(tmp_path / "R.md")]
    assert main(argv) == 0
    assert modes == ["reduce-overhead", "reduce-overhead"]  # the inference model and the training copy
    data = json.loads(out.read_text())
    for task, batch in (("infer", "2"), ("train", "2")):
        row = data[task][batch]
        assert row["ours_compiled"]["images_per_s"] > 0
        assert row["compiled_speedup_vs_hf"] > 0 and row["compiled_speedup_vs_eager"] > 0
    text = (tmp_path / "R.md").read_text()
    assert "torch.compile mode reduce-overhead" in text and "cvt + torch.compile" in text
    assert "compile=reduce-overhead" in text  # its own section, beside a default-mode run's


def test_compile_port_times_the_compiled_port_beside_ours(tmp_path, monkeypatch):
    """--compile-port compiles the port as well: a fourth contestant, and ours compiled against it compiled."""
    compiled = []

    def fake_compile(model, mode=None, dynamic=None):
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr("cvt.bench.torch.compile", fake_compile)
    out, md = tmp_path / "r.json", tmp_path / "R.md"
    argv = ["bench", "--model", "cvt_small", "--img-size", "32", "--batch-sizes", "2", "--train-batch", "2",
            "--rounds", "1", "--tasks", "infer,train", "--min-time", "0", "--threads", "1", "--compile",
            "--compile-port", "--json", str(out), "--markdown", str(md)]
    assert main(argv) == 0
    assert sorted(compiled) == ["CvT", "CvT", "_Logits", "_Logits"]  # each for inference and a training copy
    data = json.loads(out.read_text())
    for task in ("infer", "train"):
        row = data[task]["2"]
        assert row["hf_compiled"]["images_per_s"] > 0 and "compile_s" in row["hf_compiled"]
        assert row["compiled_speedup_vs_compiled_hf"] > 0 and row["compiled_hf_speedup_vs_hf"] > 0
    text = md.read_text()
    assert "transformers port + torch.compile" in text and "the compiled port" in text
    assert "compile+port" in text  # its own section


def test_cli_rejects_bad_options(capsys, monkeypatch):
    assert main(["bench", "--tasks", "infer,fly"]) == 2
    assert "unknown fly" in capsys.readouterr().err
    for argv, message in ((["--device", "foo"], "--device must be cpu, cuda or cuda:N, got 'foo'"),
                          (["--threads", "0"], "threads and the matmul size must be >= 1"),
                          (["--matmul-size", "-1"], "threads and the matmul size must be >= 1"),
                          (["--compile-port"], "compile_port (--compile-port) needs compile (--compile)")):
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # transformers is an extra (cvt[bench]), not a dependency: without it, one line says what to install.
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["bench", "--model", "cvt_small", "--img-size", "32", "--tasks", "infer", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs the package transformers" in err and "pip install 'cvt[bench]'" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["bench", "--model", "cvt_14", "--tasks", "infer"]) == 2
    assert "unknown model 'cvt_14'" in capsys.readouterr().err


def test_port_refuses_depths_it_cannot_build():
    # transformers indexes stage i's drop-path rates with i, so it needs more than i blocks in stage i
    ours = build_ours("cvt_tiny", depths=(1, 1, 2))
    with pytest.raises(ValueError, match="transformers' port cannot build depths"):
        build_hf(ours)
