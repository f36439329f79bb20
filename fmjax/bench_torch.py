"""HF's (PyTorch's) side of `fmjax bench train|decode --against hf`, on the
device fmjax computes on: the CPU, or the GPU where JAX runs on one.

On a GPU both sides multiply float32 matrices in full float32: JAX's
default there rounds the operands of float32 products to TF32 and
PyTorch's keeps float32 (`torch.backends.cuda.matmul.allow_tf32`), so
`hf_device` sets JAX's `jax_default_matmul_precision` to "highest" and
`torch_setup` keeps TF32 off. On a CPU nothing changes: both compute in
float32 there. Timed steps wait for the GPU's queue to drain
(`synchronize`), as fmjax's wait for their results.
"""

from __future__ import annotations

from fmjax.config import ConfigError


def hf_device() -> str:
    """Where HF's side runs: "cuda" when JAX's default backend is a GPU
    (also setting JAX's float32 products to full float32), "cpu" on a CPU;
    refuses other backends (a TPU), where no PyTorch device is at hand."""
    import jax

    backend = jax.default_backend()
    if backend == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")
        return "cuda"
    if backend != "cpu":
        raise ConfigError(
            f"--against hf runs HF (PyTorch) on the CPU or a GPU, beside JAX; "
            f"JAX computes on {backend!r} here"
        )
    return "cpu"


def torch_setup(threads: int, device: str = "cpu"):
    """PyTorch's threads, seed 0 and float32 products on `device`; returns it
    as a torch.device. Refuses a GPU this PyTorch cannot use."""
    import torch

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"HF's side runs on 'cpu' or 'cuda', not {device!r}")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--against hf: JAX computes on the GPU, but PyTorch "
                f"{torch.__version__} sees no CUDA device to run HF's side on; "
                f"install a CUDA build of torch, or run both on the CPU "
                f"(JAX_PLATFORMS=cpu)"
            )
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(device)


def torch_matmul(a, device: str | None):
    """A call doing PyTorch's `a @ a` on `device` and waiting for it, or None
    where PyTorch is missing or cannot use `device` (None: a TPU)."""
    if device is None:
        return None
    try:
        import torch

        torch_setup(torch.get_num_threads(), device)
    except (ImportError, ConfigError):
        return None
    t = torch.from_numpy(a).to(device)

    def product():
        t @ t
        synchronize(device)

    return product


def synchronize(device) -> None:
    """Waits for the work queued on `device` (a no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_train_step(model, opt, inputs: dict, after_step=None, device="cpu"):
    """`run()` does one full optimizer step of the HF (PyTorch) `model` on
    `inputs` (its forward's keyword arguments; the output's `.loss` trains),
    with fmjax's optimizer config `opt`: AdamW decaying matrices only (fmjax's
    mask), global-norm clipping when `opt.grad_clip_norm` > 0, then
    `after_step()` (fmjax's `constrain_params`). Model and inputs move to
    `device`; each step waits for it to finish."""
    import torch

    model.to(device).train()
    inputs = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
    }
    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.ndim >= 2]
    kept = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decayed, "weight_decay": opt.weight_decay},
        {"params": kept, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=opt.learning_rate,
        betas=(opt.b1, opt.b2), eps=opt.eps,
    )  # fmt: skip

    def run():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        if opt.grad_clip_norm and opt.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, opt.grad_clip_norm)
        optimizer.step()
        if after_step is not None:
            after_step()
        synchronize(device)

    return run
