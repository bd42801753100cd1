"""The embedded default end to end: the skills family trains, branches keep it, averaging loses it,
and the router sends each skill's prompts to its branch."""

import json

import pytest

import branchmerge
from branchmerge.config import parse_config
from branchmerge.family import SKILLS, accuracy, build_family, hf_generate, router_config, sample_prompts
from branchmerge.merge import run_merge
from branchmerge.front import build_bundle_router


@pytest.fixture(scope="module")
def skills_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("skills") / "family")


def test_family_trains_each_skill(skills_family):
    stamp = json.loads((skills_family["base"].parent / "family.json").read_text())
    assert all(stamp["accuracy"][s] >= 0.9 for s in SKILLS), stamp["accuracy"]
    again = build_family(skills_family["base"].parent)  # reused, not rebuilt
    assert again == skills_family


def test_family_held_out_prompts_never_trained_on():
    from branchmerge.family import held_out

    for s in ("rev", "shift", "dup"):
        assert len(held_out(s)) == 100
        assert {p for p, _ in sample_prompts(s, 100, seed=0)} == held_out(s)


def test_branches_keep_skills_averaging_loses_them(skills_family, tmp_path):
    branches = [{"name": s, "model": str(skills_family[s])} for s in SKILLS]
    run_merge(parse_config({"branches": branches, "compress_rate": 0.95, "dtype": "float32"}), tmp_path / "b",
              progress=False)
    run_merge(parse_config({"branches": branches, "method": "linear", "dtype": "float32"}), tmp_path / "lin",
              progress=False)
    from transformers import AutoModelForCausalLM

    lin = AutoModelForCausalLM.from_pretrained(tmp_path / "lin").eval()
    bundle = branchmerge.load(tmp_path / "b")
    kept = {s: accuracy(lambda ps, s=s: bundle.generate(ps, s, max_new_tokens=12), s, 50) for s in SKILLS}
    avg = {s: accuracy(lambda ps: hf_generate(lin, ps), s, 50) for s in SKILLS}
    assert min(kept.values()) >= 0.9, kept
    assert sum(kept[s] - avg[s] >= 0.3 for s in SKILLS) >= 2, (kept, avg)

    build_bundle_router(bundle, router_config(skills_family["base"]))
    qs = [(p, s) for s in SKILLS for p, _ in sample_prompts(s, 50, seed=5)]
    routed = bundle.router.route([q for q, _ in qs])
    acc = sum(r == s for r, (_, s) in zip(routed, qs)) / len(qs)
    assert acc >= 0.95, acc
