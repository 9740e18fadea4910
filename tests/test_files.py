"""deltainf._files: atomic writes, run-folder markers, stale temporary files and the tensor-file hash."""
from __future__ import annotations

import json
import os

import pytest
import torch

import file_damage
from deltainf import _files


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "r.json"
    _files.write_json(path, {"a": 1})
    _files.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and os.listdir(tmp_path) == ["r.json"]
    _files.write_text(tmp_path / "R.md", "# table\n")
    assert (tmp_path / "R.md").read_text() == "# table\n"


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with _files.atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("disk on fire")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
    with pytest.raises(TypeError):  # json cannot encode it: found mid-write, after the file was opened
        _files.write_json(path, {"a": object()})
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]
    with pytest.raises(KeyboardInterrupt):
        with _files.atomic_path(path) as tmp:
            tmp.write_text("new")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_atomic_write_needs_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _files.write_text(tmp_path / "no" / "x.txt", "x")


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: a report is as readable as any file the user writes."""
    path = tmp_path / "r.json"
    _files.write_json(path, {})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    names = [".report.json.0a1b2c3d.tmp", ".scores-x81kq.npy", "poison.safetensors.tmp", ".ekfac-abc.tmp",
             "cell.json.tmp"]
    keep = ["report.json", "notes.tmp", ".hidden", ".report.json.xyz.tmp", "data.npy", "draft.md.tmp", "my.json.tmp"]
    for n in names + keep:
        (tmp_path / n).write_text("x")
    assert sorted(_files.remove_stale_temps(tmp_path)) == sorted(names)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert _files.remove_stale_temps(tmp_path / "absent") == []


def test_a_write_removes_the_temporaries_of_its_own_file_only(tmp_path):
    (tmp_path / ".a.json.00000000.tmp").write_text("killed")
    (tmp_path / ".b.json.00000000.tmp").write_text("someone else's")
    (tmp_path / ".a.json.x.00000000.tmp").write_text("of a.json.x")
    _files.write_json(tmp_path / "a.json", 1)
    assert sorted(os.listdir(tmp_path)) == [".a.json.x.00000000.tmp", ".b.json.00000000.tmp", "a.json"]


def test_a_tensor_write_killed_inside_safetensors_leaves_nothing_unknown(tmp_path, monkeypatch):
    """safetensors writes through a ".tmpXXXXXX" file of its own beside its target; killed there, that file stayed
    in the folder for good (a checkpoint folder was then never removed). It now writes inside a folder named after
    deltainf's own temporary, which the next write of the file, and every cleaner, removes."""
    import safetensors.torch

    _files.write_tensors(tmp_path / "a.safetensors", {"t": torch.arange(4.0)})
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]

    def killed(tensors, filename, metadata=None):
        open(os.path.join(os.path.dirname(filename), ".tmpQ1w2E3"), "wb").close()  # what safetensors had begun
        raise KeyboardInterrupt  # stands for the kill: nothing after it runs in a killed process

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    monkeypatch.setattr(_files, "discard", lambda tmp: None)  # a killed process removes nothing
    with pytest.raises(KeyboardInterrupt):
        _files.write_tensors(tmp_path / "b.safetensors", {"t": torch.arange(4.0)})
    monkeypatch.undo()
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 3 and [n for n in left if n.endswith(".tmp.d")], left
    _files.write_tensors(tmp_path / "b.safetensors", {"t": torch.arange(4.0)})  # the rerun's write
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]


def test_run_folder_is_complete_only_at_its_end(tmp_path):
    out = tmp_path / "run"
    with _files.run_folder(out, "demo", seed=3) as record:
        assert _files.run_status(out)["status"] == "running"
        record["files"] = ["report.json"]
    status = _files.run_status(out)
    assert status["status"] == "complete" and status["seed"] == 3 and status["files"] == ["report.json"]
    assert status["command"] == "demo" and "started_utc" in status and "finished_utc" in status
    with pytest.raises(ValueError):
        with _files.run_folder(out, "demo", seed=4):
            raise ValueError("bad dataset\nsecond line")
    status = _files.run_status(out)
    assert status["status"] == "failed" and status["seed"] == 4 and status["error"] == "ValueError: bad dataset"
    with pytest.raises(KeyboardInterrupt):
        with _files.run_folder(out, "demo"):
            raise KeyboardInterrupt
    assert _files.run_status(out)["status"] == "interrupted"
    (out / ".report.json.deadbeef.tmp").write_text("x")
    _files.mark_running(out, "demo")  # a rerun starts: what a killed run left is removed
    assert sorted(os.listdir(out)) == ["run.json"] and _files.run_status(out)["status"] == "running"
    (out / "run.json").write_text("{trunc")
    assert _files.run_status(out) is None and _files.run_status(tmp_path / "nowhere") is None


