"""Block checkpoints in safetensors: loading never executes code.

Two files per block:

* ``blocks/NNNN.state.safetensors``: the resume point, written every ``checkpoint_every`` steps
  and on interruption: weights (``net.*``), Adam moments (``adam_m.*``, ``adam_v.*``) and the
  block's RNG state (``rng``), with step, wall time and config hash in the metadata; nets with
  random layers (dropout) also keep the global generator's state (``rng_global``).
* ``blocks/NNNN.safetensors``: the final weights, written when the block reaches its target.

A done block may lose its resume point (``psm prune``, ``train.keep_state: false``:
:mod:`psm.runs.prune`). Such a block resumes from its final weights at their step, with a fresh
optimizer (no Adam moments, the EMA restarted from those weights, a new data stream):
:func:`load_state` says so (``BlockState.from_weights``), never a random net.

Every load checks the file's config hash and block id against the run, and the tensor names
and shapes against the net, so a foreign, truncated or mismatched file is refused with a
:class:`~psm.errors.CheckpointError` instead of silently becoming a random network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..errors import CheckpointError
from .atomic import atomic_write_bytes

if TYPE_CHECKING:
    from .run import Run

FORMAT = "psm-block/1"


@dataclass
class BlockState:
    """Everything needed to continue training a block exactly where it stopped.

    Attributes:
        step: parameter updates done.
        net: the net's ``state_dict``.
        adam_m: Adam first moments by parameter name (None before the first step).
        adam_v: Adam second moments by parameter name.
        rng: the block generator's state (``uint8``).
        wall_time: seconds spent training so far.
        global_rng: the global generator's state (dropout masks), when the trainer kept it.
        ema: the exponential moving average of the parameters (``train.ema``), by name.
        from_weights: the block had no resume point (pruned): this state is its final weights
            at their step, with no Adam moments, EMA or RNG state (``rng`` is None); the
            trainer starts a fresh optimizer and data stream.
    """

    step: int
    net: dict[str, Tensor]
    adam_m: dict[str, Tensor] | None
    adam_v: dict[str, Tensor] | None
    rng: Tensor | None
    wall_time: float
    global_rng: Tensor | None = None
    ema: dict[str, Tensor] | None = None
    from_weights: bool = False


def _cpu_copy(t: Tensor) -> Tensor:
    """A contiguous CPU copy that owns its memory (safetensors refuses shared views)."""
    return t.detach().to("cpu").contiguous().clone()


def save_state(run: Run, block: int, state: BlockState) -> None:
    """Write a block's resume point atomically."""
    tensors = {f"net.{k}": _cpu_copy(v) for k, v in state.net.items()}
    if state.adam_m is not None and state.adam_v is not None:
        tensors |= {f"adam_m.{k}": _cpu_copy(v) for k, v in state.adam_m.items()}
        tensors |= {f"adam_v.{k}": _cpu_copy(v) for k, v in state.adam_v.items()}
    if state.rng is None:
        raise ValueError("a resume point needs the block generator's state")
    tensors["rng"] = _cpu_copy(state.rng)
    if state.global_rng is not None:
        tensors["rng_global"] = _cpu_copy(state.global_rng)
    if state.ema is not None:
        tensors |= {f"ema.{k}": _cpu_copy(v) for k, v in state.ema.items()}
    meta = _meta(run, block, state.step) | {"wall_time": repr(float(state.wall_time))}
    atomic_write_bytes(run.layout.state(block), st_save(tensors, metadata=meta))


def save_weights(run: Run, block: int, net_state: dict[str, Tensor], step: int) -> None:
    """Write a block's final weights atomically."""
    tensors = {k: _cpu_copy(v) for k, v in net_state.items()}
    atomic_write_bytes(
        run.layout.weights(block), st_save(tensors, metadata=_meta(run, block, step))
    )


def _meta(run: Run, block: int, step: int) -> dict[str, str]:
    return {
        "format": FORMAT,
        "config_hash": run.hash,
        "block": str(block),
        "step": str(step),
        "net": run.config.net_for(block).name,
        "span": run.partition.describe(block),
    }


