"""Files a stranger, a crash or a second writer cannot break (issue 24): the hostile-file corpus.

Each test generates one category of hostile or damaged files in ``tmp_path`` (``hostile_corpus``) and loads them
in a guarded child process (RLIMIT_AS 4 GiB, a watchdog per file, a restart after a file that hung or crashed it),
then checks every file against the contract:

* refused with ``EMAFileError`` (``EMAConfigError`` for YAML): one line, at most 600 characters, naming the file;
* within 1 s + 1 s per MB of file, and a tracemalloc peak of 3 x file size + 32 MiB;
* nothing runs (markers), an engine and its model are left exactly as they were on an error, a state that loads
  is identical bit for bit to the original; valid files still load.

The table of each category (file, bytes, seconds, peak MiB, outcome) is printed; at the end the corpus size and the
worst time and memory are printed, and written as JSON to ``$HOSTILE_REPORT`` when set.
"""
import contextlib
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import hostile_corpus as hc
import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("hostile_files")  # one worker: one report for the whole corpus

SUMMARIES = {}


def cpu_model():
    """The CPU the times were measured on (they depend on it)."""
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]}, {len(names)} cores" if names else "unknown CPU"


@pytest.fixture(scope="module", autouse=True)
def corpus_report(request):
    """After the module: the corpus size and the worst figures, printed and written to ``$HOSTILE_REPORT``."""
    yield
    if not SUMMARIES:
        return
    measured = [s for s in SUMMARIES.values()]
    worst_t = max((s["worst_seconds"] + [s["category"]] for s in measured if s["worst_seconds"]), default=None)
    worst_m = max((s["worst_peak_mib"] + [s["category"]] for s in measured if s["worst_peak_mib"]), default=None)
    report = {"hostile_files": sum(s["hostile_files"] for s in measured),
              "files": sum(s["files"] for s in measured),
              "violating_files": sum(s["violating_files"] for s in measured),
              "hung": sum(s["hung"] for s in measured), "crashed": sum(s["crashed"] for s in measured),
              "worst_seconds": worst_t, "worst_peak_mib": worst_m,
              "bounds": "1 s + 1 s/MB; tracemalloc peak 3 x size + 32 MiB", "cpu": cpu_model(),
              "categories": dict(sorted(SUMMARIES.items()))}
    lines = [f"hostile corpus: {report['hostile_files']} hostile files ({report['files']} loads in all), "
             f"{report['violating_files']} breaking the contract ({report['hung']} hung, {report['crashed']} crashed)",
             f"worst time {worst_t[0]:.3f} s ({worst_t[1]}, {worst_t[2]})" if worst_t else "worst time: -",
             f"worst tracemalloc peak {worst_m[0]:.1f} MiB ({worst_m[1]}, {worst_m[2]})" if worst_m else
             "worst peak: -"]
    for name, s in sorted(SUMMARIES.items()):
        lines.append(f"  {name:<22} {s['files']:>4} files, {s['hostile_files']:>4} hostile, "
                     f"{s['violating_files']:>4} violating")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        for line in [""] + lines:
            reporter.write_line(line) if reporter is not None else print(line)
    target = os.environ.get("HOSTILE_REPORT")
    if target:
        with open(target, "w") as handle:
            json.dump(report, handle, indent=1)


def check(manifest_path, deadline=240.0):
    """Run a category and fail with one line per broken promise (the table is printed either way)."""
    records, text, stats = hc.check_category(manifest_path, deadline)
    SUMMARIES[stats["category"]] = stats
    print(text)
    bad = [f"{r['entry']['name']}: {v}" for r in records for v in r["violations"]]
    if bad:
        more = f"\n... and {len(bad) - 40} more" if len(bad) > 40 else ""
        pytest.fail(f"{stats['violating_files']} of {stats['files']} files of {stats['category']} break the contract "
                    f"(worst time {stats['worst_seconds']}, worst peak MiB {stats['worst_peak_mib']}):\n" +
                    "\n".join(bad[:40]) + more, pytrace=False)
    return records


