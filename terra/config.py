"""Configuration: frozen dataclasses read once from config.yaml plus environment overrides.

The file mirrors these dataclasses section by section; unknown keys are an error so a
typo in an operator's file is caught at start-up rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from terra.chunking import ChunkOptions
from terra.recognizer.options import AgreementOptions, DecodeRules, WindowOptions

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The configuration file or an environment override is invalid."""


def zone_of(name: str) -> ZoneInfo | None:
    """The configured time zone, or None for the server's local zone."""
    return ZoneInfo(name) if name else None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9001
    tokens: tuple[str, ...] = ("ivcs",)
    max_upload_bytes: int = 20 * 1024 * 1024
    max_form_parts: int = 64  # multipart parts in one request; more: 400
    body_timeout_s: float = 60.0  # the whole body must arrive in this time; else 408
    max_json_depth: int = 32  # JSON bodies nested deeper: 400
    backlog: int = 1024  # the listen backlog (config.yaml says why so many)
    # /metrics needs this token when set; when empty it answers loopback clients only.
    metrics_token: str = ""
    log_level: str = "INFO"
    log_json: bool = True
    # Viewers (the event feed, the transcript and the pages) take these tokens, a signed
    # per-conference link (HMAC-SHA256 with link_secret; off while it is empty), or an
    # ingest token.
    viewer_tokens: tuple[str, ...] = ()
    link_secret: str = ""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    # A name installed under models_dir (e.g. "base"), a local folder, or a faster-whisper hub name.
    name: str = "base"
    models_dir: str = "models"
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 0
    allow_download: bool = False


@dataclass(frozen=True, slots=True)
class StreamConfig:
    vad_aggressiveness: int = 2
    vad_frame_ms: int = 30
    pause_ms: int = 600
    max_combination_ms: int = 30_000
    gap_ms: int = 1_000
    max_jump_ms: int = 60_000  # a fragment further ahead waits for the next to confirm it
    pre_roll_ms: int = 300
    trigger_window_ms: int = 300
    trigger_ratio: float = 0.6
    idle_close_ms: int = 4_000
    session_ttl_s: int = 3_600
    answer_wait_ms: int = 2_500
    progress_min_interval_ms: int = 1_000
    max_participants: int = 1_000  # live participants at once; a new one beyond: 503
    min_speech_ms: int = 250
    timezone: str = ""
    captions: str = ""
    # The longest fragment POST /process decodes (declared length, checked before decoding).
    max_fragment_ms: int = 30_000
    # A fragment's time (timestamp_float or the file name's) must be within this many seconds
    # of the server's clock (0: any time from 1970 to 2106).
    max_clock_skew_s: float = 86_400.0


@dataclass(frozen=True, slots=True)
class RecognizerConfig:
    mode: str = "terra"
    # Where recognition runs: local (this process's scheduler) | ray (a Ray Serve app, see
    # ClusterConfig and `terra recognizer`).
    backend: str = "local"
    # The scheduler
    max_batch_size: int = 8
    workers: int = 2
    batch_wait_ms: int = 15
    batch_burst_ms: int = 100
    max_queue: int = 256
    # Overload: at this many finals waiting, no progress pass is queued (finals take the whole
    # recognizer; they are never dropped) and /healthz says saturated.
    max_queued_finals: int = 64
    saturated_wait_s: float = 2.0  # a final waiting this long: saturated
    # Overload: a final asked for while the finals waiting hold this many seconds of audio is
    # decoded with overload_final_beam_size (greedy) instead of final_beam_size.
    overload_finals_s: float = 600.0
    overload_final_beam_size: int = 1
    # The bound on owed finals (a memory safety net): a final asked for while the finals
    # waiting hold this many seconds of audio is settled at once from the progress text.
    max_owed_final_s: float = 1800.0
    # The engine: load-time window fitting, and the rules every pass decodes by
    # (terra.recognizer.options; the passes' own options: decode_passes).
    window: WindowOptions = field(default_factory=WindowOptions)
    decoding: DecodeRules = field(default_factory=DecodeRules)
    # Live passes
    progress_beam_size: int = 1
    final_beam_size: int = 3
    # How the live agreement commits and prompts (recognizer/options.AgreementOptions).
    agreement: AgreementOptions = field(default_factory=AgreementOptions)


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    dir: str = "var/spool"
    fsync: bool = True


@dataclass(frozen=True, slots=True)
class FeedConfig:
    """GET /conferences/{conference_id}/events: the viewers' feed (see config.yaml)."""

    history_events: int = 2000  # events kept per conference for Last-Event-ID resumes
    viewer_queue: int = 500  # events waiting for one viewer before it is disconnected
    max_finals: int = 20_000  # finals kept per conference for snapshots and /transcript
    retention_s: int = 3_600  # an ended conference's feed is kept this long
    max_conferences: int = 1_000  # ended conferences kept at most (oldest go first)
    ping_s: float = 15.0  # keep-alive comment on an idle feed
    batch_ms: int = 100  # events within this long go to a viewer in one write


