"""Specification of where and how dynarank writes an adapter directory (save_adapter, export_peft, and the CLI's
export through them): readable like any folder, written through a symbolic link, never over the working directory."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import dynarank
from dynarank import DynaRankConfig
from tiny_models import randomize_adapters, tiny_bert, token_batch


def _adapted(r=3, seed=0):
    model = dynarank.attach(tiny_bert(), DynaRankConfig(target_modules=["query", "value"], r=r))
    randomize_adapters(model, seed=seed, scale=0.2)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _tree(root) -> dict[str, bytes | None]:
    """Every entry under ``root`` (links not followed) with a file's bytes: what a refused write must leave alone."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in root.rglob("*")
    }


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_an_adapter_directory_gets_the_permissions_an_ordinary_mkdir_gets_under_the_umask(tmp_path, umask):
    """A server running as another user reads the adapter: the directories were private (0700), as the temporary
    directory they are renamed from was made."""
    model = _adapted()
    previous = os.umask(umask)
    try:
        (tmp_path / "made-by-mkdir").mkdir()
        written = [
            dynarank.save_adapter(model, tmp_path / "native"),
            dynarank.save_adapter(model, tmp_path / "native"),  # a replacement too
            dynarank.export_peft(model, tmp_path / "peft"),
            dynarank.export_peft(model, tmp_path / "served", server_safe=True),
        ]
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "made-by-mkdir") == 0o777 & ~umask
    for directory in written:
        assert _mode(directory) == 0o777 & ~umask, directory
        for file in directory.iterdir():
            assert _mode(file) == 0o666 & ~umask, file


@pytest.mark.parametrize("write", ["save_adapter", "export_peft"])
def test_writing_to_a_symbolic_link_replaces_the_directory_it_points_to_and_keeps_the_link(tmp_path, write):
    """Saving over a link to an adapter raised 'Cannot call rmtree on a symbolic link' with the new adapter already
    in place of the link, the directory it pointed to unchanged and a '.link.<random>.old' link left behind."""
    ids, first, second = token_batch(), _adapted(seed=0), _adapted(r=2, seed=1)
    (tmp_path / "store").mkdir()
    (tmp_path / "links").mkdir()
    target = getattr(dynarank, write)(first, tmp_path / "store" / "v1")
    link = tmp_path / "links" / "current"
    link.symlink_to(os.path.join("..", "store", "v1"), target_is_directory=True)
    assert getattr(dynarank, write)(second, link) == link
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "store", "v1")  # the same link
    assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["current"]  # nothing left over
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["v1"]
    if write == "save_adapter":
        loaded = dynarank.load_adapter(tiny_bert(), target)
    else:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(tiny_bert(), str(target)).eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(second, ids), atol=1e-5, rtol=0)


def test_a_symbolic_link_to_a_directory_not_written_yet_is_written_through(tmp_path):
    link = tmp_path / "current"
    link.symlink_to("v1", target_is_directory=True)
    dynarank.save_adapter(_adapted(), link)
    assert link.is_symlink() and (tmp_path / "v1" / "dynarank_adapter.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]


@pytest.mark.parametrize("where", [".", "..", "the absolute path"])
@pytest.mark.parametrize("write", ["save_adapter", "export_peft"])
def test_the_working_directory_or_a_folder_that_holds_it_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, where, write
):
    """Writing to '.' failed with a raw 'Device or resource busy' (a directory is replaced by renaming it aside, which
    the working directory cannot be: by its absolute path it would be moved away and deleted under the process)."""
    model = _adapted()
    work = tmp_path / "runs" / "adapter"
    dynarank.export_peft(model, work)  # an adapter dynarank wrote: a place it would replace
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    target = str(work) if where == "the absolute path" else where
    with pytest.raises(ValueError, match="is the working directory .* or holds it: .* write to a new directory"):
        getattr(dynarank, write)(model, target)
    assert _tree(tmp_path) == before and os.getcwd() == str(work)


@pytest.mark.parametrize("write", ["save_adapter", "export_peft"])
def test_a_file_where_the_directory_is_due_is_refused_and_kept(tmp_path, write):
    (tmp_path / "adapter").write_text("the user's file")
    with pytest.raises(FileExistsError, match="adapter is a file, not a directory"):
        getattr(dynarank, write)(_adapted(), tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "the user's file"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
