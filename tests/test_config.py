"""The EMA: block: validation, overrides and merging into real suite configs."""
import dataclasses
import glob
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import PADDLEDET_ROOT, PADDLEOCR_ROOT, needs_paddledet, needs_paddleocr

from ema_callback.config.files import (
    apply_overrides,
    load_suite_yaml,
    parse_override,
    read_block_file,
    resolve_block,
    split_overrides,
)
from ema_callback.config.merge import merge_yaml_text
from ema_callback.config.schema import OPTIONS, SCHEDULE_PARAMS, WARM_UP_KEYS, EMAConfig, EMAConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = sorted(os.path.join(REPO, "configs", "ema", f) for f in os.listdir(os.path.join(REPO, "configs", "ema")))
OCR_CONFIG = os.path.join(PADDLEOCR_ROOT, "configs", "rec", "PP-OCRv3", "en_PP-OCRv3_rec.yml")
DET_CONFIG = os.path.join(PADDLEDET_ROOT, "configs", "picodet", "picodet_xs_320_coco_lcnet.yml")

BAD_BLOCKS = [
    ({"decya": 0.99}, "EMA.decya: unknown key, did you mean 'decay'?"),
    ({"decay": 0}, "EMA.decay: must be > 0"),
    ({"decay": 1}, "EMA.decay: must be < 1"),
    ({"decay": 1.5}, "EMA.decay: must be < 1"),
    ({"decay": -0.1}, "EMA.decay: must be > 0"),
    ({"decay": "high"}, "EMA.decay: expected a number"),
    ({"decay": True}, "EMA.decay: expected a number"),
    ({"decay": float("nan")}, "EMA.decay: expected a finite number"),
    ({"update_every": -1}, "EMA.update_every: must be >= 1"),
    ({"update_every": 0}, "EMA.update_every: must be >= 1"),
    ({"update_every": 2.5}, "EMA.update_every: expected an integer"),
    ({"start_step": -3}, "EMA.start_step: must be >= 0"),
    ({"eval_start_step": "soon"}, "EMA.eval_start_step: expected an integer"),
    ({"schedule": "cosine"}, "EMA.schedule: expected one of auto, constant, threshold, exponential, power"),
    ({"schedule": 3}, "EMA.schedule: expected one of"),
    ({"buffers": "mean"}, "EMA.buffers: expected one of average, copy, skip"),
    ({"include": "conv[("}, "EMA.include: bad regex 'conv[('"),
    ({"exclude": ["ok", "(unclosed"]}, "EMA.exclude: bad regex '(unclosed'"),
    ({"exclude": 5}, "EMA.exclude: expected a regex or a list of regexes"),
    ({"enable": "yes"}, "EMA.enable: expected true or false"),
    ({"bias_correction": 1}, "EMA.bias_correction: expected true or false"),
    ({"storage_dtype": "int8"}, "EMA.storage_dtype: expected one of float32, float16, bfloat16"),
    ({"device": "gpu"}, "EMA.device: expected one of same, cpu"),
    ({"tau": 0}, "EMA.tau: must be > 0"),
    ({"power": -1}, "EMA.power: must be > 0"),
    ({"min_decay": 1.0}, "EMA.min_decay: must be < 1"),
    ({"inv_gamma": "x"}, "EMA.inv_gamma: expected a number"),
    ({"save_as": "both"}, "EMA.save_as: expected one of ema, raw"),
    ({"eval_raw": None}, "EMA.eval_raw: expected true or false"),
    ({"updat_every": 2}, "EMA.updat_every: unknown key, did you mean 'update_every'?"),
    ({"zzz": 1}, "EMA.zzz: unknown key; known keys: enable"),
    ([0.99], "EMA: expected a mapping"),
]


@pytest.mark.parametrize("block,message", BAD_BLOCKS, ids=[str(b) for b, _ in BAD_BLOCKS])
def test_bad_block_gives_one_line_error_naming_the_key(block, message):
    with pytest.raises(EMAConfigError) as err:
        EMAConfig.from_block(block)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text


