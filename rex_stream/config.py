"""Worker configuration: a YAML file, overridden by `REX_…` environment variables, then CLI flags.

Nested keys map to environment variables with `__`, e.g. `REX_KAFKA__BOOTSTRAP_SERVERS`,
`REX_BATCH__MAX_WAIT_MS`, `REX_KAFKA__SASL_PASSWORD`. Secrets are `SecretStr`, so they never show
up in logs or `repr`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from .engine.requests import Limits

DEFAULT_MODEL = "iic/nlp_deberta_rex-uninlu_chinese-base"


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    ssl_endpoint_identification_algorithm: Literal["https", "none"] = "https"
    client_id: str = "rex-stream"
    extra: dict[str, str | int | float | bool] = Field(default_factory=dict, description="raw librdkafka settings")

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings common to consumer, producer and admin client (secrets included)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        if self.security_protocol in ("SSL", "SASL_SSL"):
            conf["ssl.endpoint.identification.algorithm"] = self.ssl_endpoint_identification_algorithm
        conf.update(self.extra)
        return conf


class TopicSettings(BaseModel):
    input: list[str] = Field(default_factory=lambda: ["rex-input"])
    input_pattern: str | None = Field(None, description="regex subscription, e.g. '^rex-in-.*' (overrides input)")
    output: str = "rex-output"
    dead_letter: str = "rex-dead-letter"

    def subscription(self) -> list[str]:
        return [self.input_pattern if self.input_pattern.startswith("^") else "^" + self.input_pattern] \
            if self.input_pattern else list(self.input)


class ConsumerSettings(BaseModel):
    group_id: str = "rex-stream"
    group_instance_id: str | None = Field(None, description="static membership id (stable per pod)")
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 45_000
    fetch_max_messages: int = 500
    max_buffered_messages: int = 20_000


class ModelSettings(BaseModel):
    name: str = DEFAULT_MODEL
    revision: str | None = None
    cache_dir: str | None = None
    device: str = "cuda"
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    engine_batch_tokens: int = 131_072
    attention: Literal["auto", "sdpa", "flex", "triton"] = Field(
        "auto", description="auto: triton for bf16/fp16 on CUDA, else sdpa; flex / triton: fused GPU kernels, "
                            "self-checked vs sdpa")
    compile: bool = Field(False, description="torch.compile the encoder (self-checked, falls back to eager)")
    fusions: list[Literal["gelu", "head", "rotary"]] = Field(
        default_factory=lambda: ["gelu", "head", "rotary"],
        description="fused fast path (triton, bf16/fp16) only: intermediate dense + exact GELU as one TMA GEMM "
                    "(compute capability 9+), split-bf16 span head, Triton rotary")
    default_schema: dict[str, Any] | None = Field(None, description="used for plain-text messages")
    device_socket: str | None = Field(
        None, description="Unix socket of the device process that runs the model (`rex-stream run --device-server` "
                          "sets it): a worker connects there and does the host work only; `rex-stream device-server` "
                          "listens there")
    device_authkey: SecretStr | None = Field(None, description="that socket's authentication key")


class BatchSettings(BaseModel):
    max_messages: int = Field(1024, gt=0)
    max_tokens: int = Field(131_072, gt=0, description="estimated level-0 tokens per batch")
    max_wait_ms: int = Field(50, ge=0)
    max_in_flight: int = Field(8, gt=0, description="batches handed to the engine and not finished yet; "
                                                    "the engine sorts and pads their requests together")


class LimitSettings(BaseModel):
    max_message_bytes: int = 1_000_000
    max_text_chars: int = 20_000
    max_schema_depth: int = 6
    max_schema_types: int = 1_000
    max_type_chars: int = 512
    allow_empty_text: bool = False

    def engine_limits(self) -> Limits:
        return Limits(max_text_chars=self.max_text_chars, max_schema_depth=self.max_schema_depth,
                      max_schema_types=self.max_schema_types, max_type_chars=self.max_type_chars,
                      allow_empty_text=self.allow_empty_text)


class DeliverySettings(BaseModel):
    mode: Literal["at-least-once", "exactly-once"] = "at-least-once"
    transactional_id: str | None = Field(None, description="default: '<group_id>-<hostname>-<worker index>'")
    transaction_timeout_ms: int = 120_000
    commit_timeout_s: float = 30.0
    revoke_timeout_s: float = 30.0


class MonitorSettings(BaseModel):
    stats_interval_s: float = 10.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    http_port: int | None = Field(None, description="serves /metrics, /healthz, /readyz")
    heartbeat_file: str | None = Field(None, description="touched every loop; read by `rex-stream health`")
    heartbeat_timeout_s: float = 60.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REX_", env_nested_delimiter="__", extra="forbid")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.delivery.transaction_timeout_ms <= self.delivery.commit_timeout_s * 1000:
            raise ValueError("delivery.transaction_timeout_ms must exceed delivery.commit_timeout_s")
        return self


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """File < environment < explicit overrides (the CLI's flags)."""
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the configuration file must hold a mapping")
        data = loaded
    env = EnvSettingsSource(Settings, env_prefix="REX_", env_nested_delimiter="__")()
    return Settings.model_validate(_merge(_merge(data, env), overrides or {}))


def redacted(settings: Settings) -> dict[str, Any]:
    """Settings as loggable JSON: secrets show as '**********'."""
    return settings.model_dump(mode="json")
