"""multimerge: merges that feed one another from one multi-document YAML (mergekit-multimerge's format),
run in dependency order, skipped when up to date, rebuilt when their config or inputs change."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import branchmerge
from branchmerge.errors import ConfigError
from branchmerge.multimerge import plan, run_multimerge
from tests.cli_util import run_cli


def _write(path, docs):
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _docs(family, weight_b=1.0):
    """A linear merge of a and b (mergekit's format, named "ab"), then a bundle of it and c (unnamed: final)."""
    ab = {"name": "ab", "merge_method": "linear", "dtype": "float32",
          "models": [{"model": str(family["a"][0]), "parameters": {"weight": 1.0}},
                     {"model": str(family["b"][0]), "parameters": {"weight": weight_b}}]}
    final = {"branches": [{"name": "ab", "model": "ab"}, {"name": "c", "model": str(family["c"][0])}],
             "compress_rate": 0.0, "dtype": "float32"}
    return [final, ab]  # (the final merge first: the order of the file is not the order of the merges)


def _mtime(folder):
    return max(p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file())


def test_a_merge_becomes_a_branch_of_the_next(family, tmp_path, capsys):
    cfg = _write(tmp_path / "multi.yml", _docs(family))
    inter, out = tmp_path / "inter", tmp_path / "bundle"
    code, stdout, err = run_cli(capsys, "multimerge", cfg, "-I", inter, "-o", out, "--no-progress")
    assert code == 0, err
    assert stdout.index("ab: built") < stdout.index("(final): built")
    # the intermediate is the linear merge of a and b, tensor by tensor
    merged = {}
    for f in (inter / "ab").glob("*.safetensors"):
        merged.update(load_file(f))
    a, b = family["a"][1].state_dict(), family["b"][1].state_dict()
    for k in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(merged[k], (a[k] + b[k]) / 2)
    # and the final bundle's branch "ab" (r=0) answers as that model
    bundle = branchmerge.load(out, dtype="float32")
    assert set(bundle.branch_names) == {"ab", "c"}
    x = torch.randint(3, 64, (1, 9))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(inter / "ab").eval()(x).logits
        torch.testing.assert_close(bundle.logits(x, ["ab"]), want, atol=1e-4, rtol=1e-4)


def test_only_what_changed_is_rebuilt(family, tmp_path, capsys):
    inter, out = tmp_path / "inter", tmp_path / "bundle"
    cfg = _write(tmp_path / "multi.yml", _docs(family))
    run_multimerge(cfg, inter, out, progress=False)
    stamps = {p.name: p.read_text() for p in (inter / ".stages").iterdir()}
    assert set(stamps) == {"ab.json", "_final.json"} and not (inter / "ab" / ".stages").exists()
    t_ab, t_out = _mtime(inter / "ab"), _mtime(out)
    again = run_multimerge(cfg, inter, out, progress=False)
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    assert (_mtime(inter / "ab"), _mtime(out)) == (t_ab, t_out)
    # the final merge's own setting changed: only it is rebuilt (the final output needs force, as merge's -o)
    docs = _docs(family)
    docs[0]["compress_rate"] = 0.5
    _write(cfg, docs)
    with pytest.raises(branchmerge.errors.BranchmergeError, match="already exists; pass --force"):
        run_multimerge(cfg, inter, out, progress=False)
    assert [r["status"] for r in run_multimerge(cfg, inter, out, force=True, progress=False)] == ["skipped", "built"]
    assert json.loads((out / "manifest.json").read_text())["config"]["compress_rate"] == 0.5
    # the intermediate's weights changed: it and everything reading it are rebuilt
    _write(cfg, _docs(family, weight_b=3.0))
    rep = run_multimerge(cfg, inter, out, force=True, progress=False)
    assert [(r["name"], r["status"]) for r in rep] == [("ab", "built"), ("(final)", "built")]
    q = "model.layers.1.mlp.up_proj.weight"
    merged = {}
    for f in (inter / "ab").glob("*.safetensors"):
        merged.update(load_file(f))
    a, b = family["a"][1].state_dict(), family["b"][1].state_dict()
    torch.testing.assert_close(merged[q], (a[q] + 3 * b[q]) / 4)
    # an intermediate removed by hand is rebuilt, and so is what reads it; --no-lazy rebuilds everything
    import shutil
    shutil.rmtree(inter / "ab")
    assert [r["status"] for r in run_multimerge(cfg, inter, out, force=True, progress=False)] == ["built", "built"]
    code, stdout, err = run_cli(capsys, "multimerge", cfg, "-I", inter, "-o", out, "--force", "--no-lazy",
                                "--no-progress")
    assert code == 0 and stdout.count("built") == 2, err


def test_every_intermediate_named_and_no_final(family, tmp_path):
    ab = _docs(family)[1]
    abc = {"name": "abc", "merge_method": "task_arithmetic", "base_model": str(family["base"][0]), "dtype": "float32",
           "models": [{"model": "ab", "parameters": {"weight": 0.5}},
                      {"model": str(family["c"][0]), "parameters": {"weight": 0.5}}]}
    cfg = _write(tmp_path / "m.yml", [abc, ab])
    stages = plan(cfg, tmp_path / "inter", None)
    assert [s.label for s in stages] == ["ab", "abc"] and stages[1].needs == {"ab"}
    rep = run_multimerge(cfg, tmp_path / "inter", progress=False)
    assert [r["status"] for r in rep] == ["built", "built"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "inter" / "abc").generate(
        torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_bad_files_are_named_and_write_nothing(family, tmp_path, capsys):
    a = str(family["a"][0])
    lin = {"merge_method": "linear", "dtype": "float32"}

    def two(m1, m2, **kw):
        return {**lin, "models": [{"model": m1}, {"model": m2}], **kw}

    cases = [
        ([two("y", a, name="x"), two("x", a, name="y")], "cycle: x → y → x"),
        ([two(a, a, name="x"), two(a, a, name="x")], "name 'x' is already document 1's"),
        ([two(a, a), two(a, a)], "a second merge without a name"),
        ([two(a, a, name="../up")], "name '../up' must be a folder name"),
        ([two(a, a, name=".stages")], "name '.stages' must be a folder name"),
        ([two("x", a, name="x")], "reads its own output"),
        ([{"name": "bun", "branches": [{"name": "a", "model": a}]}, two("bun", a)], "'bun', which is a bundle"),
        ([two(a, a, name="x"), {**lin, "models": "nope"}], "document 2"),
        (["just text"], "expected a merge config (a mapping)"),
        ([two(a, a, name="x", compress_rat=1)], "document 1 (x)"),
    ]
    for docs, needle in cases:
        cfg = _write(tmp_path / "bad.yml", docs)
        code, _, err = run_cli(capsys, "multimerge", cfg, "-I", tmp_path / "inter", "-o", tmp_path / "out",
                               "--no-progress")
        assert code != 0 and needle in " ".join(err.split()), (needle, err)
        assert not (tmp_path / "inter").exists() and not (tmp_path / "out").exists()
    cfg = _write(tmp_path / "m.yml", [two(a, a)])
    with pytest.raises(ConfigError, match="it is the final merge, so give --out"):
        plan(cfg, tmp_path / "inter", None)
    cfg = _write(tmp_path / "m.yml", [two(a, a, name="x")])
    with pytest.raises(ConfigError, match="--out is for an unnamed final merge"):
        plan(cfg, tmp_path / "inter", tmp_path / "out")
    (tmp_path / "dup.yml").write_text("merge_method: linear\nmerge_method: ties\n")
    with pytest.raises(ConfigError, match="appears twice"):
        plan(tmp_path / "dup.yml", tmp_path / "inter", tmp_path / "out")
    # a merge that fails leaves the earlier ones in place and nothing of its own
    docs = [two(a, a, name="x"), {**lin, "models": [{"model": "x"}, {"model": str(tmp_path / "missing")}]}]
    code, _, err = run_cli(capsys, "multimerge", _write(tmp_path / "m.yml", docs), "-I", tmp_path / "inter",
                           "-o", tmp_path / "out", "--no-progress")
    assert code != 0 and "missing" in err
    assert (tmp_path / "inter" / "x" / "config.json").is_file() and not (tmp_path / "out").exists()


def test_the_final_output_stays_out_of_the_intermediate_folder(family, tmp_path):
    cfg = _write(tmp_path / "multi.yml", _docs(family))
    for out in (tmp_path / "inter", tmp_path / "inter" / "final", tmp_path):
        with pytest.raises(ConfigError, match="overlap"):
            plan(cfg, tmp_path / "inter", out)
