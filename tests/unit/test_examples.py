"""The launch scripts in examples/ stay in sync with the code: the command each one launches is
parsed by the project's real parser (megatron's flags + every --tw-* group), passes the project's
start-up checks and megatron's own validation. A renamed or removed flag fails here.

Protocol every ``examples/*.sh`` and ``examples/*.sbatch`` implements: with ``TW_PRINT_ARGS=1`` the
script prints each ``pretrain_tw.py`` launch it would run as one line (every argument
NUL-terminated, then a newline), prints nothing else on stdout, and runs nothing.

The machine a script targets: a script whose command asks for ``--transformer-impl
transformer_engine`` targets a GPU machine and is parsed as there. The three machine probes the
parser consults are set to that machine (``runtime.cuda_available``,
``runtime.transformer_engine_available`` -> True, megatron's ``get_device_arch_version`` -> 9,
Hopper, the scripts' documented hardware); everything that reads the flags runs unchanged,
``check_machine`` included, so e.g. FP8 without the TE implementation still fails. Every other
script is parsed as on this CPU machine (the probes report what ``runtime`` reports here; megatron
sees architecture 0, as ``runtime.cpu`` makes it see on a CPU).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.launch import ROOT, train_small_sentencepiece

pytestmark = pytest.mark.unit

EXAMPLES = ROOT / "examples"
SCRIPTS = sorted([*EXAMPLES.glob("*.sh"), *EXAMPLES.glob("*.sbatch")])
ENTRY = "pretrain_tw.py"
# A SLURM allocation for the .sbatch scripts (scontrol is not called when MASTER_ADDR is set).
SLURM_ENV = {"SLURM_NNODES": "4", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT),
             "SLURM_JOB_NODELIST": "node[001-004]", "MASTER_ADDR": "node001"}

# Llama-3-8B as published (config.json of meta-llama/Meta-Llama-3-8B): 8,030,261,248 parameters.
LLAMA3_8B = dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                 num_query_groups=8, kv_channels=128, vocab=128256, params=8_030_261_248)


def launches(script: Path, *extra: str, env: dict | None = None) -> list[list[str]]:
    """The pretrain_tw.py commands ``script`` prints under TW_PRINT_ARGS=1 (each a field list)."""
    text = script.read_text()
    assert "TW_PRINT_ARGS" in text, (
        f"{script.name} does not implement TW_PRINT_ARGS=1 (print each pretrain_tw.py launch as "
        "one line of NUL-terminated arguments and run nothing); see tests/unit/test_examples.py")
    run_env = {**os.environ, "TW_PRINT_ARGS": "1", **(env or {})}
    if script.suffix == ".sbatch":
        run_env.update(SLURM_ENV)
    proc = subprocess.run(["bash", str(script), *extra], env=run_env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, f"{script.name}: exit {proc.returncode}\n{proc.stderr}"
    commands = []
    for line in proc.stdout.split("\n"):
        if not line:
            continue
        assert line.endswith("\0"), f"{script.name}: a printed line is not NUL-terminated fields: {line!r}"
        commands.append(line[:-1].split("\0"))
    commands = [c for c in commands if any(Path(f).name == ENTRY for f in c)]
    assert commands, f"{script.name} printed no {ENTRY} command under TW_PRINT_ARGS=1"
    return commands


def split_launch(fields: list[str]) -> tuple[list[str], list[str]]:
    """(launcher fields up to and without pretrain_tw.py, pretrain_tw.py's arguments)."""
    i = next(i for i, f in enumerate(fields) if Path(f).name == ENTRY)
    return fields[:i], fields[i + 1:]


def flag_value(fields: list[str], *names: str, default=None):
    """The value after the last occurrence of any of ``names`` (argparse: the last one wins)."""
    value = default
    for i, f in enumerate(fields):
        if f in names and i + 1 < len(fields):
            value = fields[i + 1]
        for name in names:
            if f.startswith(name + "="):
                value = f.split("=", 1)[1]
    return value


def world_size(launcher: list[str]) -> int:
    """Processes the launcher starts: torchrun's nproc-per-node x nnodes, else one."""
    if not any(Path(f).name == "torchrun" or f == "torch.distributed.run" for f in launcher):
        return 1
    nproc = int(flag_value(launcher, "--nproc-per-node", "--nproc_per_node", default="1"))
    nnodes = flag_value(launcher, "--nnodes", default="1")
    return nproc * int(nnodes.split(":")[-1])


def targets_gpu(argv: list[str]) -> bool:
    return flag_value(argv, "--transformer-impl") == "transformer_engine"


@pytest.fixture
def parse(monkeypatch):
    """parse(argv, world_size, gpu, script_text) -> the validated args namespace, with the
    machine probes set to the script's target machine (see the module docstring)."""
    import megatron.training.arguments as megatron_arguments

    from megatron_tw import runtime
    from megatron_tw.arguments import parse_and_validate_args

    def _parse(argv, world, gpu, script_text=""):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        if gpu:
            monkeypatch.setattr(runtime, "cuda_available", lambda: True)
            monkeypatch.setattr(runtime, "transformer_engine_available", lambda: True)
            monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)
            # The variable must come from the script itself on a GPU machine.
            if "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script_text:
                monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
            else:
                monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
        else:
            monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 0)
            monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        return parse_and_validate_args(argv, set_globals=False)

    return _parse


