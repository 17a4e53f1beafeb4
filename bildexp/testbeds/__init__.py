"""The project's own testbeds: models built here rather than loaded from the HF hub, and the toy task.

One module per testbed in this package. A module that builds models declares them in `BUILDS`, a list
of `Build`s, and `builds()` finds it on its own: the next testbed is one new file here (plus its
conf/pair/*.yaml). A pair config names a built model `builtin:<build>/<role>` (builtin:qwen25/large);
`resolve` turns that into its folder, building it on first use, and `bildexp build NAME` builds ahead.
Every build is idempotent (a rerun returns the existing folder) and atomic (bildexp.build_into).

    tiny      tiny_t5, tiny_llama: small pairs trained here in seconds on the toy task (tests, demo)
    toy       the generated toy translation task the tiny pairs learn (task=toy, data builtin:toy)
    smollm2   SmolLM2-135M-Instruct and its 1-layer draft, from a pinned PyPI wheel
    qwen25    Qwen2.5-Coder 1.5B and 0.5B, from pinned PyPI wheels
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bildexp import BildexpError

BUILTIN = "builtin:"


@dataclass(frozen=True)
class Build:
    """Models the project builds into one cache folder, one subfolder per role."""

    name: str  # builtin:<name>/<role>
    roles: tuple[str, ...]
    build: Callable[[], Path]  # builds once (a rerun does nothing) and returns the folder holding the roles
    about: str  # one line for `bildexp build --help`
    default: bool = False  # built by a bare `bildexp build`


def builds() -> dict[str, Build]:
    """Every testbed module's `BUILDS`, by name."""
    found: dict[str, Build] = {}
    for module in pkgutil.iter_modules(__path__):
        for build in getattr(importlib.import_module(f"{__name__}.{module.name}"), "BUILDS", ()):
            found[build.name] = build
    return found


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN)


def resolve(name: str) -> Path:
    """builtin:<build>/<role> → that role's folder, the build made first when missing."""
    known = builds()
    key, _, role = name[len(BUILTIN) :].partition("/")
    if key not in known or role not in known[key].roles:
        names = ", ".join(f"{BUILTIN}{k}/{r}" for k, b in known.items() for r in b.roles)
        raise BildexpError(f"unknown built-in model {name!r}: one of {names}")
    return known[key].build() / role
