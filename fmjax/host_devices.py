"""How many XLA devices a CPU host is when fmjax trains on it.

XLA:CPU runs one program on a host's cores by handing ready ops to its
threads and splitting large products between them, but a small model's step
is mostly a chain of ops, each waiting for the one before: in a trace of
`clip:small`'s step on 2 cores, ops ran on 1.4 threads on average
(docs/performance.md, "Two devices on one CPU"). Made into two XLA devices
(`jax_num_cpu_devices=2`), the host trains data-parallel: each device runs
half the batch on a thread of its own, and the gradients are summed between
them in memory. On a 2-core Zen 4 EPYC
(`python bench/host_devices_ab.py`: one process, the two setups taking
turns), steps per second against one device: `gpt_lm:small` 1.12x (two
runs), `bert_mlm:small` 1.13x, `clip:small` 1.09-1.13x,
`vit_supervised:small` 1.03-1.22x, `vit_mae:small` 0.99-1.01x. The first
step's loss was the same (to 3e-7 of it for the text models, whose loss
sums add up in another order). Since the products are 2-D on XLA:CPU
(`fmjax.models.dense.product_by_parts`), which took out copies that ran on
one thread, the same script gave `gpt_lm:small` 1.08x, `bert_mlm:small`
1.06x, `clip:small` 1.01x, `vit_simclr:small` and `vit_dino:small` 1.03x,
`vit_supervised:small` 0.98x and `vit_mae:small` 0.92x (twice), whose step
of 1,600 small ops gains nothing from half a batch and pays for the
gradients' sum: `configs/vit_mae.py` sets `mesh.host_devices=1`. Since
down projections' kernel gradients are oriented (`dense.rows_product`),
`clip:small` 0.935x, 0.972x and 0.970x (three runs), `gpt_lm:small` 1.05x,
`bert_mlm:small` 0.99x: `configs/clip.py:small` keeps one device too.

So `fmjax train` and `fmjax bench train` make 2 devices of a CPU host
(`training_devices`) wherever that changes nothing but the speed and the
rounding of sums: the run is one process, the config's mesh is data-parallel
over every device, the batch (and each micro-batch) splits in two, and no
pretrained weights over 1 GiB are loaded (each device holds a copy of the
params and the optimizer state), unless the config says one
(`mesh.host_devices=1`). A count of the user's own always wins:
`FMJAX_HOST_DEVICES=1` keeps one device, `FMJAX_HOST_DEVICES=8` simulates 8,
as do `JAX_NUM_CPU_DEVICES` and `--xla_force_host_platform_device_count` in
`XLA_FLAGS`. The count only shapes JAX's CPU backend; where a GPU or TPU
trains, nothing changes. Hosts with more cores get 2 devices as well; only
2 cores were measured.
"""

from __future__ import annotations

import os

from fmjax.config import ConfigError

SPLIT = 2
MAX_PRETRAINED_BYTES = 1 << 30
# The XLA flag for a CPU backend of N devices (FMJAX_HOST_DEVICES sets it).
FLAG = "--xla_force_host_platform_device_count"


def _pretrained_bytes(path: str, limit: int) -> int:
    """Bytes under a local pretrained directory (or file), counted up to
    `limit`; `limit` for a remote one (gs://), whose size is not checked."""
    if not path:
        return 0
    if "://" in path:
        return limit
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
            if total >= limit:
                return total
    return total


def training_devices(config, environ: dict, cores: int | None) -> int:
    """The XLA CPU devices to make of this host for training `config`: SPLIT
    where every condition in the module's docstring holds, else 0 (JAX's
    default: one, or the count the user set)."""
    wanted = config.mesh.get("host_devices", 0)
    if wanted not in (0, 1):
        raise ConfigError(
            f"mesh.host_devices={wanted!r}: expected 0 (fmjax decides) or 1 (one "
            "device); FMJAX_HOST_DEVICES=N sets any count"
        )
    if wanted == 1:
        return 0
    if environ.get("FMJAX_HOST_DEVICES") or environ.get("JAX_NUM_CPU_DEVICES"):
        return 0
    if FLAG in environ.get("XLA_FLAGS", ""):
        return 0
    if environ.get("JAX_COORDINATOR_ADDRESS") or "," in environ.get(
        "TPU_WORKER_HOSTNAMES", ""
    ):
        return 0
    if (cores or 1) < SPLIT:
        return 0
    mesh = config.mesh
    if (mesh.data, mesh.fsdp, mesh.tensor, mesh.num_devices) != (-1, 1, 1, 0):
        return 0
    accumulation = config.optimizer.get("grad_accum_steps", 1) or 1
    if config.data.batch_size % (SPLIT * accumulation):
        return 0
    pretrained = config.get("init", {}).get("model", "")
    if _pretrained_bytes(pretrained, MAX_PRETRAINED_BYTES) >= MAX_PRETRAINED_BYTES:
        return 0
    return SPLIT


def split_for_training(config, coordinator: str = "") -> int:
    """Makes this process's CPU backend `training_devices` devices (JAX's
    `jax_num_cpu_devices`, which holds only before JAX starts its backends);
    returns the count set, 0 where none was (or JAX had already started, in
    someone's own process). `coordinator`: the command's --coordinator (one
    of several processes)."""
    import jax

    environ = dict(os.environ)
    if coordinator:
        environ["JAX_COORDINATOR_ADDRESS"] = coordinator
    count = training_devices(config, environ, os.cpu_count())
    if not count:
        return 0
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backends have started: their devices stay
        return 0
    return count