def test_defaults_and_every_option_documented():
    cfg = EMAConfig.from_block(None)
    assert cfg == EMAConfig() and cfg.decay == 0.9999 and cfg.schedule == "auto"
    assert cfg.effective_schedule == "threshold" and not cfg.effective_bias_correction
    units = EMAConfig.from_block({"half_life_images": 1000})
    assert units.effective_schedule == "constant" and units.effective_bias_correction
    named = EMAConfig.from_block({"half_life_images": 1000, "schedule": "threshold"})
    assert named.effective_schedule == "threshold" and not named.effective_bias_correction
    assert [o.name for o in OPTIONS if o.default is not None and o.name not in SCHEDULE_PARAMS] == \
        list(cfg.to_block())  # a schedule's parameters only with that schedule
    assert [f.name for f in dataclasses.fields(EMAConfig)] == [o.name for o in OPTIONS]
    for o in OPTIONS:
        assert getattr(cfg, o.name) == o.default and o.doc


def test_overrides_work_without_an_ema_section():
    overrides, rest = split_overrides(["Global.epoch_num=3", "EMA.decay=0.999", "EMA.exclude=['head']",
                                       "EMA.enable=false"])
    assert rest == ["Global.epoch_num=3"]
    cfg = EMAConfig.from_block(apply_overrides(None, overrides))
    assert (cfg.decay, cfg.exclude, cfg.enable) == (0.999, ["head"], False)
    with pytest.raises(EMAConfigError, match=r"^EMA\.decay: must be < 1"):
        resolve_block({}, None, [parse_override("EMA.decay=2")])
    with pytest.raises(EMAConfigError, match=r"^-o 'EMA.decay': expected KEY=VALUE"):
        parse_override("EMA.decay")
    with pytest.raises(EMAConfigError, match=r"^-o .EMA.decay.x.: EMA keys are one level deep \(EMA.decay=0.999\)"):
        apply_overrides({}, [parse_override("EMA.decay.x=1")])


@pytest.mark.parametrize("block_path", BLOCKS, ids=os.path.basename)
@pytest.mark.parametrize("suite_path", [pytest.param(OCR_CONFIG, marks=needs_paddleocr, id="paddleocr"),
                                        pytest.param(DET_CONFIG, marks=needs_paddledet, id="paddledet")])
def test_merging_ready_blocks_into_real_suite_configs(block_path, suite_path, tmp_path):
    block = read_block_file(block_path)
    suite_text = open(suite_path, encoding="utf-8").read()
    suite = load_suite_yaml(suite_text)
    # 1. block alone: the suite keeps every key, in order, comments included, and gains the block
    merged_text = merge_yaml_text(suite_text, block, open(block_path).read())
    assert merged_text.startswith(suite_text)
    merged = load_suite_yaml(merged_text)
    assert list(merged)[:-1] == list(suite) and merged["EMA"] == block
    # 2. the suite's own EMA: section wins over the block; its length without a schedule drops the block's warm-up
    with_section = suite_text + "\nEMA:\n  decay: 0.95  # the suite's choice\n"
    merged = load_suite_yaml(merge_yaml_text(with_section, block, None))
    assert merged["EMA"]["decay"] == 0.95 and all(merged["EMA"][k] == v for k, v in block.items()
                                                  if k != "decay" and k not in WARM_UP_KEYS)
    assert not set(WARM_UP_KEYS) & set(merged["EMA"])
    # 3. -o wins over both
    merged = load_suite_yaml(merge_yaml_text(with_section, block, None, [parse_override("EMA.decay=0.9")]))
    assert merged["EMA"]["decay"] == 0.9
    suite_file = tmp_path / "suite.yml"
    suite_file.write_text(with_section)
    cfg = resolve_block(load_suite_yaml(with_section), block_path, [parse_override("EMA.update_every=4")])
    assert cfg.decay == 0.95 and cfg.update_every == 4 and cfg.schedule == "auto" and \
        cfg.effective_schedule == "threshold"


OVERLAYS = sorted(glob.glob(os.path.join(REPO, "configs", "paddleocr", "ema_*.yml")))


