"""The --tw-* flags, presets and registries: real argv lists parsed by a fresh argparse parser."""

import argparse
import dataclasses

import pytest
import torch

from megatron_tw.weighting import (PRESETS, TRANSFORMS, WeightingConfig, add_weighting_args,
                                   build_weighting_config, compute_token_weights,
                                   register_preset, register_transform,
                                   weighting_config_from_args)

pytestmark = pytest.mark.unit


def config_from_argv(argv):
    parser = add_weighting_args(argparse.ArgumentParser(prog="pretrain_tw.py"))
    return weighting_config_from_args(parser.parse_args(argv))


def test_parser_has_the_group_and_returns_the_parser():
    parser = argparse.ArgumentParser()
    assert add_weighting_args(parser) is parser
    assert any(g.title == "token weighting" for g in parser._action_groups)
    assert config_from_argv([]) == WeightingConfig() and config_from_argv([]).is_uniform


@pytest.mark.parametrize("preset, want", [
    ("uniform", WeightingConfig()),
    ("dense", WeightingConfig(transforms=("absolute",), normalization="l1", interpolation=0.75)),
    ("sparse", WeightingConfig(transforms=("absolute",), sparsity=0.25, normalization="l1")),
    ("longce", WeightingConfig(transforms=("minus", "exp"), truncation=5.0)),
    ("ppmi", WeightingConfig(transforms=("minus", "shift", "max"), shift=1.0, sparsity=0.25,
                             normalization="l1")),
    ("npmi", WeightingConfig(transforms=("shift", "max"), shift=1.0, sparsity=0.25,
                             normalization="l1")),
])
def test_presets_follow_the_method_table(preset, want):
    assert config_from_argv(["--tw-preset", preset]) == want
    assert PRESETS[preset]() == want
    assert want.is_uniform == (preset == "uniform")


def test_overrides_merge_onto_the_preset():
    cfg = config_from_argv(["--tw-preset", "dense", "--tw-interpolation", "0.5"])
    assert cfg == dataclasses.replace(PRESETS["dense"](), interpolation=0.5)
    assert cfg == PRESETS["dense"](interpolation=0.5)
    cfg = config_from_argv(["--tw-preset", "ppmi", "--tw-shift", "2", "--tw-sparsity", "0.1"])
    assert (cfg.shift, cfg.sparsity, cfg.transforms) == (2.0, 0.1, ("minus", "shift", "max"))
    cfg = config_from_argv(["--tw-transforms", "Minus, shift,max", "--tw-shift", "4",
                            "--tw-normalization", "SoftMax", "--tw-temperature", "2",
                            "--tw-comparison", "quotient"])
    assert cfg == WeightingConfig(comparison="quotient", transforms=("minus", "shift", "max"),
                                  shift=4.0, normalization="softmax", temperature=2.0)
    # "none" removes a step the preset turned on.
    cfg = config_from_argv(["--tw-preset", "dense", "--tw-interpolation", "none"])
    assert cfg == WeightingConfig(transforms=("absolute",), normalization="l1")
    cfg = config_from_argv(["--tw-preset", "sparse", "--tw-sparsity", "none",
                            "--tw-transforms", "none", "--tw-normalization", "none"])
    assert cfg == WeightingConfig() and cfg.is_uniform
    assert build_weighting_config("longce", truncation=None) == PRESETS["longce"]()


