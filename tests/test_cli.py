"""The command line's own messages: help, version, unknown commands, each subcommand's help."""
import os
import subprocess
import sys

import pytest
import yaml
from conftest import PADDLEDET_ROOT, PADDLEOCR_ROOT, needs_paddledet, needs_paddleocr

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
        "cls-train, posthoc, script-path, presets (ema-callback --help)")


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


# ---------------------------------------------------------------- issue 25: an EMA: block in the wrong place
@needs_paddleocr
def test_ocr_train_refuses_an_ema_section_under_global_at_start_up(tmp_path):
    """It used to train to the end with 'EMA: off for this run (no EMA: section ...)'."""
    cfg = yaml.safe_load(open(os.path.join(REPO, "configs", "paddleocr", "tiny_rec_ctc.yml")))
    cfg["Global"]["EMA"] = cfg.pop("EMA")
    path = tmp_path / "nested.yml"
    path.write_text(yaml.safe_dump(cfg))
    rc, _, err = cli("ocr-train", "-c", str(path), "--paddleocr-root", PADDLEOCR_ROOT,
                     "-o", f"Global.save_model_dir={tmp_path}/out/")
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"ema-callback: error: {path}: Global.EMA: not read; the EMA: section belongs at the top level of the file, "
        "not under Global")
    assert not (tmp_path / "out").exists()


@needs_paddledet
def test_det_train_refuses_an_ema_section_under_trainreader_at_start_up(tmp_path):
    """It used to run ppdet's own flat keys (use_ema: true in the _BASE_) and say nothing of the block."""
    path = tmp_path / "nested.yml"
    path.write_text(f"_BASE_: ['{PADDLEDET_ROOT}/configs/picodet/picodet_xs_320_coco_lcnet.yml']\n"
                    "TrainReader:\n  batch_size: 4\n  EMA:\n    decay: 0.9\n")
    rc, _, err = cli("det-train", "-c", str(path), "--paddledet-root", PADDLEDET_ROOT)
    assert rc == 2 and err.strip().splitlines()[-1] == (
        f"ema-callback: error: {path}: TrainReader.EMA: not read; the EMA: section belongs at the top level of the "
        "file, not under TrainReader")


# ---------------------------------------------------------------- issue 25: one rule for finding a suite checkout
def test_posthoc_sweep_with_both_suite_roots_says_give_one(tmp_path):
    rc, _, err = cli("posthoc", "sweep", "--snapshots", str(tmp_path), "--sigma-rel", "0.1", "--out", str(tmp_path),
                     "--paddleocr-root", str(tmp_path), "--paddledet-root", str(tmp_path), "-c", "cfg.yml")
    assert rc == 2 and err.strip().splitlines() == [
        "ema-callback: error: posthoc sweep: --paddleocr-root and --paddledet-root both given; give one: the suite "
        "whose tools/eval.py evaluates"]


@needs_paddleocr
@needs_paddledet
def test_every_command_finds_the_checkout_by_flag_then_environment_then_working_directory(tmp_path, monkeypatch):
    from ema_callback.errors import CheckoutError
    from ema_callback.integrations.suite_checkout import PADDLEDET, PADDLEOCR, checkout_for_one_of, find_checkout

    for name in ("PADDLEOCR_ROOT", "PADDLEDET_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(PADDLEOCR_ROOT)
    assert find_checkout(PADDLEOCR, None) == os.path.realpath(PADDLEOCR_ROOT)  # the working directory
    assert checkout_for_one_of((None, None), "posthoc sweep") == (PADDLEOCR, os.path.realpath(PADDLEOCR_ROOT))
    monkeypatch.setenv("PADDLEDET_ROOT", PADDLEDET_ROOT)  # the environment before the working directory
    assert checkout_for_one_of((None, None), "posthoc sweep") == (PADDLEDET, os.path.abspath(PADDLEDET_ROOT))
    monkeypatch.setenv("PADDLEOCR_ROOT", str(tmp_path))  # the flag before the environment
    assert find_checkout(PADDLEOCR, PADDLEOCR_ROOT) == os.path.abspath(PADDLEOCR_ROOT)
    with pytest.raises(CheckoutError, match=rf"^\$PADDLEOCR_ROOT {tmp_path}: not a PaddleOCR checkout \(missing"):
        find_checkout(PADDLEOCR, None)
    with pytest.raises(CheckoutError, match=r"^posthoc sweep: \$PADDLEOCR_ROOT and \$PADDLEDET_ROOT are both set; "
                                            r"give --paddleocr-root or --paddledet-root"):
        checkout_for_one_of((None, None), "posthoc sweep")
    monkeypatch.chdir(PADDLEDET_ROOT)
    monkeypatch.delenv("PADDLEOCR_ROOT")
    monkeypatch.delenv("PADDLEDET_ROOT")
    assert find_checkout(PADDLEDET, None) == os.path.realpath(PADDLEDET_ROOT)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckoutError, match=rf"^--paddleocr-root / \$PADDLEOCR_ROOT: not set, and the working "
                                            rf"directory {tmp_path} is not a PaddleOCR checkout"):
        find_checkout(PADDLEOCR, None)


@needs_paddleocr
def test_ocr_train_from_inside_a_checkout_needs_no_root_option(tmp_path):
    """It used to stop at '--paddleocr-root / $PADDLEOCR_ROOT: not set'; now the next check speaks (the config)."""
    env = {k: v for k, v in os.environ.items() if k != "PADDLEOCR_ROOT"}
    done = subprocess.run([sys.executable, "-m", "ema_callback.cli", "ocr-train", "-c", str(tmp_path / "none.yml")],
                          cwd=PADDLEOCR_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(env, PYTHONPATH=REPO))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
        f"ema-callback: error: {tmp_path / 'none.yml'}: no such file"
