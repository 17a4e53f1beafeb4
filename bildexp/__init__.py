"""bildexp: an experiment harness for Big Little Decoder (BiLD) and Predictive Pipelined Decoding (PPD)."""

import hashlib
import os
from pathlib import Path

__version__ = "0.1.0"

# The checkout (editable install): committed testbed weights live under PROJECT_ROOT / "testbeds".
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    """Where the project's own models are built: $BILDEXP_CACHE, else ~/.cache/bildexp."""
    return Path(os.environ.get("BILDEXP_CACHE", "~/.cache/bildexp")).expanduser()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: hub ids resolve from the local HF cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


class BildexpError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with status 2."""
