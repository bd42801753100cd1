"""End-to-end merge on tiny Llama folders: fidelity at r=0 and r=1, dedupe, manifest, export."""

import json

import torch
from transformers import AutoModelForCausalLM

from branchmerge.compress import frobenius_scale, normalize
from branchmerge.config import load_config
from branchmerge.export import export_branch, summarize
from branchmerge.io.bundle import BundleReader, key_shared
from branchmerge.merge import run_merge


def _merge(cfg_path, out):
    run_merge(load_config(cfg_path), out, progress=False)
    return out


def test_r0_reproduces_every_branch(family, family_config, tmp_path):
    bundle = _merge(family_config(0.0), tmp_path / "b0")
    x = torch.randint(0, 64, (2, 12))
    for name in "abc":
        src_path, src = family[name]
        out = export_branch(bundle, name, tmp_path / f"exp-{name}", progress=False)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        exp_sd, src_sd = model.state_dict(), src.state_dict()
        for k, v in src_sd.items():
            rel = (exp_sd[k] - v).norm() / v.norm()
            assert rel < 1e-5, (name, k, float(rel))
        with torch.no_grad():
            assert torch.allclose(model(x).logits, src(x).logits, atol=1e-4)


def test_r1_is_scaled_normalized_average(family, family_config, tmp_path):
    bundle = _merge(family_config(1.0), tmp_path / "b1")
    name = "layers.0.self_attn.q_proj.weight"
    ws = [family[n][1].state_dict()[f"model.{name}"] for n in "abc"]
    mean = sum(normalize(w, frobenius_scale(w)) for w in ws) / 3
    exp = dict(BundleReader(bundle).iter_branch_tensors("b"))
    assert torch.allclose(exp[f"model.{name}"], frobenius_scale(ws[1]) * mean, atol=1e-6)
    m = json.loads((bundle / "manifest.json").read_text())
    rec = m["tensors"]["main"][f"model.{name}"]
    assert rec["rank"] == 0
    assert not any(k.endswith("|U") or k.endswith("|delta") for k in m["weight_map"])


def test_error_falls_monotonically_as_rate_falls(family, family_config, tmp_path):
    errs = []
    for r in (1.0, 0.9, 0.7, 0.5, 0.0):
        s = summarize(_merge(family_config(r), tmp_path / f"m{r}"))
        errs.append(s["groups"]["main"]["mean_rel_error"]["a"])
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6


def test_bytes_shrink_with_rate(family, family_config, tmp_path):
    small = summarize(_merge(family_config(0.95), tmp_path / "s"))
    big = summarize(_merge(family_config(0.5), tmp_path / "l"))
    assert small["bundle_bytes"] < big["bundle_bytes"]
    assert small["bundle_bytes"] < small["input_bytes"]


def test_identical_tensors_stored_once(family, tmp_path):
    from tests.conftest import make_finetune, write_config

    base_path, base = family["base"]
    # a fine-tune that leaves the norms and embeddings alone: those must be deduplicated
    make_finetune(base, tmp_path / "x", seed=7, touch_norms=False)
    cfg = write_config(tmp_path / "c.yaml", [{"name": "base", "model": str(base_path)}, {"name": "x", "model": str(tmp_path / "x")}], compress_rate=0.5)
    # embeddings differ in make_finetune; norms do not
    bundle = _merge(cfg, tmp_path / "bundle")
    m = json.loads((bundle / "manifest.json").read_text())
    recs = m["tensors"]["main"]
    assert recs["model.norm.weight"]["role"] == "shared"
    assert key_shared("main", "model.norm.weight") in m["weight_map"]
    assert recs["model.embed_tokens.weight"]["role"] == "per_branch"
    assert recs["model.layers.0.mlp.up_proj.weight"]["role"] == "compressed"


def test_overrides_and_manifest_contents(family, family_config, tmp_path):
    cfg = family_config(0.9, compress_overrides=[{"pattern": "*.mlp.*", "compress_rate": 0.0}])
    bundle = _merge(cfg, tmp_path / "o")
    m = json.loads((bundle / "manifest.json").read_text())
    recs = m["tensors"]["main"]
    assert recs["model.layers.1.mlp.down_proj.weight"]["dense"] is True
    assert recs["model.layers.1.self_attn.o_proj.weight"]["rank"] == round(0.1 * 32)
    assert m["format_version"] == 1 and m["config"]["compress_rate"] == 0.9
    assert set(m["branches"]) == {"a", "b", "c"}
    assert m["branches"]["a"]["hf_config"]["hidden_size"] == 32
    assert (bundle / "branches" / "a" / "config.json").is_file()
    assert (bundle / "merge_config.yaml").is_file()
    assert all(len(v) == 64 for v in m["shards"].values())