# ---------------------------------------------------------------------------------------------- A: paddle.save files
def test_valid_paddle_save_files_still_load_as_paddle_load_returns_them(tmp_path):
    check(hc.build_valid(str(tmp_path)))


def test_shared_tuple_bomb_is_refused_fast(tmp_path):
    """Nested shared tuples (lists, dicts) through the memo, as a dict value, a dict key, in a set or frozenset, and
    under ``builtins.str``: 2**30..2**60 leaves in a few hundred bytes."""
    check(hc.build_shared_bombs(str(tmp_path)))


def test_allocation_bombs_are_refused_without_allocating(tmp_path):
    """``bytearray(10**9)`` (twenty of them), ``numpy.ndarray((10**9,))``, ``_reconstruct`` with odd arguments,
    object arrays, ``eval`` with other arguments; two million ``None`` may load, within the bounds."""
    check(hc.build_allocation_bombs(str(tmp_path)))


def test_lying_lengths_odd_opcodes_and_deep_nesting_are_refused(tmp_path):
    check(hc.build_lying_opcodes(str(tmp_path)))


def test_code_running_globals_are_refused_and_run_nothing(tmp_path):
    records = check(hc.build_code_globals(str(tmp_path)))
    assert len({r["entry"]["kind"] for r in records}) >= 30


def test_the_code_globals_run_code_under_plain_pickle(tmp_path):
    """The corpus is real: unpickled by plain ``pickle.loads`` (in a throwaway process), each file creates its marker
    or destroys its canary (except the few named in ``NO_VISIBLE_EFFECT``)."""
    with open(hc.build_code_globals(str(tmp_path))) as handle:
        entries = json.load(handle)["entries"]
    script = ("import pickle, sys\n"
              "for path in sys.argv[1:]:\n"
              "    try:\n"
              "        pickle.loads(open(path, 'rb').read())\n"
              "    except BaseException:\n"
              "        pass\n")
    subprocess.run([sys.executable, "-c", script] + [e["path"] for e in entries], cwd=str(tmp_path), timeout=180,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=hc._child_env())
    time.sleep(0.5)  # os.popen's shell
    inert = [e["kind"] for e in entries if e["kind"] not in hc.NO_VISIBLE_EFFECT and not hc.code_effects(e)]
    assert not inert, f"these payloads do nothing even under plain pickle: {inert}"


def test_truncated_pickles_are_refused(tmp_path):
    check(hc.build_truncated_pickles(str(tmp_path)))


# ---------------------------------------------------------------------------------------------- B, C, D: .pdema files
def test_hostile_pdema_is_refused_leaving_engine_and_model_untouched(tmp_path):
    """``read_state`` and ``ExponentialMovingAverage.load`` on hostile files: as A, and nothing changes."""
    check(hc.build_pdema_engine(str(tmp_path)))


def test_pdema_edited_without_resigning_is_refused_by_its_digest(tmp_path):
    check(hc.build_pdema_unsigned(str(tmp_path)))


def test_resigned_single_field_corruption_is_refused_naming_the_field(tmp_path):
    try:
        from ema_callback.files.state_file import payload_digest  # noqa: F401  (new in ema-callback/3)
    except ImportError as exc:
        pytest.fail(f"ema_callback.files.state_file.payload_digest is missing ({exc}): contract C (ema-callback/3 "
                    "digests) is not implemented, so no corruption can be re-signed", pytrace=False)
    check(hc.build_pdema_fields(str(tmp_path)))


def test_single_bit_flips_never_change_a_loaded_state_silently(tmp_path):
    records = check(hc.build_pdema_bitflips(str(tmp_path)))
    assert sum(r["entry"]["expect"] == "refuse_or_identical" for r in records) >= 300


# ---------------------------------------------------------------------------------------------- E: post-hoc snapshots
def test_damaged_safetensors_snapshot_is_refused(tmp_path):
    check(hc.build_snapshot_safetensors(str(tmp_path)))