def script_text(script: Path) -> str:
    """``script``'s text followed by that of every file under examples/ it sources."""
    text = script.read_text()
    for line in text.splitlines():
        found = re.match(r"\s*(?:source|\.)\s.*?([\w.-]+/[\w.-]+\.sh)\"?\s*$", line)
        if found:
            sourced = EXAMPLES / found.group(1)
            assert sourced.is_file(), f"{script.name}: {line.strip()}: no {sourced}"
            text += sourced.read_text()
    return text


def parse_script(parse, script: Path, *extra: str, env: dict | None = None):
    """Every launch of ``script``, parsed: a list of (args, world_size)."""
    out = []
    for fields in launches(script, *extra, env=env):
        launcher, argv = split_launch(fields)
        world = world_size(launcher)
        out.append((parse(argv, world, targets_gpu(argv), script_text(script)), world))
    return out


def test_the_gpu_examples_exist():
    names = {p.name for p in SCRIPTS}
    for name in ("llama3_8b_32k_dense.sh", "llama3_8b_32k_sparse.sh",
                 "llama3_8b_64k_precomputed.sh", "llama3_8b_32k_dense_multinode.sbatch"):
        assert name in names


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """A stand-in for the CPU scripts' ``DATA`` folder (data/demo, built by
    tools/build_demo_data.py and absent on a fresh checkout): the start-up checks open the
    SentencePiece model the scripts name, so it holds a real one, trained here on a few lines."""
    root = tmp_path_factory.mktemp("demo")
    (root / "tokenizer").mkdir()
    train_small_sentencepiece(root / "tokenizer" / "tokenizer")
    return root


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_every_script_parses_with_the_real_parser(parse, script, demo_data):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # DATA is the CPU scripts' data folder; the GPU scripts take DATA_ROOT/DATA_PREFIX instead.
    for args, world in parse_script(parse, script, env={"DATA": str(demo_data)}):
        model_parallel = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                          * args.context_parallel_size)
        assert world % model_parallel == 0
        assert args.data_parallel_size == world // model_parallel
        assert args.global_batch_size % (args.micro_batch_size * args.data_parallel_size) == 0
        if targets_gpu_args(args):
            assert args.distributed_backend == "nccl"  # the GPU machine's default


def targets_gpu_args(args) -> bool:
    return args.transformer_impl == "transformer_engine"


def llama_params(args, vocab: int) -> int:
    """Parameter count of an untied Llama model from the parsed flags, written from the
    architecture: embedding and output matrices, q/k/v/o, SwiGLU MLP, two RMSNorms per layer
    and the final one."""
    h, L, f = args.hidden_size, args.num_layers, args.ffn_hidden_size
    d_attn = args.num_attention_heads * args.kv_channels
    d_kv = args.num_query_groups * args.kv_channels
    layer = h * d_attn + 2 * h * d_kv + d_attn * h + 3 * h * f + 2 * h
    return 2 * vocab * h + L * layer + h


def assert_reference_training(args):
    """The paper's reference set-up: AdamW 2e-5 constant after 20 warm-up steps, betas 0.9/0.95,
    eps 1e-8, weight decay 0.01, clip 1.0, 240 steps, bf16, RoPE base 15.3M, one book per sequence."""
    assert (args.lr, args.min_lr, args.lr_decay_style, args.lr_warmup_iters) == (2e-5, 2e-5, "constant", 20)
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.95, 1e-8)
    assert (args.weight_decay, args.clip_grad, args.train_iters) == (0.01, 1.0, 240)
    assert args.bf16 and not args.fp16 and args.fp8 is None
    assert args.rotary_base == 15_300_000 and not args.use_rope_scaling
    assert args.tw_long_document_sampling and len(args.data_path) == 1
    assert args.sequence_parallel and args.use_distributed_optimizer
    assert llama_params(args, LLAMA3_8B["vocab"]) == LLAMA3_8B["params"]
    assert args.untie_embeddings_and_output_weights and args.swiglu
    assert args.normalization == "RMSNorm" and args.position_embedding_type == "rope"


def only(parsed):
    assert len(parsed) == 1
    return parsed[0]