def test_a_stop_between_run_json_and_the_run_still_marks_it(tmp_path, monkeypatch):
    """A SIGTERM that came just after run.json was written, before the run's block began, left the folder marked
    running (once in 50 runs of the CLI's SIGTERM test). A stop before the mark leaves the folder as the last run
    left it; a stop after the completion leaves it complete."""
    out = tmp_path / "run"
    marks = {"running": _files.mark_running, "complete": _files.mark_complete}

    def then_stopped(mark):
        def marked(*args, **kwargs):
            marks[mark](*args, **kwargs)
            raise KeyboardInterrupt  # the signal, at the first line after the write

        return marked

    monkeypatch.setattr(_files, "mark_running", then_stopped("running"))
    with pytest.raises(KeyboardInterrupt):
        with _files.run_folder(out, "demo"):
            pass
    assert _files.run_status(out)["status"] == "interrupted"
    monkeypatch.setattr(_files, "mark_running", marks["running"])
    monkeypatch.setattr(_files, "mark_complete", then_stopped("complete"))
    with pytest.raises(KeyboardInterrupt):
        with _files.run_folder(out, "demo", seed=5):
            pass
    assert _files.run_status(out)["status"] == "complete" and _files.run_status(out)["seed"] == 5

    def stopped_before_writing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_files, "mark_running", stopped_before_writing)
    with pytest.raises(KeyboardInterrupt):
        with _files.run_folder(out, "demo", seed=6):
            pass
    assert _files.run_status(out)["status"] == "complete" and _files.run_status(out)["seed"] == 5


def test_tensor_digest_covers_names_dtypes_shapes_bytes_and_metadata():
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([True, False])}
    base = _files.tensor_digest(t, {"k": "v"})
    assert base == _files.tensor_digest({"b": t["b"], "a": t["a"].T.contiguous().T}, {"k": "v"})  # order, strides
    assert base == _files.tensor_digest(t, {"k": "v", _files.DIGEST_KEY: "anything"})
    variants = [{**t, "c": t["a"]}, {"c": t["a"], "b": t["b"]}, {**t, "a": t["a"].double()},
                {**t, "a": t["a"].reshape(3, 2)}, {**t, "a": t["a"] + 1}, {**t, "b": t["b"].to(torch.uint8)}]
    for v in variants:
        assert _files.tensor_digest(v, {"k": "v"}) != base
    assert _files.tensor_digest(t, {"k": "w"}) != base and _files.tensor_digest(t) != base
    bf = torch.ones(3, dtype=torch.bfloat16)
    assert _files.tensor_digest({"x": bf}) != _files.tensor_digest({"x": bf * 2})
    assert _files.tensor_digest({"x": torch.zeros(0, 4)}) != _files.tensor_digest({"x": torch.zeros(4, 0)})


def test_tensor_files_check_themselves(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"w": torch.randn(8, 8), "i": torch.arange(5)}
    _files.write_tensors(path, tensors, {"note": "x"})
    got, meta = _files.read_tensors(path, "test file")
    assert torch.equal(got["w"], tensors["w"]) and meta["note"] == "x" and _files.DIGEST_KEY in meta
    text = tmp_path / "t.json"
    _files.write_text(text, "{}")
    assert path.stat().st_mode & 0o777 == text.stat().st_mode & 0o777  # as readable as the run's other files
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(path.read_bytes())
    file_damage.flip_bit(flipped, 8 * file_damage.header_span(path)[1] + 5)
    with pytest.raises(ValueError, match=r"^test file '.*flipped.safetensors': its content does not match its "
                                         r"recorded hash"):
        _files.read_tensors(flipped, "test file")
    unchecked = _files.read_tensors(flipped, "test file", verify=False)[0]
    assert sum(not torch.equal(unchecked[k], tensors[k]) for k in tensors) == 1
    edited = file_damage.rewrite(path, tmp_path / "edited.safetensors", metadata={"note": "y"}, rehash=False)
    with pytest.raises(ValueError, match="does not match its recorded hash"):
        _files.read_tensors(edited, "test file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated.safetensors'?: not a readable safetensors file"):
        _files.read_tensors(truncated, "test file")
    with pytest.raises(FileNotFoundError, match="test file '.*absent.safetensors': no such file"):
        _files.read_tensors(tmp_path / "absent.safetensors", "test file")
    unhashed = file_damage.rewrite(path, tmp_path / "unhashed.safetensors", drop=[_files.DIGEST_KEY])
    _files.read_tensors(unhashed, "test file")  # a user's own file: read as it is
    with pytest.raises(ValueError, match="unhashed.safetensors'?: no content hash"):
        _files.require_digest(_files.read_tensors(unhashed, "test file")[1], "test file", unhashed)


