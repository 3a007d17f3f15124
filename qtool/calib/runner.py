"""Block-by-block calibration runner.

Captures the inputs of decoder block 0 once (the embeddings run on the compute device, then a
sentinel stops the forward), then walks the blocks in order: each block is moved to the compute
device, processed by a callback, run forward to produce the next block's inputs, and moved back.
Cached hidden states live on the CPU between blocks when `offload` is set, so a model larger than
the GPU still calibrates (only one block and one micro-batch of activations are on the device).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from qtool.models.base import Adapter, AttentionSpec, BlockPlan

log = logging.getLogger("qtool.calib")


class _StopForward(Exception):
    """Private sentinel raised by the catcher after block 0's inputs were recorded."""


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module, sink: list):
        super().__init__()
        self.block = block
        self.sink = sink
        # HF decoder stacks may read attributes such as `attention_type` off each layer.
        for attr in ("attention_type", "layer_idx"):
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((hidden_states, args, kwargs))
        raise _StopForward


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _fit_batch(obj, captured_b: int, b: int):
    """Slice batch-sized tensors in captured kwargs down to a smaller last micro-batch."""
    if b == captured_b or captured_b == 1:
        return obj
    if isinstance(obj, Tensor):
        return obj[:b] if obj.dim() > 0 and obj.shape[0] == captured_b else obj
    if isinstance(obj, tuple):
        return tuple(_fit_batch(o, captured_b, b) for o in obj)
    if isinstance(obj, dict):
        return {k: _fit_batch(v, captured_b, b) for k, v in obj.items()}
    return obj


@dataclass
class BlockContext:
    """Everything a pass needs about one decoder block during calibration."""

    index: int
    prefix: str  # e.g. "model.layers.3"
    block: nn.Module
    plan: BlockPlan
    attention: AttentionSpec
    inputs: list[Tensor]  # hidden-state micro-batches (CPU when offloaded)
    kwargs: dict  # captured keyword arguments of the block forward (masks, positions)
    captured_batch: int
    device: torch.device
    notes: list[str] = field(default_factory=list)

    def linear(self, name: str) -> nn.Linear:
        return self.block.get_submodule(name)

    def module(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    def batches(self) -> Iterator[tuple[Tensor, dict]]:
        for x in self.inputs:
            yield x.to(self.device), _fit_batch(self.kwargs, self.captured_batch, x.shape[0])

    @torch.inference_mode()
    def run_block(self, offload: bool = True) -> list[Tensor]:
        """Forward the whole block over every micro-batch; outputs on CPU when offload."""
        outs = []
        for x, kw in self.batches():
            y = _first_output(self.block(x, **kw))
            outs.append(y.to("cpu") if offload else y)
        return outs

    @torch.inference_mode()
    def collect(self, names: list[str], fn: Callable[[str, Tensor], Any]) -> None:
        """Run the block once; call fn(name, input) with the input of each named sub-module."""
        handles = []
        for name in names:
            mod = self.block.get_submodule(name)
            handles.append(mod.register_forward_pre_hook(_make_hook(name, fn), with_kwargs=True))
        try:
            for x, kw in self.batches():
                self.block(x, **kw)
        finally:
            for h in handles:
                h.remove()

    def call(self, name: Optional[str], x: Tensor, kw: dict) -> Tensor:
        """Run a sub-module (None: a single linear given by the caller) on x with the block kwargs."""
        mod = self.block if name is None else self.block.get_submodule(name)
        if name is not None and name.endswith("self_attn"):
            return _first_output(mod(hidden_states=x, **kw))
        return _first_output(mod(x))


def _make_hook(name, fn):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        fn(name, x)

    return hook


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


@torch.inference_mode()
def capture_block0_inputs(model, adapter: Adapter, ids: Tensor, device, batch_size: int, offload: bool):
    """Run the embedding stage for each micro-batch and return (hidden micro-batches, kwargs, batch)."""
    blocks = adapter.blocks(model)
    sink: list = []
    first = blocks[0]
    blocks[0] = _Catcher(first, sink)
    moved = [adapter.embed_tokens(model)]
    rot = adapter.rotary(model)
    if rot is not None:
        moved.append(rot)
    for m in moved:
        m.to(device)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = first
        for m in moved:
            m.to("cpu")
    if len(sink) != -(-ids.shape[0] // batch_size):
        raise RuntimeError("block 0 was not reached for every calibration micro-batch")
    hidden = [h.to("cpu") if offload else h for h, _, _ in sink]
    _, args, kwargs = sink[0]
    if args:
        raise RuntimeError("decoder block received unexpected positional arguments")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    kwargs = _to(kwargs, "cpu") if offload else kwargs
    return hidden, kwargs, hidden[0].shape[0]


def walk_blocks(
    model,
    adapter: Adapter,
    cfg,
    ids: Tensor,
    process: Callable[[BlockContext], None],
    *,
    device: torch.device,
    batch_size: int,
    offload: bool,
    propagate: str = "fp",
    on_block: Optional[Callable[[int, int], None]] = None,
) -> None:
    """Capture block-0 inputs, then for each block: process(ctx) and compute the next inputs.

    propagate="fp": block i+1 sees block i's output computed *before* `process` modified it (AWQ's
    protocol); "quantized": after (GPTQ-style sequential propagation).
    """
    hidden, kwargs, captured_b = capture_block0_inputs(model, adapter, ids, device, batch_size, offload)
    plan = adapter.block_plan(cfg)
    attn = adapter.attention(cfg)
    blocks = adapter.blocks(model)
    n = len(blocks)
    for i in range(n):
        block = blocks[i]
        block.to(device)
        ctx = BlockContext(
            index=i,
            prefix=adapter.block_prefix(i),
            block=block,
            plan=plan,
            attention=attn,
            inputs=hidden,
            kwargs=_to(kwargs, device),
            captured_batch=captured_b,
            device=device,
        )
        with _oom_advice(i):
            if propagate == "fp":
                next_hidden = ctx.run_block(offload)
                process(ctx)
            else:
                process(ctx)
                next_hidden = ctx.run_block(offload)
        block.to("cpu")
        hidden = next_hidden
        del ctx
        if device.type == "cuda":
            torch.cuda.empty_cache()
        gc.collect()
        if on_block:
            on_block(i + 1, n)


@contextlib.contextmanager
def _oom_advice(i: int):
    try:
        yield
    except torch.OutOfMemoryError as e:
        from qtool.errors import CalibrationError

        raise CalibrationError(
            f"out of memory while calibrating block {i}",
            "lower calib.batch_size, calib.n_samples or calib.seqlen, or set calib.offload=true",
        ) from e
