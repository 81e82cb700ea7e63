"""Typed settings, read once from the environment (prefix ``STREAMREC_``).

Every service builds one :class:`KafkaSettings` with :func:`load` at start-up;
a setting that cannot work raises :class:`~contract.errors.ConfigError` naming
the environment variable and the reason, before anything connects.  Secrets
are ``SecretStr``: they print as ``**********`` in logs and reprs, and are
only revealed when handed to a Kafka client.

The same security settings are passed to both clients (librdkafka via
:meth:`KafkaSettings.confluent_config`, aiokafka/Faust via
:meth:`KafkaSettings.faust_credentials`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.errors import ConfigError

ENV_PREFIX = "STREAMREC_"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    """Where fetched and generated files go (git-ignored): ``$STREAMREC_CACHE_DIR`` or ``.cache``."""
    return Path(os.environ.get("STREAMREC_CACHE_DIR", PROJECT_ROOT / ".cache")).resolve()


class KafkaSettings(BaseSettings):
    """How to reach the cluster and name the topics; shared by every service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated host:port list of the brokers."
    )
    topic_prefix: str = Field(default="", description="Prepended to every topic name of DESIGN.md.")
    partitions: int = Field(
        default=4,
        ge=1,
        le=1024,
        description=(
            "Partitions of each created topic; the join worker requires its inputs and its state "
            "changelog to have this many (co-partitioning)."
        ),
    )
    replication_factor: int = Field(default=1, ge=1, le=16, description="Replicas of each created topic.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (required with SASL_*)."
    )
    sasl_username: str | None = Field(default=None, description="SASL user (required with SASL_*).")
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (required with SASL_*; masked in logs)."
    )
    ssl_cafile: Path | None = Field(default=None, description="CA bundle (PEM) to verify brokers.")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (PEM), for mTLS.")
    ssl_keyfile: Path | None = Field(default=None, description="Client private key (PEM), for mTLS.")
    ssl_key_password: SecretStr | None = Field(
        default=None, description="Password of the client key, if encrypted (masked in logs)."
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _hosts(cls, v: str) -> str:
        hosts = [h.strip() for h in v.split(",") if h.strip()]
        if not hosts:
            raise ValueError("needs at least one host:port")
        for h in hosts:
            host, sep, port = h.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{h!r} is not host:port")
        return ",".join(hosts)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v and not all(c.isalnum() or c in "._-" for c in v):
            raise ValueError("may only contain letters, digits, '.', '_' and '-' (Kafka topic rules)")
        return v

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"file {v} does not exist")
        return v

    @model_validator(mode="after")
    def _security_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None:
                raise ValueError("sasl_mechanism: required when security_protocol is SASL_*")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("sasl_username/sasl_password: required when security_protocol is SASL_*")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile/ssl_keyfile: give both or neither")
        return self

    # --- naming ---------------------------------------------------------------
    def topic(self, logical: str) -> str:
        """The real topic name of a DESIGN.md topic (``items`` → ``<prefix>items``)."""
        return f"{self.topic_prefix}{logical}"

    # --- clients --------------------------------------------------------------
    def confluent_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka configuration (confluent-kafka Producer/Consumer/AdminClient)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_cafile:
            conf["ssl.ca.location"] = str(self.ssl_cafile)
        if self.ssl_certfile:
            conf["ssl.certificate.location"] = str(self.ssl_certfile)
        if self.ssl_keyfile:
            conf["ssl.key.location"] = str(self.ssl_keyfile)
        if self.ssl_key_password is not None:
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        conf.update(extra)
        return conf

    def producer_config(self, **extra: Any) -> dict[str, Any]:
        """Producer defaults of the project: murmur2 keys (co-partitioning), idempotence, batching."""
        base = {
            "partitioner": "murmur2_random",  # same partition as Java clients and Faust
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "lz4",
        }
        base.update(extra)
        return self.confluent_config(**base)

    def faust_credentials(self) -> Any:
        """The same security settings as a Faust ``broker_credentials`` value (None for PLAINTEXT)."""
        import ssl

        import faust

        ctx = None
        if self.security_protocol.endswith("SSL"):
            ctx = ssl.create_default_context(
                purpose=ssl.Purpose.SERVER_AUTH,
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
            )
            if self.ssl_certfile and self.ssl_keyfile:
                ctx.load_cert_chain(
                    str(self.ssl_certfile),
                    str(self.ssl_keyfile),
                    password=self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
                )
        if self.security_protocol.startswith("SASL_"):
            assert self.sasl_username and self.sasl_password is not None  # checked at load
            if self.sasl_mechanism == "PLAIN":
                return faust.SASLCredentials(
                    username=self.sasl_username,
                    password=self.sasl_password.get_secret_value(),
                    ssl_context=ctx,
                )
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password.get_secret_value(),
                ssl_context=ctx,
                mechanism=self.sasl_mechanism,
            )
        if ctx is not None:
            return faust.SSLCredentials(ctx)
        return None

    def faust_broker(self) -> list[str]:
        """Broker URLs for ``faust.App(broker=...)``."""
        return [f"kafka://{h}" for h in self.bootstrap_servers.split(",")]


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S] = KafkaSettings, **overrides: Any) -> S:  # type: ignore[assignment]
    """Build a settings object from the environment (+ overrides) or raise ConfigError.

    The error names the environment variable, e.g.
    ``setting STREAMREC_SASL_MECHANISM: required when security_protocol is SASL_*``.
    """
    try:
        return cls(**overrides)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        prefix = cls.model_config.get("env_prefix", "") or ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["loc"]:
            name = f"{prefix}{err['loc'][0]}".upper()
        else:
            field, _, msg = msg.partition(": ")
            name = f"{prefix}{field.split('/')[0]}".upper()
        raise ConfigError(name, msg) from None


def settings_help(*sections: tuple[str, type[BaseSettings]]) -> str:
    """A ``--help`` epilog listing each settings class: variable, meaning, default.

    Every service CLI uses it, so ``--help`` shows the same names and defaults
    as the README's table (both read the classes themselves).
    """
    lines: list[str] = []
    for title, cls in sections:
        prefix = (cls.model_config.get("env_prefix") or "").upper()
        lines.append(f"{title}:")
        for name, field in cls.model_fields.items():
            default = "(computed)" if field.default_factory is not None else repr(field.default)
            if isinstance(field.default, SecretStr):
                default = "(secret)"
            lines.append(f"  {prefix}{name.upper():<36} {field.description or ''} [default {default}]")
        lines.append("")
    return "\n".join(lines).rstrip()
