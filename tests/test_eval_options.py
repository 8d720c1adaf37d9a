"""The conf/eval options are deltas of whole.yaml (each inherits it through its defaults list
and states only what differs), and each composes to exactly the ``eval`` node it composed to
before they became deltas: tests/data/eval_options.json, written on the code before (main
4b3b464) from the same composition as below."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, REPO, compose_config

OPTIONS = sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml"))
BEFORE = json.loads((REPO / "tests" / "data" / "eval_options.json").read_text())


def test_every_recorded_eval_option_still_exists():
    assert set(BEFORE) <= set(OPTIONS)


def recorded_part(node, before):
    """``node`` restricted to the keys ``before`` has (keys added to whole.yaml since the
    recording reach every option alike)."""
    if isinstance(node, dict) and isinstance(before, dict):
        return {k: recorded_part(node.get(k, "<missing>"), before[k]) for k in before}
    return node


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_eval_option_composes_as_before(name):
    cfg = compose_config([f"eval={name}"])
    composed = OmegaConf.to_container(cfg.eval, resolve=False)
    assert recorded_part(composed, BEFORE[name]) == BEFORE[name]


@pytest.mark.parametrize("name", [n for n in OPTIONS if n != "whole"])
def test_eval_option_inherits_whole_and_states_only_what_differs(name):
    """Each option's own file, merged over its parent's composed node, changes every value it
    writes: nothing is restated from the parent."""
    own = OmegaConf.load(CONF_DIR / "eval" / f"{name}.yaml")
    defaults = list(own.pop("defaults", []))
    assert defaults and defaults[-1] == "_self_", f"eval={name} has no defaults list"
    parents = [d for d in defaults if d != "_self_"]
    assert len(parents) == 1, f"eval={name}: {parents}"
    parent = compose_config([f"eval={parents[0]}"]).eval

    def restated(node, base, path=""):
        for key, value in node.items():
            if key not in base:
                continue
            if OmegaConf.is_dict(value) and OmegaConf.is_dict(base[key]):
                yield from restated(value, base[key], f"{path}{key}.")
            elif value == base[key]:
                yield f"{path}{key}"

    assert list(restated(own, parent)) == [], f"eval={name} restates its parent's values"
