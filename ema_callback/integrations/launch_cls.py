"""Script form of ``ema-callback cls-train`` for ``python -m paddle.distributed.launch`` (it takes a path):

    python -m paddle.distributed.launch --nproc_per_node 2 "$(ema-callback script-path cls)" -c cfg.yml -o ...
"""
import sys

from ema_callback.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("cls-train"))