def _read(
    path: Path, run: Run, block: int, *, tensors: bool = True
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Open a block file, check its metadata against the run, and read its tensors.

    safetensors checks on open that the header covers the whole file, so a truncated file is
    caught even when only the metadata is read (``tensors=False``).
    """
    rel = path.relative_to(run.path) if path.is_relative_to(run.path) else path
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118
    except FileNotFoundError:
        raise CheckpointError(f"block {block}: {rel} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"block {block}: {rel} is unreadable (truncated or corrupt: {str(e).splitlines()[0]});"
            " delete it to retrain this block"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"block {block}: {rel} is not a psm block checkpoint")
    if meta.get("config_hash") != run.hash:
        raise CheckpointError(
            f"block {block}: {rel} was written under another config "
            f"(hash {meta.get('config_hash')}, this run is {run.hash}); refusing to load it"
        )
    if meta.get("block") != str(block):
        raise CheckpointError(f"block {block}: {rel} holds block {meta.get('block')}")
    return out, meta


def verify_checkpoints(run: Run, blocks: list[int]) -> None:
    """Check that every existing checkpoint of ``blocks`` is readable and belongs to this run
    (headers only, cheap); raise :class:`CheckpointError` on the first that is not."""
    for b in blocks:
        for path in (run.layout.state(b), run.layout.weights(b)):
            if path.exists():
                _read(path, run, b, tensors=False)


def resume_step(run: Run, block: int) -> int:
    """The step a block would resume from: its resume point's, else (a pruned block) its final
    weights', else 0. Reads headers only."""
    path = run.layout.state(block)
    if not path.exists():
        path = run.layout.weights(block)
        if not path.exists():
            return 0
    return _step_of(block, path, _read(path, run, block, tensors=False)[1])


def has_moments(run: Run, block: int) -> bool:
    """Whether a block resumes with Adam moments (a resume point written after a step); False
    for a block not started or pruned, which starts a fresh optimizer. Reads the header only."""
    path = run.layout.state(block)
    if not path.exists():
        return False
    _read(path, run, block, tensors=False)  # checked: ours, not truncated
    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("adam_m.") for k in f.keys())  # noqa: SIM118


def weights_step(run: Run, block: int) -> int:
    """The step of a block's final weights, checked against the run (header only).

    Raises:
        CheckpointError: the weights are missing, foreign or unreadable.
    """
    path = run.layout.weights(block)
    return _step_of(block, path, _read(path, run, block, tensors=False)[1])


def _step_of(block: int, path: Path, meta: dict[str, str]) -> int:
    try:
        return int(meta["step"])
    except (KeyError, ValueError):
        raise CheckpointError(f"block {block}: {path.name} has a malformed step") from None


def _check_keys(block: int, path: Path, got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [k for k in want if k in got and got[k].shape != want[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}")
        if shapes:
            parts.append(f"shape of {', '.join(shapes[:3])}")
        raise CheckpointError(
            f"block {block}: {path.name} does not match the configured net ({'; '.join(parts)})"
        )


def load_state(run: Run, block: int, net: nn.Module) -> BlockState | None:
    """A block's resume point; for a block without one but with final weights (pruned), those
    weights as a :class:`BlockState` with ``from_weights=True``; None for a block not started.
    ``net`` gives the expected tensors."""
    path = run.layout.state(block)
    if not path.exists():
        return _state_from_weights(run, block, net)
    tensors, meta = _read(path, run, block)
    want = net.state_dict()
    net_t = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    _check_keys(block, path, net_t, want)
    adam_m = {k[7:]: v for k, v in tensors.items() if k.startswith("adam_m.")} or None
    adam_v = {k[7:]: v for k, v in tensors.items() if k.startswith("adam_v.")} or None
    if adam_m is not None:
        params = dict(net.named_parameters())
        _check_keys(block, path, adam_m, params)
        _check_keys(block, path, adam_v or {}, params)
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    if ema is not None:
        _check_keys(block, path, ema, dict(net.named_parameters()))
    if "rng" not in tensors:
        raise CheckpointError(f"block {block}: {path.name} has no RNG state")
    try:
        step = int(meta["step"])
        wall = float(meta.get("wall_time", "0"))
    except (KeyError, ValueError):
        raise CheckpointError(f"block {block}: {path.name} has a malformed step") from None
    return BlockState(
        step, net_t, adam_m, adam_v, tensors["rng"], wall, tensors.get("rng_global"), ema
    )


def _state_from_weights(run: Run, block: int, net: nn.Module) -> BlockState | None:
    """A pruned block's restart point: its final weights at their step, nothing else (None when
    the block has no weights either)."""
    path = run.layout.weights(block)
    if not path.exists():
        return None
    tensors, meta = _read(path, run, block)
    _check_keys(block, path, tensors, net.state_dict())
    wall = float((run.ledger.read(block) or {}).get("wall_time", 0.0))
    return BlockState(_step_of(block, path, meta), tensors, None, None, None, wall,
                      from_weights=True)  # fmt: skip


def load_weights(run: Run, block: int, net: nn.Module) -> int:
    """Load a block's final weights into ``net`` (checked); return the step they were saved at."""
    path = run.layout.weights(block)
    tensors, meta = _read(path, run, block)
    _check_keys(block, path, tensors, net.state_dict())
    net.load_state_dict({k: v.to(p.device) for (k, v), p in _zip_state(tensors, net)})
    return int(meta["step"])


def _zip_state(tensors: dict[str, Tensor], net: nn.Module):
    ref = net.state_dict()
    return [((k, tensors[k]), ref[k]) for k in ref]