@dataclass(frozen=True, slots=True)
class MinutesConfig:
    """GET /minutes/{conference_id}: offline compiles of the spooled audio (see config.yaml)."""

    dir: str = "var/minutes"
    jobs_dir: str = "var/jobs"
    workers: int = 1
    max_queued: int = 64
    max_in_flight: int = 1
    beam_size: int = 5
    word_timestamps: bool = True
    context: bool = True
    chunking: ChunkOptions = field(default_factory=ChunkOptions)
    phrase_pause_ms: int = 1000
    sentence_pause_ms: int = 300


@dataclass(frozen=True, slots=True)
class TranslateConfig:
    """POST /translate_to_any: off until enabled with a URL (http) or a model (ctranslate2)."""

    enabled: bool = False
    backend: str = "http"  # http (LibreTranslate-compatible) | ctranslate2 (local models)
    url: str = ""
    skip_check_en: bool = False
    skip_check_ru: bool = False
    detect_min_score: float = 0.2
    max_items: int = 1000
    max_content_chars: int = 5000
    batch_size: int = 16
    # http
    api_key: str = ""
    timeout_s: float = 10.0
    retries: int = 2
    retry_backoff_s: float = 0.5
    concurrency: int = 2
    # ctranslate2
    model_ru_en: str = ""
    model_en_ru: str = ""
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 0
    beam_size: int = 2
    max_input_tokens: int = 512
    max_output_tokens: int = 512


