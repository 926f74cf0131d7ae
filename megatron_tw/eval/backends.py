"""Model backends for evaluation: one small interface, two independent implementations.

A backend answers two questions about a causal language model:

    logprobs(ids [b, s]) -> [b, s-1] float32     log p(ids[:, i+1] | ids[:, :i+1])
    greedy(ids [s], n, stop_ids) -> list[int]    up to n greedily decoded continuation tokens

Logits are cut to ``vocab_size`` (the tokenizer's vocabulary) before the softmax, so a megatron
model's padded vocabulary rows never take probability mass and both backends score the same
distribution. Backends register by name (``@register_backend``); ``tools/evaluate.py --model-type``
chooses one:

    hf        a Hugging Face folder, run by ``transformers`` (greedy decoding by its ``generate``,
              with its KV cache)
    megatron  a megatron torch_dist checkpoint, run by megatron-core's GPTModel in one process
              (megatron_backend.py; greedy decoding with megatron-core's static KV cache)

Device: a backend holds its model on one device (``device=``, default
``megatron_tw.runtime.compute_device()``: the current CUDA device when there is one, else the
CPU) and moves every input there; ``logprobs`` returns its values on the CPU, where the callers
(perplexity.py, short_context.py, token_view.py) combine them with other CPU tensors.
"""

from __future__ import annotations

import abc
import contextlib
import types
from typing import Callable, Optional, Sequence, Union

import torch

from megatron_tw.registry import registrar

BACKENDS: dict[str, Callable[..., "ModelBackend"]] = {}


register_backend = registrar(BACKENDS, "model backend")


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """The device named by ``--device``: ``auto``/None: :func:`megatron_tw.runtime.compute_device`;
    ``cpu``; ``cuda``/``cuda:N`` (``cuda``: the current CUDA device; ValueError without CUDA). A
    ``torch.device`` is taken as given (tests pass fake CUDA devices)."""
    from megatron_tw import runtime

    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return runtime.compute_device()
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here "
                             "(torch.cuda.is_available() is False); use --device auto or cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class ModelBackend(abc.ABC):
    """A causal LM behind ``logprobs`` and ``greedy``. Runs on one device (``device``; inputs are
    moved there), in eval mode, no grad."""

    name: str = "?"
    vocab_size: int
    batch_size: int = 8  # sequences per forward in logprobs()
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def logits(self, ids: torch.Tensor, keep: Optional[int] = None) -> torch.Tensor:
        """ids [b, s] int64 -> logits [b, s, >= vocab_size] (any float dtype); with ``keep``, at
        least the last ``keep`` positions (the caller slices), which a backend may compute alone."""

    def logprobs(self, ids: torch.Tensor, last: Optional[int] = None) -> torch.Tensor:
        """ids [b, s] (or [s]) -> [b, s-1] float32 log-probabilities of each next token, computed in
        batches of ``batch_size`` sequences; the log-softmax runs in float32 over ``vocab_size``.
        With ``last``: only the last ``last`` targets, [b, last] (short-context windows need one)."""
        squeeze = ids.dim() == 1
        ids = ids.view(1, -1) if squeeze else ids
        if ids.shape[1] < 2:
            raise ValueError(f"logprobs needs sequences of at least 2 tokens, got {ids.shape[1]}")
        if int(ids.max()) >= self.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"token id {int(ids.max())} outside the vocabulary "
                             f"[0, {self.vocab_size}): wrong tokenizer for this model?")
        n = ids.shape[1] - 1 if last is None else min(last, ids.shape[1] - 1)
        with torch.no_grad():
            result = torch.cat([self._batch_logprobs(batch, n).cpu()
                                for batch in ids.split(self.batch_size)])
        return result[0] if squeeze else result

    def _batch_logprobs(self, batch: torch.Tensor, n: int) -> torch.Tensor:
        """[b, s] (any device) -> [b, n] float32 on ``self.device``: the last n targets."""
        batch = batch.to(self.device)
        logits = self.logits(batch, keep=n + 1)[:, -(n + 1):-1, :self.vocab_size].float()
        lp = torch.log_softmax(logits, dim=-1)
        return lp.gather(-1, batch[:, -n:, None]).squeeze(-1)

    def greedy(self, ids: Sequence[int], max_new_tokens: int,
               stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of ``ids`` (argmax over ``vocab_size``), stopping after a stop id
        (not returned) or ``max_new_tokens`` tokens. Default: a full forward per new token."""
        seq = torch.tensor(list(ids), dtype=torch.long, device=self.device)[None]
        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                nxt = self.logits(seq, keep=1)[0, -1, :self.vocab_size].argmax()
                if int(nxt) in stop_ids:
                    break
                new.append(int(nxt))
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        return new

    def close(self) -> None:
        """Release the model (and any process groups the backend created)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HFBackend(ModelBackend):
    """A ``transformers`` causal LM (any architecture ``AutoModelForCausalLM`` loads)."""

    name = "hf"

    def __init__(self, model, vocab_size: Optional[int] = None, batch_size: int = 8,
                 folder: Optional[str] = None, device: Union[str, torch.device, None] = None):
        _check_vocab(vocab_size, model.get_input_embeddings().weight.shape[0],
                     folder or type(model).__name__)
        self.device = resolve_device(device)
        if any(p.device != self.device for p in model.parameters()):
            model = model.to(self.device)
        self.model = model.eval()
        self.vocab_size = int(vocab_size or model.config.vocab_size)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, folder: str, *, vocab_size: Optional[int] = None,
                        dtype: torch.dtype = torch.float32, batch_size: int = 8,
                        device: Union[str, torch.device, None] = None) -> "HFBackend":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        rows = getattr(config, "vocab_size", None)
        if isinstance(rows, int):
            _check_vocab(vocab_size, rows, folder)  # before loading the weights
        with _unpatched_torch_factories():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                         local_files_only=True)
        return cls(model, vocab_size, batch_size, folder=folder, device=device)

    def logits(self, ids: torch.Tensor, keep: Optional[int] = None) -> torch.Tensor:
        return self.model(input_ids=ids.to(self.device), use_cache=False,
                          logits_to_keep=keep or 0).logits

    def greedy(self, ids: Sequence[int], max_new_tokens: int,
               stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy decoding by ``transformers``' ``generate`` (one prompt forward, then one token a
        step with its KV cache): argmax over ``vocab_size``, stopping at a stop id (not returned).

        Only the arguments given here steer it: the model's own ``generation_config`` (which a
        Hub folder may fill with sampling, repetition penalties or its EOS ids) is set aside for
        the call, so the result is the plain argmax continuation whatever the folder ships.
        """
        from transformers import GenerationConfig, LogitsProcessorList

        if max_new_tokens <= 0:
            return []
        stop = [int(s) for s in stop_ids]
        inp = torch.tensor(list(ids), dtype=torch.long, device=self.device)[None]
        config = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=int(max_new_tokens), min_new_tokens=0,
            use_cache=True, eos_token_id=stop or None,
            pad_token_id=stop[0] if stop else 0)  # one sequence: no position is ever padded
        processors = LogitsProcessorList([_vocabulary_cut(self.vocab_size)])
        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        try:
            out = self.model.generate(inp, attention_mask=torch.ones_like(inp),
                                      generation_config=config, logits_processor=processors)
        finally:
            self.model.generation_config = saved
        new = out[0, inp.shape[1]:].tolist()
        for i, token in enumerate(new):
            if token in stop:
                return new[:i]
        return new

    def close(self) -> None:
        self.model = None


def _vocabulary_cut(vocab_size: int):
    """A ``transformers`` logits processor: ids >= ``vocab_size`` (padded embedding rows the
    tokenizer does not have) never win the argmax."""
    from transformers import LogitsProcessor

    class VocabularyCut(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores[:, vocab_size:] = float("-inf")
            return scores

    return VocabularyCut()


def _check_vocab(vocab_size: Optional[int], rows: int, where: str) -> None:
    """A tokenizer larger than the model's embedding gives ids the model cannot look up."""
    if vocab_size is not None and int(vocab_size) > rows:
        raise ValueError(f"--tokenizer: the tokenizer has {int(vocab_size)} tokens but the model "
                         f"{where} embeds only {rows} (ids >= {rows} have no embedding); pass the "
                         "tokenizer the model was trained with")


