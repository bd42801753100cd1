"""GGUF → Hugging Face safetensors folder, through transformers' own GGUF loader (dequantized)."""

from __future__ import annotations

import logging
from pathlib import Path

from branchmerge.common import resolve_dtype
from branchmerge.errors import ModelInputError
from branchmerge.io.writer import atomic_output_dir

logger = logging.getLogger(__name__)


def import_gguf(gguf_file: str | Path, out: str | Path, *, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Dequantize a GGUF model into an HF folder (config.json, model.safetensors, tokenizer).

    A GGUF-loaded model carries a ``quantization_config``; the model is rebuilt from its config
    without it before ``save_pretrained``, so the folder loads as an ordinary model.

    Raises:
        ModelInputError: the file is missing or not a GGUF model transformers can read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    resolve_dtype(dtype)  # a bad dtype fails before the (slow) load
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ModelInputError(f"GGUF file {gguf_file} does not exist")
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelInputError(f"{gguf_file} is not a GGUF file (bad magic bytes)")
    folder, fname = str(gguf_file.parent), gguf_file.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32,
                                                      trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable files
        raise ModelInputError(f"could not load GGUF {gguf_file}: {e}") from None
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype), trust_remote_code=False)
    model.load_state_dict(loaded.state_dict())
    with atomic_output_dir(out, force=force, inputs=[gguf_file]) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    logger.debug("imported %s into %s", gguf_file, out)
    return Path(out)
