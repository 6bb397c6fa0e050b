"""Run by test_distributed.py under `python -m paddle.distributed.launch --nproc_per_node 2` on CPU."""
import hashlib
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402
from fit_helpers import Blobs, make_model  # noqa: E402

from ema_callback import EMACallback  # noqa: E402


def main(out):
    paddle.set_device("cpu")
    dist.init_parallel_env()
    rank = dist.get_rank()
    model = make_model()
    sampler = paddle.io.DistributedBatchSampler(Blobs(64, 1), batch_size=8, shuffle=False)
    train = paddle.io.DataLoader(Blobs(64, 1), batch_sampler=sampler)
    evald = paddle.io.DataLoader(Blobs(32, 2), batch_size=16)
    save_dir = os.path.join(out, f"save_rank{rank}")
    os.makedirs(save_dir, exist_ok=True)
    cb = EMACallback(decays=[0.9, 0.99], decay_batch_size=64, eval_raw=True,  # kappa = 8 x 2 ranks / 64
                     recompute_bn=2)  # each rank recomputes on its own last 2 batches, averaged over ranks
    model.fit(train, evald, epochs=2, verbose=0, save_dir=save_dir, callbacks=[cb])
    shadow = cb.ema.state_dict()["shadow"]
    digest = {k: float(np.asarray(v, np.float64).sum()) for k, v in shadow.items()}
    raw = cb.raw_state_dict()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"shadow": digest, "shadow_bytes": {k: hashlib.sha1(np.asarray(v).tobytes()).hexdigest()
                                                      for k, v in shadow.items()},
                   "raw": {k: hashlib.sha1(v.tobytes()).hexdigest() for k, v in raw.items()},
                   "others_bytes": [{k: hashlib.sha1(np.asarray(v).tobytes()).hexdigest() for k, v in other.items()}
                                    for other in cb.ema.state_dict()["shadows"]],
                   "global_batch": cb.ema.batch.global_batch, "decays": cb.ema.decays,
                   "final_bn": {k: hashlib.sha1(v.numpy().tobytes()).hexdigest()  # EMA weights in after fit
                                for k, v in model.network.state_dict().items() if "_mean" in k or "_variance" in k},
                   "recomputed_from": cb.ema.features["recompute_bn"].used,
                   "num_steps": cb.ema.num_steps, "world": dist.get_world_size(),
                   "auto": auto_fit(out, rank), "auto_loss": auto_fit_on_loss(out, rank)}, handle)


def auto_fit_on_loss(out, rank):
    """length: auto with no metric (the loss is monitored) and the evaluation data split across the ranks: each
    rank's loss is its own share's, so every rank takes rank 0's values and units; it hung (ranks refining around
    different lengths, a broadcast with no partner) before."""
    model = make_model(metrics=False)
    train = paddle.io.DataLoader(Blobs(64, 1), batch_sampler=paddle.io.DistributedBatchSampler(
        Blobs(64, 1), batch_size=8, shuffle=False))
    evald = paddle.io.DataLoader(Blobs(320, 2), batch_sampler=paddle.io.DistributedBatchSampler(
        Blobs(320, 2), batch_size=8, shuffle=False))
    cb = EMACallback()
    model.fit(train, evald, epochs=4, verbose=0, callbacks=[cb])
    return {"values": {k: e.value for k, e in cb.auto.evaluated.items()}, "pick": cb.auto.decision.label,
            "metric": cb.auto.metric,
            "final": {k: hashlib.sha1(v.numpy().tobytes()).hexdigest() for k, v in model.network.state_dict().items()
                      if "_mean" not in k and "_variance" not in k}}


def auto_fit(out, rank):
    """length: auto (issue 26): each rank's own save_dir, rank 0 alone writes snapshots; the candidates reach every
    rank from rank 0, so both evaluate the same weights, pick the same and end holding the same parameters."""
    model = make_model()
    sampler = paddle.io.DistributedBatchSampler(Blobs(64, 1), batch_size=8, shuffle=False)
    train = paddle.io.DataLoader(Blobs(64, 1), batch_sampler=sampler)
    evald = paddle.io.DataLoader(Blobs(32, 2), batch_size=16)
    save_dir = os.path.join(out, f"auto_rank{rank}")
    cb = EMACallback(eval_raw=True)
    model.fit(train, evald, epochs=4, verbose=0, save_dir=save_dir, callbacks=[cb])
    return {"values": {k: e.value for k, e in cb.auto.evaluated.items()}, "pick": cb.auto.decision.label,
            "final": {k: hashlib.sha1(v.numpy().tobytes()).hexdigest() for k, v in model.network.state_dict().items()
                      if "_mean" not in k and "_variance" not in k},
            "files": sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else []}


if __name__ == "__main__":
    main(sys.argv[1])
