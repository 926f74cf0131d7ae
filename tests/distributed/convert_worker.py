"""Conversion under tensor and pipeline parallelism (one process per rank, gloo).

    python convert_worker.py convert OUT              # one process: every case -> HF folder +
                                                      # megatron torch_dist checkpoint (TP2 padding)
    torchrun --nproc-per-node 2 convert_worker.py check OUT --tp 2 --pp 1

``check`` builds, for every case of convert_cases.CASES, this rank's GPTModel stage and fills it
twice: with ``load_hf_into_megatron`` straight from the HF weights (each rank slices its own TP shard
and pipeline layers) and from the one-process torch_dist checkpoint (dist_checkpointing reshards it
at load time). Both give the HF model's logits (gathered over TP, computed on the last stage after
the first stage sends its activations). Rank 0 prints CONVERT_PARALLEL_OK on success.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from tests.distributed.convert_cases import (  # noqa: E402
    CASES,
    VOCAB_DIVISOR,
    make_hf_model,
    sample_tokens,
)

TP_FOR_PADDING = 2


def convert_all(out: str) -> None:
    from megatron_tw.checkpoint import convert

    for case in CASES:
        make_hf_model(case).save_pretrained(os.path.join(out, "hf", case))
        convert.hf_to_megatron(os.path.join(out, "hf", case), os.path.join(out, "megatron", case),
                               make_vocab_size_divisible_by=VOCAB_DIVISOR,
                               target_tensor_parallel_size=TP_FOR_PADDING)
    print("CONVERTED", len(CASES), flush=True)


def stage_forward(model, tokens, hidden_size):
    """Logits [b, s, V_padded / TP] on the last stage (None elsewhere); activations [s, b, h]
    travel from stage 0 to stage 1 by send/recv."""
    from megatron.core import parallel_state as ps

    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return model(tokens, pos, None)
    if ps.is_pipeline_first_stage():
        hidden = model(tokens, pos, None)
        dist.send(hidden.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    hidden = torch.empty(tokens.shape[1], tokens.shape[0], hidden_size)
    dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
    model.set_input_tensor(hidden)
    return model(tokens, pos, None)


def gather_vocab(logits):
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def check_all(out: str, tp: int, pp: int) -> None:
    from megatron_tw import runtime

    runtime.prepare()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.training.argument_utils import core_transformer_config_from_args

    from megatron_tw.checkpoint import megatron_io
    from megatron_tw.checkpoint.families import megatron_args_from_hf_config
    from megatron_tw.checkpoint.hf import load_hf_into_megatron
    from megatron_tw.model.provider import build_gpt_model

    ps.initialize_model_parallel(tp, pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    failures = []
    for case in CASES:
        hf = make_hf_model(case)
        tokens = sample_tokens(hf.config.vocab_size)
        with torch.no_grad():
            want = hf(tokens).logits
        ckpt = megatron_io.checkpoint_data_dir(os.path.join(out, "megatron", case))
        padded = megatron_io.checkpoint_tensor_shape(ckpt, "embedding.word_embeddings.weight")[0]
        flags = megatron_args_from_hf_config(hf.config, make_vocab_size_divisible_by=VOCAB_DIVISOR)
        args = megatron_io.parse_model_args(flags, ["--tensor-model-parallel-size", str(tp),
                                                    "--pipeline-model-parallel-size", str(pp)])
        model = build_gpt_model(args, core_transformer_config_from_args(args), vocab_size=padded,
                                pre_process=ps.is_pipeline_first_stage(),
                                post_process=ps.is_pipeline_last_stage()).eval()
        for route in ("hf", "checkpoint"):
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
                if route == "hf":
                    load_hf_into_megatron(model, hf.state_dict(), hf.config)
                else:
                    megatron_io.load_checkpoint_into_model(model, args, ckpt)
                logits = stage_forward(model, tokens, hf.config.hidden_size)
            if ps.is_pipeline_last_stage():
                got = gather_vocab(logits)[..., : hf.config.vocab_size]
                err = (got - want).abs().max().item()
                print(f"rank {dist.get_rank()} {case} {route}: max |logit diff| {err:.2e}", flush=True)
                if not err < 1e-4:
                    failures.append(f"{case}/{route}: {err}")
    flags = torch.tensor([len(failures)])
    dist.all_reduce(flags)
    if failures:
        raise SystemExit(f"rank {dist.get_rank()} mismatches: {failures}")
    if flags.item() == 0 and dist.get_rank() == 0:
        print(f"CONVERT_PARALLEL_OK tp={tp} pp={pp} cases={len(CASES)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["convert", "check"])
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    a = parser.parse_args()
    convert_all(a.out) if a.mode == "convert" else check_all(a.out, a.tp, a.pp)
