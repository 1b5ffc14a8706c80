"""Every metric of the summary: its name (a pattern for families: `<endpoint>`, `<measure>`, ...), unit and
meaning. The one place they are written: the docs' metrics table is generated from it (sim/reference.py), the run
report reads its units, and a test checks that every key a run reports has an entry here."""
from __future__ import annotations

import re

METRICS: tuple[tuple[str, str, str], ...] = (
    ('workload', '',
     "the workload's `name`"),
    ('seed', '',
     'root seed'),
    ('replications', '',
     'number of replications'),
    ('duration_s', 's',
     'arrivals are generated in [0, duration_s)'),
    ('window_end_s', 's',
     'end of the measuring window: duration_s, or where the trace replays end (see [reading the '
     'output](../getting-started.md#reading-the-output))'),
    ('unstable', 'bool',
     'some endpoint has offered utilisation >= 1'),
    ('offered_load_rps', 'req/s',
     'total open-loop arrival rate offered (rate_scale applied)'),
    ('warmup_s', 's',
     "requests arriving earlier are left out (MSER-5's choice with `auto`)"),
    ('requests_arrived', 'requests',
     'arrivals in the window'),
    ('requests_completed', 'requests',
     'of those, completed (each arrival ends in exactly one `requests_*` outcome)'),
    ('requests_rejected', 'requests',
     'of those, rejected (too long for the KV cache)'),
    ('requests_queue_full', 'requests',
     'of those, turned away by a full queue (`queue.capacity`)'),
    ('requests_expired', 'requests',
     "of those, dropped when their class's `deadline_s` passed while they waited"),
    ('requests_rate_limited', 'requests',
     "of those, refused with a 429 (ours or the provider's) until the client gave up"),
    ('requests_timed_out', 'requests',
     'with a pipeline: stopped at a guardrail time limit with no fallback left'),
    ('requests_cancelled', 'requests',
     'with a pipeline: the user stopped reading the stream (answered: counted in latency and throughput)'),
    ('requests_partial', 'requests',
     'with a pipeline: ended by the `partial_answer` fallback (what had streamed, flagged uncertain)'),
    ('requests_try_later', 'requests',
     'with a pipeline: ended by the `try_later` fallback'),
    ('guard_retries_per_request', 'calls',
     'with guardrails: retries of failed calls per request'),
    ('guard_call_timeouts_per_request', 'calls',
     'with guardrails: calls stopped by `call_timeout_s` per request'),
    ('fallback_smaller_model_share', '0..1',
     'with guardrails: requests whose last call was the `smaller_model` fallback'),
    ('fallback_reduced_context_share', '0..1',
     'with guardrails: requests whose last call was the `reduced_context` fallback'),
    ('guard_hop_limited_share', '0..1',
     'with guardrails: requests denied a call by `max_hops`'),
    ('guard_token_limited_share', '0..1',
     'with guardrails: requests denied a call by `max_tokens`'),
    ('guard_tool_limited_share', '0..1',
     'with guardrails: requests whose retrieval was cut by `max_tool_calls`'),
    ('rate_limited_share', '0..1',
     'requests_rate_limited / requests_arrived'),
    ('retries_mean', 'retries',
     'mean retries after a 429 per arrived request (`attempts` - 1)'),
    ('throughput_rps', 'req/s',
     'completions (answers, cancelled streams included) in the window / window length'),
    ('goodput_rps', 'req/s',
     'completions in the window that met every `slo` target / window (only with `slo`; a request with no '
     'tpot passes `tpot_s`)'),
    ('slo_<measure>_met_share', '0..1',
     'per `slo` target (ttft, e2e, tpot): the share of the requests the latency table measures within it '
     '(a request with no tpot passes)'),
    ('warnings', 'lines',
     '(JSON only: `run --json`, summary.json) what the run found that you should know, one line each, as '
     'printed on standard error: trace arrivals past the run, a per-user limit on a class of one user, '
     "offered traffic near a provider's rpm or tpm, an output cache still warming, a replica beyond its "
     'calibrated range, a missing compiled kernel'),
    ('<measure>_mean_s', 's',
     'mean of queue_wait, ttft, e2e or tpot over answered requests (completed, or a stream the user '
     'cancelled) of interactive classes (batch classes: `batch_*`); with a pipeline queue_wait is the time'
     ' its model calls spent in endpoint queues; tpot only over requests that streamed two or more tokens'),
    ('<measure>_p50_s', 's',
     'median'),
    ('<measure>_p90_s', 's',
     '90th percentile'),
    ('<measure>_p95_s', 's',
     '95th percentile'),
    ('<measure>_p99_s', 's',
     '99th percentile'),
    ('<measure>_p999_s', 's',
     '99.9th percentile'),
    ('tokens_in_per_s', 'tokens/s',
     'prompt tokens of completions in the window / window'),
    ('tokens_out_per_s', 'tokens/s',
     'output tokens of completions in the window / window'),
    ('itl_mean_s', 's',
     'mean inter-token latency: sum of (e2e - ttft) / sum of (output tokens - 1) over the requests with a '
     "tpot (every token gap weighs the same; percentiles would need each token's time, which the engine's "
     "skip-ahead never computes: use tpot's)"),
    ('tokens_out_per_s_per_user', 'tokens/s',
     'the streaming speed a reader sees: mean over the requests with a tpot of 1 / tpot'),
    ('tokens_out_per_s_per_gpu', 'tokens/s',
     'with engine endpoints: output tokens their calls made in the window / window / mean GPUs held '
     '(replicas held x GPUs per replica)'),
    ('utilisation_<endpoint>', '0..1',
     'share of capacity in use (see [reading the output](../getting-started.md#reading-the-output))'),
    ('step_times_<endpoint>', 'text',
     "where an engine's step-time coefficients come from: typed in, the catalog's roofline (GPU x model, "
     'TP), or `llmsim calibrate` (its files); they hold for that host and setup only'),
    ('batch_mean_<endpoint>', 'requests',
     'mean requests running on a replica while it is busy'),
    ('offered_utilisation_<endpoint>', '0..1+',
     'offered load from the config (open-loop traffic only; with a pipeline every request counts as a '
     'call, before the output cache; with a router, calls go to the tiers as the policy and escalation '
     'send them)'),
    ('cost_total_usd', 'USD',
     'over the window: replica-hours x GPUs per replica x `gpu_hourly_usd`, plus API tokens x prices '
     '(batch calls x `price_multiplier`), plus the priced stages: tokens embedded x `price_per_mtok`, hops'
     ' x `price_per_query_usd` (of requests arriving in the window) and every `hourly_usd` x the window'),
    ('cost_per_hour_usd', 'USD/h',
     'cost_total_usd per hour of window'),
    ('cost_per_request_usd', 'USD',
     'cost_total_usd / completions in the window'),
    ('cost_per_1k_usd', 'USD',
     'per 1,000 requests'),
    ('cost_model_usd', 'USD',
     "with priced stages or a batch class: the model calls' part of cost_total_usd (replicas and API "
     "tokens); the `cost_<stage>_usd` add up to cost_total_usd, as the ledger's `stage` column does"),
    ('cost_embedding_usd', 'USD',
     "the embedding service's part: tokens embedded x `price_per_mtok`, and its `hourly_usd`"),
    ('cost_backend_usd', 'USD',
     "the retrieval backends' part: hops x `price_per_query_usd`, and their `hourly_usd`"),
    ('cost_tool_usd', 'USD',
     "the flows' tools' part: attempts x `price_per_call_usd`, and their `hourly_usd`"),
    ('cost_cache_usd', 'USD',
     "the caches' `hourly_usd` (output, retrieval, embedding)"),
    ('cost_batch_usd', 'USD',
     'of cost_model_usd, the calls billed at batch prices'),
    ('batch_requests', 'requests',
     'with a batch class: its requests arriving in the window (their latency is in none of the interactive'
     ' figures)'),
    ('batch_e2e_mean_s', 's',
     'their mean end-to-end latency (answered ones): our queue (`max_in_flight`), the turnaround and any '
     'pipeline stages'),
    ('batch_e2e_p50_s', 's',
     'median'),
    ('batch_e2e_p95_s', 's',
     '95th percentile'),
    ('batch_e2e_p99_s', 's',
     '99th percentile'),
    ('batch_e2e_max_s', 's',
     'the slowest'),
    ('batch_within_window_share', '0..1',
     'batch requests answered within `completion_window_s` of their arrival (waiting on our side counts)'),
    ('model_calls_per_request', 'calls',
     'with a `pipeline`: model calls per request (below 1 when the cache answers)'),
    ('cache_hit_rate_output', '0..1',
     'output-cache hits (stale ones included) per lookup'),
    ('cache_stale_hit_rate_output', '0..1',
     "stale hits per lookup (the entry's data changed after it was cached)"),
    ('cache_leak_rate_output', '0..1',
     "output-cache hits per lookup that served another user's personalised answer (`personalised_share`; 0"
     ' with `scope: user`)'),
    ('cache_bypass_share_output', '0..1',
     'requests not eligible for the cache (not deterministic)'),
    ('budget_truncated_share', '0..1',
     'requests whose prompt sections were trimmed'),
    ('stage_<stage>_mean_s', 's',
     'mean time of completed requests in a stage: `queue`, `prefill` (admission to first token), `decode` '
     '(first to last token); with a pipeline also `gate` (rate limits, retries), `cache`, `retrieval`, '
     '`evaluation`, `post_processing`, `retry` (guardrail backoff), and with a flow `tool` and '
     "`flow_calls` (its top-level tool steps and other steps) (model-call stages summed over a request's "
     "answer calls, a stopped call up to its stop). A request's stages add up to its e2e latency"),
    ('stage_<stage>_share', '0..1',
     "the stage's share of the mean e2e latency"),
    ('stage_<stage>_share_p95', '0..1',
     'its share of the latency of the slowest 5% of requests'),
    ('bottleneck_stage', '',
     'the stage with the largest share of mean latency: fix it first'),
    ('prompt_cached_share', '0..1',
     "with prompt caches or an engine `prefix_cache`: share of the calls' prompt tokens read from a cache"),
    ('validation_retries_per_request', 'calls',
     'with a pipeline: structured-output retries per request'),
    ('retrieval_cache_hit_rate', '0..1',
     'with retrieval and its cache: hits per lookup (whole run)'),
    ('embedding_cache_hit_rate', '0..1',
     'with an embedding cache: hits per lookup (whole run)'),
    ('cache_stale_hit_rate_retrieval', '0..1',
     'with a retrieval cache: stale hits per lookup (whole run)'),
    ('cache_leak_rate_retrieval', '0..1',
     "with a retrieval cache: hits per lookup on another user's personalised entry (whole run)"),
    ('cache_stale_hit_rate_embedding', '0..1',
     'with an embedding cache: stale hits per lookup (whole run)'),
    ('cache_leak_rate_embedding', '0..1',
     "with an embedding cache: hits per lookup on another user's personalised entry (whole run)"),
    ('embedding_batch_size_mean', 'queries',
     'queries per embedding batch (whole run)'),
    ('embedding_utilisation', '0..1',
     'busy share of the embedding workers (whole run)'),
    ('backend_<name>_utilisation', '0..1',
     "busy share of a retrieval backend's slots (whole run)"),
    ('backend_<name>_wait_mean_s', 's',
     'mean wait for a backend slot (whole run)'),
    ('flow_step_<name>_mean_s', 's',
     'mean time of completed requests in a flow step (0 where it did not run; nested steps overlap their '
     'group)'),
    ('flow_step_<name>_share', '0..1',
     "the step's share of the mean e2e latency"),
    ('flow_step_<name>_run_share', '0..1',
     'share of requests that ran the step (not skipped by its condition or a cap)'),
    ('tool_<name>_calls_per_request', 'calls',
     "a tool's calls (flow steps run) per request"),
    ('tool_<name>_attempts_mean', 'attempts',
     'attempts per call, retries included'),
    ('tool_<name>_failed_share', '0..1',
     'share of calls that failed after their retries'),
    ('tool_<name>_wait_mean_s', 's',
     'mean wait for a tool slot (whole run)'),
    ('quality_good_share', '0..1',
     'with a router: routed requests whose final answer is good'),
    ('quality_correct_share', '0..1',
     'with a router or `pipeline.quality`: answered requests whose answer is correct (cache hits replay '
     'theirs)'),
    ('quality_grounded_mean', '0..1',
     'mean groundedness of the answered requests that retrieve (coverage of the evidence kept, its '
     'confidence)'),
    ('quality_citation_mean', '0..1',
     'mean citation accuracy of the answered requests that retrieve'),
    ('quality_useful_mean', '0..1',
     'mean usefulness over every request (wrong, partial, reduced-context answers count less, none counts '
     '0)'),
    ('hops_mean', 'calls',
     'with a router: model calls per routed request (escalations add calls)'),
    ('escalation_rate', '0..1',
     'with a router: routed requests escalated at least once'),
    ('cost_per_request_<feature>_usd', 'USD',
     "with `features`: each feature's share of the window's cost (as the ledger shares it) per request of "
     'that feature'),
    ('cold_window_s', 's',
     'end of the cold window (only when something starts cold: `cold_start_s`, or '
     '`simulation.cold_window_s`)'),
    ('<window>_requests', 'requests',
     '`cold_` or `warm_`: requests arriving in the cold window [0, cold_window_s) or after it (warm-up '
     'ignored)'),
    ('<window>_<measure>_mean_s', 's',
     'mean ttft or e2e of those requests'),
    ('<window>_<measure>_p50_s', 's',
     'median'),
    ('<window>_<measure>_p95_s', 's',
     '95th percentile'),
    ('<window>_<measure>_p99_s', 's',
     '99th percentile'),
    ('<measure>_<stat>_<class>_s', 's',
     "with several classes: each class's latency statistics (`e2e_p99_chat_s`; stat as above: mean, p50 "
     '... p999)'),
    ('throughput_<class>_rps', 'req/s',
     "with several classes: the class's completions in the window / window"),
    ('rate_limited_share_<class>', '0..1',
     "with several classes: the class's share of arrivals that ended rate-limited")
)
"""(name, unit, meaning) of every summary metric, in the order of the docs' table."""

