"""A 2-process CPU run of Model.fit with EMACallback through paddle.distributed.launch."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.distributed
@pytest.mark.xdist_group("launch")  # 2-process launches one at a time
def test_two_rank_fit_has_equal_shadows_and_only_rank0_writes(tmp_path):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "log"), os.path.join(HERE, "dist_fit_script.py"), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    logs = "".join(open(os.path.join(tmp_path, "log", f)).read()[-2000:] for f in os.listdir(tmp_path / "log"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs
    r0 = json.load(open(tmp_path / "rank0.json"))
    r1 = json.load(open(tmp_path / "rank1.json"))
    assert r0["world"] == r1["world"] == 2
    assert r0["num_steps"] == r1["num_steps"] == 8  # 64 samples / 2 ranks / batch 8, 2 epochs
    assert r0["shadow_bytes"] == r1["shadow_bytes"] and r0["others_bytes"] == r1["others_bytes"]  # every EMA
    # the world size is measured into the scaling rule: global batch 8 x 2 ranks = 16, decays tuned for 64
    assert r0["global_batch"] == r1["global_batch"] == 16
    assert r0["decays"] == pytest.approx([0.9 ** 0.25, 0.99 ** 0.25], rel=1e-15)
    # recompute_bn: each rank ran its own batches, the statistics were averaged: identical on both ranks
    assert r0["recomputed_from"] == r1["recomputed_from"] == 2
    assert r0["final_bn"] and r0["final_bn"] == r1["final_bn"]
    # parameters agree on both ranks; BatchNorm statistics are per rank in Paddle's DataParallel
    params = [k for k in r0["raw"] if "_mean" not in k and "_variance" not in k]
    assert params and all(r0["raw"][k] == r1["raw"][k] for k in params)
    assert any(r0["raw"][k] != r1["raw"][k] for k in r0["raw"] if k not in params)
    rank0_files = sorted(os.listdir(tmp_path / "save_rank0"))
    assert {"0.pdema", "1.pdema", "final.pdema", "final.pdparams"} <= set(rank0_files)
    assert os.listdir(tmp_path / "save_rank1") == []
    # length: auto on 2 ranks: the same candidates evaluated (values equal), the same pick, the same final weights
    a0, a1 = r0["auto"], r1["auto"]
    assert len(a0["values"]) >= 6 and a0["values"] == a1["values"] and a0["pick"] == a1["pick"]
    assert a0["final"] == a1["final"]
    assert "ema_auto.json" in a0["files"] and "posthoc" in a0["files"] and a1["files"] in ([], ["posthoc"])
    # ... and on the loss, each rank's own share of split evaluation data: rank 0's values on both, one pick
    l0, l1 = r0["auto_loss"], r1["auto_loss"]
    assert l0["metric"] == "loss" and len(l0["values"]) >= 6
    assert l0["values"] == l1["values"] and l0["pick"] == l1["pick"] and l0["final"] == l1["final"]
