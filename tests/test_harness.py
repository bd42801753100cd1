"""The in-process lm-evaluation-harness backend against lm_eval's own `hf` backend on a local task."""

from __future__ import annotations

import json

import pytest

from tests.cli_util import run_cli

QUESTIONS = [("add 1+2=", ["3", "4", "12"], 0), ("rev abc=", ["cba", "abc"], 0), ("add 5+5=", ["10", "55"], 0),
             ("key zz=", ["ab", "zz", "x"], 1), (" dup ab=", ["aabb", "ab "], 0)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (d / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "gen.jsonl").write_text("\n".join(json.dumps({"question": q, "answer": c[a]}) for q, c, a in QUESTIONS) + "\n")
    (d / "text.jsonl").write_text("\n".join(json.dumps({"text": q * 3}) for q, _, _ in QUESTIONS) + "\n")
    common = "dataset_path: json\ntest_split: train\n"
    (d / "bm_mc.yaml").write_text(
        f"task: bm_mc\n{common}dataset_kwargs:\n  data_files: {d / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    (d / "bm_gen.yaml").write_text(
        f"task: bm_gen\n{common}dataset_kwargs:\n  data_files: {d / 'gen.jsonl'}\noutput_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['=']\n  max_gen_toks: 5\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (d / "bm_ppl.yaml").write_text(
        f"task: bm_ppl\n{common}dataset_kwargs:\n  data_files: {d / 'text.jsonl'}\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    return d


def _evaluate(model: str, model_args: str, tasks_dir, names: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import branchmerge.harness  # noqa: F401  (registers the backend)

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                   bootstrap_iters=0)  # (local tasks only: lm_eval's own index takes seconds)


def _resps(res: dict, task: str) -> list:
    return [s["resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_branch_equals_hf_backend(bundles, family, tasks):
    """An r=0 branch under `branchmerge` scores every item as lm_eval's `hf` backend scores the original:
    per-choice loglikelihoods within 1e-4, the same greedy flags, accuracy, generations and rolling
    loglikelihoods."""
    names = ["bm_mc", "bm_gen", "bm_ppl"]
    ours = _evaluate("branchmerge", f"bundle={bundles[0.0]},branch=b,batch_size=3", tasks, names)
    hf = _evaluate("hf", f"pretrained={family['b'][0]},dtype=float32,device=cpu", tasks, names)
    for a, b in zip(_resps(ours, "bm_mc"), _resps(hf, "bm_mc")):
        assert len(a) == len(b)
        for (lp1, g1), (lp2, g2) in ((x[0], y[0]) for x, y in zip(a, b)):
            assert lp1 == pytest.approx(lp2, abs=1e-4) and g1 == g2
    assert ours["results"]["bm_mc"]["acc,none"] == hf["results"]["bm_mc"]["acc,none"]
    assert _resps(ours, "bm_gen") == _resps(hf, "bm_gen")
    for a, b in zip(_resps(ours, "bm_ppl"), _resps(hf, "bm_ppl")):
        assert a[0][0] == pytest.approx(b[0][0], abs=1e-4)


def test_plain_folder_and_auto(bundles, family, tasks, tmp_path):
    import shutil

    import branchmerge
    from branchmerge.front import build_bundle_router
    from branchmerge.router import RouterConfig

    plain = _evaluate("branchmerge", f"pretrained={family['a'][0]}", tasks, ["bm_mc"])
    hf = _evaluate("hf", f"pretrained={family['a'][0]},dtype=float32,device=cpu", tasks, ["bm_mc"])
    assert [x[0][0] for r in _resps(plain, "bm_mc") for x in r] == pytest.approx(
        [x[0][0] for r in _resps(hf, "bm_mc") for x in r], abs=1e-4)
    d = tmp_path / "bundle"
    shutil.copytree(bundles[0.0], d)
    build_bundle_router(branchmerge.load(d), RouterConfig(
        samples={"a": ["add 1+2=", "add 5+5="], "b": ["rev abc=", "rev hello="], "c": ["key zz=", "key ab="]},
        template="{input} field of", phrase="field of"))
    auto = _evaluate("branchmerge", f"bundle={d},branch=auto", tasks, ["bm_mc"])
    b = branchmerge.load(d)
    for (q, choices, _), resp in zip(QUESTIONS, _resps(auto, "bm_mc")):
        branch = b.router.route([q])[0]  # lm_eval's context is the question
        tok = b.tokenizer(branch)
        for c, r in zip(choices, resp):
            ctx = q.rstrip()
            cont = q[len(ctx):] + " " + c  # lm_eval's target_delimiter; trailing context spaces move here
            ci = tok.encode(ctx)
            xi = tok.encode(ctx + cont)[len(ci):]
            want = sum(b.token_logprobs(ci + xi, branch).logprobs[-len(xi):])
            assert r[0][0] == pytest.approx(want, abs=1e-4)


def test_cli_wrapper_and_bad_input(capsys, bundles, tasks, tmp_path):
    out = tmp_path / "res"
    code, stdout, err = run_cli(capsys, "lm-eval", bundles[0.9], "--branch", "a", "--", "--tasks", "bm_mc",
                                "--include_path", str(tasks), "--output_path", str(out))
    assert code == 0, err
    files = list(out.rglob("results*.json"))
    assert files and "bm_mc" in json.loads(files[0].read_text())["results"]
    code, _, err = run_cli(capsys, "lm-eval", bundles[0.9], "--branch", "zz", "--", "--tasks", "bm_mc",
                           "--include_path", str(tasks))
    assert code != 0 and "unknown branch 'zz'" in err
    code, _, err = run_cli(capsys, "lm-eval", bundles[0.9], "--", "--model", "hf", "--tasks", "bm_mc")
    assert code == 1 and "sets --model" in err
    code, _, err = run_cli(capsys, "lm-eval", bundles[0.9], "--branch", "a", "--", "--tasks", "bm_mc_typo",
                           "--include_path", str(tasks))
    assert code == 1 and "error: lm_eval: Tasks not found: bm_mc_typo" in err and "Traceback" not in err


def test_batched_generation_equals_one_at_a_time(bundles):
    from lm_eval.api.instance import Instance

    from branchmerge.harness import BranchmergeLM

    reqs = [Instance("generate_until", {}, (q, {"until": u, "max_gen_toks": m}), i)
            for i, (q, u, m) in enumerate([("add 1+2=", ["3"], 6), ("rev hello=", ["l"], 8), ("key zz=", [], 4),
                                           ("add 12+30=", ["\n"], 7), ("rev abcdefgh=", ["zz"], 9)])]
    batched = BranchmergeLM(bundle=str(bundles[0.9]), branch="a", batch_size=4).generate_until(reqs, disable_tqdm=True)
    alone = BranchmergeLM(bundle=str(bundles[0.9]), branch="a", batch_size=1).generate_until(reqs, disable_tqdm=True)
    assert batched == alone and any(batched)
