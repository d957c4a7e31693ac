"""edge_memdec.files: the one atomic writer, its stale-temp sweep and its one error sentence."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from edge_memdec.errors import UserError
from edge_memdec.files import (
    atomic_dir,
    atomic_path,
    output_folder,
    remove_stale_temps,
    write_json_atomic,
    write_npy_atomic,
    write_npz_atomic,
)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_writes_appear_whole_and_leave_no_temp(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_npy_atomic(tmp_path / "b.npy", np.arange(3))
    write_npz_atomic(tmp_path / "c.npz", v=np.ones(2))
    assert (tmp_path / "a.json").read_text() == '{\n "x": 1\n}\n'
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "c.npz")["v"], np.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npy", "c.npz"]


def test_a_failed_write_is_one_sentence_and_keeps_the_earlier_file(tmp_path):
    out = tmp_path / "out.bin"
    out.write_text("earlier")
    with pytest.raises(UserError, match=r"^writing .*out.bin failed \(No space left on device\); check the free"):
        with atomic_path(out) as temp:
            temp.write_text("half")
            raise OSError(28, "No space left on device")
    assert out.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_ctrl_c_removes_the_temp(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "out.bin") as temp:
            temp.write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_of_dead_processes_go_and_live_ones_stay(tmp_path):
    dead, live = dead_pid(), os.getpid()
    (tmp_path / f".keys-00001.npy.{dead}.part").write_text("stale")
    (tmp_path / f".m.gguf.{dead}.part.f32").write_text("stale")
    (tmp_path / f".keys-00002.npy.{live}.part").write_text("live")
    (tmp_path / f".hf.{dead}.part").mkdir()
    remove_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f".keys-00002.npy.{live}.part"]


def test_an_output_folder_is_made_swept_or_refused_in_one_sentence(tmp_path):
    folder = output_folder(tmp_path / "a" / "datastore", "datastore")
    (folder / f".keys-00001.npy.{dead_pid()}.part").write_text("stale")
    (folder / "keys-00000.npy").write_text("kept")
    assert output_folder(folder, "datastore") == folder and [p.name for p in folder.iterdir()] == ["keys-00000.npy"]
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=r"^cannot create the targets folder .*file.targets \(.+\)$"):
        output_folder(tmp_path / "file" / "targets", "targets")


def test_atomic_dir_swaps_the_folder_in(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with atomic_dir(folder) as temp:
        temp.mkdir()
        (temp / "new.txt").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
