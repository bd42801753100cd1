"""Attacks and careless mistakes against merge, bundles and loading: each gets a clear error, and nothing
is lost, written outside its folder, or run."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import branchmerge
from branchmerge.errors import BundleError, ConfigError
from branchmerge.export import export_branch
from tests.cli_util import run_cli
from tests.conftest import write_config


def _copy_bundle(bundles, tmp_path, name="bundle") -> Path:
    d = tmp_path / name
    shutil.copytree(bundles[0.9], d)
    return d


def _edit_manifest(bundle: Path, fn) -> None:
    p = bundle / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


# ---- 1. paths from a bundle stay inside it ---------------------------------------------------------
@pytest.mark.parametrize("bad", ["../../.bashrc", "/etc/passwd", "sub/tokenizer.json", ".."])
def test_export_refuses_side_files_outside_the_branch(bundles, tmp_path, bad):
    d = _copy_bundle(bundles, tmp_path)
    _edit_manifest(d, lambda m: m["branches"]["a"]["files"].append(bad))
    out = tmp_path / "exp"
    with pytest.raises(BundleError, match=r"branches\.a\.files") as e:
        export_branch(d, "a", out, progress=False)
    assert "not a safe name" in str(e.value)
    assert not out.exists() and not (tmp_path / ".bashrc").exists()


@pytest.mark.parametrize("bad", ["../x.safetensors", "/tmp/x.safetensors", "sub/shard.safetensors", "manifest.json"])
def test_shard_names_must_be_plain_files_in_the_bundle(bundles, tmp_path, bad):
    d = _copy_bundle(bundles, tmp_path)

    def rename(m):
        old = next(iter(m["shards"]))
        m["shards"][bad] = m["shards"].pop(old)
        m["weight_map"] = {k: (bad if v == old else v) for k, v in m["weight_map"].items()}

    _edit_manifest(d, rename)
    with pytest.raises(BundleError, match="is not a plain"):
        branchmerge.load(d)


def test_weight_map_may_only_name_checksummed_shards(bundles, tmp_path):
    """A tensor pointed at an extra file (not in `shards`, so never sha256-checked) is refused."""
    d = _copy_bundle(bundles, tmp_path)
    shutil.copy(next(d.glob("shard-*.safetensors")), d / "evil.safetensors")
    _edit_manifest(d, lambda m: m["weight_map"].update({next(iter(m["weight_map"])): "evil.safetensors"}))
    with pytest.raises(BundleError, match="not a listed \\(checksummed\\) shard"):
        branchmerge.load(d)


@pytest.mark.parametrize("drop", ["branches", "groups", "dtype", "weight_map", "shards"])
def test_missing_manifest_keys_are_named(bundles, tmp_path, drop):
    d = _copy_bundle(bundles, tmp_path)
    _edit_manifest(d, lambda m: m.pop(drop))
    with pytest.raises(BundleError, match=f"{drop}: Field required"):
        branchmerge.load(d)
    code, _, err = run_cli_plain(["inspect", str(d)])
    assert code == 1 and drop in err and "Traceback" not in err


def test_manifest_group_and_branch_must_agree(bundles, tmp_path):
    d = _copy_bundle(bundles, tmp_path)
    _edit_manifest(d, lambda m: m["branches"]["a"].update(group="nope"))
    with pytest.raises(BundleError, match="branches.a.group: 'nope' is not a group"):
        branchmerge.load(d)


def run_cli_plain(args: list[str]) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "branchmerge.cli.main", *args], capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


# ---- 3. and 8. outputs: never destroy inputs, never leave debris ------------------------------------
def test_force_never_deletes_an_input(capsys, family, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(family["a"][0], models / "a")
    shutil.copytree(family["b"][0], models / "b")
    cfg = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(models / "a")},
                                             {"name": "b", "model": str(models / "b")}])
    for out in (models, models / "a"):
        code, _, err = run_cli(capsys, "merge", cfg, "-o", out, "--force", "--no-progress")
        assert code == 1 and "would destroy the input" in err
    assert (models / "a" / "config.json").is_file() and (models / "b" / "model.safetensors").is_file()
    b = _merge_out(capsys, cfg, tmp_path / "bundle")
    code, _, err = run_cli(capsys, "export-branch", b, "a", "-o", b, "--force")
    assert code == 1 and "would destroy the input" in err and (b / "manifest.json").is_file()


def _merge_out(capsys, cfg, out):
    code, _, err = run_cli(capsys, "merge", cfg, "-o", out, "--no-progress")
    assert code == 0, err
    return out


def test_output_current_folder_and_file(capsys, family, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(family["a"][0])}])
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", str(work), ".."):
        code, _, err = run_cli(capsys, "merge", cfg, "-o", out, "--force", "--no-progress")
        assert code == 1 and "current folder" in err
    assert (work / "notes.txt").read_text() == "mine" and sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    # --force replaces only an earlier output (or an empty folder): never a file, such as the config itself
    # after a typo, nor a folder of other things
    others = tmp_path / "others"
    others.mkdir()
    (others / "thesis.txt").write_text("years of work")
    folder = r"is a folder that branchmerge did not write \(it holds thesis.txt\)"
    for out, what in ((cfg, "is a file"), (others, folder)):
        code, _, err = run_cli(capsys, "merge", cfg, "-o", out, "--force", "--no-progress")
        assert code == 1 and re.search(f"{what}; --force replaces only an earlier branchmerge output", err), err
    assert Path(cfg).read_text().startswith("branches") and (others / "thesis.txt").read_text() == "years of work"
    out = _merge_out(capsys, cfg, tmp_path / "out")
    (out / "notes.txt").write_text("kept until replaced")  # an earlier output, however it was added to, is ours
    code, _, err = run_cli(capsys, "merge", cfg, "-o", out, "--force", "--no-progress")
    assert code == 0 and (out / "manifest.json").is_file() and not (out / "notes.txt").exists(), err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "empty", "--force", "--no-progress")
    assert code == 0 and (tmp_path / "empty" / "manifest.json").is_file(), err
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_caller_claims_its_own_output_from_before_markers(tmp_path):
    """The demo and the benchmarks write fixed names in their own work folders; an output there written by
    a version without markers (an HF folder: no manifest) is claimed, then replaced like any other."""
    from branchmerge.errors import BranchmergeError
    from branchmerge.io.writer import MARKER, atomic_output_dir, claim_output

    old = tmp_path / "merge-linear"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(BranchmergeError, match="did not write"):
        with atomic_output_dir(old, force=True):
            pass
    claim_output(old)
    claim_output(tmp_path / "absent")  # nothing to claim: nothing made
    assert (old / MARKER).is_file() and not (tmp_path / "absent").exists()
    with atomic_output_dir(old, force=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
    assert sorted(p.name for p in old.iterdir()) == [MARKER, "model.safetensors"]


def test_stale_temp_folders_of_dead_runs_are_removed(capsys, family, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(family["a"][0])}])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / "shard-00001.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.tmp-{os.getppid()}-keep12"  # a live process's work is left alone
    alive.mkdir()
    _merge_out(capsys, cfg, tmp_path / "out")
    assert not stale.exists() and alive.exists()


def test_sigterm_mid_merge_leaves_nothing(family, tmp_path):
    """A merge stopped by SIGTERM removes its temporary folder: no output, no debris."""
    cfg = write_config(tmp_path / "c.yaml", [{"name": n, "model": str(family[n][0])} for n in "abc"],
                       compress_rate=0.5)
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import time, pathlib
        import branchmerge.merge.branch as mb
        from branchmerge.config import load_config
        orig = mb._merge_tensor
        def slow(*a, **k):
            pathlib.Path({str(ready)!r}).touch()
            time.sleep(0.5)
            return orig(*a, **k)
        mb._merge_tensor = slow
        mb.run_branch_merge(load_config({str(cfg)!r}), {str(tmp_path / "out")!r}, progress=False)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if ready.exists() or p.poll() is not None:
            break
        __import__("time").sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "SIGTERM" in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.yaml", "ready"]


def test_outputs_get_the_users_umask(capsys, family, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(family["a"][0])}])
    old = os.umask(0o022)
    try:
        b = _merge_out(capsys, cfg, tmp_path / "out")
    finally:
        os.umask(old)
    assert b.stat().st_mode & 0o777 == 0o755
    assert next(b.glob("shard-*")).stat().st_mode & 0o777 == 0o644


# ---- 4. a bundle's code is never run ---------------------------------------------------------------
def test_remote_code_in_a_bundle_is_never_run(bundles, tmp_path, monkeypatch):
    """A bundle whose branch config and tokenizer name custom code (`auto_map`) loads with transformers'
    built-in classes; the Python file is never imported and nothing is asked on stdin."""
    d = _copy_bundle(bundles, tmp_path)
    marker = tmp_path / "pwned"
    code = f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"
    bdir = d / "branches" / "a"
    (bdir / "evil.py").write_text(code + "from transformers import LlamaConfig as EvilConfig\n"
                                  "from transformers import PreTrainedTokenizerFast as EvilTok\n")
    auto = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig",
            "AutoTokenizer": ["evil.EvilTok", "evil.EvilTok"]}
    tc = json.loads((bdir / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": auto["AutoTokenizer"]}
    (bdir / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = json.loads((bdir / "config.json").read_text())
    cfg["auto_map"] = auto
    (bdir / "config.json").write_text(json.dumps(cfg))
    _edit_manifest(d, lambda m: m["branches"]["a"]["hf_config"].update(auto_map=auto))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\ny\n"))
    b = branchmerge.load(d)
    try:
        b.generate("add 1+2=", "a", max_new_tokens=3)
    except BundleError as e:  # refusing is fine too; running the code is not
        assert "trust_remote_code" in str(e)
    assert not marker.exists()
    assert sys.stdin.read() == "y\ny\ny\n"  # nobody asked


# ---- 7. merge refuses what it could not load -------------------------------------------------------
@pytest.mark.parametrize("field,value", [("hidden_size", "32"), ("num_hidden_layers", -2), ("vocab_size", 0),
                                         ("intermediate_size", 1.5), ("num_attention_heads", True)])
def test_bad_size_fields_in_config_json(capsys, family, tmp_path, field, value):
    d = tmp_path / "m"
    shutil.copytree(family["a"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    c = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(d)}])
    code, _, err = run_cli(capsys, "merge", c, "-o", tmp_path / "out", "--no-progress")
    assert code == 1 and f"field {field} must be a positive integer, got {value!r}" in err
    assert not (tmp_path / "out").exists()


def test_config_json_that_is_a_list(capsys, family, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(family["a"][0], d)
    (d / "config.json").write_text("[1, 2]")
    c = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(d)}])
    code, _, err = run_cli(capsys, "merge", c, "-o", tmp_path / "out", "--no-progress")
    assert code == 1 and "must hold a JSON object, got a JSON list" in err and "Traceback" not in err


def test_norm_shapes_differ_within_a_group(capsys, family, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(family["b"][0], d)
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(33)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    c = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(d)}])
    code, _, err = run_cli(capsys, "merge", c, "-o", tmp_path / "out", "--no-progress")
    assert code == 1 and "model.norm.weight has shape [33]" in err and not (tmp_path / "out").exists()


def test_float16_overflow_is_an_error(capsys, family, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(family["a"][0], d)
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], 1e6)  # finite in float32
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    c = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(d)}], dtype="float16")
    code, _, err = run_cli(capsys, "merge", c, "-o", tmp_path / "out", "--no-progress")
    assert code == 1 and "model.norm.weight" in err and "float16" in err and "65504" in err
    assert not (tmp_path / "out").exists()


def test_merge_checks_that_the_bundle_loads(family, tmp_path, monkeypatch):
    """The final load check refuses a bundle that would not run, and leaves no output."""
    import branchmerge.runtime.check as check
    from branchmerge.config import load_config
    from branchmerge.merge import run_merge

    def broken(path, **_):
        raise BundleError("branch 'a' of the merged bundle fails a forward pass (boom)")

    monkeypatch.setattr(check, "check_bundle_loads", broken)
    c = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(family["a"][0])}])
    with pytest.raises(BundleError, match="fails a forward pass"):
        run_merge(load_config(c), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_merge_check_catches_config_weight_mismatch(family, tmp_path):
    """A branch whose config.json disagrees with its weights' shapes (so transformers would build another
    model) is caught by the merge-end check, before any output exists."""
    from branchmerge.config import load_config
    from branchmerge.merge import run_merge

    d = tmp_path / "m"
    shutil.copytree(family["a"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96  # weights say 64
    (d / "config.json").write_text(json.dumps(cfg))
    c = write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(d)}])
    with pytest.raises(BundleError, match="does config.json match the weights"):
        run_merge(load_config(c), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- 9. router inputs ------------------------------------------------------------------------------
def test_router_layer_out_of_range(loaded):
    from branchmerge.front import build_bundle_router
    from branchmerge.router import RouterConfig

    with pytest.raises(ConfigError, match="router `layer` 99 is out of range: the embedder has 2 layers"):
        build_bundle_router(loaded[0.9], RouterConfig(samples={"a": ["x"], "b": ["y"], "c": ["z"]}, layer=99))


def test_external_embedder_change_anywhere_is_detected(bundles, family, tmp_path):
    """The stored fingerprint of an external embedder covers all of its weights, not the first MiB."""
    from safetensors.torch import load_file, save_file

    from branchmerge.front import build_bundle_router
    from branchmerge.router import RouterConfig

    emb = tmp_path / "emb"
    shutil.copytree(family["base"][0], emb)
    d = _copy_bundle(bundles, tmp_path)
    cfg = RouterConfig(samples={"a": ["add 1+2="], "b": ["rev ab="], "c": ["key z="]}, embedder=str(emb),
                       template="{input} field of", phrase="field of")
    build_bundle_router(branchmerge.load(d), cfg)
    branchmerge.load(d)  # unchanged: loads
    sd = load_file(emb / "model.safetensors")
    last = sorted(sd)[-1]
    sd[last] = sd[last] + 1e-3  # a change in one tensor, wherever it lies in the file
    save_file(sd, emb / "model.safetensors", metadata={"format": "pt"})
    from branchmerge import front

    front._external.clear()
    with pytest.raises(BundleError, match="another embedder"):
        branchmerge.load(d)


def test_router_cuts_huge_questions(loaded):
    """A 1 MB question is cut to `max_input_chars` before embedding: same route as its beginning."""
    from branchmerge.front import embedder_factory
    from branchmerge.router import RouterConfig

    cfg = RouterConfig(samples={"a": ["x"]}, template="{input} field of", phrase="field of", max_input_chars=50)
    emb, _ = embedder_factory(loaded[0.9])(cfg)
    q = "rev abc=" * 131072
    torch.testing.assert_close(emb.embed([q]), emb.embed([q[:50]]))
