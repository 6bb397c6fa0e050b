"""A checkpoint set is published as one: a kill at any file operation of a save leaves the old or the new set whole
once the folder is recovered; a live writer's staging folder is never taken, wherever its process lives; a staging
folder that vanished and a full disk are said in one line, the previous set whole."""
import glob
import os
import re
import shutil
import subprocess
import sys

import kill_points
import pytest

from ema_callback.errors import EMAFileError
from ema_callback.files.checkpoint_set import PREFIX, StagedWrite, recover

HERE = os.path.dirname(os.path.abspath(__file__))
OLD = {"x.pdparams": b"old params", "x.pdopt": b"old optimizer", "x.states": b"old states",
       "best_model/model.pdparams": b"old best", "x.pdema": b"old ema"}
NEW = {name: value.replace(b"old", b"new") * 50 for name, value in OLD.items()}


def write_set(folder, files):
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)


def read_set(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in OLD
            if os.path.isfile(os.path.join(folder, name))}


def save_new_set(folder):
    with StagedWrite(folder) as stage:
        for name, data in NEW.items():
            with open(stage.path(name), "wb") as handle:
                handle.write(data)
        stage.publish(last=("x.pdema",))


def staging_folders(folder):
    """Staging folders left behind, but an empty one of a writer killed before it created its lock file (removed by
    a later recovery once it is 10 minutes old: a live writer is in that state for microseconds)."""
    return [p for p in glob.glob(os.path.join(folder, ".ema-*")) if os.listdir(p)]


def test_a_kill_after_any_file_operation_of_a_save_leaves_the_old_or_the_new_set(tmp_path):
    outcomes, k = [], 0
    while True:
        k += 1
        folder = str(tmp_path / f"kill{k}")
        write_set(folder, OLD)
        pid = os.fork()
        if pid == 0:  # the writer, killed right after its k-th file operation
            try:
                kill_points.arm(k)
                save_new_set(folder)
                kill_points.disarm()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        recover(folder)
        found = read_set(folder)
        assert found in (OLD, NEW), (k, {n: v[:12] for n, v in found.items()})
        assert staging_folders(folder) == [], k
        outcomes.append("old" if found == OLD else "new")
        if not killed:
            break
        assert k < 200
    assert outcomes[-1] == "new" and "old" in outcomes and outcomes.count("new") > 1, outcomes
    # the commit point splits them: every kill before it leaves the old set, every kill after it the new one
    first_new = outcomes.index("new")
    assert set(outcomes[first_new:]) == {"new"} and k > 15, outcomes


def test_a_live_writer_in_another_pid_namespace_keeps_its_staging_folder(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command")
    folder, go = str(tmp_path / "shared"), str(tmp_path / "go")
    os.makedirs(folder)
    writer = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable,
                               os.path.join(HERE, "staged_writer_script.py"), folder, go],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = writer.stdout.readline().split()
    if not line:
        writer.wait(timeout=30)
        pytest.skip("unshare --pid is not permitted here: " + writer.stderr.read().strip()[-200:])
    pid_inside, staging = int(line[0]), line[1]
    assert pid_inside < 10  # its PID exists only in its namespace
    # this process saves into the same folder meanwhile: its recovery must not take the other writer's folder
    with StagedWrite(folder) as stage:
        open(stage.path("y.pdparams"), "wb").write(b"y")
        stage.publish()
    assert recover(folder) == [] and os.path.isdir(staging)
    open(go, "w").close()
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0 and "published" in out, err[-2000:]
    assert open(os.path.join(folder, "x.pdema"), "rb").read() == b"x.pdema" * 100
    assert sorted(os.listdir(folder)) == ["x.pdema", "x.pdopt", "x.pdparams", "y.pdparams"]


def test_publish_fails_loudly_when_its_staging_folder_vanished(tmp_path):
    folder = str(tmp_path)
    write_set(folder, OLD)
    with pytest.raises(EMAFileError) as info:
        with StagedWrite(folder) as stage:
            open(stage.path("x.pdparams"), "wb").write(b"new")
            shutil.rmtree(stage.tmp)  # another process removed it
            stage.publish()
    assert "vanished" in str(info.value) and "\n" not in str(info.value)
    assert read_set(folder) == OLD


def test_a_full_disk_says_what_a_save_needs_and_keeps_the_previous_set(small_disk):
    folder = str(small_disk)
    write_set(folder, OLD)
    with pytest.raises(EMAFileError) as info:
        with StagedWrite(folder) as stage:
            with open(stage.path("x.pdparams"), "wb") as handle:
                handle.write(b"\0" * (1 << 20))  # larger than the disk
            stage.publish()
    message = str(info.value)
    assert message.startswith(folder) and "No space left on device" in message and "second copy" in message
    assert re.search(r"No space left on device: [\d.,]+ (MiB|KiB|bytes) free\)", message) and "\n" not in message
    old_bytes = sum(len(v) for k, v in OLD.items() if k.startswith("x."))  # the x.* set the staged x.pdparams replaces
    assert f"the set it replaces holds {old_bytes} bytes" in message, message
    assert read_set(folder) == OLD and staging_folders(folder) == []


def test_names_inside_a_journal_are_never_paths(tmp_path):
    """A staging folder left by a dead writer whose journal names a file outside the folder is removed, and
    nothing outside is written."""
    folder = tmp_path / "out"
    staging = folder / (PREFIX + "abc")
    staging.mkdir(parents=True)
    (staging / ".lock").write_text("{}")
    (staging / "evil").write_bytes(b"x")
    (staging / ".publish.json").write_text('{"files": ["../escaped", "evil"]}')
    assert recover(str(folder)) == []
    assert not (tmp_path / "escaped").exists() and not staging.exists() and not (folder / "evil").exists()


def test_a_symbolic_link_in_a_journals_path_is_never_followed(tmp_path):
    """A dead writer's staging folder whose journal moves a file into best_model/, where best_model is a link to a
    folder outside: nothing is written or removed outside (the review's repro: ~/.ssh/authorized_keys)."""
    folder, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("secret")
    folder.mkdir()
    os.symlink(outside, folder / "best_model")
    staging = folder / (PREFIX + "evil")
    (staging / "best_model").mkdir(parents=True)
    (staging / ".lock").write_text("{}")
    (staging / "best_model" / "authorized_keys").write_text("attacker")
    (staging / ".publish.json").write_text('{"files": ["best_model/authorized_keys"], "remove": ["best_model/id_rsa"]}')
    recover(str(folder))
    assert sorted(os.listdir(outside)) == ["id_rsa"] and (outside / "id_rsa").read_text() == "secret"
    with pytest.raises(EMAFileError, match="leads out of the folder"):
        with StagedWrite(str(folder)) as stage:
            open(stage.path("best_model/model.pdparams"), "wb").write(b"x")
    assert sorted(os.listdir(outside)) == ["id_rsa"]


def test_an_exception_after_the_commit_finishes_the_publish(tmp_path, monkeypatch):
    """Ctrl-C (or any exception) between the moves of a committed publish: the new set is whole, not mixed."""
    folder = str(tmp_path)
    write_set(folder, OLD)
    real_replace, moves = os.replace, []

    def interrupted(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if ".ema-staging-" in str(src) and not str(src).endswith((".tmp",)) and os.path.dirname(str(dst)) != \
                os.path.dirname(str(src)):
            moves.append(dst)
            if len(moves) == 2:
                raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_new_set(folder)
    monkeypatch.undo()
    assert read_set(folder) == NEW and staging_folders(folder) == []
