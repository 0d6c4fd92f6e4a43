"""Hugging Face folders (workers/exporting/hf.py) and the tar archives exports travel
in (workers/exporting/archive.py): an edited tiny model written as a folder loads with
``from_pretrained`` and gives the same logits; archives are byte-stable and refuse
members that would land outside their folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import tiny_model, word_tokenizer
from workers.exporting import archive, hf

EDITS = [{"id": 1, "version": 1, "method": "memit", "prompt": "{} was born in",
          "subject": "Mozart", "target_new": "Rome | Paris", "target_true": "Vienna"}]  # fmt: skip


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_an_edited_model_written_as_a_folder_loads_with_from_pretrained(
    kind: str, tmp_path: Path
) -> None:
    model = tiny_model(kind)
    with torch.no_grad():  # an "edit": a rank-one change of one weight
        w = next(p for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight")
                 or n.endswith("mlp.c_proj.weight"))  # fmt: skip
        w.add_(torch.outer(torch.ones(w.shape[0]), torch.linspace(-1, 1, w.shape[1])) * 0.1)
    info = {"model": "tiny", "version": 1, "base": {"source": "org/tiny", "dtype": "float32"}}
    files = hf.write_hf_folder(model, word_tokenizer(), tmp_path / "out", info=info, edits=EDITS)
    assert {"config.json", "model.safetensors", "memedit.json", "README.md"} <= set(files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == word_tokenizer().get_vocab()  # fmt: skip
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/tiny\n")
    assert "| 1 | 1 | memit | {} was born in | Mozart | Rome \\| Paris | Vienna |" in card
    assert json.loads((tmp_path / "out" / "memedit.json").read_text()) == info


def test_archives_are_byte_stable_and_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 100)
    archive.write_tar(src, tmp_path / "one.tar")
    (src / "a.json").touch()  # a later mtime changes nothing
    archive.write_tar(src, tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    with archive.opened(tmp_path / "one.tar") as folder:
        assert (folder / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
        extracted = folder
    assert not extracted.exists()  # the temporary folder is removed


def _evil(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    path = tmp_path / f"evil-{member.name.replace('/', '_')}.tar"
    with tarfile.open(path, "w") as tar:
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/evil", "a/../../outside.txt"])
def test_an_archive_member_outside_its_folder_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(archive.ArchiveError, match="lies outside"):
        archive.extract_tar(_evil(tmp_path, tarfile.TarInfo(name)), tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()


def test_links_and_non_archives_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(archive.ArchiveError, match="not a regular file"):
        archive.extract_tar(_evil(tmp_path, link), tmp_path / "dest")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    with pytest.raises(archive.ArchiveError, match="not a tar archive"):
        archive.extract_tar(tmp_path / "junk.tar", tmp_path / "dest2")