def test_sharding_respects_limit(family, family_config, tmp_path):
    bundle = _merge(family_config(0.5, max_shard_bytes=20_000), tmp_path / "sh")
    m = json.loads((bundle / "manifest.json").read_text())
    assert len(m["shards"]) > 3
    out = export_branch(bundle, "c", tmp_path / "exp", progress=False, max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").is_file()
    sharded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    whole = AutoModelForCausalLM.from_pretrained(export_branch(bundle, "c", tmp_path / "one", progress=False)).state_dict()
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)


def test_standalone_branch_kept_whole(family, tmp_path):
    from tests.conftest import make_tiny_llama, write_config

    other = tmp_path / "other"
    ref = make_tiny_llama(other, seed=5, hidden=48)
    cfg = write_config(
        tmp_path / "c.yaml",
        [{"name": "a", "model": str(family["a"][0])}, {"name": "b", "model": str(family["b"][0])},
         {"name": "big", "model": str(other), "standalone": True}],
        compress_rate=0.9,
    )
    bundle = _merge(cfg, tmp_path / "bundle")
    s = summarize(bundle)
    assert s["groups"]["big"]["standalone"] and s["groups"]["big"]["compressed"] == 0
    exp = dict(BundleReader(bundle).iter_branch_tensors("big"))
    for k, v in ref.state_dict().items():
        assert torch.equal(exp[k], v), k


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _blocks(card: str, lang: str) -> list[str]:
    return [b.split("```")[0] for b in card.split(f"```{lang}\n")[1:]]


def test_a_bundle_has_a_model_card_whose_example_runs(bundles, family):
    """README.md, as mergekit writes one: front matter naming the input models, a row per branch, the
    config (which parses back to merge_config.yaml), and a Python example that runs as printed."""
    import subprocess
    import sys

    import yaml

    folder = bundles[0.9]
    card = (folder / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "branchmerge" and meta["base_model"] == [str(family[n][0]) for n in "abc"]
    rows = [ln for ln in card.splitlines() if ln.startswith("| ") and " | g" not in ln]
    for n in "abc":
        assert any(ln.startswith(f"| {n} | ") and str(family[n][0]) in ln for ln in rows), n
    assert yaml.safe_load(_blocks(card, "yaml")[0]) == yaml.safe_load((folder / "merge_config.yaml").read_text())
    assert f"{summarize(folder)['bundle_bytes'] / 1e6:,.1f} MB" in card
    code = _blocks(card, "python")[0]
    done = subprocess.run([sys.executable, "-c", code], cwd=folder.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]


def test_no_model_card_and_a_baseline_merge_card(family, tmp_path):
    from tests.conftest import write_config

    pipe = tmp_path / "we|ird\nname"  # a path Markdown would read as table structure
    pipe.mkdir()
    import shutil

    shutil.copytree(family["b"][0], pipe / "b")
    cfg = load_config(write_config(tmp_path / "c.yaml", [{"name": "a", "model": str(family["a"][0])},
                                                         {"name": "b", "model": str(pipe / "b")}], compress_rate=0.9))
    run_merge(cfg, tmp_path / "none", progress=False, model_card=False)
    assert not (tmp_path / "none" / "README.md").exists() and (tmp_path / "none" / "manifest.json").exists()
    run_merge(cfg, tmp_path / "card", progress=False)
    card = (tmp_path / "card" / "README.md").read_text()
    assert _front_matter(card)["base_model"][1] == str(pipe / "b")  # YAML keeps it exact
    row = next(ln for ln in card.splitlines() if ln.startswith("| b | "))
    assert row.count(" | ") == 4 and "we\\|ird name" in row  # escaped: still five cells on one line
    data = cfg.model_dump(mode="json")
    linear = load_config(write_config(tmp_path / "l.yaml", data["branches"], method="linear"))
    run_merge(linear, tmp_path / "lin", progress=False)
    card = (tmp_path / "lin" / "README.md").read_text()
    assert _front_matter(card)["tags"] == ["branchmerge", "merge", "linear"] and "`linear` method" in card
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lin") is not None  # the card does not get in the way
