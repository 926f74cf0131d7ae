"""Model backends for evaluation: one small interface, two independent implementations.

A backend answers two questions about a causal language model:

    logprobs(ids [b, s]) -> [b, s-1] float32     log p(ids[:, i+1] | ids[:, :i+1])
    greedy(ids [s], n, stop_ids) -> list[int]    up to n greedily decoded continuation tokens

Logits are cut to ``vocab_size`` (the tokenizer's vocabulary) before the softmax, so a megatron
model's padded vocabulary rows never take probability mass and both backends score the same
distribution. Backends register by name (``@register_backend``); ``tools/evaluate.py --model-type``
chooses one:

    hf        a Hugging Face folder, run by ``transformers`` (greedy decoding with its KV cache)
    megatron  a megatron torch_dist checkpoint, run by megatron-core's GPTModel in one process
              (megatron_backend.py; greedy decoding re-runs the full forward each step)
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import types
from typing import Callable, Optional, Sequence

import torch

BACKENDS: dict[str, Callable[..., "ModelBackend"]] = {}


def register_backend(name: str):
    def register(factory):
        if name in BACKENDS:
            raise ValueError(f"model backend {name!r} is already registered")
        BACKENDS[name] = factory
        return factory

    return register


class ModelBackend(abc.ABC):
    """A causal LM behind ``logprobs`` and ``greedy``. Runs on one device, in eval mode, no grad."""

    name: str = "?"
    vocab_size: int
    batch_size: int = 8  # sequences per forward in logprobs()

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
        out = []
        with torch.no_grad():
            for batch in ids.split(self.batch_size):
                logits = self.logits(batch, keep=n + 1)[:, -(n + 1):-1, :self.vocab_size].float()
                lp = torch.log_softmax(logits, dim=-1)
                out.append(lp.gather(-1, batch[:, -n:, None]).squeeze(-1))
        result = torch.cat(out)
        return result[0] if squeeze else result

    def greedy(self, ids: Sequence[int], max_new_tokens: int,
               stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of ``ids`` (argmax over ``vocab_size``), stopping after a stop id
        (not returned) or ``max_new_tokens`` tokens. Default: a full forward per new token."""
        seq = torch.tensor(list(ids), dtype=torch.long)[None]
        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                nxt = int(self.logits(seq, keep=1)[0, -1, :self.vocab_size].argmax())
                if nxt in stop_ids:
                    break
                new.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
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

    def __init__(self, model, vocab_size: Optional[int] = None, batch_size: int = 8):
        self.model = model.eval()
        self.vocab_size = int(vocab_size or model.config.vocab_size)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, folder: str, *, vocab_size: Optional[int] = None,
                        dtype: torch.dtype = torch.float32, batch_size: int = 8) -> "HFBackend":
        from transformers import AutoModelForCausalLM

        with _unpatched_torch_factories():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                         local_files_only=True)
        return cls(model, vocab_size, batch_size)

    def logits(self, ids: torch.Tensor, keep: Optional[int] = None) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False, logits_to_keep=keep or 0).logits

    def greedy(self, ids: Sequence[int], max_new_tokens: int,
               stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy decoding with the model's KV cache (one prompt forward, then one token a step)."""
        new: list[int] = []
        inp = torch.tensor(list(ids), dtype=torch.long)[None]
        past = None
        # transformers 5 names the KV cache argument/output ``cache`` (``past_key_values`` before)
        name = ("cache" if "cache" in inspect.signature(self.model.forward).parameters
                else "past_key_values")
        with torch.no_grad():
            for _ in range(max_new_tokens):
                out = self.model(input_ids=inp, use_cache=True, logits_to_keep=1, **{name: past})
                past = out[name]
                nxt = int(out.logits[0, -1, :self.vocab_size].argmax())
                if nxt in stop_ids:
                    break
                new.append(nxt)
                inp = torch.tensor([[nxt]])
        return new

    def close(self) -> None:
        self.model = None


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
def _hf(path: str, *, vocab_size=None, dtype=torch.float32, batch_size: int = 8, **_):
    return HFBackend.from_pretrained(path, vocab_size=vocab_size, dtype=dtype,
                                     batch_size=batch_size)


@register_backend("megatron")
def _megatron(path: str, *, vocab_size=None, dtype=torch.float32, batch_size: int = 8,
              iteration=None, max_length=None, **_):
    from megatron_tw.eval.megatron_backend import MegatronBackend

    return MegatronBackend.from_checkpoint(path, vocab_size=vocab_size, dtype=dtype,
                                           batch_size=batch_size, iteration=iteration,
                                           max_length=max_length)


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
