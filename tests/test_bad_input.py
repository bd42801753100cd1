"""Bad input: a clear message naming the culprit, a non-zero exit, and no output folder left behind."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_util import run_cli
from tests.conftest import make_tiny_llama, write_config


def _cfg(tmp_path, branches, **kw):
    return write_config(tmp_path / "cfg.yaml", branches, **kw)


def _expect_error(capsys, tmp_path, cfg, *needles, extra=()):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", cfg, "-o", out, "--no-progress", *extra)
    assert code != 0
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    return err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path(capsys, tmp_path, family):
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(tmp_path / "nope")}])
    _expect_error(capsys, tmp_path, cfg, "nope", "does not exist")


def test_folder_without_config(capsys, tmp_path, family):
    d = _copy(family["a"][0], tmp_path / "noconf")
    (d / "config.json").unlink()
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(d)}])
    _expect_error(capsys, tmp_path, cfg, "'a'", "config.json")


def test_folder_without_weights_mentions_pickle(capsys, tmp_path, family):
    d = _copy(family["a"][0], tmp_path / "now")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(d)}])
    _expect_error(capsys, tmp_path, cfg, "no *.safetensors", "pytorch_model.bin")


def test_truncated_safetensors(capsys, tmp_path, family):
    d = _copy(family["b"][0], tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(d)}])
    _expect_error(capsys, tmp_path, cfg, "'b'", "model.safetensors", "corrupt or truncated")


def test_garbage_safetensors(capsys, tmp_path, family):
    d = _copy(family["b"][0], tmp_path / "garbage")
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    cfg = _cfg(tmp_path, [{"name": "b", "model": str(d)}])
    _expect_error(capsys, tmp_path, cfg, "model.safetensors")


def test_different_architectures(capsys, tmp_path, family):
    d = _copy(family["b"][0], tmp_path / "arch")
    c = json.loads((d / "config.json").read_text())
    c["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(c))
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}, {"name": "m", "model": str(d)}])
    _expect_error(capsys, tmp_path, cfg, "'a'", "'m'", "architectures", "standalone: true")


def test_different_hidden_size(capsys, tmp_path, family):
    make_tiny_llama(tmp_path / "wide", hidden=64)
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}, {"name": "w", "model": str(tmp_path / "wide")}])
    _expect_error(capsys, tmp_path, cfg, "hidden_size", "32 vs 64", "standalone: true")


def test_missing_tensor(capsys, tmp_path, family):
    d = _copy(family["b"][0], tmp_path / "miss")
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors")
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(d)}])
    _expect_error(capsys, tmp_path, cfg, "model.layers.1.mlp.up_proj.weight", "missing from branch 'b'")


def test_wrong_shape(capsys, tmp_path, family):
    d = _copy(family["b"][0], tmp_path / "shape")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(32, 16)
    save_file(sd, d / "model.safetensors")
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(d)}])
    _expect_error(capsys, tmp_path, cfg, "model.layers.0.self_attn.o_proj.weight", "[32, 16]", "'b'")


def test_nan_weights(capsys, tmp_path, family):
    d = _copy(family["c"][0], tmp_path / "nan")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors")
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}, {"name": "c", "model": str(d)}])
    _expect_error(capsys, tmp_path, cfg, "'c'", "model.layers.1.self_attn.q_proj.weight", "NaN/Inf")


def test_duplicate_branch_names(capsys, tmp_path, family):
    p = str(family["a"][0])
    cfg = _cfg(tmp_path, [{"name": "a", "model": p}, {"name": "a", "model": p}])
    _expect_error(capsys, tmp_path, cfg, "duplicate branch name 'a'")


def test_no_branches(capsys, tmp_path):
    cfg = _cfg(tmp_path, [])
    _expect_error(capsys, tmp_path, cfg, "at least one model")


@pytest.mark.parametrize("rate", ["1.5", "-0.1"])
def test_rate_out_of_range(capsys, tmp_path, family, rate):
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}])
    _expect_error(capsys, tmp_path, cfg, "compress_rate", "[0, 1]", rate, extra=("--compress-rate", rate))


def test_unknown_field_named(capsys, tmp_path, family):
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0]), "standlone": True}])
    _expect_error(capsys, tmp_path, cfg, "branches.0.standlone")


@pytest.mark.parametrize("text,where", [
    ("compress_rate: 0.5\ncompress_rate: 0.9\n", "key 'compress_rate' appears twice (lines {n} and {m})"),
    ("rsvd: {seed: 1, seed: 2}\n", "key 'seed' appears twice (lines {n} and {n})"),
])
def test_a_key_given_twice_is_refused(capsys, tmp_path, family, text, where):
    """PyYAML keeps the last of two equal keys, so a pasted second `compress_rate:` would win silently."""
    cfg = tmp_path / "twice.yaml"
    head = f"branches:\n  - {{name: a, model: {family['a'][0]}}}\n  - {{name: b, model: {family['b'][0]}}}\n"
    cfg.write_text(head + text)
    _expect_error(capsys, tmp_path, cfg, where.format(n=4, m=5))


def test_yaml_that_explodes_or_nests_too_deep_is_refused(capsys, tmp_path, family):
    """A config is input: "billion laughs" aliases (a few lines that become 10⁹ values for whatever walks them:
    multimerge's name resolution took minutes) and nesting deeper than Python's stack (a RecursionError
    traceback) are each one clear error, for merge and multimerge alike, with nothing written."""
    from branchmerge.config import safe_load

    head = f"branches:\n  - {{name: a, model: {family['a'][0]}}}\n"
    laughs = "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))
    deep = "parameters: {x: " + "[" * 5000 + "]" * 5000 + "}\n"
    for text, needle in ((head + laughs, "expand it to over 1,000,000 values"),
                         (head + deep, "nests deeper than can be read")):
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(text)
        for args in (("merge", cfg, "-o", tmp_path / "out"), ("multimerge", cfg, "-I", tmp_path / "i", "-o",
                                                               tmp_path / "out")):
            code, _, err = run_cli(capsys, *args)
            assert code == 1 and needle in err and "Traceback" not in err, (args[0], err[-300:])
            assert not (tmp_path / "out").exists() and not (tmp_path / "i").exists()
    small = "a: &a [1, 2]\nb: [*a, *a, *a]\n"  # (aliases that stay small are YAML as usual)
    assert safe_load(small)["b"] == [[1, 2]] * 3


def test_yaml_merge_keys_may_still_be_overridden():
    from branchmerge.config import safe_load

    text = "base: &b {compress_rate: 0.5, dtype: float32}\nrun:\n  <<: *b\n  compress_rate: 0.9\n"
    assert safe_load(text)["run"] == {"compress_rate": 0.9, "dtype": "float32"}


def test_output_exists_needs_force(capsys, tmp_path, family):
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(family["b"][0])}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "merge", cfg, "-o", out, "--no-progress")
    assert code != 0 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, err = run_cli(capsys, "merge", cfg, "-o", out, "--no-progress", "--force")
    assert code == 1 and "a folder that branchmerge did not write (it holds keep.txt)" in err  # not ours to delete
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    code, stdout, err = run_cli(capsys, "merge", cfg, "-o", out, "--no-progress")  # an empty folder is taken
    assert code != 0 and "already exists" in err
    code, stdout, err = run_cli(capsys, "merge", cfg, "-o", out, "--no-progress", "--force")
    assert code == 0 and (out / "manifest.json").is_file(), err


def test_a_resized_vocabulary_joins_the_group_or_its_own(capsys, tmp_path, family):
    """A fine-tune with a resized vocabulary (80 rows) merges in the group of the others (embeddings and head per
    branch at their own size; the old merge wrote a bundle that then failed to load, a later one refused it),
    or in a group of its own when asked; either way each branch gives logits of its own width."""
    from tests.conftest import make_finetune

    base = family["base"][1]
    d = tmp_path / "bigvocab"
    ft = make_finetune(base, d, seed=3)
    ft.resize_token_embeddings(80, mean_resizing=False)
    ft.save_pretrained(d)
    branches = [{"name": "a", "model": str(family["a"][0])}, {"name": "v", "model": str(d)}]
    import branchmerge

    for group, n_groups in ((None, 1), ("big", 2)):
        if group:
            branches[1]["group"] = group
        cfg = _cfg(tmp_path, branches, compress_rate=0.5)
        code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "out", "--no-progress", "--force")
        assert code == 0, err
        b = branchmerge.load(tmp_path / "out")
        assert len(b.reader.manifest.groups) == n_groups
        assert b.logits(torch.tensor([[1, 2, 79]]), ["v"]).shape == (1, 3, 80)
        assert b.logits(torch.tensor([[1, 2, 3]]), ["a"]).shape == (1, 3, 64)


def test_corrupt_bundle_shard_detected(capsys, tmp_path, family):
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(family["b"][0])}], compress_rate=0.5)
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", cfg, "-o", out, "--no-progress")[0] == 0
    shard = next(out.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "inspect", out)
    assert code != 0 and shard.name in err and "sha256" in err


def test_unknown_format_version(capsys, tmp_path, family):
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}])
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", cfg, "-o", out, "--no-progress")[0] == 0
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(capsys, "inspect", out)
    assert code != 0 and "format_version 99" in err


def test_export_unknown_branch_lists_valid(capsys, tmp_path, family):
    cfg = _cfg(tmp_path, [{"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(family["b"][0])}])
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", cfg, "-o", out, "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "export-branch", out, "zzz", "-o", tmp_path / "exp")
    assert code != 0 and "'zzz'" in err and "a, b" in err
    assert not (tmp_path / "exp").exists()