# Families of keys, each named once in METRICS: a key's generic name replaces its variable part by a placeholder.
GENERIC = (
    (r"_ci95_(low|high)$", ""),
    (r"^(utilisation|batch_mean|offered_utilisation|step_times)_.+$", r"\1_<endpoint>"),
    (r"^(queue_wait|ttft|e2e|tpot)_(mean|p50|p90|p95|p99|p999)_s$", r"<measure>_\2_s"),
    (r"^(cold|warm)_(ttft|e2e)_(mean|p50|p95|p99)_s$", r"<window>_<measure>_\3_s"),
    (r"^(cold|warm)_requests$", "<window>_requests"),
    (r"^cost_per_request_(?!usd$).+_usd$", "cost_per_request_<feature>_usd"),
    (r"^stage_[a-z_]+?_(mean_s|share|share_p95)$", r"stage_<stage>_\1"),
    (r"^backend_.+_(utilisation|wait_mean_s)$", r"backend_<name>_\1"),
    (r"^flow_step_.+?_(mean_s|share|run_share)$", r"flow_step_<name>_\1"),
    (r"^tool_.+_(calls_per_request|attempts_mean|failed_share|wait_mean_s)$", r"tool_<name>_\1"),
    (r"^(queue_wait|ttft|e2e|tpot)_(mean|p50|p90|p95|p99|p999)_.+_s$", r"<measure>_<stat>_<class>_s"),
    (r"^slo_(ttft|e2e|tpot)_met_share$", "slo_<measure>_met_share"),
    (r"^throughput_.+_rps$", "throughput_<class>_rps"),
    (r"^rate_limited_share_.+$", "rate_limited_share_<class>"),
)
_UNITS = {name: unit for name, unit, _ in METRICS}


def generic_key(key: str) -> str:
    """The METRICS name a summary key falls under (`utilisation_llama8b` -> `utilisation_<endpoint>`)."""
    if key in _UNITS:
        return key
    for pattern, replacement in GENERIC:
        key = re.sub(pattern, replacement, key)
    return key


def unit_of(key: str) -> str:
    """A summary key's unit, as METRICS gives it ("" where it has none, or the key is unknown)."""
    return _UNITS.get(generic_key(key), "")