@contextlib.contextmanager
def _unpatched_torch_factories():
    """Run with torch's own tensor factories (``torch.arange``, ``torch.empty``, ...).

    On a machine without CUDA, megatron_tw.runtime wraps them to redirect ``device="cuda"``.
    transformers 5 builds a model under a meta-device context and then recomputes its RoPE
    buffer; with the wrapped factories that buffer is left as uninitialised memory (garbage
    ``inv_freq``, wrong logits) whenever megatron was prepared earlier in the process (e.g. an HF
    scorer next to a megatron model). Loading with the originals avoids it.
    """
    saved = {}
    for name, fn in list(vars(torch).items()):
        # Only plain Python functions can be the wrappers (torch's own factories are builtins).
        if (isinstance(fn, types.FunctionType) and getattr(fn, "__megatron_tw_cpu__", False)
                and hasattr(fn, "__wrapped__")):
            saved[name] = fn
            setattr(torch, name, fn.__wrapped__)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


@register_backend("hf")
def _hf(path: str, *, vocab_size=None, dtype=torch.float32, batch_size: int = 8, device=None,
        **_):
    return HFBackend.from_pretrained(path, vocab_size=vocab_size, dtype=dtype,
                                     batch_size=batch_size, device=device)


@register_backend("megatron")
def _megatron(path: str, *, vocab_size=None, dtype=torch.float32, batch_size: int = 8,
              iteration=None, max_length=None, device=None, **_):
    from megatron_tw.eval.megatron_backend import MegatronBackend

    return MegatronBackend.from_checkpoint(path, vocab_size=vocab_size, dtype=dtype,
                                           batch_size=batch_size, iteration=iteration,
                                           max_length=max_length, device=device)


def detect_model_type(path: str) -> str:
    """``megatron`` for a folder with a checkpoint tracker or iteration folders, ``hf`` for one with
    a config.json and weights; raises naming the flag otherwise."""
    import os

    if not os.path.isdir(path):
        raise ValueError(f"--model {path}: no such folder")
    names = os.listdir(path)
    if "latest_checkpointed_iteration.txt" in names or "metadata.json" in names:
        return "megatron"
    if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
        return "hf"
    raise ValueError(f"--model {path}: neither a megatron checkpoint (no "
                     "latest_checkpointed_iteration.txt) nor an HF folder (config.json + weights); "
                     "pass --model-type hf|megatron")


def load_backend(path: str, model_type: str = "auto", **kwargs) -> ModelBackend:
    """Build the registered backend for ``path`` (``auto``: by the folder's contents)."""
    if model_type == "auto":
        model_type = detect_model_type(path)
    if model_type not in BACKENDS:
        raise ValueError(f"--model-type {model_type}: unknown; registered: {sorted(BACKENDS)}")
    return BACKENDS[model_type](path, **kwargs)
