"""bildexp: an experiment harness for Big Little Decoder (BiLD) and Predictive Pipelined Decoding (PPD)."""

import contextlib
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


def start_build(final: Path) -> Path:
    """A fresh temporary sibling of `final` to build into (then `os.replace`d into place), holding the builder's pid;
    siblings left by killed builders (their pid no longer runs) are removed first."""
    import shutil
    import tempfile

    prefix = f".{final.name}.tmp-"
    for stale in final.parent.glob(prefix + "*"):
        try:
            os.kill(int((stale / "pid").read_text()), 0)
        except (OSError, ValueError):  # no pid file, or no such process: a killed build
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not secret
    (tmp / "pid").write_text(str(os.getpid()))
    return tmp


@contextlib.contextmanager
def build_into(final: Path):
    """Yield a fresh `start_build` folder; when the block finishes, it replaces `final` (an older partial copy is
    removed first: ours are renamed in whole); on any exit the temporary folder is gone."""
    import shutil

    tmp = start_build(final)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: hub ids resolve from the local HF cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


class BildexpError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with status 2."""
