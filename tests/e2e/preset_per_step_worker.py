"""Worker for test_weighted_step_oracle.py (run under torchrun): ``pretrain_tw.py`` whose
iteration i (0-based) uses the weighting preset PRESETS[i] (given as "name" or
"name:field=value,..."), through pretrain_tw.main's ``wrap_forward_step`` hook (the one
benchmarks/interleaved_steps.py uses). The run's flags set the first preset.

argv: <presets separated by ";"> <pretrain_tw.py flags>
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def parse(spec: str):
    from megatron_tw.weighting import build_weighting_config

    name, _, fields = spec.partition(":")
    overrides = dict(item.split("=") for item in fields.split(",") if item)
    return build_weighting_config(name, **{k: float(v) for k, v in overrides.items()})


def per_step(configs):
    def wrap(forward_step):
        from megatron.training import get_args

        def step(data_iterator, model, *args, **kwargs):
            megatron_args = get_args()
            megatron_args.tw_weighting = configs[megatron_args.curr_iteration]
            return forward_step(data_iterator, model, *args, **kwargs)

        return step

    return wrap


if __name__ == "__main__":
    from megatron_tw import runtime

    runtime.prepare()  # as pretrain_tw.main does, before anything imports megatron
    import pretrain_tw

    configs = [parse(spec) for spec in sys.argv[1].split(";")]
    pretrain_tw.main(sys.argv[2:], wrap_forward_step=per_step(configs))
