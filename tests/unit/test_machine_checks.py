"""Requests a machine cannot serve fail at start-up with one message that names the flag and what
is missing (a CUDA GPU, Transformer Engine, the TE layer implementation), instead of a stack trace
from deep inside megatron or Transformer Engine; and the GPU check degrades the same way.

The machine is described to the parser through its probes (``runtime.cuda_available``,
``runtime.transformer_engine_available``, megatron's ``get_device_arch_version``), so each case
runs the same on any machine; the flags, the parser and every check run unchanged. One case runs
``python pretrain_tw.py`` as a user would, on this machine as it is.

"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.launch import PYTHON, ROOT, TINY_MODEL, TINY_TRAINING, env

unit = pytest.mark.unit
BASE = [*TINY_MODEL, *TINY_TRAINING, "--train-iters", "2"]


@pytest.fixture
def machine(monkeypatch):
    """machine(cuda, te, arch=9, capability=None) sets the probes; returns a parse(argv)."""
    import megatron.training.arguments as megatron_arguments
    import torch

    from megatron_tw import runtime
    from megatron_tw.arguments import parse_and_validate_args

    def describe(cuda: bool, te: bool, arch: int = 9, capability=None):
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        monkeypatch.setattr(runtime, "cuda_available", lambda: cuda)
        monkeypatch.setattr(runtime, "transformer_engine_available", lambda: te)
        monkeypatch.setattr(megatron_arguments, "get_device_arch_version",
                            lambda: arch if cuda else 0)
        if capability is not None:  # for checks that read the compute capability
            monkeypatch.setattr(runtime, "device_capability", lambda: capability, raising=False)
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        return lambda argv: parse_and_validate_args([*BASE, *argv], set_globals=False)

    return describe


# -- a CPU machine: no CUDA, no Transformer Engine --------------------------------------------

@unit
def test_fp8_on_a_cpu_machine_fails_at_start_up_from_the_command_line():
    """``python pretrain_tw.py ... --fp8-format hybrid`` on this machine (it has no GPU): exit
    status 1, one line on stderr naming the flag and the missing GPU, nothing trained."""
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("this machine has Transformer Engine; the CPU case needs a machine without")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([PYTHON, "pretrain_tw.py", *BASE, "--fp8-format", "hybrid",
                           "--fp8-recipe", "delayed"], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.search(r"pretrain_tw\.py: error: --fp8-format hybrid needs a CUDA GPU", proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "iteration" not in proc.stdout


@unit
@pytest.mark.parametrize("flags, message", [
    (["--transformer-impl", "transformer_engine"],
     r"--transformer-impl transformer_engine needs a CUDA GPU.*--transformer-impl local"),
    (["--fp8-format", "hybrid"], r"--fp8-format hybrid needs a CUDA GPU \(Hopper or newer\)"),
    (["--fp8-format", "e4m3", "--fp8-recipe", "tensorwise"], r"--fp8-format e4m3 needs a CUDA GPU"),
    (["--fp8-format", "hybrid", "--fp8-recipe", "mxfp8"], r"--fp8-format hybrid needs a CUDA GPU"),
    (["--fp8-format", "hybrid", "--transformer-impl", "transformer_engine"],
     r"--transformer-impl transformer_engine needs a CUDA GPU"),
    (["--distributed-backend", "nccl"], r"--distributed-backend nccl needs CUDA GPUs.*gloo"),
    (["--tw-preset", "dense", "--tw-short-context", "16", "--tw-scorer", "frozen",
      "--tw-scorer-load", "/models/scorer", "--tw-scorer-fp8"],
     r"--tw-scorer-fp8 needs Transformer Engine"),
], ids=["te-impl", "fp8-hybrid", "fp8-e4m3-tensorwise", "fp8-mxfp8", "fp8-with-te-impl", "nccl",
        "scorer-fp8"])
def test_cpu_machine_rejects_gpu_requests(machine, flags, message):
    from megatron_tw.arguments import ConfigError

    parse = machine(cuda=False, te=False)
    with pytest.raises(ConfigError, match=message):
        parse(flags)


@unit
def test_cpu_machine_defaults_need_no_gpu_flags(machine):
    args = machine(cuda=False, te=False)([])
    assert (args.transformer_impl, args.distributed_backend, args.fp8) == ("local", "gloo", None)


# -- a GPU machine without Transformer Engine --------------------------------------------------

@unit
@pytest.mark.parametrize("flags, message", [
    (["--transformer-impl", "transformer_engine"], r"needs Transformer Engine"),
    (["--transformer-impl", "local", "--fp8-format", "hybrid"],
     r"--fp8-format hybrid needs Transformer Engine"),
], ids=["te-impl", "fp8"])
def test_gpu_without_transformer_engine_rejects_te_requests(machine, flags, message):
    from megatron_tw.arguments import ConfigError

    with pytest.raises(ConfigError, match=message):
        machine(cuda=True, te=False)(flags)


# -- a GPU machine with Transformer Engine (Hopper) --------------------------------------------

@unit
def test_fp8_needs_the_te_layer_implementation(machine):
    from megatron_tw.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"--fp8-format needs --transformer-impl transformer_engine"):
        machine(cuda=True, te=True)(["--fp8-format", "hybrid", "--transformer-impl", "local"])


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


@unit
@pytest.mark.parametrize("te, recipe", [(False, "delayed"), (True, "delayed"),
                                        (True, "tensorwise"), (True, "blockwise"),
                                        (True, "mxfp8")],
                         ids=["gpu-without-te", "te-delayed", "te-tensorwise", "te-blockwise",
                              "te-mxfp8"])
def test_gpu_check_commands_parse_on_a_gpu_machine(machine, te, recipe):
    """Every training command benchmarks/gpu_check.py launches (its pretrain rows, and
    tools/score_data.py for the sparse row's sidecar) is accepted by the project's parser on the
    machine it targets: a GPU with TE (TE layers, FP8 rows with the recipe) and the lent H200
    without TE (local layers; the FP8 rows are skipped there, not launched)."""
    gpu_check = _gpu_check()
    args = gpu_check.parse_args(["--fp8-recipe", recipe])
    info = ({"cuda": True, "te": {"version": "any"}, "te_installed": True} if te else
            {"cuda": True, "te": None, "te_installed": False, "te_error": None})
    parse = machine(cuda=True, te=te)
    paths = gpu_check.paths(args)
    launcher = str(ROOT / "benchmarks" / "gpu_check_train.py")
    for row in gpu_check.ROWS:
        if row.startswith("fp8") and not te:
            assert gpu_check.fp8_recipe_support(info, recipe) == "Transformer Engine not installed"
            continue
        cmd = gpu_check.row_command(row, args, info)
        assert cmd[1] == launcher
        parsed = parse(cmd[2:])
        assert parsed.transformer_impl == ("transformer_engine" if te else "local") and parsed.bf16
        assert (parsed.seq_length, parsed.global_batch_size, parsed.train_iters) == (8192, 4, 3)
        if row.startswith("fp8"):
            assert (parsed.fp8, parsed.fp8_recipe) == ("hybrid", recipe)
        else:
            assert parsed.fp8 is None
        assert parsed.tw_weighting.is_uniform == row.endswith("uniform")
        if not row.endswith("uniform"):
            assert parsed.tw_short_context == (4097 if "windows" in row else 4096)
            assert parsed.tw_short_mode == ("windows" if "windows" in row else "sliding")
        expected_scorer = {"dense-frozen": "frozen", "sparse-precomputed": "precomputed"}
        if not row.endswith("uniform"):
            assert parsed.tw_scorer == expected_scorer.get(row, "self")
        if row == "dense-frozen":
            assert parsed.tw_scorer_load == str(paths["scorer"])
        if row == "sparse-precomputed":
            assert parsed.tw_short_loss_path == str(paths["sidecar"])
        if row == "uniform":  # the evaluate row's checkpoint
            assert parsed.save == str(paths["ckpt"]) and parsed.save_interval == 3

    # the sidecar is scored with the sparse row's own flags (same samples), frozen scorer
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import score_data
    finally:
        sys.path.pop(0)
    cmd = gpu_check.score_command(args, info)
    tool, scored = score_data.parse(cmd[2:])
    assert scored.tw_scorer == "frozen" and scored.tw_scorer_load == str(paths["scorer"])
    assert (scored.seq_length, scored.tw_short_context, scored.tw_short_loss_path) == (
        8192, 4096, str(paths["sidecar"]))


# -- checks that megatron's own validation does not make ----------------------------------------------------

@unit
def test_fp8_recipe_without_fp8_format_is_rejected(machine):
    from megatron_tw.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"--fp8-recipe"):
        machine(cuda=True, te=True)(["--fp8-recipe", "mxfp8", "--transformer-impl",
                                     "transformer_engine"])


@unit
def test_scorer_fp8_without_a_frozen_scorer_is_rejected(machine):
    from megatron_tw.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"--tw-scorer-fp8"):
        machine(cuda=False, te=False)(["--tw-scorer-fp8"])


@unit
def test_fp8_on_an_ampere_gpu_is_rejected(machine):
    from megatron_tw.arguments import ConfigError

    parse = machine(cuda=True, te=True, arch=8, capability=(8, 0))
    with pytest.raises(ConfigError, match=r"--fp8-format.*(8\.9|Hopper|Ada)"):
        parse(["--fp8-format", "hybrid", "--transformer-impl", "transformer_engine"])


@unit
def test_mxfp8_on_hopper_is_rejected(machine):
    from megatron_tw.arguments import ConfigError

    parse = machine(cuda=True, te=True, arch=9, capability=(9, 0))
    with pytest.raises(ConfigError, match=r"--fp8-recipe mxfp8.*(Blackwell|10\.0)"):
        parse(["--fp8-format", "e4m3", "--fp8-recipe", "mxfp8", "--transformer-impl",
               "transformer_engine"])


# -- the GPU check on a machine without TE (and here without a GPU) ----------------------------

@pytest.mark.e2e
def test_gpu_check_runs_bf16_local_and_skips_fp8_without_te(tmp_path):
    """benchmarks/gpu_check.py on this machine: the uniform row trains with --transformer-impl
    local and its figures follow from the stated formula; the FP8 row is skipped with the
    reason."""
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("this machine has Transformer Engine")
    import json

    out = tmp_path / "gpu_check.md"
    proc = subprocess.run(
        [PYTHON, "benchmarks/gpu_check.py", "--model", "tiny", "--allow-cpu",
         "--sections", "pretrain", "--rows", "uniform,fp8-uniform", "--iters", "4",
         "--warmup", "1", "--global-batch-size", "2", "--seq-length", "128", "--log-dir",
         str(tmp_path), "--out", str(out)], cwd=ROOT, env=env(), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    table = out.read_text()
    rows = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    uniform, fp8 = rows["uniform"], rows["fp8-uniform"]
    assert uniform["status"] == "ok" and uniform["data"]["impl"] == "local"
    assert "| pretrain | uniform | ok |" in table and ", local" in uniform["numbers"]
    assert fp8["status"] == "skipped"
    assert fp8["error"].startswith("Transformer Engine not installed")
    assert "warning" not in table  # megatron's parameter count == the formula's

    # Independent float64 reference for the tiny model: L=2, h=64, f=128, 4 heads x 16,
    # 2 KV groups, vocabulary 512, seq 128, 2 sequences per step.
    L, h, f, heads, d_head, g, V, s, T = 2, 64, 128, 4, 16, 2, 512, 128, 2 * 128
    d_attn = heads * d_head
    N = L * (h * d_attn + 2 * h * g * d_head + d_attn * h + 3 * h * f) + V * h
    flops = 6.0 * N * T + 6.0 * L * s * d_attn * T
    data = uniform["data"]
    step_s = data["step_ms"] / 1000.0
    assert data["step_ms"] == pytest.approx(
        sorted(data["step_times"][1:])[1], rel=1e-9)  # median of iterations 2..4
    assert data["tokens_per_s"] == pytest.approx(T / step_s, rel=1e-9)
    assert data["tflops"] == pytest.approx(flops / step_s / 1e12, rel=1e-9)
    assert f"{T / step_s:,.0f} tok/s" in uniform["numbers"]
    assert f"N = {N:,}" in table
