"""An independent numpy reference for the EMA (written from the formulas, not from the package)."""
import math

import numpy as np


def reference_decay(schedule, t, decay, tau=2000.0, inv_gamma=1.0, power=2 / 3, min_decay=0.0):
    if schedule == "constant":
        return decay
    if schedule == "threshold":
        return min(decay, (1 + t) / (10 + t))
    if schedule == "exponential":
        return decay * (1 - math.exp(-(t + 1) / tau))
    if schedule == "power":
        return float(np.clip(1 - (1 + t / inv_gamma) ** -power, min_decay, decay))
    raise ValueError(schedule)


def reference_ema(init, trajectory, averaged, copied, schedule="constant", decay=0.99, start_step=0,
                  update_every=1, bias_correction=False, **schedule_args):
    """EMA of float64 numpy snapshots.

    init: {name: array} before training; trajectory: list of {name: array} after each optimizer step;
    averaged / copied: names of averaged and copied tensors. Returns {name: array}.
    """
    shadow = {k: init[k].astype(np.float64) for k in averaged}
    copies = {k: init[k].copy() for k in copied}
    updates, product = 0, 1.0
    for step, weights in enumerate(trajectory, start=1):
        if step <= start_step:
            shadow = {k: weights[k].astype(np.float64) for k in averaged}
            copies = {k: weights[k].copy() for k in copied}
            continue
        if (step - start_step) % update_every:
            continue
        d = reference_decay(schedule, updates * update_every, decay, **schedule_args) ** update_every
        for k in averaged:
            old = 0.0 if (bias_correction and updates == 0) else shadow[k]
            shadow[k] = d * old + (1 - d) * weights[k].astype(np.float64)
        copies = {k: weights[k].copy() for k in copied}
        updates += 1
        product *= d
    scale = 1.0 / (1.0 - product) if (bias_correction and updates) else 1.0
    out = {k: v * scale for k, v in shadow.items()}
    out.update(copies)
    return out


def batch_statistics_mean(copy, ema_weights, batches):
    """numpy: per BatchNorm layer of ``copy`` (a fresh network of the same structure), the mean over ``batches`` of
    its input's batch mean and biased variance, with ``ema_weights`` loaded (train-mode forward: each BatchNorm
    normalises with its batch statistics). The independent reference for ``recompute_bn``."""
    import paddle

    from ema_callback.core.bn_recompute import batchnorm_layers

    copy.set_state_dict({k: paddle.to_tensor(v) for k, v in ema_weights.items()})
    seen, hooks = {}, []
    for name, layer in copy.named_sublayers():
        if any(layer is bn for bn in batchnorm_layers(copy)):
            def hook(layer, inputs, name=name):
                seen.setdefault(name, []).append(inputs[0].numpy().astype(np.float64))
            hooks.append(layer.register_forward_pre_hook(hook))
    copy.train()
    with paddle.no_grad():
        for args, kwargs in batches:
            copy(*args, **kwargs)
    for h in hooks:
        h.remove()
    return {name: (np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0),
                   np.mean([x.var(axis=(0, 2, 3)) for x in xs], axis=0)) for name, xs in seen.items()}
