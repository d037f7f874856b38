"""Data parallelism for the UNet: DDP (default) and FSDP2 (memory-bound cases).

DDP keeps a full fp32 copy of weights, grads and AdamW state per GPU (40 GiB for UNet + TE1,
../shared/reference/performance.md §5); that caps the micro-batch without checkpointing at ~5.
FSDP2 shards all three across ranks (`fully_shard` per UNet block, so one block's weights are
gathered at a time), with bf16 compute params and fp32 gradient reduction: static state falls
to ~5 GiB/GPU on 8 ranks and the freed memory buys a bigger micro-batch or a trainable TE2.

Both wrappers take a plain module and return the module to train; checkpoints always save
and load a FULL (unsharded) state dict, so a run can resume under the other strategy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's down / mid / up blocks: the FSDP2 units (each gathers its weights once)."""
    blocks = [*unet.down_blocks]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(unet.mid_block)
    blocks += [*unet.up_blocks]
    return blocks


def apply_fsdp2(
    unet: nn.Module,
    *,
    mesh=None,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    extra_modules: Iterable[nn.Module] = (),
) -> nn.Module:
    """Shard `unet` in place with FSDP2: one unit per UNet block, the root holds the rest.

    `param_dtype=bfloat16` replaces autocast for the UNet (weights are all-gathered already in
    bf16, which also halves all-gather traffic); fp32 master weights and AdamW state stay
    sharded in fp32 and gradients are reduce-scattered in `reduce_dtype`. `extra_modules`
    (e.g. a trained text encoder) become their own units. `torch.distributed` must be
    initialised; `mesh` defaults to all ranks on the current device type.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 (torch 2.11-2.13) refuses non-contiguous params, i.e. channels-last conv weights.
    # Make them contiguous: convs still run channels-last when their input is (PyTorch picks
    # the memory format from input or weight), so the activations keep the fast layout.
    extra_modules = list(extra_modules)
    for mod in [unet, *extra_modules]:
        for p in mod.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in unet_blocks(unet):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for mod in extra_modules:
        fully_shard(mod, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        _keep_output_recording(mod)
    # Root: conv_in/out, time and text-time embeddings; never resharded (used again first in backward).
    fully_shard(unet, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return unet


def _keep_output_recording(module: nn.Module) -> None:
    """fully_shard swaps a module's class for an `FSDP<Name>` subclass; transformers 5 looks up
    which layers' outputs `output_hidden_states` records by the exact class name, so without
    this a sharded CLIP text encoder silently returns `hidden_states=None`."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers 4: hidden states are returned without a registry
        return
    if getattr(module, "_can_record_outputs", None):
        _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def wrap_ddp(
    module: nn.Module,
    device: torch.device,
    *,
    bucket_cap_mb: int = 100,
    static_graph: bool = True,
) -> nn.Module:
    """DDP with larger gradient buckets (fewer all-reduce launches for 2.6 B params) and grads as
    bucket views (no second gradient copy). `static_graph` lets DDP overlap comm with compute
    from the first step, valid because the UNet uses every parameter every step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
        gradient_as_bucket_view=True,
        static_graph=static_graph,
    )


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 weights on CPU, identical in layout for plain, DDP and FSDP2 modules.

    Collective under FSDP2: every rank must call it (rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module
    return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a plain, DDP or FSDP2 module.

    Distributed: collective; rank 0 passes the full dict (read from the checkpoint) and the
    other ranks may pass `{}` — rank 0 broadcasts, so only one process reads the file."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    inner = module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module
    broadcast = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    set_model_state_dict(inner, dict(state), options=opts)  # a copy: torch swaps in DTensors


def set_gradient_sync(roots: Iterable[nn.Module], enabled: bool) -> None:
    """FSDP2 gradient accumulation: skip the reduce-scatter on non-final micro-steps (the
    unsharded gradients accumulate locally) and sync on the last one; the DDP twin is `no_sync()`."""
    for root in roots:
        root.set_requires_gradient_sync(enabled)


def unsharded_copy(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) module of `module`'s class holding `state`, for `save_pretrained`.

    Built on `meta` and filled with `assign=True`, so the only memory used is `state` itself
    (the gathered full weights). Non-persistent buffers (e.g. CLIP's position ids) are rebuilt
    from the original, because `save_pretrained` writes only the state dict anyway but some
    models touch them while saving."""
    with torch.device("meta"):
        if hasattr(module, "from_config") and hasattr(module, "config"):  # diffusers
            copy = type(module).from_config(module.config)
        else:  # transformers
            copy = type(module)(module.config)
    copy.load_state_dict(state, strict=False, assign=True)
    for name, buf in list(copy.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            src = module.get_buffer(name)
            (copy.get_submodule(owner) if owner else copy).register_buffer(
                leaf, src.detach().to("cpu").clone(), persistent=False
            )
    missing = [n for n, p in copy.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"gathered state of {type(module).__name__} lacks {missing[:5]}")
    return copy.eval()


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The FSDP2 optimizer state gathered unsharded (tensors keyed by parameter FQN), on rank 0's
    CPU; other ranks get `{}`. Collective. Same layout as `fqn_optimizer_state` of a plain model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard an FQN-keyed full optimizer state (read by every rank) into this rank's FSDP2 optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )


def fqn_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A plain optimizer's `state_dict()` with parameter ids renamed to FQNs (values untouched).

    One on-disk layout for DDP and FSDP2 checkpoints, so a run can resume under either."""
    sd = optimizer.state_dict()
    names = _fqns_by_id(model, optimizer)
    return {
        "state": {names[pid]: st for pid, st in sd["state"].items()},
        "param_groups": [{**g, "params": [names[p] for p in g["params"]]} for g in sd["param_groups"]],
    }


def id_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """Inverse of `fqn_optimizer_state` (FQN keys -> this optimizer's ids); id-keyed input passes through."""
    groups = state["param_groups"]
    if all(isinstance(p, int) for g in groups for p in g["params"]):
        return state
    ids = {name: pid for pid, name in _fqns_by_id(model, optimizer).items()}
    return {
        "state": {ids[name]: st for name, st in state["state"].items()},
        "param_groups": [{**g, "params": [ids[p] for p in g["params"]]} for g in groups],
    }


def fqn_keyed(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An id-keyed optimizer state (older checkpoints, DDP) renamed to FQNs for FSDP2 loading."""
    groups = state["param_groups"]
    if not all(isinstance(p, int) for g in groups for p in g["params"]):
        return state
    names = _fqns_by_id(model, optimizer)
    return {
        "state": {names[pid]: st for pid, st in state["state"].items()},
        "param_groups": [{**g, "params": [names[p] for p in g["params"]]} for g in groups],
    }


def _fqns_by_id(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Optimizer state ids (position over all groups' params, as `state_dict()` numbers them) -> FQN."""
    by_param = {id(p): name for name, p in model.named_parameters()}
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: by_param[id(p)] for i, p in enumerate(flat)}
