"""Short-context scorers sharded over CP ranks equal a one-process reference, for the self and the
frozen scorer, both modes. The frozen scorer's reference is Hugging Face transformers (an
independent implementation): each window run on its own with BOS substituted (windows), or the
whole row under an explicit mask "first token + the previous W - 1 tokens" (sliding)."""

import pytest

from tests.launch import TINY_MODEL, TINY_TRAINING, torchrun

pytestmark = pytest.mark.distributed

# seq 64, W 17: windows of 17 tokens every 8 tile the sample of 65 tokens; CP4 gives chunks of 8.
BASE = TINY_MODEL + TINY_TRAINING + ["--train-iters", "1", "--tw-preset", "dense",
                                     "--tw-short-context", "17"]


@pytest.fixture(scope="module")
def hf_scorer(tmp_path_factory):
    """A tiny random HF Llama with the trainee's vocabulary (128), as a frozen scorer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scorer")
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("nproc,layout,mode", [
    (1, [], ["--tw-short-mode", "sliding"]),
    (2, ["--context-parallel-size", "2"], ["--tw-short-mode", "sliding"]),
    (4, ["--context-parallel-size", "4"], ["--tw-short-mode", "windows", "--tw-short-stride", "8"]),
    (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2"],
     ["--tw-short-mode", "windows", "--tw-short-stride", "8"]),
], ids=["self-sliding-cp1", "self-sliding-cp2", "self-windows-cp4", "self-windows-tp2cp2"])
def test_self_scorer_matches_reference(nproc, layout, mode):
    out = torchrun(nproc, "tests/distributed/scorer_worker.py", BASE + layout + mode).stdout
    assert out.count("SCORER-OK") == nproc, out[-3000:]


@pytest.mark.parametrize("mode", [["--tw-short-mode", "sliding"],
                                  ["--tw-short-mode", "windows", "--tw-short-stride", "8"]],
                         ids=["sliding", "windows"])
def test_frozen_scorer_cp2_matches_reference(hf_scorer, mode):
    args = BASE + ["--context-parallel-size", "2", "--tw-scorer", "frozen",
                   "--tw-scorer-load", hf_scorer] + mode
    out = torchrun(2, "tests/distributed/scorer_worker.py", args).stdout
    assert out.count("SCORER-OK") == 2, out[-3000:]
