"""Context-parallel requests that cannot work fail at start-up naming the flag and the fix."""

import pytest

from megatron_tw.arguments import ConfigError, parse_and_validate_args
from tests.launch import TINY_MODEL, TINY_TRAINING

pytestmark = pytest.mark.unit


def _parse(*extra):
    return parse_and_validate_args([*TINY_MODEL, *TINY_TRAINING, "--train-iters", "1", *extra],
                                   set_globals=False)


def test_sequence_not_divisible_by_twice_cp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"--seq-length 64 must be divisible by 2 x "
                                          r"--context-parallel-size = 6.*--seq-length 66"):
        _parse("--context-parallel-size", "3")


def test_a2a_needs_heads_divisible_by_cp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match=r"--cp-comm-type a2a.*--context-parallel-size 8"):
        _parse("--context-parallel-size", "8", "--cp-comm-type", "a2a", "--seq-length", "64")


def test_short_context_must_be_shorter_than_the_sequence():
    with pytest.raises(ConfigError, match=r"--tw-short-context 64 must be in \[2, --seq-length"):
        _parse("--tw-preset", "dense", "--tw-short-context", "64")


def test_windows_stride_must_tile_the_sequence():
    with pytest.raises(ConfigError, match=r"--tw-short-stride 5.*divisible"):
        _parse("--tw-preset", "dense", "--tw-short-context", "16", "--tw-short-mode", "windows",
               "--tw-short-stride", "5")


def test_cp_layout_that_fits_is_accepted(monkeypatch):
    import megatron.training.arguments as megatron_arguments

    # megatron's own validation reads the GPU architecture for CP > 1 (0: no GPU here)
    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 0)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = _parse("--context-parallel-size", "4")
    assert args.context_parallel_size == 4 and args.seq_length % 8 == 0
