"""The fast paths of `cvt.layers`: the public switch, and each path against the reference forward it replaces."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cvt
from cvt import layers
from cvt.layers import FAST_PATHS, config, fast_path_config, fast_paths, fused, is_enabled, linear, set_fast_paths
from cvt.layers.activations import ActKernel

# Where each fast path does its work: a function that runs only when the path is on (and applies).
WHERE = {
    "fused_inference": (fused, "block_inference"),
    "fold_batchnorm": (cvt.model, "conv_bn_folded"),
    "onednn_linear": (linear, "onednn_linear"),
    "mlp_in_pieces": (fused, "onednn_linear_add"),
    "recompute_act": (fused, "linear_of_recomputed"),
    "dense_gradient": (layers.norm._DenseGradient, "apply"),
    "quick_gelu_as_silu": (layers.activations, "_QUICK_GELU_AS_SILU"),  # an ActKernel: its kernel is counted
}


@pytest.fixture(autouse=True)
def _restore_switch():
    saved = fast_path_config()
    yield
    set_fast_paths(**saved)


@pytest.fixture
def small_thresholds(monkeypatch):
    """A model this small takes the size-gated paths only with their thresholds lowered; the MLP in pieces of 7
    tokens (several pieces and a shorter last one)."""
    monkeypatch.setattr(fused, "_RECOMPUTE_MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_MLP_ROWS", 7)
    monkeypatch.setattr(linear, "_ONEDNN_GRAD_MIN_TOKENS", 0)


def test_every_fast_path_is_documented_and_on_by_default():
    assert set(WHERE) == set(FAST_PATHS)
    assert all(FAST_PATHS.values())
    assert all(is_enabled(name) for name in FAST_PATHS)


def test_switch_sets_single_paths_all_paths_and_restores():
    set_fast_paths(onednn_linear=False)
    assert not is_enabled("onednn_linear") and is_enabled("fused_inference")
    with fast_paths(False, fused_inference=True):
        assert fast_path_config() == {name: name == "fused_inference" for name in FAST_PATHS}
        with fast_paths(True):
            assert all(fast_path_config().values())
        assert not is_enabled("onednn_linear")
    assert fast_path_config() == {name: name != "onednn_linear" for name in FAST_PATHS}
    with pytest.raises(ValueError, match="unknown fast path 'warp_drive'"):
        set_fast_paths(warp_drive=False)
    with pytest.raises(RuntimeError), fast_paths(False):
        raise RuntimeError  # an exception inside the block still restores the setting
    assert is_enabled("fused_inference")


@pytest.mark.parametrize("spec, off", [
    ("1", set()), ("all", set()), ("", set()), ("0", set(FAST_PATHS)), ("none", set(FAST_PATHS)),
    ("fused_inference,fold_batchnorm", set(FAST_PATHS) - {"fused_inference", "fold_batchnorm"}),
])
def test_environment_spec(spec, off):
    assert config.parse_spec(spec) == {name: name not in off for name in FAST_PATHS}


def test_environment_spec_of_names_off_leaves_the_rest_as_they_are():
    assert config.parse_spec("-onednn_linear, -recompute_act") == {"onednn_linear": False, "recompute_act": False}


def test_environment_variable_is_applied_and_a_typo_only_warns(monkeypatch):
    monkeypatch.setenv(config.ENV_VAR, "-mlp_in_pieces")
    config._from_environment()
    assert not is_enabled("mlp_in_pieces") and is_enabled("onednn_linear")
    monkeypatch.setenv(config.ENV_VAR, "-onednn_lienar")
    with pytest.warns(UserWarning, match="unknown fast path 'onednn_lienar'"):
        config._from_environment()
    assert not is_enabled("mlp_in_pieces") and is_enabled("onednn_linear")  # left as it was


def _calls(monkeypatch, name: str) -> list[int]:
    """Count the calls of the function where fast path `name` does its work."""
    owner, attr = WHERE[name]
    real = getattr(owner, attr)
    count = [0]

    def spy(*args, **kwargs):
        count[0] += 1
        return (real.kernel if isinstance(real, ActKernel) else real)(*args, **kwargs)

    monkeypatch.setattr(owner, attr, dataclasses.replace(real, kernel=spy) if isinstance(real, ActKernel) else spy)
    return count


def _outputs_and_grads(model, x, y):
    """Inference logits, then a training step's loss gradients, from the same starting state."""
    start = copy.deepcopy(model.state_dict())  # a training forward moves the BatchNorm statistics
    model.eval()
    with torch.inference_mode():
        out = model(x)
    model.train().zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.load_state_dict(start)
    return out, grads


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("name", list(FAST_PATHS) + ["all"])
def test_fast_path_computes_the_reference_forward(name, act, monkeypatch, small_thresholds):
    """With the path on it runs (where it applies to this model), switched off it does not, and the inference
    output and training gradients agree; "all": every path off against every path on."""
    if name == "quick_gelu_as_silu" and act == "gelu":
        pytest.skip("applies to QuickGELU only")
    if name in ("onednn_linear", "mlp_in_pieces") and not linear.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN Linear")
    torch.manual_seed(0)
    model = cvt.create_model("cvt_tiny", in_chans=3, act=act)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    calls = _calls(monkeypatch, name) if name != "all" else None
    on_out, on_grads = _outputs_and_grads(model, x, y)
    if calls is not None:
        assert calls[0] > 0, f"{name} did not run"
        on_calls, calls[0] = calls[0], 0
    with fast_paths(False) if name == "all" else fast_paths(**{name: False}):
        off_out, off_grads = _outputs_and_grads(model, x, y)
    if name == "mlp_in_pieces":  # off, each MLP is one piece: one call per block instead of several
        assert 0 < calls[0] < on_calls
    elif calls is not None:
        assert calls[0] == 0, f"{name} ran while switched off"
    assert torch.allclose(on_out, off_out, atol=1e-5), name
    for a, b in zip(on_grads, off_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_mlp_in_pieces_equals_one_piece(monkeypatch):
    m = cvt.create_model("cvt_tiny", in_chans=3, act="quick_gelu").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        monkeypatch.setattr(fused, "_MLP_ROWS", 1 << 30)
        whole = m(x)
        monkeypatch.setattr(fused, "_MLP_ROWS", 7)
        assert torch.allclose(m(x), whole, atol=1e-6)


def test_quick_gelu_module_is_the_authors_formula_either_way():
    x = torch.randn(1000) * 4
    authors = x * torch.sigmoid(1.702 * x)
    act = layers.QuickGELU()
    assert torch.allclose(act(x), authors, atol=1e-6)
    with fast_paths(quick_gelu_as_silu=False):
        assert torch.equal(act(x), authors)


def test_tracers_and_dispatch_modes_see_ordinary_ops():
    """FlopCounterMode counts only the ops it knows (oneDNN's are not among them): under it, as under tracers
    and compilers, the Linear layers take PyTorch's own matmul."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    assert linear.onednn_applies(x, w) == linear.onednn_available()
    with FlopCounterMode(display=False):
        assert not linear.onednn_applies(x, w)
    with fast_paths(onednn_linear=False):
        assert not linear.onednn_applies(x, w)


def _ablation():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
    spec = importlib.util.spec_from_file_location("ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_switches_through_the_public_switch():
    ablation = _ablation()
    for name in FAST_PATHS:
        with ablation.switched_off(name):
            assert fast_path_config() == {n: n != name for n in FAST_PATHS}
        assert is_enabled(name)
    with pytest.raises(ValueError, match="unknown fast path"), ablation.switched_off("warp_drive"):
        pass


# ---------------------------------------------------------------------------------------------------------------
# Per-CPU defaults and `cvt tune`
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def cpu_capability(monkeypatch, tmp_path):
    """Pretend PyTorch dispatches to the given ISA, with an empty calibration cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def pretend(capability: str):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        config._from_cpu()

    return pretend


@pytest.mark.parametrize("capability, kind", [("AVX512", "avx512"), ("AVX512_BF16", "avx512"), ("AVX2", "avx2"),
                                              ("DEFAULT", "other"), ("NO AVX", "other")])
def test_cpu_kind_defaults(cpu_capability, capability, kind):
    cpu_capability(capability)
    assert config.cpu_kind() == kind
    off = set(config.CPU_DEFAULTS[kind])
    assert fast_path_config() == {name: name not in off for name in FAST_PATHS}
    assert config.fast_path_origin().startswith(f"{kind} defaults")
    if kind == "avx2":  # oneDNN's GEMM measured slower than PyTorch's on the AVX2-only Zen 3 (RESULTS.md)
        assert off == {"onednn_linear", "mlp_in_pieces"}


def test_calibration_cache_applies_to_its_machine_only(cpu_capability, tmp_path):
    from cvt.layers import calibrate

    cpu_capability("AVX2")
    path = calibrate.save({"onednn_linear": True, "mlp_in_pieces": False}, {}, {"model": "cvt_tiny"})
    assert path == tmp_path / "cvt" / "fast_paths.json"
    config._from_cpu()
    assert is_enabled("onednn_linear") and not is_enabled("mlp_in_pieces")
    assert "cvt tune for this CPU (onednn_linear on, mlp_in_pieces off)" in config.fast_path_origin()
    cpu_capability("AVX512")  # another ISA (e.g. ATEN_CPU_CAPABILITY lowered it) is another machine
    assert calibrate.cached_choice() is None and is_enabled("mlp_in_pieces")
    path.write_text("{not json")
    assert calibrate.cached_choice() is None


def test_choose_keeps_a_path_only_where_it_pays_everywhere():
    from cvt.layers.calibrate import choose

    assert choose({"onednn_linear": {"inference": 1.07, "training step": 0.94},
                   "mlp_in_pieces": {"inference": 1.01}}) == {"onednn_linear": False, "mlp_in_pieces": True}


def test_cvt_tune_measures_and_keeps_the_choice(cpu_capability, tmp_path, capsys, one_thread):
    import json

    from cvt.cli import main
    from cvt.layers import calibrate

    cpu_capability("AVX2")
    assert main(["tune", "--model", "cvt_tiny", "--img-size", "28", "--batch-size", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "onednn_linear" in out and "kept for" in out
    entry = json.loads(calibrate.cache_path().read_text())[calibrate.machine_key()]
    assert set(entry["paths"]) == set(config.CPU_DEPENDENT) and entry["workload"]["batch"] == 2
    assert entry["paths"] == calibrate.choose(entry["speedups"])
    assert main(["tune", "--show"]) == 0
    assert "avx2 defaults" in capsys.readouterr().out
