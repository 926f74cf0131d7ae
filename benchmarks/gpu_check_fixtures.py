#!/usr/bin/env python
"""Inputs benchmarks/gpu_check.py makes on the fly (nothing is downloaded):

    python benchmarks/gpu_check_fixtures.py --out DIR --vocab 128256 --max-positions 8192

  DIR/scorer         a tiny Hugging Face Llama with random weights and the trainee's vocabulary
                     (--vocab, the run's --vocab-size for NullTokenizer): the frozen scorer of
                     the frozen row and of tools/score_data.py
  DIR/tok.model      a SentencePiece BPE model trained on a few hundred generated lines
  DIR/heldout.jsonl  generated {"text": ...} documents for tools/evaluate.py's perplexity

Prints ``FIXTURES {json}`` with the three paths.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

WORDS = ("the grass is green the sky is blue the sun is yellow here we go there and back again "
         "one of the special magic numbers for is what are all mentioned in provided text").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + f" {rng.randint(10**6, 10**7 - 1)}."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--max-positions", type=int, required=True)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--documents", type=int, default=60, help="held-out documents")
    p.add_argument("--words", type=int, default=200, help="words per held-out document")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         num_key_value_heads=a.kv_heads, max_position_embeddings=a.max_positions,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so context matters to the losses
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    scorer = os.path.join(a.out, "scorer")
    model.save_pretrained(scorer)

    rng = random.Random(0)
    lines = [text(rng, 30) for _ in range(300)] + ["0123456789 - . , : ? !"] * 10
    prefix = os.path.join(a.out, "tok")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix,
                                   vocab_size=100, model_type="bpe", minloglevel=2)
    heldout = os.path.join(a.out, "heldout.jsonl")
    with open(heldout, "w") as f:
        for _ in range(a.documents):
            f.write(json.dumps({"text": text(rng, a.words)}) + "\n")
    print("FIXTURES " + json.dumps({"scorer": scorer, "tokenizer": prefix + ".model",
                                    "heldout": heldout}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
