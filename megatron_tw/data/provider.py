"""megatron's ``train_valid_test_datasets_provider`` for token-weighted training.

Megatron's own GPTDataset (packed documents, ``--data-path``/``--split``; ``--mock-data`` for
synthetic tokens) is the default. Every sample additionally carries ``sample_id``, its index in
the dataset, which the weighting uses as a layout-independent tie-break key, and, with
``--tw-scorer precomputed``, ``short_loss`` read from the sidecar by the same index
(megatron_tw/data/short_loss.py).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.training import get_args, get_tokenizer, print_rank_0
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from megatron_tw.data.batch import reads_short_loss
from megatron_tw.data.checks import check_token_ids, data_prefixes
from megatron_tw.data.short_loss import SidecarError, attach_short_losses
from megatron_tw.registry import registrar


class WithSampleId(torch.utils.data.Dataset):
    """Adds ``sample_id`` (the sample's index, int64) to every sample of ``dataset``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx):
        sample = dict(self.dataset[idx])
        sample.setdefault("sample_id", torch.tensor(int(idx), dtype=torch.int64))
        return sample


def is_dataset_built_on_rank(vp_stage=None) -> bool:
    return (is_first_or_last_pipeline_stage(vp_stage)
            and parallel_state.get_tensor_model_parallel_rank() == 0)


def gpt_dataset_config_from_args(args) -> GPTDatasetConfig:
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )


# name -> builder(args, train_val_test_num_samples, vp_stage) -> (train, valid, test)
DATASET_BUILDERS = {}


register_dataset_builder = registrar(DATASET_BUILDERS, "dataset builder")


@register_dataset_builder("gpt")
def _build_gpt(args, num_samples, vp_stage):
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_type, num_samples, partial(is_dataset_built_on_rank, vp_stage=vp_stage),
        gpt_dataset_config_from_args(args)).build()


def lead_token(args, tokenizer) -> int:
    """The id every long-document window starts with: --tw-lead-token-id, else the BOS."""
    if getattr(args, "tw_lead_token_id", None) is not None:
        if args.tw_lead_token_id >= tokenizer.vocab_size:
            raise SystemExit(f"pretrain_tw.py: error: --tw-lead-token-id {args.tw_lead_token_id} "
                             f"is outside the tokenizer's vocabulary ({tokenizer.vocab_size})")
        return args.tw_lead_token_id
    try:
        bos = tokenizer.bos
    except (AttributeError, NotImplementedError):
        bos = None
    if bos is None or bos < 0:
        raise SystemExit("pretrain_tw.py: error: --tw-long-document-sampling starts every window "
                         "with BOS, and this tokenizer has none: pass --tw-lead-token-id ID (e.g. "
                         "its end-of-text token)")
    return bos


@register_dataset_builder("long_document")
def _build_long_document(args, num_samples, vp_stage):
    from megatron_tw.data.long_document import build_long_document_datasets

    if not is_dataset_built_on_rank(vp_stage):
        return None, None, None
    tokenizer = get_tokenizer()
    return build_long_document_datasets(
        args.data_path, seq_length=args.seq_length, bos_id=lead_token(args, tokenizer),
        min_document_length=args.tw_min_document_length or 0, split=args.split,
        num_samples=num_samples, seed=args.seed,
        create_attention_mask=args.create_attention_mask_in_dataloader)


def dataset_kind(args) -> str:
    return "long_document" if getattr(args, "tw_long_document_sampling", False) else "gpt"


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage: Optional[int] = None):
    args = get_args()
    kind = dataset_kind(args)
    if not getattr(args, "mock_data", False) and is_dataset_built_on_rank(vp_stage):
        try:
            check_token_ids(data_prefixes(*get_blend_and_blend_per_split(args)),
                            args.padded_vocab_size)
        except ValueError as err:  # the file, the cause and the fix: no traceback to bury it
            raise SystemExit(f"pretrain_tw.py: error: {err}") from None
    print_rank_0(f"> building train, validation, and test datasets ({kind}) ...")
    datasets = DATASET_BUILDERS[kind](args, train_val_test_num_samples, vp_stage)
    if reads_short_loss(args):
        try:
            datasets = attach_short_losses(args, datasets, train_val_test_num_samples)
        except SidecarError as err:
            # The message is the whole story (file, cause, fix); a traceback through megatron's
            # data-loader set-up would only bury it. Raised before any training step.
            raise SystemExit(f"pretrain_tw.py: error: {err}") from None
    print_rank_0("> finished creating datasets ...")
    return tuple(WithSampleId(ds) if ds is not None else None for ds in datasets)


train_valid_test_datasets_provider.is_distributed = True
