"""A bundle is input: one edited after it was written, with its shard checksums recomputed so that the
sha256 check passes, gets a clear error naming what is wrong, at load, not a traceback or a hang later."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import branchmerge
from branchmerge.errors import BundleError, ConfigError
from branchmerge.runtime.bundle import load
from tests.cli_util import run_cli

DOWN = "model.layers.0.mlp.down_proj.weight"  # [32, 64] in the tiny family; rank 3 at r=0.9


def _copy(bundles, tmp_path) -> Path:
    d = tmp_path / "bundle"
    shutil.copytree(bundles[0.9], d)
    return d


def _edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _edit_shards(d: Path, fn) -> None:
    """Apply ``fn`` to the tensors of every shard, then record the new checksums, as an attacker would."""
    digests = {}
    for p in sorted(d.glob("shard-*.safetensors")):
        t = load_file(p)
        fn(t)
        save_file(t, p, metadata={"format": "pt"})
        digests[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    _edit_manifest(d, lambda m: m["shards"].update(digests))


def _set(key: str, value_of):
    def fn(t: dict) -> None:
        if key in t:
            t[key] = value_of(t[key])
    return fn


def _drop(key: str):
    return lambda t: t.pop(key, None)


@pytest.mark.parametrize("edit,message", [
    (_set(f"b.a|{DOWN}|U", lambda u: u[:, :-1].contiguous()), rf"b\.a\|{DOWN}\|U has shape \[32, 2\]; its manifest "
                                                               r"record implies \[32, 3\]"),
    (_set(f"b.b|{DOWN}|V", lambda v: v[:, :-5].contiguous()), r"\|V has shape \[3, 59\]; its manifest record implies "
                                                              r"\[3, 64\]"),
    (_set(f"g.main|{DOWN}|mean", lambda w: w.T.contiguous()), r"\|mean has shape \[64, 32\]"),
    (_set(f"g.main|{DOWN}|scales", lambda s: s[:2].clone()), r"\|scales has shape \[2\]; its manifest record implies "
                                                             r"\[3\]"),
    (_set(f"g.main|{DOWN}|scales", lambda s: s.long()), r"\|scales is stored as I64; a floating-point type"),
    (_set(f"b.c|{DOWN}|U", lambda u: (u * 100).to(torch.int32)), r"\|U is stored as I32"),
    (_set("b.a|model.embed_tokens.weight", lambda e: e[:10].contiguous()), r"embed_tokens\.weight has shape "
                                                                           r"\[10, 32\]"),
    (_drop(f"b.a|{DOWN}|U"), r"has no tensor b\.a\|.*\|U \(the weight map names it\)"),
    (_set(f"g.main|{DOWN}|mean", lambda w: w.index_fill(1, torch.tensor([0, 5]), float("nan"))),
     r"mean holds 64 non-finite value\(s\) \(NaN or Inf\)"),
    (_set("b.b|lm_head.weight", lambda w: w.index_fill(0, torch.tensor([3]), float("inf"))),
     r"b\.b\|lm_head\.weight holds 32 non-finite"),
])
def test_tensors_that_disagree_with_the_manifest(bundles, tmp_path, edit, message):
    d = _copy(bundles, tmp_path)
    _edit_shards(d, edit)
    with pytest.raises(BundleError, match=message):
        load(d)


def test_a_tampered_tensor_is_named_by_the_cli(capsys, bundles, tmp_path):
    d = _copy(bundles, tmp_path)
    _edit_shards(d, _set(f"b.a|{DOWN}|U", lambda u: u[:, :-1].contiguous()))
    code, _, err = run_cli(capsys, "generate", d, "add 1+2=", "--branch", "a", "-n", "2")
    assert code == 1 and "Traceback" not in err
    assert f"b.a|{DOWN}|U has shape [32, 2]" in err


def test_a_shard_header_that_overflows(bundles, tmp_path):
    """A header whose shape overflows the buffer size: safetensors' own error, named with the shard."""
    d = _copy(bundles, tmp_path)
    p = next(d.glob("shard-*.safetensors"))
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[f"b.a|{DOWN}|U"]["shape"] = [1 << 40, 1 << 22]
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    _edit_manifest(d, lambda m: m["shards"].update({p.name: hashlib.sha256(p.read_bytes()).hexdigest()}))
    with pytest.raises(BundleError, match=rf"shard {p.name} cannot be read"):
        load(d)


@pytest.mark.parametrize("field,value,message", [
    ("rank", 10**9, r"`rank` 1000000000 does not fit a 2-D tensor of shape \[32, 64\]"),
    ("shape", [-1, 64], r"`shape` \[-1, 64\] has a dimension below 1"),
])
def test_tensor_records_that_cannot_be(bundles, tmp_path, field, value, message):
    d = _copy(bundles, tmp_path)
    _edit_manifest(d, lambda m: m["tensors"]["main"][DOWN].__setitem__(field, value))
    with pytest.raises(BundleError, match=message):
        load(d)


