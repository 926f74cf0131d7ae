"""The megatron backend: a torch_dist checkpoint evaluated by megatron-core's GPTModel in one process.

No conversion to Hugging Face is involved: the model is built by the project's own provider
(``build_gpt_model``, the code training runs) from the arguments the checkpoint saved, with the
parallel layout collapsed to one process (dist_checkpointing reshards any saved TP x PP layout),
and loaded with the checkpoint helpers of :mod:`megatron_tw.checkpoint.megatron_io`. So the HF
backend and this one are independent implementations of the same model, and agreeing perplexities
check both (tests/e2e/test_evaluate.py).

The model may be evaluated beyond the context it was trained at: RoPE has no length limit, and
``max_position_embeddings`` is raised to the longest sequence asked for.

Device: the model is built on the CPU (``use_cpu_initialization``), loaded, cast to ``dtype`` and
then moved to the compute device (``runtime.compute_device()``: the current CUDA device when there
is one). The Transformer Engine layer spec is kept only when CUDA is present and TE imports; else
the local spec (``transformer_impl="local"``, the project's ContextParallelDotProductAttention).

Greedy decoding uses megatron-core's own KV cache, ``StaticInferenceContext``, driven as its
static-batching text generation controller drives it: one forward over the prompt (the prefill,
``sequence_len_offset`` 0), then one forward per new token with ``sequence_len_offset`` advanced
by the tokens already cached. Attention then sees sq new queries against sk = offset + sq cached
keys (causal, lower-right aligned; the local spec's core attention handles sq < sk).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch

from megatron_tw.eval.backends import ModelBackend

EMBEDDING_KEY = "embedding.word_embeddings.weight"

# A checkpoint saved by an N-GPU run carries its parallel layout; evaluation runs in one process.
_ONE_PROCESS = dict(
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
    expert_model_parallel_size=1, expert_tensor_parallel_size=1,
    virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
    decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
    pipeline_model_parallel_layout=None, sequence_parallel=False,
    account_for_embedding_in_pipeline_split=False, account_for_loss_in_pipeline_split=False,
    hierarchical_context_parallel_sizes=None, recompute_granularity=None,
    recompute_method=None, recompute_num_layers=None, fp8=None,
    attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
    flash_decode=False,  # greedy() drives megatron's plain static KV cache (see the module doc)
)
# Kernels that exist only on CUDA (see megatron_tw/arguments.py: the CPU defaults).
_NO_CUDA = dict(
    transformer_impl="local", gradient_accumulation_fusion=False, apply_rope_fusion=False,
    masked_softmax_fusion=False, no_persist_layer_norm=True, bias_swiglu_fusion=False,
    bias_gelu_fusion=False, bias_dropout_fusion=False, cross_entropy_loss_fusion=False,
)


def single_process_args(ckpt_args, max_length: Optional[int] = None):
    """A copy of the checkpoint's argument namespace, ready to build its model in one process.

    Every architectural argument (layers, heads, norms, RoPE base, biases, tied embeddings, ...)
    is the checkpoint's own; only the parallel layout, dropout and CUDA-only kernels change.
    """
    from megatron_tw import runtime

    if ckpt_args is None:
        raise ValueError("this megatron checkpoint saved no arguments; evaluate the HF folder "
                         "instead (tools/convert_checkpoint.py megatron-to-hf) or re-save it "
                         "with pretrain_tw.py")
    args = copy.copy(ckpt_args)
    for name, value in _ONE_PROCESS.items():
        setattr(args, name, value)
    if not runtime.cuda_available() or not runtime.transformer_engine_available():
        for name, value in _NO_CUDA.items():
            setattr(args, name, value)
    if max_length is not None and args.position_embedding_type != "learned_absolute":
        args.max_position_embeddings = max(args.max_position_embeddings, max_length)
        args.seq_length = max(args.seq_length, max_length)
    return args


class MegatronBackend(ModelBackend):
    """A GPTModel (TP = PP = CP = 1) with the weights of a megatron checkpoint."""

    name = "megatron"

    def __init__(self, model, vocab_size: int, stack: contextlib.ExitStack, batch_size: int = 8,
                 info: Optional[dict] = None, device=None):
        self.device = _megatron_device(device)
        self.model = model.to(self.device).eval()
        self.vocab_size = int(vocab_size)
        self.batch_size = batch_size
        self._stack = stack
        self.info = info or {}

    @classmethod
    def from_checkpoint(cls, folder: str, *, vocab_size: Optional[int] = None,
                        dtype: torch.dtype = torch.float32, batch_size: int = 8,
                        iteration: Optional[int] = None, max_length: Optional[int] = None,
                        device=None):
        """Load ``folder`` (the directory given to ``--save``, or an iteration folder).

        vocab_size: the tokenizer's vocabulary; logits are cut to it (default: the checkpoint's
            ``vocab_size`` argument, else the padded embedding rows).
        device: default ``runtime.compute_device()``, the only device megatron-core allocates its
            own buffers on (RoPE frequencies, the KV cache).
        """
        from megatron_tw.checkpoint import megatron_io

        stack = contextlib.ExitStack()
        try:
            stack.enter_context(megatron_io.single_process_megatron())
            device = _megatron_device(device)
            data_dir = megatron_io.checkpoint_data_dir(folder, iteration)
            ckpt_args = megatron_io.checkpoint_args(data_dir)
            args = single_process_args(ckpt_args, max_length)
            padded = megatron_io.checkpoint_tensor_shape(data_dir, EMBEDDING_KEY)[0]
            saved_dtype = _saved_dtype(data_dir)
            model = megatron_io.build_model(args, padded, saved_dtype)
            megatron_io.load_checkpoint_into_model(model, args, data_dir)
            model = model.to(dtype)
        except BaseException:
            stack.close()
            raise
        vocab = vocab_size or getattr(ckpt_args, "vocab_size", None) or padded
        if vocab > padded:
            stack.close()
            raise ValueError(f"{folder}: the tokenizer has {vocab} tokens but the checkpoint's "
                             f"embedding only {padded} rows: wrong --tokenizer for this model")
        info = {"checkpoint": data_dir, "padded_vocab_size": padded,
                "trained_seq_length": getattr(ckpt_args, "seq_length", None),
                "rotary_base": getattr(ckpt_args, "rotary_base", None)}
        try:
            return cls(model, vocab, stack, batch_size, info, device=device)
        except BaseException:
            stack.close()
            raise

    def logits(self, ids: torch.Tensor, keep: Optional[int] = None) -> torch.Tensor:
        """ids [b, s] -> logits [b, s, padded vocab]: GPTModel's forward without labels (on one
        process the output layer's vocabulary shard is the whole padded vocabulary). With
        ``keep`` < s only the last ``keep`` positions reach the output layer ([b, keep, V]):
        short-context windows need one position each, and the vocabulary projection dominates the
        cost of a small model."""
        ids = ids.to(self.device)
        self._grow_rope(ids.shape[1])
        positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        return self._forward(ids, positions, keep)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: Optional[int],
                 inference_context=None) -> torch.Tensor:
        if keep is None or keep >= ids.shape[1]:
            return self.model(ids, positions, None, inference_context=inference_context)

        def last_positions(module, args, kwargs):  # hidden states [s, b, h] -> [keep, b, h]
            return (args[0][-keep:], *args[1:]), kwargs

        hook = self.model.output_layer.register_forward_pre_hook(last_positions, with_kwargs=True)
        try:
            return self.model(ids, positions, None, inference_context=inference_context)
        finally:
            hook.remove()

    def greedy(self, ids, max_new_tokens: int, stop_ids=()) -> list[int]:
        """Greedy continuation with megatron-core's static KV cache: one forward over the prompt,
        then one single-token forward per new token (see the module doc). Same contract as
        :meth:`ModelBackend.greedy` (argmax over ``vocab_size``; a stop id ends it, not returned).

        Only the last position reaches the output layer (the ``keep`` hook of :meth:`_forward`):
        megatron's own ``materialize_only_last_token_logits`` acts only under its process-wide
        ``InferenceMode`` flag, which this backend leaves alone.
        """
        if getattr(self.model.config, "window_size", None) is not None:
            # the local core attention's sliding-window paths number the queries from 0, which
            # a cache offset breaks: decode such a model by full forwards
            return super().greedy(ids, max_new_tokens, stop_ids)
        if max_new_tokens <= 0:
            return []
        import warnings

        with warnings.catch_warnings():  # the package __init__ warns about its own imports
            warnings.simplefilter("ignore", DeprecationWarning)
            from megatron.core.inference.contexts.static_context import StaticInferenceContext

        tokens = torch.tensor(list(ids), dtype=torch.long, device=self.device)[None]
        total = tokens.shape[1] + max_new_tokens
        self._grow_rope(total)
        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=total)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                start = context.sequence_len_offset  # tokens already in the cache
                positions = torch.arange(start, start + tokens.shape[1], device=self.device)[None]
                logits = self._forward(tokens, positions, 1, inference_context=context)
                context.increment_sequence_len_offset(tokens.shape[1])
                context.enable_decode_mode()
                nxt = logits[0, -1, :self.vocab_size].argmax()
                if int(nxt) in stop_ids:
                    break
                new.append(int(nxt))
                tokens = nxt.view(1, 1)
        return new

    def _grow_rope(self, length: int) -> None:
        # megatron caches nothing length-bound for RoPE on CPU (it computes the frequencies for
        # the actual length each call); learned absolute position embeddings cannot extrapolate.
        emb = getattr(self.model, "embedding", None)
        pos = getattr(emb, "position_embeddings", None)
        if pos is not None and length > pos.num_embeddings:
            raise ValueError(f"sequence of {length} tokens exceeds the model's learned position "
                             f"embeddings ({pos.num_embeddings})")

    def close(self) -> None:
        self.model = None
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def _megatron_device(device=None) -> torch.device:
    """The device for the model: default and only choice ``runtime.compute_device()``.

    megatron-core puts its own buffers (RoPE frequencies, the static KV cache) on
    ``torch.cuda.current_device()`` whenever CUDA is present, so on a CUDA machine the model must
    be on that device; on a CPU machine the runtime's CPU measures redirect those buffers to the
    CPU. To evaluate on the CPU of a GPU machine, hide the GPUs (``tools/evaluate.py --device
    cpu`` does: CUDA_VISIBLE_DEVICES="")."""
    from megatron_tw import runtime
    from megatron_tw.eval.backends import resolve_device

    want = runtime.compute_device()
    got = resolve_device(device)
    if got != want:
        raise ValueError(f"--device {got}: the megatron backend runs on {want}, the device "
                         "megatron-core allocates its buffers on; to run on the CPU hide the GPUs "
                         "(CUDA_VISIBLE_DEVICES= or tools/evaluate.py --device cpu)")
    return got


def _saved_dtype(data_dir: str) -> torch.dtype:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(data_dir)[EMBEDDING_KEY].dtype