@dataclass(frozen=True, slots=True)
class FilesConfig:
    """The file dialects (SaluteSpeech async, connecte predictions): see config.yaml."""

    dir: str = "var/files"
    jobs_dir: str = "var/file-jobs"
    retention_s: int = 72 * 3600
    sweep_interval_s: int = 600
    workers: int = 1
    max_queued: int = 64
    max_upload_bytes: int = 100 * 1024 * 1024
    # The longest audio a file job decodes (summed over channels recognised apart).
    max_audio_s: float = 3 * 3600.0
    max_in_flight: int = 3
    beam_size: int = 5
    chunking: ChunkOptions = field(default_factory=ChunkOptions)
    # Words starting with one of these are masked when a client asks for the filter.
    profanity_words: tuple[str, ...] = (
        "хуй", "хуе", "хуё", "пизд", "ебат", "ебан", "блят", "fuck", "shit",
    )  # fmt: skip
    # connecte predictions
    connecte_models: tuple[str, ...] = ("openai/whisper",)
    cost_per_audio_s: float = 0.0
    sync_timeout_s: float = 30.0
    max_sync_timeout_s: float = 50.0
    url_max_bytes: int = 100 * 1024 * 1024
    url_timeout_s: float = 60.0
    url_allow: tuple[str, ...] = ()
    webhook_tries: int = 12
    webhook_backoff_s: float = 0.5
    webhook_backoff_max_s: float = 60.0
    webhook_timeout_s: float = 10.0
    webhook_max_response_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class JobsConfig:
    """Durable jobs of every kind (minutes, SaluteSpeech, connecte): see config.yaml."""

    max_attempts: int = 3
    lease_s: float = 30.0
    scan_interval_s: float = 10.0
    node_id: str = ""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """recognizer.backend: ray: the Ray cluster and the recognizer's Serve app (config.yaml)."""

    address: str = "auto"  # Ray's address: "auto" (a node on this machine), "host:6379"
    namespace: str = "terra"
    app_name: str = "terra-recognizer"
    # Per replica: Ray resources, model calls at once, model threads (0: num_cpus / workers).
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    replica_workers: int = 1
    replica_threads: int = 0
    # Autoscaling on each replica's queue (requests waiting or running in it).
    min_replicas: int = 1
    max_replicas: int = 1
    target_queue: float = 8.0
    # Serve's autoscaling clock: a decision needs the queue above (below) target this long;
    # replicas report their queue every metrics_interval_s, averaged over look_back_period_s.
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    max_ongoing_requests: int = 32  # per replica; the router holds the rest
    # How a replica batches: terra (its own scheduler) | serve (@serve.batch).
    batching: str = "terra"
    # Front end: requests sent and not answered at most; more wait here, where a newer
    # progress request still replaces an older one.
    max_in_flight: int = 16
    # A request the cluster could not take (its replica died, Serve's queue full, no replica)
    # is sent again for this long (finals are never dropped).
    retry_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    recognizer: RecognizerConfig = field(default_factory=RecognizerConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    minutes: MinutesConfig = field(default_factory=MinutesConfig)
    translate: TranslateConfig = field(default_factory=TranslateConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    feed: FeedConfig = field(default_factory=FeedConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


T = TypeVar("T")

# Environment variable -> (section, key). Lists are comma-separated.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "TERRA_HOST": ("server", "host"),
    "TERRA_PORT": ("server", "port"),
    "TERRA_TOKENS": ("server", "tokens"),
    "TERRA_LOG_LEVEL": ("server", "log_level"),
    "TERRA_VIEWER_TOKENS": ("server", "viewer_tokens"),
    "TERRA_LINK_SECRET": ("server", "link_secret"),
    "TERRA_METRICS_TOKEN": ("server", "metrics_token"),
    "TERRA_MODEL": ("model", "name"),
    "TERRA_MODELS_DIR": ("model", "models_dir"),
    "TERRA_DEVICE": ("model", "device"),
    "TERRA_COMPUTE_TYPE": ("model", "compute_type"),
    "TERRA_CPU_THREADS": ("model", "cpu_threads"),
    "TERRA_SPOOL_DIR": ("spool", "dir"),
    "TERRA_MINUTES_DIR": ("minutes", "dir"),
    "TERRA_JOBS_DIR": ("minutes", "jobs_dir"),
    "TERRA_FILES_DIR": ("files", "dir"),
    "TERRA_FILE_JOBS_DIR": ("files", "jobs_dir"),
    "TERRA_MINUTES_WORKERS": ("minutes", "workers"),
    "TERRA_RECOGNIZER_MODE": ("recognizer", "mode"),
    "TERRA_NODE_ID": ("jobs", "node_id"),
    "TERRA_RECOGNIZER_BACKEND": ("recognizer", "backend"),
    "TERRA_RAY_ADDRESS": ("cluster", "address"),
    # The translator's variables keep the names the IVA Terra spec gives them (no prefix).
    "USE_TRANSLATOR": ("translate", "enabled"),
    "TRANSLATOR_URL": ("translate", "url"),
    "SKIP_CHECK_EN": ("translate", "skip_check_en"),
    "SKIP_CHECK_RU": ("translate", "skip_check_ru"),
    "TERRA_TRANSLATOR_BACKEND": ("translate", "backend"),
}


def _coerce(value: Any, like: Any, where: str) -> Any:
    """Convert a YAML or environment value to the type of the dataclass default ``like``."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if isinstance(like, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        element = like[0] if like else ""
        return tuple(
            _coerce(item.strip() if isinstance(item, str) else item, element, where)
            for item in items
            if not (isinstance(item, str) and not item.strip())
        )
    try:
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from e
    if isinstance(like, str):
        return str(value)
    return value


# Settings that no longer exist: read from an old config.yaml with a warning, not an error.
REMOVED: dict[str, set[str]] = {
    "recognizer": {"stable_prefix"},  # the forced-prefix path (commit and trim replaced it)
}


def _build(cls: type[T], values: Mapping[str, Any], section: str) -> T:
    defaults = cls()
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    known = {f.name for f in fields}
    values = _move_flat_keys(defaults, values, section)
    for key in sorted(set(values) & REMOVED.get(section, set())):
        log.warning("config: %s.%s was removed and is ignored", section, key)
        del values[key]
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{section}]: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        like = getattr(defaults, name)
        where = f"{section}.{name}"
        if dataclasses.is_dataclass(like):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
            kwargs[name] = _build(type(like), value, where)
        else:
            kwargs[name] = _coerce(value, like, where)
    return dataclasses.replace(defaults, **kwargs)  # type: ignore[type-var]


# Settings that moved into a nested section under another name: old key -> nested.key.
RENAMED: dict[str, dict[str, str]] = {
    "recognizer": {
        "commit_edge_guard_s": "agreement.edge_guard_s",
        "commit_force_after_s": "agreement.force_after_s",
        "commit_force_guard_s": "agreement.force_guard_s",
    },
}


def _move_flat_keys(defaults: Any, values: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Settings that moved into a nested section (``minutes.max_chunk_s`` is now
    ``minutes.chunking.max_chunk_s``; ``recognizer.commit_edge_guard_s`` is now
    ``recognizer.agreement.edge_guard_s``) are still read at their old place, with a
    warning; the new place wins when both are set."""
    targets = dict(RENAMED.get(section, {}))
    for section_field in dataclasses.fields(defaults):
        nested = getattr(defaults, section_field.name)
        if dataclasses.is_dataclass(nested):
            for f in dataclasses.fields(nested):
                targets[f.name] = f"{section_field.name}.{f.name}"
    moved = dict(values)
    for old in sorted(targets.keys() & values.keys()):
        log.warning(
            "config: %s.%s is deprecated: set %s.%s instead", section, old, section, targets[old]
        )
        nested_name, key = targets[old].split(".")
        inner = moved.get(nested_name)
        merged = {key: moved.pop(old)}
        if isinstance(inner, Mapping):
            merged.update(inner)
        moved[nested_name] = merged
    return moved


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read ``path`` (if given), then apply environment variables, then explicit overrides."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: the top level must be a mapping of sections")
        for section, values in loaded.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"config {path}: section [{section}] must be a mapping")
            raw[str(section)] = dict(values)
    env = os.environ if environ is None else environ
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in env and env[var] != "":
            raw.setdefault(section, {})[key] = env[var]
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)

    defaults = Config()
    sections = {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(Config)}
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    built = {name: _build(cls, raw.get(name, {}), name) for name, cls in sections.items()}
    config = Config(**built)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    if not config.server.tokens:
        raise ConfigError("server.tokens: at least one token is required")
    if config.stream.vad_frame_ms not in (10, 20, 30):
        raise ConfigError("stream.vad_frame_ms must be 10, 20 or 30 (webrtcvad frame sizes)")
    if not 0 <= config.stream.vad_aggressiveness <= 3:
        raise ConfigError("stream.vad_aggressiveness must be 0..3")
    if config.stream.timezone:
        try:
            ZoneInfo(config.stream.timezone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ConfigError(f"stream.timezone: unknown zone {config.stream.timezone!r}") from e
    if config.recognizer.mode not in ("terra", "naive"):
        raise ConfigError("recognizer.mode must be 'terra' or 'naive'")
    if config.recognizer.backend not in ("local", "ray"):
        raise ConfigError("recognizer.backend must be 'local' or 'ray'")
    cluster = config.cluster
    if not 1 <= cluster.min_replicas <= cluster.max_replicas:
        raise ConfigError("cluster: 1 <= min_replicas <= max_replicas")
    if cluster.batching not in ("terra", "serve"):
        raise ConfigError("cluster.batching must be 'terra' or 'serve'")
    if min(cluster.replica_workers, cluster.max_in_flight, cluster.max_ongoing_requests) < 1:
        raise ConfigError("cluster.replica_workers, max_in_flight, max_ongoing_requests: >= 1")
    buckets = config.recognizer.window.window_buckets_s
    if not buckets or max(buckets) > 30:
        raise ConfigError("recognizer.window.window_buckets_s: non-empty, each at most 30 s")
    recognizer = config.recognizer
    beams = (recognizer.progress_beam_size, recognizer.final_beam_size)
    if min(*beams, recognizer.overload_final_beam_size) < 1:
        raise ConfigError(
            "recognizer.progress_beam_size, final_beam_size, overload_final_beam_size: at least 1"
        )
    if recognizer.overload_finals_s < 0:
        raise ConfigError("recognizer.overload_finals_s: at least 0")
    if recognizer.max_owed_final_s <= 0:
        raise ConfigError("recognizer.max_owed_final_s: more than 0")
    if config.stream.max_combination_ms > 30_000:
        raise ConfigError("stream.max_combination_ms: at most 30000 (Whisper's window)")
    feed = config.feed
    if min(feed.history_events, feed.viewer_queue, feed.max_finals, feed.max_conferences) < 1:
        raise ConfigError("feed: history_events, viewer_queue, max_finals, max_conferences >= 1")
    minutes = config.minutes
    if min(minutes.workers, minutes.max_queued, minutes.max_in_flight, minutes.beam_size) < 1:
        raise ConfigError("minutes.workers, max_queued, max_in_flight and beam_size: at least 1")
    for problem in minutes.chunking.problems():
        raise ConfigError(f"minutes.chunking.{problem}")
    files = config.files
    if min(files.workers, files.max_queued, files.max_in_flight, files.beam_size) < 1:
        raise ConfigError("files.workers, max_queued, max_in_flight and beam_size: at least 1")
    if not files.max_sync_timeout_s > 0:
        raise ConfigError("files.max_sync_timeout_s: more than 0")
    for problem in files.chunking.problems():
        raise ConfigError(f"files.chunking.{problem}")
    jobs = config.jobs
    if jobs.max_attempts < 1 or jobs.lease_s <= 0 or jobs.scan_interval_s <= 0:
        raise ConfigError("jobs.max_attempts: at least 1; jobs.lease_s, scan_interval_s: > 0")
    if config.translate.backend not in ("http", "ctranslate2"):
        raise ConfigError("translate.backend must be 'http' or 'ctranslate2'")
    translate = config.translate
    if min(translate.batch_size, translate.concurrency, translate.max_items) < 1:
        raise ConfigError("translate.batch_size, concurrency and max_items must be at least 1")
