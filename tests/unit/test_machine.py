"""Start-up decisions are functions of a machine description (runtime/machine.py): CPU, a GPU
without Transformer Engine, Ampere with TE and Hopper with TE, checked on any machine.

The reference for "what works" is megatron itself: the config each profile's defaults produce is
handed to megatron's own ``TransformerConfig`` (which raises for TE-only fusions it cannot serve).
"""

from __future__ import annotations

import dataclasses

import pytest

from megatron_tw.runtime.machine import (
    ALLOW_CPU_ENV,
    Machine,
    compute_device,
    cpu_mode_refused,
    megatron_defaults,
)
from tests.launch import TINY_MODEL, TINY_TRAINING

pytestmark = pytest.mark.unit

CPU = Machine(cuda=False, te=False)
GPU_NO_TE = Machine(cuda=True, te=False, capability=(9, 0))
AMPERE_TE = Machine(cuda=True, te=True, capability=(8, 0))
HOPPER_TE = Machine(cuda=True, te=True, capability=(9, 0))
BROKEN_TE = Machine(cuda=True, te=False, te_error="OSError: libtransformer_engine.so: cannot open",
                    capability=(9, 0))

FUSIONS = ("apply_rope_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion")


def test_cpu_defaults():
    d = megatron_defaults(CPU)
    assert (d["transformer_impl"], d["distributed_backend"], d["use_cpu_initialization"]) == (
        "local", "gloo", True)
    assert all(d[f] is False for f in FUSIONS) and d["no_persist_layer_norm"] is True


def test_gpu_without_te_turns_off_te_kernels_only():
    d = megatron_defaults(GPU_NO_TE)
    assert d["transformer_impl"] == "local"
    assert d["apply_rope_fusion"] is False and d["no_persist_layer_norm"] is True
    assert d["gradient_accumulation_fusion"] is False  # no apex either
    assert "distributed_backend" not in d and "use_cpu_initialization" not in d  # NCCL, GPU init
    with_apex = megatron_defaults(dataclasses.replace(GPU_NO_TE, apex=True))
    assert "gradient_accumulation_fusion" not in with_apex  # apex's fused wgrad serves it


@pytest.mark.parametrize("machine", [AMPERE_TE, HOPPER_TE], ids=["ampere", "hopper"])
def test_gpu_with_te_keeps_megatron_defaults(machine):
    d = megatron_defaults(machine)
    assert not set(d) & {"transformer_impl", "distributed_backend", *FUSIONS}
    assert d["calculate_per_token_loss"] is True


def test_fp8_needs_ada_or_newer_and_te():
    assert HOPPER_TE.fp8 and not AMPERE_TE.fp8 and not GPU_NO_TE.fp8 and not CPU.fp8


def test_compute_device_of_a_cpu_machine():
    assert compute_device(CPU).type == "cpu"


def test_visible_gpus_that_torch_cannot_use_refuse_cpu_mode(monkeypatch):
    monkeypatch.delenv(ALLOW_CPU_ENV, raising=False)
    message = cpu_mode_refused(dataclasses.replace(CPU, gpus_visible=True))
    assert message and "torch.cuda.is_available() is False" in message and ALLOW_CPU_ENV in message
    assert cpu_mode_refused(CPU) is None and cpu_mode_refused(HOPPER_TE) is None
    monkeypatch.setenv(ALLOW_CPU_ENV, "1")
    assert cpu_mode_refused(dataclasses.replace(CPU, gpus_visible=True)) is None


# -- the profiles through the real parser and megatron's TransformerConfig ---------------------

@pytest.fixture
def parse_on(monkeypatch):
    import megatron.training.arguments as megatron_arguments

    from megatron_tw import runtime
    from megatron_tw.arguments import parse_and_validate_args

    def parse(machine: Machine, argv=()):
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        monkeypatch.setattr(runtime, "this_machine", lambda: machine)
        monkeypatch.setattr(megatron_arguments, "get_device_arch_version",
                            lambda: machine.capability[0] if machine.cuda else 0)
        return parse_and_validate_args([*TINY_MODEL, *TINY_TRAINING, *argv], set_globals=False)

    return parse


def test_gpu_without_te_builds_a_transformer_config(parse_on):
    """megatron's TransformerConfig raises for apply_rope_fusion without TE ("install TE >=
    1.4"); the profile's defaults must give one it accepts."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = parse_on(GPU_NO_TE)
    assert (args.transformer_impl, args.apply_rope_fusion, args.no_persist_layer_norm,
            args.gradient_accumulation_fusion) == ("local", False, True, False)
    config = core_transformer_config_from_args(args)
    assert config.apply_rope_fusion is False


def test_broken_te_gets_one_clear_line(parse_on):
    from megatron_tw.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"Transformer Engine is installed but does not import "
                                          r"\(OSError: libtransformer_engine.so.*docs/gpu.md"):
        parse_on(BROKEN_TE, ["--transformer-impl", "transformer_engine"])
    assert parse_on(BROKEN_TE).transformer_impl == "local"


def test_broken_te_fallback_says_so(parse_on, capsys):
    parse_on(BROKEN_TE)
    err = capsys.readouterr().err
    assert "Transformer Engine is installed but does not import" in err and "local" in err


def test_sequence_parallel_on_the_cpu_is_refused(parse_on):
    from megatron_tw.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"--sequence-parallel.*needs CUDA"):
        parse_on(CPU, ["--sequence-parallel", "--tensor-model-parallel-size", "2"])


def test_a2a_needs_kv_heads_divisible_by_cp(parse_on):
    """TE's a2a scatters K/V heads too: 2 query groups over TP 1 and CP 4 cannot be split."""
    from megatron_tw.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"K/V heads.*--num-query-groups 2.*--context-parallel"):
        parse_on(HOPPER_TE, ["--context-parallel-size", "4", "--cp-comm-type", "a2a"])


# -- the scorer's config -------------------------------------------------------------------------

def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                             use_cpu_initialization=True, **kw)


def test_sliding_scorer_with_p2p_cp_uses_all_gather():
    """TE asserts that sliding-window attention with CP uses all_gather or a2a."""
    from megatron_tw.scoring.model import scorer_config

    trainee = _config(context_parallel_size=2, cp_comm_type="p2p")
    sliding = scorer_config(trainee, mode="sliding", window=16)
    assert sliding.cp_comm_type == "all_gather" and sliding.window_size == (14, 0)  # W - 2
    assert sliding.context_parallel_size == 2
    per_layer = scorer_config(_config(context_parallel_size=2, cp_comm_type=["p2p", "a2a"]),
                              mode="sliding", window=16)
    assert per_layer.cp_comm_type == ["all_gather", "a2a"]
    windows = scorer_config(trainee, mode="windows", window=16)
    assert windows.context_parallel_size == 1 and windows.window_size is None


def test_scorer_fp8_follows_its_flag_not_the_trainee():
    from megatron_tw.scoring.model import scorer_config

    bf16 = _config()
    assert scorer_config(bf16, mode="windows", window=8, fp8=True).fp8 == "e4m3"
    fp8_trainee = dataclasses.replace(bf16, fp8="hybrid")
    assert scorer_config(fp8_trainee, mode="windows", window=8, fp8=False).fp8 is None
    assert scorer_config(fp8_trainee, mode="windows", window=8, fp8=None).fp8 == "hybrid"
