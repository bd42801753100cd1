"""A Qwen2-MoE from SmolLM2-135M-Instruct (Llama layout): two perturbed copies as routed experts, the base
as the shared expert, `hidden` gates; greedy chat answers side by side with and without `residual_scale`.

The shared expert's output adds to the routed experts' (whose weights sum to 1), so from fine-tunes of one
base each MLP gives up to twice one model's output; scaling every expert's down_proj compensates.

    python bench/moe_smollm2.py
"""

from __future__ import annotations

import time

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from _common import CACHE, perturbed_copies, smollm2_folder
from branchmerge.moe import build_moe, load_moe_config

QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is 2+2?"]


def answers(folder, tok) -> list[str]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=16, do_sample=False)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def main() -> None:
    base = smollm2_folder()
    copies = perturbed_copies(base, 2)
    tok = AutoTokenizer.from_pretrained(base)
    rows = {"dense SmolLM2": answers(base, tok)}
    for scale in (None, 0.5):
        extra = {} if scale is None else {"residual_scale": scale}
        cfg = {"base_model": str(base), "gate_mode": "hidden", "dtype": "bfloat16", "architecture": "qwen",
               "experts": [{"source_model": str(copies[0]), "positive_prompts": ["def fibonacci(n):"], **extra},
                           {"source_model": str(copies[1]), "positive_prompts": ["The patient presents with"],
                            **extra}],
               "shared_experts": [{"source_model": str(base), "positive_prompts": ["Hello", "What is it?"],
                                   **extra}]}
        path = CACHE / "smol-qmoe.yml"
        path.write_text(yaml.safe_dump(cfg))
        t = time.perf_counter()
        build_moe(load_moe_config(path), CACHE / "smol-qmoe", force=True, progress=False)
        name = f"Qwen2-MoE, residual_scale {scale}"
        print(f"{name}: built in {time.perf_counter() - t:.1f} s", flush=True)
        rows[name] = answers(CACHE / "smol-qmoe", tok)
    print("\n| model | " + " | ".join(QUESTIONS) + " |\n|---|" + "---|" * len(QUESTIONS))
    for name, got in rows.items():
        print(f"| {name} | " + " | ".join(a.replace("|", "/").replace("\n", " ") for a in got) + " |")


if __name__ == "__main__":
    main()