def test_llama3_8b_32k_dense_is_the_reference_run(parse):
    from megatron_tw.weighting import WeightingConfig

    args, world = only(parse_script(parse, EXAMPLES / "llama3_8b_32k_dense.sh"))
    assert world == 8 and args.seq_length == 32768 and args.global_batch_size == 16
    assert_reference_training(args)
    # dense lambda: absolute -> L1 -> interpolation 0.75 (METHOD table)
    assert args.tw_weighting == WeightingConfig(transforms=("absolute",), normalization="l1",
                                                interpolation=0.75)
    assert (args.tw_scorer, args.tw_short_context, args.tw_short_mode) == ("self", 8192, "sliding")
    assert args.tensor_model_parallel_size * args.context_parallel_size == 8


def test_llama3_8b_32k_sparse_keeps_a_quarter(parse):
    from megatron_tw.weighting import WeightingConfig

    args, world = only(parse_script(parse, EXAMPLES / "llama3_8b_32k_sparse.sh"))
    assert world == 8 and args.seq_length == 32768
    assert_reference_training(args)
    assert args.tw_weighting == WeightingConfig(transforms=("absolute",), sparsity=0.25,
                                                normalization="l1")
    assert (args.tw_scorer, args.tw_short_context) == ("self", 8192)


def test_llama3_8b_64k_reads_precomputed_scores(parse):
    args, world = only(parse_script(parse, EXAMPLES / "llama3_8b_64k_precomputed.sh",
                                    env={"DATA_PREFIX": "/d/pg19_text_document"}))
    assert world == 8 and args.seq_length == 65536 == args.max_position_embeddings
    # the 32k run's tokens per step
    assert args.global_batch_size * args.seq_length == 16 * 32768
    assert args.tw_scorer == "precomputed"
    assert args.tw_short_loss_path == "/d/pg19_text_document_short_loss"
    assert args.data_path == ["/d/pg19_text_document"]
    assert args.recompute_granularity == "full"
    assert llama_params(args, LLAMA3_8B["vocab"]) == LLAMA3_8B["params"]


def test_multinode_sbatch_is_data_parallel_across_nodes(parse):
    fields = only(launches(EXAMPLES / "llama3_8b_32k_dense_multinode.sbatch"))
    launcher, _ = split_launch(fields)
    assert Path(launcher[0]).name == "srun" and "torchrun" in launcher
    assert flag_value(launcher, "--rdzv-endpoint") == "node001:29500"
    assert flag_value(launcher, "--rdzv-id") == "4242"
    args, world = only(parse_script(parse, EXAMPLES / "llama3_8b_32k_dense_multinode.sbatch"))
    assert world == 32 and args.data_parallel_size == 4
    assert args.tensor_model_parallel_size * args.context_parallel_size == 8  # inside one node
    assert_reference_training(args)


def test_environment_overrides_reach_the_command():
    env = {"DATA_PREFIX": "/x/tokens", "CKPT_DIR": "/x/ckpt", "SAVE_DIR": "/x/save",
           "TB_DIR": "/x/tb", "TOKENIZER_MODEL": "/x/tok", "GPUS_PER_NODE": "4", "NNODES": "2",
           "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "7000"}
    launcher, argv = split_launch(only(launches(EXAMPLES / "llama3_8b_32k_dense.sh", env=env)))
    assert [flag_value(launcher, f) for f in ("--nproc-per-node", "--nnodes", "--node-rank",
                                              "--master-addr", "--master-port")] == \
        ["4", "2", "1", "10.0.0.1", "7000"]
    assert [flag_value(argv, f) for f in ("--data-path", "--pretrained-checkpoint", "--load",
                                          "--save", "--tensorboard-dir", "--tokenizer-model")] == \
        ["/x/tokens", "/x/ckpt", "/x/save", "/x/save", "/x/tb", "/x/tok"]


# The harness can fail: what a stale script would look like.

def test_extra_arguments_are_forwarded_and_later_flags_win(parse):
    args, _ = only(parse_script(parse, EXAMPLES / "llama3_8b_32k_dense.sh",
                                "--tw-interpolation", "0.5", "--train-iters", "10"))
    assert args.tw_weighting.interpolation == 0.5 and args.train_iters == 10


@pytest.mark.parametrize("stale", [["--tw-short-window", "8192"], ["--rope-base", "500000"]])
def test_an_unknown_flag_fails_the_parse(parse, capsys, stale):
    with pytest.raises(SystemExit) as err:
        parse_script(parse, EXAMPLES / "llama3_8b_32k_dense.sh", *stale)
    assert err.value.code == 2
    assert stale[0] in capsys.readouterr().err


def test_a_project_check_fails_the_parse(parse):
    from megatron_tw.arguments import ConfigError

    # sliding-window short context as long as the sequence: rejected by the scorer checks
    with pytest.raises(ConfigError, match="--tw-short-context 32768"):
        parse_script(parse, EXAMPLES / "llama3_8b_32k_dense.sh", "--tw-short-context", "32768")
