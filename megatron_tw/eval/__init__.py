"""Evaluation of long-context models: RULER-style synthetic tasks, perplexity by position, LongPPL.

Files (one concern each):
    tokenizer.py        text <-> ids (SentencePiece model file or HF tokenizer folder)
    backends.py         ModelBackend (logprobs, greedy), the HF backend and the backend registry
    megatron_backend.py a megatron torch_dist checkpoint run by megatron-core's GPTModel
    short_context.py    short-context log-probabilities (sliding or strided windows of W tokens)
    perplexity.py       held-out loss by position, perplexity vs context, short-context ppl, LongPPL
    haystack.py         word lists, essay and noise haystacks, random needle keys/values
    tasks.py            task registry (RULER names), samples, fitting prompts to a token length
    task_niah.py        needle in a haystack (single, multi-key, multi-value, multi-query)
    task_tracing.py     variable tracking
    task_aggregation.py common- and frequent-words extraction
    scoring.py          string_match_all
    ruler.py            running tasks and the needle grid with a backend
    report.py           results JSON, markdown tables, PNG plots, multi-model comparison
    run.py              one evaluation run (what tools/evaluate.py calls)
    token_view.py       per-token losses and weights rendered as HTML/PNG (tools/visualize_weights.py)
    fidelity.py         short-context scores against an exact reference (tools/score_fidelity.py);
                        its rank statistics in fidelity_stats.py, the HF reference losses in
                        fidelity_hf.py, the project's frozen scorer in fidelity_project.py
    planted.py          metrics of planted key-value records (loss beyond/within W, retrieval)
    study.py            evaluation of tools/long_range_study.py's runs
"""
