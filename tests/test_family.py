"""The embedded default end to end: the skills family trains, branches keep it, averaging loses it,
and the router sends each skill's prompts to its branch."""

import json
import re
import shlex
from pathlib import Path

import pytest

import branchmerge
from branchmerge.config import parse_config
from branchmerge.family import SKILLS, accuracy, build_family, hf_generate, router_config, sample_prompts
from branchmerge.front import build_bundle_router
from branchmerge.merge import run_merge
from tests.cli_util import run_cli


@pytest.fixture(scope="module")
def skills_family(tmp_path_factory):
    return build_family()  # the cache make demo fills: trained once per machine, not once per run


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


@pytest.fixture(scope="module")
def demo_bundle(skills_family, tmp_path_factory):
    """What `make demo` leaves: ``demo_out/bundle-r0.95`` (float32, r=0.95) with the family's router, inside a
    fresh working folder."""
    work = tmp_path_factory.mktemp("demo")
    branches = [{"name": s, "model": str(skills_family[s])} for s in SKILLS]
    out = work / "demo_out" / "bundle-r0.95"
    run_merge(parse_config({"branches": branches, "compress_rate": 0.95, "dtype": "float32"}), out, progress=False)
    build_bundle_router(branchmerge.load(out), router_config(skills_family["base"]))
    return work


def test_branches_keep_skills_averaging_loses_them(skills_family, demo_bundle, tmp_path):
    branches = [{"name": s, "model": str(skills_family[s])} for s in SKILLS]
    run_merge(parse_config({"branches": branches, "method": "linear", "dtype": "float32"}), tmp_path / "lin",
              progress=False)
    from transformers import AutoModelForCausalLM

    lin = AutoModelForCausalLM.from_pretrained(tmp_path / "lin").eval()
    bundle = branchmerge.load(demo_bundle / "demo_out" / "bundle-r0.95")
    kept = {s: accuracy(lambda ps, s=s: bundle.generate(ps, s, max_new_tokens=12), s, 50) for s in SKILLS}
    avg = {s: accuracy(lambda ps: hf_generate(lin, ps), s, 50) for s in SKILLS}
    assert min(kept.values()) >= 0.9, kept
    assert sum(kept[s] - avg[s] >= 0.3 for s in SKILLS) >= 2, (kept, avg)

    qs = [(p, s) for s in SKILLS for p, _ in sample_prompts(s, 50, seed=5)]
    routed = bundle.router.route([q for q, _ in qs])
    acc = sum(r == s for r, (_, s) in zip(routed, qs)) / len(qs)
    assert acc >= 0.95, acc


def _readme_blocks(lang: str) -> list[str]:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    return [b for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S) if "demo_out/" in b]


def test_readme_examples_run_on_the_demo_bundle(demo_bundle, monkeypatch, capsys):
    """Every README block that names the demo's bundle runs as written, from the folder `make demo` ran in
    and from another one (absolute path)."""
    monkeypatch.chdir(demo_bundle)
    lines = [ln.split("#")[0].strip() for b in _readme_blocks("bash") for ln in b.splitlines()]
    cmds = [shlex.split(ln)[1:] for ln in lines if ln.startswith("branchmerge ") and "demo_out/" in ln]
    assert len(cmds) >= 4
    for args in cmds:
        code, out, err = run_cli(capsys, *args)
        assert code == 0, (args, err)
    code, out, err = run_cli(capsys, "generate", "demo_out/bundle-r0.95", "rev hello=", "--branch", "rev")
    assert out.strip() == "olleh"
    blocks = _readme_blocks("python")
    assert len(blocks) >= 2
    for b in blocks:
        exec(compile(b, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "['olleh', 'aabb']" in printed and "rev abc=cba" in printed
    elsewhere = demo_bundle / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.chdir(elsewhere)
    code, out, err = run_cli(capsys, "generate", str(demo_bundle / "demo_out" / "bundle-r0.95"), "shift abc=",
                             "--branch", "auto")
    assert code == 0 and out.strip() == "def" and "[branch: shift]" in err
