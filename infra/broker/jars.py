"""The Kafka 3.9.1 broker's jars, resolved from Maven Central into the cache.

``mvn`` resolves ``kafka_2.13`` and a logging backend with a pinned
maven-dependency-plugin into the git-ignored cache,
``<cache>/kafka/3.9.1/libs``, once: :func:`fetch_jars` is idempotent and
safe to run concurrently, and a manifest written last marks a complete fetch.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from contract.settings import default_cache_dir
from infra.broker.errors import BrokerError, ToolNotFoundError

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"
MAVEN_ARTIFACTS: tuple[str, ...] = (
    f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}",
    # kafka_2.13 brings no logging backend; Kafka 3.x logs through slf4j + reload4j.
    "org.slf4j:slf4j-reload4j:1.7.36",
    "ch.qos.reload4j:reload4j:1.2.25",
)
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
_MANIFEST = ".complete"


def kafka_dir(cache_dir: Path | None = None) -> Path:
    """``<cache>/kafka``: jars, broker homes and temporary brokers."""
    return (cache_dir or default_cache_dir()) / "kafka"


def libs_dir(cache_dir: Path | None = None) -> Path:
    """The folder with every runtime jar of the broker."""
    return kafka_dir(cache_dir) / KAFKA_VERSION / "libs"


def jars_present(cache_dir: Path | None = None) -> bool:
    """True when a complete fetch left its manifest and every jar it lists."""
    libs = libs_dir(cache_dir)
    manifest = libs / _MANIFEST
    if not manifest.is_file():
        return False
    lines = manifest.read_text().splitlines()
    if not lines or lines[0] != _manifest_header():
        return False
    jars = [j for j in lines[1:] if j]
    return bool(jars) and all((libs / j).is_file() and (libs / j).stat().st_size > 0 for j in jars)


def _manifest_header() -> str:
    return "# " + " ".join(MAVEN_ARTIFACTS)


def _pom() -> str:
    deps = []
    for coord in MAVEN_ARTIFACTS:
        group, artifact, version = coord.split(":")
        deps.append(
            f"    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
            f"<version>{version}</version></dependency>"
        )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>streamrec</groupId><artifactId>kafka-runtime</artifactId>"
        "<version>1</version><packaging>pom</packaging>\n"
        "  <dependencies>\n" + "\n".join(deps) + "\n  </dependencies>\n</project>\n"
    )


def find_tool(name: str, hint: str) -> str:
    """The path of ``java``/``mvn`` (``$JAVA_HOME/bin`` first for java) or ToolNotFoundError."""
    if name == "java" and os.environ.get("JAVA_HOME"):
        candidate = Path(os.environ["JAVA_HOME"]) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    path = shutil.which(name)
    if path is None:
        raise ToolNotFoundError(f"`{name}` was not found on PATH: {hint}")
    return path


def fetch_jars(cache_dir: Path | None = None) -> Path:
    """Resolve the broker's runtime jars with Maven into :func:`libs_dir` (once) and return it.

    Idempotent and safe to run concurrently: a file lock serialises fetches,
    the jars are copied into a temporary folder and renamed into place, and a
    manifest written last marks the folder complete.
    """
    libs = libs_dir(cache_dir)
    if jars_present(cache_dir):
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if jars_present(cache_dir):  # another process finished while we waited
            return libs
        mvn = find_tool("mvn", "install Maven 3.8+ (e.g. `apt-get install maven`) to fetch the Kafka jars")
        with tempfile.TemporaryDirectory(dir=libs.parent, prefix=".fetch-") as tmp:
            tmpdir = Path(tmp)
            (tmpdir / "pom.xml").write_text(_pom())
            out = tmpdir / "libs"
            cmd = [
                mvn, "-B", "-q", "--strict-checksums", "-f", str(tmpdir / "pom.xml"),
                f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                "-DincludeScope=runtime", f"-DoutputDirectory={out}",
            ]  # fmt: skip
            log.info("resolving Kafka %s jars with Maven into %s", KAFKA_VERSION, libs)
            started = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr).strip()[-3000:]
                raise BrokerError(f"mvn could not resolve the Kafka jars (exit {proc.returncode}):\n{tail}")
            jars = sorted(p.name for p in out.glob("*.jar"))
            if not any(j.startswith(f"kafka_2.13-{KAFKA_VERSION}") for j in jars):
                raise BrokerError(f"mvn finished but kafka_2.13-{KAFKA_VERSION}.jar is missing in {out}")
            (out / _MANIFEST).write_text("\n".join([_manifest_header(), *jars]) + "\n")
            if libs.exists():  # an incomplete earlier attempt
                shutil.rmtree(libs)
            out.rename(libs)
        log.info("%d jars ready in %.1f s", len(jars), time.monotonic() - started)
    return libs
