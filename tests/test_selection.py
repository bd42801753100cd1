"""Model selection: the chooser against brute force, bad input, and a whole `select` run on tiny models."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import yaml

from branchmerge.errors import ConfigError
from branchmerge.selection.choose import NothingFits, Profile, bundle_bytes, choose, score
from tests.cli_util import run_cli

SHAPES = ((32, 32), (32, 64), (64, 32))


def _brute(profiles, domains, rates, budget, esize):
    best = None
    for r in range(1, len(profiles) + 1):
        for sub in itertools.combinations(profiles, r):
            for rate in rates:
                b = bundle_bytes(sub, rate, esize)
                if b <= budget:
                    key = (-round(score(sub, domains), 9), rate, b)  # ties up to float summation order
                    if best is None or key < best:
                        best = key
    return None if best is None else (-best[0], best[2], best[1])


@pytest.mark.parametrize("seed", range(12))
def test_chooser_equals_brute_force(seed):
    rng = random.Random(seed)
    domains = ["med", "code", "math"]
    profiles = []
    for i in range(rng.randint(2, 6)):
        group = rng.choice(["base1", "base1", "base2", f"solo{i}"])
        acc = {d: round(rng.choice([0.2, 0.4, 0.6, 0.8]), 2) for d in domains}  # coarse: ties happen
        profiles.append(Profile(f"c{i}", group, acc, SHAPES if group != "base2" else SHAPES[:2], rng.randint(100, 900)))
    rates = [0.5, 0.9]
    esize = 2
    sizes = sorted(bundle_bytes([p], 0.9, esize) for p in profiles)
    everything = bundle_bytes(profiles, 0.5, esize)
    for budget in (sizes[0] - 1, sizes[0], sizes[len(sizes) // 2] + 500, everything, everything * 10):
        want = _brute(profiles, domains, rates, budget, esize)
        if want is None:
            with pytest.raises(NothingFits, match="the smallest set"):
                choose(profiles, domains, rates, budget, esize)
            continue
        got = choose(profiles, domains, rates, budget, esize)
        assert got.score == pytest.approx(want[0]) and (got.bytes, got.rate) == (want[1], want[2])
        assert got.bytes <= budget
        assert set(got.members) | set(got.dropped) == {p.name for p in profiles}


def test_bundle_bytes_arithmetic():
    a = Profile("a", "g", {}, ((100, 50),), 10)
    b = Profile("b", "g", {}, ((100, 50),), 10)
    assert bundle_bytes([a], 0.9, 2) == (5000 + 10) * 2  # a group of one is its dense model
    k = round(0.1 * 50)  # rank 5: factors 5·150 = 750 per branch
    assert bundle_bytes([a, b], 0.9, 2) == (5000 + 2 * 750) * 2 + 4 * 2 + 20 * 2
    assert bundle_bytes([a, b], 0.0, 2) == (5000 + 2 * 5000) * 2 + 8 + 40  # factors not smaller: dense Δ
    assert k == 5


def test_select_config_errors(tmp_path):
    from branchmerge.selection.config import load_select_config

    def cfg(**kw):
        data = {"candidates": [{"name": "a", "model": "m"}], "tasks": [{"name": "t", "path": "t.jsonl"}],
                "budget_gb": 1, **kw}
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
        return tmp_path / "s.yaml"

    with pytest.raises(ConfigError, match="fine-tune of 'zz', which is not a candidate with role base"):
        load_select_config(cfg(candidates=[{"name": "a", "model": "m", "role": "finetune", "base": "zz"}]))
    with pytest.raises(ConfigError, match="exactly one of `lm_eval`"):
        load_select_config(cfg(tasks=[{"name": "t"}]))
    with pytest.raises(ConfigError, match="budget_gb"):
        load_select_config(cfg(budget_gb=0))
    from branchmerge.selection.tasks import read_local_task

    (tmp_path / "bad.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q"}\n')
    with pytest.raises(ConfigError, match="line 2: `choices` must list"):
        read_local_task("t", tmp_path / "bad.jsonl", "multiple_choice", 1)
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(ConfigError, match="line 1: `answer` must be the index"):
        read_local_task("t", tmp_path / "bad.jsonl", "multiple_choice", 1)


def _task(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


@pytest.fixture(scope="module")
def skill_tasks(tmp_path_factory):
    """The skills family (trained once per machine) and one local generation task per skill, whose first
    8 items are dev (router samples) and the rest are evaluated."""
    from branchmerge.family import SKILLS, build_family, sample_prompts

    fam = build_family()
    d = tmp_path_factory.mktemp("skilltasks")
    tasks = []
    for s in SKILLS:
        items = [{"question": p, "answer": a} for p, a in sample_prompts(s, 20, seed=31)]
        tasks.append({"name": s, "path": _task(d / f"{s}.jsonl", items), "kind": "generate"})
    return fam, tasks


def test_select_end_to_end(capsys, skill_tasks, tmp_path):
    """Base plus four fine-tunes, each the best on its own skill: with room for all, select takes the four
    fine-tunes as one group (the base adds nothing), measures routing against samples per branch and
    recommends a count, and --verify's bundle answers as its branches did; a tight budget takes fewer and
    says why; a budget nothing fits says what the smallest set needs. Re-runs read the cache."""
    fam, tasks = skill_tasks
    cands = [{"name": "base", "model": str(fam["base"]), "role": "base"}] + [
        {"name": s, "model": str(fam[s]), "role": "finetune", "base": "base"} for s in ("rev", "shift", "dup", "recall")]
    data = {"candidates": cands, "tasks": tasks, "budget_gb": 1.0, "limit": 8, "dev_items": 8,
            "compress_rates": [0.5, 0.9], "dtype": "float32", "router_counts": [1, 4, 8]}
    (tmp_path / "select.yaml").write_text(yaml.safe_dump(data))
    code, out, err = run_cli(capsys, "select", tmp_path / "select.yaml", "-o", tmp_path / "sel", "--verify",
                             "--no-progress")
    assert code == 0, err
    res = json.loads((tmp_path / "sel" / "select.json").read_text())
    acc = {n: c["domain_accuracy"] for n, c in res["candidates"].items()}
    for s in ("rev", "shift", "dup", "recall"):
        assert acc[s][s] >= 0.9 and acc[s][s] > acc["base"][s], acc
    ch = res["choice"]
    assert sorted(ch["members"]) == ["dup", "recall", "rev", "shift"] and ch["rate"] == 0.5
    assert "adds nothing" in ch["dropped"]["base"]
    merge = yaml.safe_load((tmp_path / "sel" / "merge.yaml").read_text())
    assert {b["group"] for b in merge["branches"]} == {"base"} and merge["compress_rate"] == 0.5
    router = yaml.safe_load((tmp_path / "sel" / "router.yaml").read_text())
    evaluated = {json.loads(ln)["question"] for t in tasks for ln in open(t["path"]).read().splitlines()[8:]}
    assert all(q not in evaluated for qs in router["samples"].values() for q in qs)
    curve = res["routing"]["curve"]
    assert set(curve) == {"1", "4", "8"} and all(0 <= a <= 1 for a in curve.values())
    assert len(router["samples"]["rev"]) == res["routing"]["recommended"]
    v = res["verify"]
    assert v["bundle_bytes"] <= v["predicted_bytes"]
    for s in ("rev", "shift", "dup", "recall"):  # r=0.5 keeps each skill, with the oracle branch
        assert v["oracle"][s] >= 0.9, v
    report = (tmp_path / "sel" / "report.md").read_text()
    assert "## Routing" in report and "## The merged bundle" in report and (tmp_path / "sel" / "select.png").is_file()
    # a tight budget: a smaller set, with a reason for each left out; the evaluations come from the cache
    cached = sorted((tmp_path / "sel" / "cache").iterdir())
    one = res["candidates"]["rev"]["params"] * 4
    code, out, err = run_cli(capsys, "select", tmp_path / "select.yaml", "-o", tmp_path / "sel",
                             "--budget-gb", str(one * 1.2 / 1e9), "--no-progress")
    assert code == 0, err
    res2 = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert len(res2["choice"]["members"]) == 1 and res2["choice"]["bytes"] <= one * 1.2  # two need 1.35×
    assert all("would need" in why for n, why in res2["choice"]["dropped"].items() if n != "base")
    assert sorted((tmp_path / "sel" / "cache").iterdir()) == cached
    # an entry cut short (edited, or left by an older version killed while writing it) is measured again
    broken = next(p for p in cached if "-mem2-" not in p.name)
    broken.write_text(broken.read_text()[:10])
    code, out, err = run_cli(capsys, "select", tmp_path / "select.yaml", "-o", tmp_path / "sel",
                             "--budget-gb", str(one * 1.2 / 1e9), "--no-progress")
    assert code == 0, err
    assert json.loads(broken.read_text())["accuracy"] and sorted((tmp_path / "sel" / "cache").iterdir()) == cached
    code, _, err = run_cli(capsys, "select", tmp_path / "select.yaml", "-o", tmp_path / "sel", "--budget-gb", "1e-6")
    assert code == 1 and "nothing fits" in err and "the smallest set" in err
    assert not (tmp_path / "sel" / "select.json").exists()  # the last run's result does not pass for this one's


def test_routing_curve_and_recommendation(skill_tasks):
    from branchmerge.selection.run import recommended_count, routing_curve

    fam, tasks = skill_tasks
    qs = {t["name"]: [json.loads(ln)["question"] for ln in open(t["path"]).read().splitlines()] for t in tasks}
    curve = routing_curve(str(fam["base"]), {k: v[:8] for k, v in qs.items()}, {k: v[8:] for k, v in qs.items()},
                          [1, 4, 16])
    assert list(curve) == [1, 4, 8]  # capped at the 8 dev items there are
    assert curve[8] >= 0.9  # the skills' prompts are easy to tell apart
    assert recommended_count({1: 0.5, 4: 0.95, 16: 0.955, 64: 0.96}) == 4
    assert recommended_count({}) is None


def test_select_bad_candidates_and_tasks(capsys, family, tmp_path):
    """An unknown lm_eval task stops before any work; a candidate that does not load is reported and the
    others are measured and chosen."""
    items = [{"question": f"add {i}+1=", "choices": [str(i + 1), "x"], "answer": 0} for i in range(6)]
    task = {"name": "adds", "path": _task(tmp_path / "adds.jsonl", items)}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((family["a"][0] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    cands = [{"name": "a", "model": str(family["a"][0])}, {"name": "broken", "model": str(broken)}]
    data = {"candidates": cands, "tasks": [task, {"name": "nope", "lm_eval": "no_such_task_xyz"}], "budget_gb": 1,
            "limit": 2, "dev_items": 2}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    code, _, err = run_cli(capsys, "select", tmp_path / "s.yaml", "-o", tmp_path / "out", "--no-progress")
    assert code == 1 and "unknown lm_eval task(s) ['no_such_task_xyz']" in err
    data["tasks"] = [task]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    code, out, err = run_cli(capsys, "select", tmp_path / "s.yaml", "-o", tmp_path / "out", "--no-progress")
    assert code == 0, err
    res = json.loads((tmp_path / "out" / "select.json").read_text())
    assert "broken" in res["errors"] and "not a readable safetensors" in res["errors"]["broken"]
    assert res["choice"]["members"] == ["a"] and "could not measure broken" in out
