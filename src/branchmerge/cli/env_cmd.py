"""`branchmerge env`: what a bug report needs (vLLM's ``collect_env``): versions of branchmerge, Python and the
packages it works with, torch's devices, and the machine's cores and memory."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from importlib.util import find_spec
from typing import Any

import typer

PACKAGES = ("torch", "transformers", "safetensors", "tokenizers", "accelerate", "peft", "triton", "fastapi",
            "uvicorn", "pydantic", "openai", "anthropic", "lm_eval", "vllm", "mergekit", "gguf", "numpy")
DISTRIBUTIONS = {"lm_eval": "lm-eval"}  # import name → distribution name, where they differ


def _version(name: str) -> str | None:
    try:
        return metadata.version(DISTRIBUTIONS.get(name, name))
    except metadata.PackageNotFoundError:
        return None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def collect() -> dict[str, Any]:
    """The report as a dict (packages not installed are ``None``; torch is imported, nothing else)."""
    import torch

    from branchmerge import __version__

    devices = [{"name": torch.cuda.get_device_name(i), "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
               for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "branchmerge": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                  "devices": devices, "threads": torch.get_num_threads()},
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "packages": {p: _version(p) if find_spec(p) is not None else None for p in PACKAGES},
    }


def env_cmd(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """Print versions, devices and the machine's size, to paste into a bug report."""
    rep = collect()
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    t = rep["torch"]
    gpus = ", ".join(f"{d['name']} ({d['memory_bytes'] / 2**30:.0f} GiB)" for d in t["devices"]) or "none"
    mem = f"{rep['memory_bytes'] / 2**30:.1f} GiB" if rep["memory_bytes"] else "unknown"
    lines = [f"branchmerge {rep['branchmerge']}", f"python {rep['python']} on {rep['platform']}",
             f"cpus {rep['cpu_count']}, memory {mem}",
             f"torch {t['version']} (CUDA {t['cuda'] or 'none'}; GPUs: {gpus}; {t['threads']} threads)"]
    width = max(len(p) for p in rep["packages"])
    lines += [f"  {p:<{width}}  {v or 'not installed'}" for p, v in rep["packages"].items()]
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    app.command("env")(env_cmd)
