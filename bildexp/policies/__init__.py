"""Policy registry: `policy.name` in the config → policy class."""

from __future__ import annotations

from bildexp.config import PolicyConfig
from bildexp.policies.base import Generation, Policy, Prompt
from bildexp.policies.bild import BiLD
from bildexp.policies.calm import CALM
from bildexp.policies.hf_assisted import HFAssisted
from bildexp.policies.oracle import Oracle
from bildexp.policies.ppd import PPD
from bildexp.policies.ppd_match import PPDMatch
from bildexp.policies.speculative import Speculative
from bildexp.policies.vanilla import Vanilla

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Vanilla, BiLD, Oracle, CALM, Speculative, HFAssisted, PPDMatch, PPD)}


def make_policy(cfg: PolicyConfig) -> Policy:
    return POLICIES[cfg.name](cfg)


__all__ = ["Generation", "POLICIES", "Policy", "Prompt", "make_policy"]