def test_a_config_with_more_layers_than_the_bundle_stores(bundles, tmp_path):
    """Refused before a skeleton is built: 10⁵ empty layers would take minutes to make."""
    d = _copy(bundles, tmp_path)
    _edit_manifest(d, lambda m: m["branches"]["a"]["hf_config"].__setitem__("num_hidden_layers", 100_000))
    with pytest.raises(BundleError, match=r"`num_hidden_layers` is 100000, but the bundle stores tensors for 2 layers"):
        load(d)


def test_a_config_its_class_rejects(bundles, tmp_path):
    d = _copy(bundles, tmp_path)
    _edit_manifest(d, lambda m: m["branches"]["a"]["hf_config"].__setitem__("num_attention_heads", 3))
    with pytest.raises(BundleError, match=r"branch 'a': its config is invalid: .*not a multiple of the number of "
                                          r"attention heads \(3\)"):
        load(d)


@pytest.mark.parametrize("where", ["file", "folder"])
def test_symbolic_links_in_a_branch_folder(bundles, tmp_path, where):
    """A branch's tokenizer read through a link could come from anywhere on the machine."""
    d = _copy(bundles, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(d / "branches" / "a", outside)
    if where == "file":
        (d / "branches" / "a" / "tokenizer.json").unlink()
        os.symlink(outside / "tokenizer.json", d / "branches" / "a" / "tokenizer.json")
        link = d / "branches" / "a" / "tokenizer.json"
    else:
        shutil.rmtree(d / "branches" / "a")
        os.symlink(outside, d / "branches" / "a")
        link = d / "branches" / "a"
    with pytest.raises(BundleError, match=f"{link} is a symbolic link"):
        load(d).tokenizer("a")


def test_a_chat_template_that_reaches_for_python_internals(bundles, tmp_path):
    """transformers renders chat templates in jinja's sandbox; what it refuses is a clear error naming the
    branch, which the server answers with a 400, not a traceback."""
    d = _copy(bundles, tmp_path)
    p = d / "branches" / "a" / "tokenizer_config.json"
    tc = json.loads(p.read_text())
    tc["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    p.write_text(json.dumps(tc))
    b = load(d)
    with pytest.raises(ConfigError, match=r"the chat template of branch 'a' refused these messages \(SecurityError"):
        b.encode_messages([{"role": "user", "content": "hi"}], "a")


def test_a_branch_config_that_breaks_the_tokenizer_loader(bundles, tmp_path):
    """AutoTokenizer reads the branch's config.json too; a config whose validator divides by zero was a
    ZeroDivisionError traceback (a 500 in the server), now it is the bundle's error naming the branch."""
    d = _copy(bundles, tmp_path)
    p = d / "branches" / "a" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["num_attention_heads"] = 0
    p.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"branch 'a': the tokenizer in .* cannot be loaded .*ZeroDivisionError"):
        load(d).tokenizer("a")


def _with_router(bundles, tmp_path) -> Path:
    from branchmerge.front import build_bundle_router
    from branchmerge.router import RouterConfig

    d = _copy(bundles, tmp_path)
    cfg = RouterConfig(samples={"a": ["add 1+2="], "b": ["rev ab="], "c": ["key z="]},
                       template="{input} field of", phrase="field of")
    build_bundle_router(branchmerge.load(d), cfg)
    return d


@pytest.mark.parametrize("edit,message", [
    (lambda e: e.index_fill(0, torch.tensor([0]), float("nan")), "must be finite floating-point values"),
    (lambda e: e[:, :3].contiguous(), "holds 3-wide embeddings; its embedder's hidden states are 32 wide"),
])
def test_router_samples_that_cannot_be_scored(bundles, tmp_path, edit, message):
    """A NaN sample used to win every route (NaN sorts first); a narrower one failed on the first question."""
    d = _with_router(bundles, tmp_path)
    p = d / "router" / "samples.safetensors"
    t = load_file(p)
    t["embeddings"] = edit(t["embeddings"])
    save_file(t, p)
    with pytest.raises(BundleError, match=message):
        branchmerge.load(d)


def test_an_error_during_generation_ends_the_cli(capsys, bundles, monkeypatch):
    """A failure in the generating thread (out of memory, a kernel error) ends `generate` with the error;
    the stream it was feeding used to wait for ever."""
    from branchmerge.runtime.bundle import Bundle

    real = Bundle.generate_ids

    def fails_midway(self, ids_list, names, *, streamer=None, **kw):
        kw["max_new_tokens"] = 1
        real(self, ids_list, names, streamer=None, **kw)  # one real step, then the device gives out
        streamer.put(torch.tensor([[5]]))
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Bundle, "generate_ids", fails_midway)
    raised: list[BaseException] = []

    def cli() -> None:
        try:
            run_cli(capsys, "generate", bundles[0.9], "add 1+2=", "--branch", "a", "-n", "4")
        except BaseException as e:  # noqa: BLE001 - checked below
            raised.append(e)

    t = threading.Thread(target=cli, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "generate hung after its worker failed"
    assert len(raised) == 1 and "simulated" in str(raised[0])