@needs_paddleocr
@pytest.mark.parametrize("overlay", OVERLAYS, ids=os.path.basename)
def test_paddleocr_overlays_name_a_real_config_and_merge_into_it(overlay):
    text = open(overlay).read()
    named = re.search(r"PaddleOCR's (configs/\S+\.yml)", text).group(1)
    suite_path = os.path.join(PADDLEOCR_ROOT, named)
    assert os.path.isfile(suite_path), named
    block = read_block_file(overlay)
    merged = load_suite_yaml(merge_yaml_text(open(suite_path).read(), block, text))
    assert merged["EMA"] == block and EMAConfig.from_block(merged["EMA"]).enable


@needs_paddleocr
def test_merge_config_command_writes_the_merged_yaml(tmp_path):
    out = tmp_path / "merged.yml"
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "ema_callback.cli", "merge-config", OCR_CONFIG,
                           os.path.join(REPO, "configs", "ema", "short_run.yml"), "-o", str(out),
                           "--set", "EMA.decay=0.997"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(out.read_text())
    assert merged["EMA"] == {"decay": 0.997, "eval_raw": True}  # a new length without a schedule: auto decides
    # block style and the ready block's comments are kept; the value set changes, the block's warm-up goes
    block_text = open(os.path.join(REPO, "configs", "ema", "short_run.yml")).read()
    assert out.read_text().endswith(block_text.replace("  decay: 0.998\n", "  decay: 0.997\n").replace(
        "  schedule: exponential\n  tau: 200\n", ""))
    assert merged["Global"] == yaml.safe_load(open(OCR_CONFIG))["Global"]
    bad = tmp_path / "bad.yml"
    bad.write_text("EMA:\n  decya: 0.9\n")
    done = subprocess.run([sys.executable, "-m", "ema_callback.cli", "merge-config", OCR_CONFIG, str(bad),
                           "-o", str(tmp_path / "never.yml")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "ema-callback: error: EMA.decya: unknown key, did you mean 'decay'?"]
    assert not (tmp_path / "never.yml").exists()


def test_merge_keeps_the_sections_lines_and_comments():
    suite = ("Global:\n  epoch_num: 3\nEMA:\n  decay: 0.95  # the suite's choice\n  exclude:\n    - head\n"
             "    - neck\n  # a note\n  eval_raw: true\nOptimizer:\n  name: Adam\n")
    overrides = [parse_override("EMA.decay=0.9"), parse_override("EMA.exclude=[fc]"),
                 parse_override("EMA.start_step=50")]
    merged = merge_yaml_text(suite, {"buffers": "copy"}, None, overrides)
    assert merged == ("Global:\n  epoch_num: 3\nEMA:\n  decay: 0.9  # the suite's choice\n  exclude: [fc]\n"
                      "  # a note\n  eval_raw: true\n  buffers: copy\n  start_step: 50\nOptimizer:\n  name: Adam\n")


def test_block_file_errors_name_the_file(tmp_path):
    cases = {"missing.yml": None, "list.yml": "- 1\n", "other.yml": "Global: {}\n", "broken.yml": "EMA: [\n"}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(EMAConfigError) as err:
            read_block_file(str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- issue 19: precedence, merge-config, YAML readings
def test_one_precedence_rule_for_the_length_forms():
    """Within a layer (one YAML block, one -o list) two forms are an error; a later layer's form replaces."""
    with pytest.raises(EMAConfigError, match=r"^EMA\.half_life_images: give the EMA length one way"):
        EMAConfig.from_block({"decay": 0.99, "half_life_images": 100})
    with pytest.raises(EMAConfigError) as err:
        apply_overrides({}, [parse_override("EMA.decay=0.99"), parse_override("EMA.half_life_images=100")])
    assert str(err.value).startswith("-o EMA.decay=... and -o EMA.half_life_images=...: give the EMA length one way "
                                     "in one list of overrides")
    with pytest.raises(EMAConfigError, match=r"^-o EMA.decays=\.\.\. and -o EMA.half_life_epochs=\.\.\."):
        apply_overrides({}, [parse_override("EMA.decays=[0.9, 0.99]"), parse_override("EMA.half_life_epochs=[1, 2]")])
    across = EMAConfig.from_block(apply_overrides({"decay": 0.99, "decay_batch_size": 64},
                                                  [parse_override("EMA.half_life_images=100")]))
    assert across.half_life_images == 100 and across.decay_batch_size is None and across.length_key == \
        "half_life_images"
    again = apply_overrides({}, [parse_override("EMA.decay=0.9"), parse_override("EMA.decay=0.99")])
    assert again == {"decay": 0.99}  # the same key twice: the last value, as for any -o key


def test_merge_config_can_change_the_length_form_keeping_comments(tmp_path):
    suite = "Global:\n  epoch_num: 3\nEMA:\n  # tuned for 8 GPUs\n  decay: 0.9999  # PaddleOCR's\n  eval_raw: true\n"
    merged = merge_yaml_text(suite, {}, None, [parse_override("EMA.half_life_epochs=2")])
    assert merged == ("Global:\n  epoch_num: 3\nEMA:\n  # tuned for 8 GPUs\n  eval_raw: true\n"
                      "  half_life_epochs: 2\n")
    assert EMAConfig.from_block(load_suite_yaml(merged)["EMA"]).half_life_epochs == 2


def test_numbers_written_as_strings_and_yaml_colon_slips_and_nested_posthoc_overrides():
    assert EMAConfig.from_block(yaml.safe_load("half_life_images: 1e4")).half_life_images == 10000.0
    assert EMAConfig.from_block({"decays": ["9.9e-1", 0.999]}).decays == [0.99, 0.999]
    assert EMAConfig.from_block({"update_every": "4"}).update_every == 4
    with pytest.raises(EMAConfigError, match=r"^EMA\.decay: expected a number, got 'high'$"):
        EMAConfig.from_block({"decay": "high"})
    block = apply_overrides({}, [parse_override("EMA.posthoc.snapshot_every=5"),
                                 parse_override("EMA.posthoc.sigma_rels=[0.05, 0.1]")])
    assert EMAConfig.from_block(block).posthoc["snapshot_every"] == 5
    with pytest.raises(EMAConfigError) as err:
        EMAConfig.from_block(apply_overrides({}, [parse_override("EMA.posthoc={snapshot_every:0}")]))
    assert str(err.value) == ("EMA.posthoc: YAML read 'snapshot_every:0' as one key with no value (no space after "
                              "the colon); write snapshot_every: 0")
    with pytest.raises(EMAConfigError, match=r"EMA keys are one level deep \(EMA.decay=0.999\), except the posthoc "
                                             r"sub-block's \(EMA.posthoc.snapshot_every=5"):
        apply_overrides({}, [parse_override("EMA.decay.x=1")])


def test_batchinfo_and_posthocema_are_public():
    import ema_callback

    assert ema_callback.BatchInfo(16, world=2, accumulate=2).global_batch == 64
    assert ema_callback.PostHocEMA.__name__ == "PostHocEMA" and "BatchInfo" in ema_callback.__all__
    assert "Fields:" in ema_callback.BatchInfo.__doc__


def test_ready_blocks_by_preset_name():
    from ema_callback import EMACallback
    from ema_callback.config.presets import presets

    known = presets()
    assert set(known) == {"default", "ppdet_threshold", "short_run", "ppocrv4_det", "ppocrv4_rec", "svtr_rec",
                          "picodet_s_416", "ppyoloe_plus_s"}  # the tiny suite configs are not blocks
    assert read_block_file("short_run") == read_block_file(os.path.join(REPO, "configs", "ema", "short_run.yml"))
    assert EMACallback.from_config("ppocrv4_rec").config.decay_batch_size == 1536
    assert all(description.endswith(".") for _, description in known.values())
    with pytest.raises(EMAConfigError, match=r"^--ema-config ppocrv5: no such file and no preset of that name "
                                             r"\(presets: default, ppdet_threshold, short_run, "):
        read_block_file("ppocrv5")


# ---------------------------------------------------------------- issue 25: what the plugin says is what it does
@pytest.mark.parametrize("suite,where", [
    ({"TrainReader": {"batch_size": 4, "EMA": {"decay": 0.9}}}, "TrainReader.EMA"),
    ({"Global": {"epoch_num": 3, "ema": {"decay": 0.9}}}, "Global.ema"),
    ({"Architecture": {"Backbone": {"name": "MobileNetV3", "Ema": {}}}}, "Architecture.Backbone.Ema"),
    ({"Train": {"dataset": {"transforms": [{"DecodeImage": {}}, {"EMA": {"decay": 0.9}}]}}},
     "Train.dataset.transforms[1].EMA"),
])
def test_an_ema_section_below_the_top_level_is_an_error_naming_where_it_is(suite, where):
    from ema_callback.config.files import check_section_name

    with pytest.raises(EMAConfigError) as err:
        check_section_name(suite, "cfg.yml")
    parent = where.rsplit(".", 1)[0]
    assert str(err.value) == (f"cfg.yml: {where}: not read; the EMA: section belongs at the top level of the file, "
                              f"not under {parent}")
    check_section_name({"EMA": {"decay": 0.9, "exclude": ["head"]}, "Global": {"epoch_num": 3}}, "cfg.yml")
    with pytest.raises(EMAConfigError, match=rf"^suite\.yml: {re.escape(where)}: not read"):
        merge_yaml_text(yaml.safe_dump(suite), {"decay": 0.99}, source="suite.yml")  # merge-config too
    for text, key in (("Global.EMA.decay=0.9", "Global.EMA"), ("ema.decay=0.9", "ema")):
        with pytest.raises(EMAConfigError) as err:
            split_overrides([text])
        assert str(err.value) == (f"-o {text!r}: {key} is not read; set EMA keys as -o EMA.key=value (the EMA: "
                                  "section is top-level, upper case)")


def test_a_length_stated_in_a_higher_layer_without_a_schedule_drops_the_lower_layers_warm_up():
    """--ema-config ppyoloe_plus_s -o EMA.half_life_epochs=2 kept the preset's threshold warm-up (from optimizer
    step 3,242 on 1,000 images of batch 8), where a length in the user's units holds from the first update."""
    from ema_callback.config.schema import layered
    from ema_callback.core.horizon import BatchInfo, candidates, describe

    cfg = resolve_block({}, "ppyoloe_plus_s", [parse_override("EMA.half_life_epochs=2")])
    assert (cfg.schedule, cfg.effective_schedule, cfg.effective_bias_correction) == ("auto", "constant", True)
    assert cfg.exclude == [r"proj_conv\.weight"] and cfg.decay_batch_size is None  # the rest of the preset stays
    batch = BatchInfo(8, dataset_size=1000)
    assert describe(cfg, batch, candidates(cfg, batch)).endswith(
        "; schedule auto -> constant with bias correction: this length holds from the first update")
    short = {"decay": 0.998, "schedule": "exponential", "tau": 200, "eval_raw": True}
    assert layered(short, {"decay": 0.99}) == {"decay": 0.99, "eval_raw": True}  # the same holds for decay
    assert layered(short, {"decay": 0.99, "schedule": "power"}) == {"decay": 0.99, "schedule": "power",
                                                                     "eval_raw": True}  # tau was exponential's
    assert layered(short, {"decay": 0.99, "schedule": "exponential"}) == dict(short, decay=0.99)  # its tau stays
    assert layered(short, {"eval_raw": False}) == dict(short, eval_raw=False)  # no length: the warm-up stays
    cfg = EMAConfig.from_block(short).replace(decay=0.99)  # EMACallback(config, decay=...) is a higher layer too
    assert cfg.schedule == "auto" and cfg.effective_schedule == "threshold" and cfg.tau == 2000.0


def test_from_config_outside_the_clone_names_the_argument_and_the_preset(tmp_path, monkeypatch):
    """examples/model_fit_ema.py suggested from_config("configs/ema/short_run.yml"), which only works in the clone,
    and the error named the CLI flag --ema-config."""
    from ema_callback import EMACallback

    monkeypatch.chdir(tmp_path)
    with pytest.raises(EMAConfigError) as err:
        EMACallback.from_config("configs/ema/short_run.yml")
    assert str(err.value).startswith("EMACallback.from_config('configs/ema/short_run.yml'): no such file and no "
                                     "preset of that name; that is the preset 'short_run': give its name, which works "
                                     "from any folder (presets: default, ")
    assert EMACallback.from_config("short_run").config.tau == 200
    example = open(os.path.join(REPO, "examples", "model_fit_ema.py")).read()
    assert 'EMACallback.from_config("short_run")' in example and "configs/ema/" not in example
