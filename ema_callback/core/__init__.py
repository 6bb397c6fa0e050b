"""The EMA itself, independent of any training loop.

``engine`` (``ExponentialMovingAverage``: the shadows, the update, the swap, its state) over ``storage`` (the
update kernels: numpy on the host, one flat tensor on the device), ``device_counters`` (the device path's
counters), ``model_tensors`` (the model's side: which tensors, writing them in place), ``rank_sync`` (buffers
averaged over ranks) and ``engine_state`` (the state as a dict and back). The length in the user's units is
``horizon`` (with ``schedules``), what a run is told about it ``run_report``. Features beside the average plug in
through ``features``: ``switch_ema``, ``bn_recompute`` and the post-hoc ``posthoc.tracking``. ``selection`` sorts
a model's tensors, ``paddle_compat`` covers Paddle 2.6 to 3.3.
"""
