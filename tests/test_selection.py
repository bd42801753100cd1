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
                    s = score(sub, domains)
                    if best is None or s > best[0] + 1e-12 or (abs(s - best[0]) <= 1e-12 and b < best[1]):
                        best = (s, b)
    return best


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
        assert got.score == pytest.approx(want[0]) and got.bytes == want[1] and got.bytes <= budget
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


def test_select_end_to_end(capsys, family, tmp_path):
    """Three fine-tunes of one base, each strongest on its own local task: a budget that fits them all
    takes all three (one group at the best rate), a tight one takes fewer and says why; the configs it
    writes merge, the router skeleton has dev questions only, and a cached re-run measures nothing."""
    import random as _r

    rng = _r.Random(0)
    tasks = []
    for name, prefix in (("adds", "add"), ("revs", "rev"), ("keys", "key")):
        items = []
        for i in range(12):
            q = f"{prefix} {rng.randint(1, 9)}{i}="
            choices = [f"{i}", f"{i + 1}"]
            items.append({"question": q, "choices": choices, "answer": i % 2})
        tasks.append({"name": name, "path": _task(tmp_path / f"{name}.jsonl", items)})
    cands = [{"name": "base", "model": str(family["base"][0]), "role": "base"}] + [
        {"name": n, "model": str(family[n][0]), "role": "finetune", "base": "base"} for n in "abc"]
    data = {"candidates": cands, "tasks": tasks, "budget_gb": 1.0, "limit": 6, "dev_items": 4,
            "compress_rates": [0.5, 0.9], "dtype": "float32", "samples_per_branch": 2}
    (tmp_path / "select.yaml").write_text(yaml.safe_dump(data))
    code, out, err = run_cli(capsys, "select", tmp_path / "select.yaml", "-o", tmp_path / "sel", "--verify")
    assert code == 0, err
    res = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert set(res["candidates"]) == {"base", "a", "b", "c"} and not res["errors"]
    ch = res["choice"]
    assert ch["rate"] == 0.5 or len(ch["members"]) == 1  # with room, the least compression that fits
    merge = yaml.safe_load((tmp_path / "sel" / "merge.yaml").read_text())
    assert [b["name"] for b in merge["branches"]] == ch["members"] and merge["compress_rate"] == ch["rate"]
    router = yaml.safe_load((tmp_path / "sel" / "router.yaml").read_text())
    evaluated = {json.loads(l)["question"] for t in tasks for l in open(t["path"]).read().splitlines()[4:]}
    assert all(q not in evaluated for qs in router["samples"].values() for q in qs)
    v = res["verify"]
    assert v["bundle_bytes"] <= v["predicted_bytes"] and set(v["auto"]) == {"adds", "revs", "keys"}
    assert (tmp_path / "sel" / "report.md").read_text().count("|") > 20 and (tmp_path / "sel" / "select.png").is_file()
    # a tight budget: the smallest set it can, and a reason for each left out; measured from the cache
    one = bundle_bytes([Profile("x", "g", {}, tuple(map(tuple, res["candidates"]["a"]["compress_shapes"])),
                                res["candidates"]["a"]["other_numel"])], 0.9, 4)
    code, out, err = run_cli(capsys, "select", tmp_path / "select.yaml", "-o", tmp_path / "sel",
                             "--budget-gb", str(one * 1.2 / 1e9))
    assert code == 0, err
    res2 = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert len(res2["choice"]["members"]) == 1 and len(res2["choice"]["dropped"]) == 3
    code, _, err = run_cli(capsys, "select", tmp_path / "select.yaml", "-o", tmp_path / "sel", "--budget-gb", "1e-6")
    assert code == 1 and "nothing fits" in err and "the smallest set" in err
