"""The trainee's model provider: a Llama-style megatron GPTModel built from Megatron flags.

Llama-style means ``--normalization RMSNorm --swiglu --position-embedding-type rope
--rotary-base B --group-query-attention --num-query-groups G --disable-bias-linear`` (and
``--untie-embeddings-and-output-weights`` for untied heads); the provider adds nothing of its own:
every architectural choice is a Megatron flag, so checkpoints and flags stay interchangeable
with Megatron-LM.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_tw.model.specs import layer_spec_from_args


def build_gpt_model(args: Namespace, config: TransformerConfig, *, pre_process: bool = True,
                    post_process: bool = True, vp_stage: Optional[int] = None,
                    pg_collection=None, vocab_size: Optional[int] = None,
                    layer_spec=None) -> GPTModel:
    """Build one (pipeline-stage) GPTModel for ``args``/``config``.

    ``vocab_size`` defaults to megatron's padded vocabulary (``args.padded_vocab_size``);
    ``layer_spec`` to the run's (``layer_spec_from_args``).
    """
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec if layer_spec is not None else layer_spec_from_args(args),
        vocab_size=vocab_size if vocab_size is not None else args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        # --rotary-seq-len-interpolation-factor: linear position interpolation (positions / F)
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None,
                   config=None, pg_collection=None) -> GPTModel:
    """megatron.training's model-provider hook (called once per pipeline stage / virtual stage)."""
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    return build_gpt_model(args, config, pre_process=pre_process, post_process=post_process,
                           vp_stage=vp_stage, pg_collection=pg_collection)
