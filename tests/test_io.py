"""Atomic writes: the destination holds the old content or the new, and no temp file is left behind."""

from __future__ import annotations

import os

import pytest

from tiltlm.io import atomic_write_bytes, atomic_write_text, replace_dir


def test_atomic_write_text_creates_then_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.json"
    assert atomic_write_text(path, "first\n") == path
    assert path.read_text() == "first\n"
    assert atomic_write_text(str(path), "second é\r\n") == path  # str paths too; UTF-8, newlines as given
    assert path.read_bytes() == "second é\r\n".encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_write_bytes(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"old")
    atomic_write_bytes(path, b"\x00\xffnew")
    assert path.read_bytes() == b"\x00\xffnew"
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_a_failed_write_keeps_the_old_content_and_removes_its_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def fail(src, dst):
        assert os.path.exists(src)  # the temp file was written in full
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_the_temp_file_is_hidden_beside_the_destination(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_text(tmp_path / "a.txt", "x")
    (src, dst), = seen
    assert dst == str(tmp_path / "a.txt")
    assert os.path.dirname(src) == str(tmp_path)
    name = os.path.basename(src)
    assert name.startswith(".a.txt") and name.endswith(".tmp") and str(os.getpid()) in name


def test_replace_dir_replaces_an_existing_directory(tmp_path):
    final = tmp_path / "report"
    final.mkdir()
    (final / "old.html").write_text("old")
    tmp = tmp_path / ".report-new"
    tmp.mkdir()
    (tmp / "report.html").write_text("new")
    assert replace_dir(tmp, final) == final
    assert sorted(p.name for p in final.iterdir()) == ["report.html"]
    assert (final / "report.html").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no tmp, no old copy left


def test_replace_dir_into_a_new_place(tmp_path):
    tmp = tmp_path / "policy.tmp"
    tmp.mkdir()
    (tmp / "weights").write_bytes(b"w")
    replace_dir(tmp, tmp_path / "policy")
    assert (tmp_path / "policy" / "weights").read_bytes() == b"w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_replace_dir_puts_the_old_directory_back_when_the_move_fails(tmp_path):
    final = tmp_path / "report"
    final.mkdir()
    (final / "old.html").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "never-written", final)
    assert (final / "old.html").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
