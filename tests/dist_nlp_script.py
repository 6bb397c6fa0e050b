"""Run by test_nlp.py under `python -m paddle.distributed.launch --nproc_per_node 2` on CPU: PaddleNLP's Trainer with
EMATrainerCallback on 2 data-parallel ranks; each rank writes what it holds to rank<N>.json in the folder given."""
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# not tests/ (a script's own folder comes first): its datasets.py would stand for Hugging Face's, which PaddleNLP
# imports
sys.path[:] = [os.path.join(HERE, "..", "examples"), os.path.join(HERE, "..")] + [
    p for p in sys.path if os.path.abspath(p or os.getcwd()) != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402
import uie_ema  # noqa: E402
from paddlenlp.trainer import TrainerCallback  # noqa: E402

from ema_callback.integrations.paddlenlp_trainer import EMATrainerCallback  # noqa: E402

D = (0.9, 0.99)


def sha(a):
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


class Recorder(TrainerCallback):
    def __init__(self):
        self.start, self.after = None, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = {k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()}

    def on_optimizer_end(self, args, state, control, model=None, **kwargs):
        self.after.append({k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()})


def main(out):
    paddle.set_device("cpu")
    rank = dist.get_rank()
    rec = Recorder()
    cb = EMATrainerCallback(decays=list(D), schedule="constant", eval_raw=True)
    trainer = uie_ema.make_trainer(os.path.join(out, "run"), max_steps=10, eval_steps=5, save_steps=5,
                                   per_device_train_batch_size=8, callbacks=[rec, cb])
    trainer.train()
    # the primary EMA against numpy over this rank's recorded weights
    ref = dict(rec.start)
    for w in rec.after:
        ref = {k: D[0] * ref[k] + (1 - D[0]) * w[k] for k in ref}
    held = {k: v.numpy() for k, v in trainer.model.state_dict().items()}  # the EMA after train()
    err = max(float(np.abs(held[k] - ref[k]).max()) for k in ref if np.issubdtype(held[k].dtype, np.floating))
    state = cb.ema.state_dict()
    evals = [{k: v for k, v in h.items() if k.startswith("eval_loss") or k == "step"}
             for h in trainer.state.log_history if "eval_loss" in h]
    run = os.path.join(out, "run")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world": dist.get_world_size(), "num_steps": cb.ema.num_steps, "num_updates": cb.ema.num_updates,
                   "global_batch": cb.ema.batch.global_batch,
                   "shadow": {k: sha(v) for k, v in state["shadow"].items()},
                   "others": [{k: sha(v) for k, v in o.items()} for o in state["shadows"]],
                   "held": {k: sha(v) for k, v in held.items()},
                   "raw": {k: sha(v) for k, v in cb.ema.backup_numpy().items()},
                   "numpy_error": err, "evals": evals,
                   "files": sorted(os.listdir(os.path.join(run, "checkpoint-10"))) if rank == 0 else []}, handle)


if __name__ == "__main__":
    main(sys.argv[1])
