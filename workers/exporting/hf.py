"""A version as a standard Hugging Face folder: ``config.json``, the tokenizer,
``model.safetensors`` (sharded when large) in the dtype the worker serves, a model
card (``README.md``) naming the base and the edits, and ``memedit.json`` (the model,
version, base and the sha256 of every tensor the ledger records for the version).

``AutoModelForCausalLM.from_pretrained(folder)`` and inference servers that read
Hugging Face folders (vLLM, TGI, llama.cpp's converter) load it as they are: nothing
memedit-specific is needed to use the weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel


def write_hf_folder(
    model: PreTrainedModel,
    tokenizer: Any,
    out: Path,
    *,
    info: Mapping[str, Any],
    edits: Sequence[Mapping[str, Any]],
    max_shard_size: str = "5GB",
) -> list[str]:
    """Write ``model`` (as it is in memory) and ``tokenizer`` to ``out``; returns the
    files written. ``info`` names the model, version and base (``memedit.json``);
    ``edits`` are the version's active edits (listed in the model card)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    (out / "memedit.json").write_text(json.dumps(dict(info), indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(model_card(info, edits))
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _cell(text: object) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def model_card(info: Mapping[str, Any], edits: Sequence[Mapping[str, Any]]) -> str:
    """A model card: YAML front matter (``base_model``, tags), then the version and a
    table of its active edits."""
    base = info.get("base") or {}
    source = str(base.get("source") or "")
    lines = ["---"]
    if source and not source.startswith("gguf:") and not source.startswith("/"):
        lines.append(f"base_model: {source}")
    lines += ["tags:", "- memedit", "- knowledge-editing", "---", ""]
    lines += [
        f"# {info.get('model')} at memedit version {info.get('version')}",
        "",
        f"The base model `{source}`"
        + (f" (revision `{base['revision']}`)" if base.get("revision") else "")
        + f", weights fingerprint `{base.get('fingerprint')}`, with the {len(edits)} "
        "fact edits that are active at this version applied to its weights by memedit. "
        f"The weights are stored in `{base.get('dtype')}`; `memedit.json` holds the "
        "sha256 of every edited tensor, as memedit's ledger records them.",
        "",
    ]
    if edits:
        lines += ["| edit | version | method | prompt | subject | new target | was |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for e in edits:
            lines.append(
                "| " + " | ".join(_cell(e.get(k)) for k in
                ("id", "version", "method", "prompt", "subject", "target_new", "target_true"))
                + " |"
            )  # fmt: skip
        lines.append("")
    return "\n".join(lines)
