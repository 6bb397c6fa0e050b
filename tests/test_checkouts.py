"""A fresh machine without ../shared: `make checkouts` clones the pinned suites, or says which tests will skip."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None,
                                reason="needs git and make")


def git(*args, cwd=None):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))


def bare_repo(tmp_path, name, files):
    """A local bare repository with two commits; returns (url, sha of the first, which the pin names)."""
    work = tmp_path / f"{name}-work"
    work.mkdir()
    git("init", "-q", cwd=work)
    for path in files:
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text("# first\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "pinned", cwd=work)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
    (work / files[0]).write_text("# later\n")
    git("commit", "-q", "-am", "later", cwd=work)
    bare = tmp_path / f"{name}.git"
    git("clone", "-q", "--bare", str(work), str(bare))
    return f"file://{bare}", sha


def make(tmp_path, *variables):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PADDLEOCR_ROOT", "PADDLEDET_ROOT", "PADDLECLAS_ROOT", "MAKEFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", "--no-print-directory", "-C", REPO, "checkouts", "skipped-suites",
                           f"SHARED_THIRD_PARTY={tmp_path}/no-shared", f"CHECKOUT_CACHE={tmp_path}/cache",
                           f"PADDLECLAS_GIT=file://{tmp_path}/no-paddleclas.git", *variables],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_make_fetches_the_pinned_commits_and_says_what_it_could_not(tmp_path):
    ocr_url, ocr_sha = bare_repo(tmp_path, "ocr", ["tools/train.py", "tools/program.py", "ppocr/__init__.py"])
    out = make(tmp_path, f"PADDLEOCR_GIT={ocr_url}", f"PADDLEOCR_COMMIT={ocr_sha[:12]}",
               f"PADDLEDET_GIT=file://{tmp_path}/missing.git", "PADDLEDET_COMMIT=0123456789ab")
    clone = tmp_path / "cache" / "PaddleOCR"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    assert head == ocr_sha and (clone / "tools" / "train.py").read_text() == "# first\n"  # the pin, not the tip
    assert f"make: could not fetch PaddleDetection from file://{tmp_path}/missing.git at 0123456789ab" in out
    assert not (tmp_path / "cache" / "PaddleDetection").exists()
    assert out.strip().splitlines()[-1].startswith(
        "make test: the PaddleDetection end-to-end tests were SKIPPED: no checkout at "
        f"{tmp_path}/cache/PaddleDetection; set PADDLEDET_ROOT=")
    assert "PaddleOCR end-to-end tests were SKIPPED" not in out
    # a second run finds the checkout and fetches nothing
    again = make(tmp_path, f"PADDLEOCR_GIT={ocr_url}", f"PADDLEOCR_COMMIT={ocr_sha[:12]}",
                 f"PADDLEDET_GIT=file://{tmp_path}/missing.git")
    assert "fetching PaddleOCR" not in again


def test_a_root_set_by_the_user_is_never_written_to(tmp_path):
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    out = make(tmp_path, f"PADDLEOCR_ROOT={mine}", f"PADDLEDET_ROOT={mine}", f"PADDLECLAS_ROOT={mine}",
               f"PADDLEOCR_GIT=file://{tmp_path}/x.git")
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(os.listdir(mine)) == ["notes.txt"]
    assert "fetching" not in out and f"no checkout at {mine}" in out