@pytest.mark.parametrize("argv, flag, fix", [
    (["--tw-interpolation", "0.5"], "--tw-interpolation", "--tw-normalization l1"),
    (["--tw-preset", "dense", "--tw-normalization", "none"], "--tw-interpolation",
     "--tw-normalization l1"),
    (["--tw-preset", "dense", "--tw-interpolation", "1.5"], "--tw-interpolation", "[0, 1]"),
    (["--tw-preset", "dense", "--tw-interpolation", "-0.1"], "--tw-interpolation", "[0, 1]"),
    (["--tw-preset", "sparse", "--tw-sparsity", "0"], "--tw-sparsity", "(0, 1]"),
    (["--tw-preset", "sparse", "--tw-sparsity", "1.5"], "--tw-sparsity", "(0, 1]"),
    (["--tw-preset", "sparse", "--tw-sparsity", "nan"], "--tw-sparsity", "(0, 1]"),
    (["--tw-normalization", "softmax", "--tw-temperature", "0"], "--tw-temperature", "> 0"),
    (["--tw-normalization", "softmax", "--tw-temperature", "-1"], "--tw-temperature", "> 0"),
    (["--tw-preset", "dense", "--tw-temperature", "2"], "--tw-temperature", "softmax"),
    (["--tw-transforms", "absolute,squared"], "--tw-transforms", "'squared'"),
    (["--tw-transforms", "minus,shift,max"], "--tw-shift", "> 0"),
    (["--tw-preset", "dense", "--tw-shift", "2"], "--tw-shift", "add 'shift'"),
    (["--tw-preset", "ppmi", "--tw-shift", "0"], "--tw-shift", "> 0"),
    (["--tw-preset", "npmi", "--tw-shift", "-2"], "--tw-shift", "> 0"),
    (["--tw-preset", "ppmi", "--tw-shift", "none"], "--tw-shift", "> 0"),
    (["--tw-preset", "longce", "--tw-truncation", "0"], "--tw-truncation", "> 0"),
    (["--tw-preset", "longce", "--tw-truncation", "-1"], "--tw-truncation", "> 0"),
    (["--tw-preset", "longce", "--tw-truncation", "inf"], "--tw-truncation", "> 0"),
    (["--tw-normalization", "l2"], "--tw-normalization", "softmax"),
    (["--tw-comparison", "ratio", "--tw-normalization", "l1"], "--tw-comparison", "quotient"),
])
def test_invalid_configurations_name_the_flag_and_the_fix(argv, flag, fix):
    with pytest.raises(ValueError) as err:
        config_from_argv(argv)
    assert flag in str(err.value) and fix in str(err.value), str(err.value)


def test_argparse_rejects_unknown_presets_and_non_numbers(capsys):
    for argv in (["--tw-preset", "dens"], ["--tw-sparsity", "a quarter"]):
        with pytest.raises(SystemExit):
            config_from_argv(argv)
    assert "float-or-none" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--tw-preset"):
        build_weighting_config("dens")
    with pytest.raises(ValueError, match="unknown weighting override"):
        build_weighting_config("dense", lam=0.5)


def test_registries_extend_without_touching_the_pipeline():
    @register_transform("test-square")
    def square(scores, config):
        return scores * scores

    @register_preset("test-squared-l1")
    def squared_l1() -> WeightingConfig:
        return WeightingConfig(transforms=("test-square",), normalization="l1")

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_transform("test-square")(square)
        with pytest.raises(ValueError, match="already registered"):
            register_preset("dense")(squared_l1)
        # Flags: the transform is usable at once; the preset on parsers built after registering.
        cfg = config_from_argv(["--tw-preset", "test-squared-l1"])
        assert cfg == config_from_argv(["--tw-transforms", "test-square",
                                        "--tw-normalization", "l1"])
        long = torch.tensor([[1.0, 2.0, 4.0, 0.5]])
        short = torch.tensor([[2.0, 2.0, 1.0, 0.5]])
        w = compute_token_weights(long, short, torch.ones(1, 4), torch.arange(4)[None],
                                  torch.tensor([0]), config=cfg, seed=0, iteration=0)
        d2 = (long - short) ** 2
        torch.testing.assert_close(w, 4 * d2 / d2.sum())
    finally:
        del TRANSFORMS["test-square"], PRESETS["test-squared-l1"]


def test_config_is_frozen_and_canonical():
    cfg = WeightingConfig(transforms="absolute", normalization="L1")
    assert cfg.transforms == ("absolute",) and cfg.normalization == "l1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 0.5
    assert WeightingConfig(sparsity=1.0).is_uniform
    assert not WeightingConfig(truncation=2.0).is_uniform
    assert not WeightingConfig(transforms=("absolute",), normalization="l1",
                               interpolation=0.99).is_uniform


def test_dump_weights_flags_are_checked():
    import argparse

    from megatron_tw.weighting.arguments import validate_dump_args
    from megatron_tw.weighting.presets import build_weighting_config

    uniform = argparse.Namespace(tw_dump_weights="/tmp/w", tw_dump_weights_interval=10,
                                 tw_weighting=build_weighting_config("uniform"))
    with pytest.raises(ValueError, match="--tw-dump-weights: the uniform preset"):
        validate_dump_args(uniform)
    bad = argparse.Namespace(tw_dump_weights="/tmp/w", tw_dump_weights_interval=0,
                             tw_weighting=build_weighting_config("dense"))
    with pytest.raises(ValueError, match="--tw-dump-weights-interval must be >= 1"):
        validate_dump_args(bad)
    validate_dump_args(argparse.Namespace(tw_dump_weights="/tmp/w", tw_dump_weights_interval=5,
                                          tw_weighting=build_weighting_config("dense")))
