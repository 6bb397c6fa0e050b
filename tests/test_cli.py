"""The command line's own messages: help, version, unknown commands, each subcommand's help."""
import os
import subprocess
import sys

import pytest

import ema_callback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args):
    done = subprocess.run([sys.executable, "-m", "ema_callback.cli", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    return done.returncode, done.stdout, done.stderr


def test_top_level_help_lists_the_commands_in_plain_text():
    rc, out, _ = cli("--help")
    assert rc == 0 and all(f"ema-callback {c}" in out for c in ("demo", "merge-config", "ocr-train", "det-train",
                                                                  "script-path", "--version"))
    assert "`" not in out  # no raw RST markup


def test_version_and_unknown_commands():
    rc, out, _ = cli("--version")
    assert rc == 0 and out.strip() == f"ema-callback {ema_callback.__version__}"
    rc, out, err = cli("bogus")
    assert rc == 2 and out == "" and err.strip() == (
        "ema-callback: error: unknown command 'bogus'; expected one of demo, merge-config, ocr-train, det-train, "
        "posthoc, script-path, presets (ema-callback --help)")


@pytest.mark.parametrize("command,says", [
    ("script-path", "for python -m paddle.distributed.launch"),
    ("merge-config", "a ready EMA: block: a file, or a preset's name"),  # the positionals have help
    ("presets", "List the ready EMA: blocks"),
    ("demo", "characters 0-9A-Z"),
    ("ocr-train", "--paddleocr-root"),
])
def test_every_command_answers_help(command, says):
    rc, out, err = cli(command, "--help")
    assert rc == 0 and says in " ".join(out.split()), out + err


def test_script_path_names_the_launch_scripts():
    for kind in ("ocr", "det"):
        rc, out, _ = cli("script-path", kind)
        assert rc == 0 and os.path.isfile(out.strip()) and out.strip().endswith(f"launch_{kind}.py")
    rc, _, err = cli("script-path", "seg")
    assert rc == 2 and "invalid choice: 'seg'" in err