def test_damaged_legacy_npz_snapshot_is_refused_zip_bombs_included(tmp_path):
    check(hc.build_snapshot_npz(str(tmp_path)))


def test_load_snapshots_skips_odd_names_and_symlinks_and_touches_nothing_outside(tmp_path):
    check(hc.build_snapshot_folder(str(tmp_path)))


# ---------------------------------------------------------------------------------------------- F: YAML
def test_yaml_alias_bomb_is_refused_and_anchors_still_load(tmp_path):
    check(hc.build_yaml(str(tmp_path)))


# ---------------------------------------------------------------------------------------------- H: start-up
@pytest.mark.parametrize("planted", ["tuple_bomb", "bytearray_bomb"])
def test_fit_starts_and_trains_with_a_hostile_pdema_in_save_dir(tmp_path, planted):
    check(hc.build_startup(str(tmp_path), planted), deadline=200.0)


# ---------------------------------------------------------------------------------------------- the corpus itself
def test_the_corpus_is_what_it_claims(tmp_path):
    """The generators build what they say (checked with trusted readers, on harmless sizes)."""
    # shared nesting: 3 levels are 8 leaves through the memo
    small = pickle.loads(hc.program(hc.shared_nest(3)))
    assert small == ((("lol", "lol"), ("lol", "lol")), (("lol", "lol"), ("lol", "lol"))) and small[0] is small[1]
    assert len(hc.program(hc.shared_nest(60))) < 1000
    # the zip bomb: a valid zip whose member declares 2 GiB, ~2 MB on disk; its first MiB inflates to an npy header
    path = str(tmp_path / hc.npz_name(20))
    hc.zip_bomb_npz(path, "profile0")
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("profile0.npy")
        assert info.file_size == 2 * 2 ** 30 and info.compress_type == zipfile.ZIP_DEFLATED
        assert info.compress_size < 3 * 2 ** 20 and os.path.getsize(path) < 3 * 2 ** 20
        assert json.loads(bytes(np.load(z.open("header.npy"))).decode())["step"] == 20
        with z.open("profile0.npy") as member:
            head = member.read(2 ** 20)
        assert head.startswith(b"\x93NUMPY") and b"(536870880,)" in head[:128]
    crc, usize, chunks = hc.deflate_bomb(b"x", 4 * 2 ** 20)
    assert zlib.decompress(b"".join(chunks()), -15) == b"x" + bytes(4 * 2 ** 20 - 1)
    assert crc == zlib.crc32(b"x" + bytes(4 * 2 ** 20 - 1))
    # a valid new-format snapshot: the library reads it, and its digest is the sha256 of its data section
    from safetensors.numpy import load

    blob = hc.safetensors_snapshot(10)
    header, data = hc.split_safetensors(blob)
    meta = json.loads(header["__metadata__"]["ema_callback"])
    import hashlib

    assert meta["digest"] == hashlib.sha256(data).hexdigest() and meta["format"] == "ema-callback-phema-2"
    assert np.array_equal(load(blob)["profile0"], hc.snapshot_arrays(10)["profile0"])
    # the legacy one: today's writer's layout, readable by numpy without pickle
    with np.load(__import__("io").BytesIO(hc.legacy_npz_snapshot(10)), allow_pickle=False) as npz:
        assert json.loads(bytes(npz["header"]).decode())["step"] == 10
    # the 11-byte file and the 2**40 length
    m = hc.Manifest(str(tmp_path / "lies"), "x", "checked_load")
    hc.build_lying_opcodes(m.root)
    assert os.path.getsize(os.path.join(m.files, "eleven_bytes.pdparams")) == 11
    with open(os.path.join(m.files, "binbytes8_2pow40.pdparams"), "rb") as handle:
        assert pickle.BINBYTES8 + struct.pack("<Q", 2 ** 40) in handle.read()
    # the billion laughs is ~600 bytes with 25 levels
    assert 400 < len(hc.alias_bomb(25)) < 700 and hc.alias_bomb(25).count("&") == 25