def test_output_folder_is_checked_before_anything_is_created(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b"
    assert _files.output_folder(out) == out and not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="--out: '.*f' exists and is not a folder"):
        _files.output_folder(tmp_path / "f")
    with pytest.raises(ValueError, match="--out: expected a folder path, got ''"):
        _files.output_folder("")
    with pytest.raises(ValueError, match="--out: '.*f/run' cannot be written"):
        _files.output_folder(tmp_path / "f" / "run")  # under a file
    if os.path.isdir("/proc"):  # access() says yes to root, the folder cannot be made all the same
        with pytest.raises(ValueError, match="--out: '/proc/deltainf-run' cannot be written"):
            _files.output_folder("/proc/deltainf-run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the folder made to try is gone
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (root can write anywhere)
    with pytest.raises(ValueError, match=f"--run-dir: '{out}' cannot be written \\('{tmp_path}' is not a writable"):
        _files.output_folder(out, "--run-dir")


def test_output_folder_refuses_a_folder_where_the_run_writes_a_file(tmp_path):
    (tmp_path / "flagged.json").mkdir()
    assert _files.output_folder(tmp_path, files=("report.json",)) == tmp_path
    with pytest.raises(ValueError, match="--out: '.*flagged.json' is a folder, where the run writes its flagged.json"):
        _files.output_folder(tmp_path, files=("report.json", "flagged.json"))
    (tmp_path / "flagged.json").rmdir()
    (tmp_path / "flagged.json").write_text("{}")  # an earlier run's file is the run's to replace
    assert _files.output_folder(tmp_path, files=("flagged.json",)) == tmp_path


def test_output_file_is_checked_before_anything_is_written(tmp_path, monkeypatch):
    assert _files.output_file(tmp_path / "s.npy", "out") == str(tmp_path / "s.npy")
    with pytest.raises(FileNotFoundError, match="score_file: directory .* does not exist"):
        _files.output_file(tmp_path / "missing" / "s.npy", "score_file")
    (tmp_path / "x.npy").mkdir()
    with pytest.raises(ValueError, match="score_file: '.*x.npy' is a folder, not a file"):
        _files.output_file(tmp_path / "x.npy", "score_file")
    # what is there and is no regular file would be replaced by the atomic write (deltainf bench --out /dev/full
    # made the device a JSON file; a link was replaced, its target left as it was)
    (tmp_path / "target.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    for there in (tmp_path / "link.json", "/dev/null"):
        with pytest.raises(ValueError, match="--out: '.*' exists and is not a regular file"):
            _files.output_file(there, "--out")
    with pytest.raises(ValueError, match="--out: expected a file path, got ''"):
        _files.output_file("", "--out")
    # a folder to be made: the nearest existing one must be writable
    assert _files.output_file(tmp_path / "new" / "deeper" / "b.json", "--out", make_folder=True)
    assert not (tmp_path / "new").exists()
    if os.path.isdir("/proc"):
        with pytest.raises(ValueError, match="--out: '/proc/b.json' cannot be written"):
            _files.output_file("/proc/b.json", "--out")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="path: '.*f.safetensors' cannot be written"):
        _files.output_file(tmp_path / "f.safetensors", "path")


def test_a_temporary_file_held_by_its_writer_is_not_stale(tmp_path):
    """A run starting beside a long score pass writing the same file removed the pass's live temporary file as an
    orphan (the pass then failed at its end with "no such file"): a held temporary file is left alone."""
    from deltainf._files import hold, temp_beside

    live = temp_beside(tmp_path / "s.npy")
    fd = hold(live)
    other = temp_beside(tmp_path / "s.npy")
    assert live.exists() and other.exists()
    os.close(fd)
    temp_beside(tmp_path / "s.npy")
    assert not live.exists() and not other.exists()  # orphans once nobody holds them


def test_a_filesystem_without_locks_holds_nothing(tmp_path, monkeypatch):
    """flock failing with ENOLCK (a network filesystem without locks) ended every score pass with an OSError."""
    import errno

    from deltainf._files import hold, temp_beside

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_files.fcntl, "flock", no_locks)
    live = temp_beside(tmp_path / "s.npy")
    assert hold(live) is None
    temp_beside(tmp_path / "s.npy")
    assert not live.exists()  # unheld: an orphan, as before there were locks



def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError ("Error while serializing: IoError(...)"), naming
    neither the file nor an OS error: a checkpoint partition failed so, after the work of the partition."""
    import safetensors.torch as st
    from safetensors import SafetensorError

    def no_space(tensors, filename, metadata=None):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(st, "save_file", no_space)
    path = tmp_path / "part.safetensors"
    with pytest.raises(OSError, match=f"^'{path}' could not be written \\(Error while serializing.*No space left"):
        _files.write_tensors(path, {"a": torch.zeros(3)})
    assert os.listdir(tmp_path) == []


def test_a_torch_save_file_is_named_as_such(tmp_path):
    """A checkpoint written with torch.save was refused as "header too large", with no word of what to do."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a readable safetensors file .*; it is a torch.save file: save the state "
                                         "dict with safetensors.torch.save_file"):
        _files.read_tensors(path, "checkpoint")
