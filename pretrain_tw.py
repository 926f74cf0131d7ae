"""Token-weighted long-context (continued) pretraining on Megatron-Core.

    torchrun --nproc-per-node 8 pretrain_tw.py <megatron flags> --tw-preset dense ...

Like Megatron-LM's pretrain_gpt.py this entry only wires the project's pieces into
``megatron.training.pretrain()``; everything it adds lives in the ``megatron_tw`` package.
"""

import sys
import time

_PROGRAM_START = time.time()


def main(argv=None, wrap_forward_step=None) -> None:
    """``wrap_forward_step``: forward_step -> forward_step; benchmarks/interleaved_steps.py
    uses it to change the weighting preset or scorer from one iteration to the next."""
    from functools import partial

    from megatron_tw import runtime

    runtime.prepare()  # before megatron parses flags: argument validation queries the device

    from megatron.core.enums import ModelType
    from megatron.training import get_tokenizer, pretrain, set_startup_timestamps
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from megatron_tw.arguments import ConfigError, parse_and_validate_args
    from megatron_tw.data.provider import train_valid_test_datasets_provider
    from megatron_tw.model.provider import model_provider
    from megatron_tw.reliability import install_step_guard
    from megatron_tw.scoring.scorers import build_scorer, probe_ids, special_token
    from megatron_tw.step import forward_step, scorer_setup_hook

    try:
        args = parse_and_validate_args(argv)
    except ConfigError as err:
        sys.exit(f"pretrain_tw.py: error: {err}")
    set_startup_timestamps(program_start=_PROGRAM_START, main_entry=time.time())

    # The run's side effects, all here: the optimizer-step guard (a patch of megatron.training's
    # optimizer builder) and the scorer, built once (its model in the model-provider hook).
    if args.tw_check_nonfinite:
        install_step_guard()
    tokenizer = get_tokenizer()
    scorer = build_scorer(args, bos_id=special_token(tokenizer, "bos"),
                          vocab_size=tokenizer.vocab_size, probe_ids=probe_ids(tokenizer))
    step = partial(forward_step, scorer=scorer)
    if wrap_forward_step is not None:
        step = wrap_forward_step(step)
    pretrain(
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        step,
        model_provider=scorer_setup_hook(model_provider, scorer),
    )


if __name__ == "__main__":  # the guard matters: checkpoint saves start worker processes
    main()
