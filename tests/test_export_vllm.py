"""export-vllm: a shared base plus PEFT LoRA adapters per branch (loaded back with PEFT), or dense folders."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from branchmerge.errors import BranchmergeError
from branchmerge.export_vllm import export_vllm, vllm_rank
from branchmerge.io.bundle import BundleReader
from tests.cli_util import run_cli

IDS = torch.tensor([[1, 5, 9, 14, 3, 22, 7, 30], [1, 7, 7, 30, 12, 4, 9, 2]])


def _peft(out, branch):
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    return PeftModel.from_pretrained(base, out / "adapters" / branch).eval()


@pytest.fixture(scope="module")
def exported(bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    out = {}
    for pb in ("mean", "lora"):
        out[pb] = (root / pb, export_vllm(bundles[0.9], root / pb, per_branch=pb, dtype="float32", progress=False))
    return out


@pytest.mark.parametrize("per_branch", ["mean", "lora"])
def test_lora_export_loads_with_peft_within_the_reported_error(exported, loaded, per_branch):
    out, report = exported[per_branch]
    g = report["groups"]["main"]
    assert set(g["branches"]) == {"a", "b", "c"} and g["max_lora_rank"] in (1, 8, 16, 32, 64, 128)
    reader = BundleReader(loaded[0.9].path)
    for b in "abc":
        model = _peft(out, b)
        with torch.no_grad():
            got = model(input_ids=IDS).logits
        want = loaded[0.9].logits(IDS, [b, b])
        logit_err = float((got - want).norm() / want.norm())
        rep = g["branches"][b]
        assert logit_err < max(5 * rep["max_rel_weight_error"], 1e-3), (b, logit_err, rep["max_rel_weight_error"])
        merged = model.merge_and_unload().state_dict()
        dense = dict(reader.iter_branch_tensors(b))
        for t, err in rep["tensors"].items():  # what PEFT builds is what the report measured
            rel = float((merged[t] - dense[t]).norm() / dense[t].norm())
            assert rel == pytest.approx(err, abs=1e-4), t
        cfg = json.loads((out / "adapters" / b / "adapter_config.json").read_text())
        assert cfg["rank_pattern"] == cfg["alpha_pattern"] and cfg["r"] == cfg["lora_alpha"]


def test_per_branch_lora_beats_averaging_the_embeddings(exported):
    mean, lora = exported["mean"][1]["groups"]["main"], exported["lora"][1]["groups"]["main"]
    emb = "model.embed_tokens.weight"
    for b in "abc":
        assert lora["branches"][b]["base_tensors"][emb] < 0.1 * mean["branches"][b]["base_tensors"][emb]
    keys = load_file(str(exported["lora"][0] / "adapters" / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys and "base_model.model.lm_head.lora_A.weight" in keys


def test_refactor_beats_ignoring_the_scales(bundles, exported, tmp_path):
    ign = export_vllm(bundles[0.9], tmp_path / "ign", scale="ignore", dtype="float32", progress=False)
    ref = exported["mean"][1]
    for b in "abc":
        a, r = ign["groups"]["main"]["branches"][b], ref["groups"]["main"]["branches"][b]
        assert r["max_rel_error_lora_tensors"] <= a["max_rel_error_lora_tensors"] + 1e-6


def test_dense_export_equals_each_branch(bundles, tmp_path):
    rep = export_vllm(bundles[0.9], tmp_path / "d", mode="dense", dtype="float32", progress=False)
    reader = BundleReader(bundles[0.9])
    for b in "abc":
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "d" / b, dtype=torch.float32).state_dict()
        for t, w in reader.iter_branch_tensors(b):
            assert torch.equal(got[t], w.float()), (b, t)
    assert len(rep["launch"]) == 3 and all("--served-model-name" in x for x in rep["launch"])


def test_launch_line_and_gateway_config(exported, capsys, bundles, tmp_path):
    out, report = exported["mean"]
    script = (out / "serve_vllm.sh").read_text()
    assert "vllm serve" in script and "--enable-lora" in script and "--lora-modules" in script
    assert f"a={out / 'adapters' / 'a'}" in script and "--max-lora-rank" in script
    gw = yaml.safe_load((out / "gateway.yaml").read_text())
    assert set(gw["branches"]) == {"a", "b", "c"} and gw["upstreams"]["main"]["base_url"].endswith("/v1")
    code, stdout, _ = run_cli(capsys, "export-vllm", bundles[0.9], "-o", tmp_path / "x", "--no-progress")
    assert code == 0 and "LoRA rank" in stdout and "vllm serve" in stdout


def test_bad_export_requests(bundles, tmp_path):
    with pytest.raises(BranchmergeError, match="per-branch tensor"):
        export_vllm(bundles[0.9], tmp_path / "r", per_branch="refuse", progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(BranchmergeError, match="--mode"):
        export_vllm(bundles[0.9], tmp_path / "m", mode="sparse", progress=False)
    assert vllm_rank(5) == 8 and vllm_rank(300) == 320
    with pytest.raises(BranchmergeError, match="largest --max-lora-rank"):
        vllm_rank(600)
    with pytest.raises(BranchmergeError, match="would destroy the input"):
        export_vllm(bundles[0.9], bundles[0.9].parent, progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(BranchmergeError, match="exists"):
        export_vllm(bundles[0.9], tmp_path / "taken", progress=False)


def test_launch_paths_are_absolute_from_a_relative_output(bundles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel_bundle = os.path.relpath(bundles[0.9], tmp_path)  # a relative bundle path, too
    rep = export_vllm(rel_bundle, "rel_out", dtype="float32", progress=False)
    assert f"--lora-modules a={tmp_path.resolve() / 'rel_out' / 'adapters' / 'a'}" in rep["launch"][0]
    gw = yaml.safe_load((tmp_path / "rel_out" / "gateway.yaml").read_text())
    assert gw["router"] == str(bundles[0.9].resolve())
