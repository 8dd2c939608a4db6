"""Per-GPU launch settings of the Triton kernels: measured on each GPU by ``mirrorla tune``, never guessed.

Some choices of the Triton path depend on the GPU more than on the code, so they are looked up per GPU:

- ``row_max_tiles``: rows of at most this many token tiles (64 tokens at d ≤ 64) run on the row kernels, one
  program per (b, h) row and one launch each way; longer rows run on the chunked kernels, many programs per row.
  The row kernels save launches (host time) and lose parallelism, so where they stop winning depends on the GPU's
  size and its host. A value beyond the default's 8 tiles applies only with at least as many rows as the GPU has
  SMs (and never while a CUDA graph records), see ``_row_max_tiles`` in :mod:`.triton_linear_attention`.
- ``backward_blocks``: ``(token tile, warps)`` of the chunked backward kernels for heads up to 64 wide, where the
  matmuls run on tensor cores (bf16/fp16 inputs; fp32 ones where torch allows TF32). Smaller tiles and more warps
  spill fewer registers (ptxas) but run smaller matmuls.
- ``ieee_backward_blocks``: the same for fp32 inputs with IEEE fp32 matmuls (torch's default matmul precision),
  every head width, and the row backward's token tile there too. Those matmuls hold fp32 operand tiles in
  registers: with 64-token tiles ptxas for sm_90 spills 20–30 KB per thread, with 16 tokens and 8 warps nothing.
- ``moment_state_blocks``: ``(token tile, warps)`` of the chunked state pass of a rotation's training forward
  (MirrorLA's, or ``rotate_relu``'s with an angle that needs a gradient) for heads up to 64 wide on tensor-core
  dots. That pass also sums the moment its backward needs, which doubles its accumulators: on sm_90 (bf16,
  d = 64, ptxas) 64-token tiles with 4 warps take 216 registers per thread, so an SM holds 8 of its warps, where
  32-token tiles take 153 and an SM holds 12, for about 11% more instructions per token. Which wins is the GPU's
  to say: the pass waits on memory and on its matmuls more than it issues instructions. The chunked passes launch
  4 programs per SM, so the 32-token option's 3 programs per SM run in two rounds, the second a third full; the
  race measures that as the library would run it.

Where the values come from, the first that has the GPU (by its CUDA name) wins:

1. the JSON file named by the environment variable ``MIRRORLA_TUNING`` (what ``mirrorla tune --out FILE``
   writes; read at the first launch on each GPU, :func:`clear_tuning_cache` rereads it);
2. ``kernel_tuning.json`` beside this module: entries measured in this project's GPU sessions;
3. :data:`DEFAULT_TUNING`.

CPU tensors (Triton's interpreter) always take the defaults. Tools and tests can force values for a block of code
with :func:`forced_tuning`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_TUNING", "KernelTuning", "clear_tuning_cache", "forced_tuning", "kernel_tuning",
           "read_tuning_file", "tuning_for_gpu"]

TUNING_FORMAT = 1
BUNDLED_TUNING = Path(__file__).with_name("kernel_tuning.json")
TILE_CHOICES = (16, 32, 64)  # tl.dot needs at least 16 rows; the backward's tiles of 128 overflow shared memory
WARP_CHOICES = (1, 2, 4, 8, 16)
BLOCK_FIELDS = ("backward_blocks", "ieee_backward_blocks", "moment_state_blocks")  # the (token tile, warps) settings


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """The Triton path's per-GPU launch settings (see the module's docstring); ``source`` says where they came from."""

    row_max_tiles: int = 8
    backward_blocks: tuple[int, int] = (64, 4)
    ieee_backward_blocks: tuple[int, int] = (16, 8)
    moment_state_blocks: tuple[int, int] = (64, 4)
    source: str = "defaults"

    def __post_init__(self):
        if not isinstance(self.row_max_tiles, int) or isinstance(self.row_max_tiles, bool) or self.row_max_tiles < 0:
            raise ValueError(f"row_max_tiles must be an int >= 0, got {self.row_max_tiles!r}")
        for name in BLOCK_FIELDS:
            blocks = getattr(self, name)
            if (not isinstance(blocks, tuple) or len(blocks) != 2 or blocks[0] not in TILE_CHOICES
                    or blocks[1] not in WARP_CHOICES):
                raise ValueError(f"{name} must be (token tile in {TILE_CHOICES}, warps in {WARP_CHOICES}), "
                                 f"got {blocks!r}")

    def settings(self) -> dict:
        """The settings as a tuning file stores them."""
        return {"row_max_tiles": self.row_max_tiles, **{name: list(getattr(self, name)) for name in BLOCK_FIELDS}}


DEFAULT_TUNING = KernelTuning()
"""Used where no measurement names the GPU: rows of up to 8 tiles (512 tokens) on the row kernels, the chunked
backward on the forward's (64 tokens, 4 warps), with IEEE fp32 dots on (16 tokens, 8 warps), and the training
state pass of a rotation on the forward's (64 tokens, 4 warps)."""

_CACHE: dict[int, KernelTuning] = {}
_FORCED: dict = {}


def read_tuning_file(path: str | os.PathLike) -> dict[str, KernelTuning]:
    """The entries of a tuning file, ``{GPU name: KernelTuning}``. A malformed file is an error naming it and the
    entry at fault."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"tuning file {path} does not exist (MIRRORLA_TUNING names it)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"tuning file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != TUNING_FORMAT or not isinstance(data.get("gpus"), dict):
        raise ValueError(f"tuning file {path} must be a JSON object with \"format\": {TUNING_FORMAT} and a \"gpus\" "
                         "object (what mirrorla tune writes)")
    entries = {}
    for name, entry in data["gpus"].items():
        try:
            # backward_blocks is required; the settings added later default where an older file lacks them
            blocks = {field: entry[field] if field == "backward_blocks" else
                      entry.get(field, list(getattr(DEFAULT_TUNING, field))) for field in BLOCK_FIELDS}
            entries[name] = KernelTuning(
                row_max_tiles=entry["row_max_tiles"],
                **{field: tuple(value) if isinstance(value, list) else value for field, value in blocks.items()},
                source=f"{path.name}: {entry.get('measured', 'no provenance recorded')}")
        except (KeyError, TypeError, ValueError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"tuning file {path}, entry {name!r}: {detail}") from None
    return entries


def tuning_for_gpu(name: str) -> KernelTuning:
    """The settings for the GPU called ``name`` (``torch.cuda.get_device_name``): ``MIRRORLA_TUNING``'s file, then
    the bundled table, then the defaults."""
    user = os.environ.get("MIRRORLA_TUNING", "").strip()
    for path in ([user] if user else []) + [BUNDLED_TUNING]:
        if path is BUNDLED_TUNING and not path.exists():
            continue
        entries = read_tuning_file(path)
        if name in entries:
            return entries[name]
    return DEFAULT_TUNING


def kernel_tuning(device: torch.device) -> KernelTuning:
    """The launch settings for tensors on ``device`` (looked up once per GPU; forced values win)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        tuning = _CACHE.get(index)
        if tuning is None:
            tuning = _CACHE[index] = tuning_for_gpu(torch.cuda.get_device_name(index))
    else:
        tuning = DEFAULT_TUNING
    return dataclasses.replace(tuning, **_FORCED) if _FORCED else tuning


def clear_tuning_cache() -> None:
    """Forget the looked-up settings: the next launch on each GPU reads ``MIRRORLA_TUNING`` and the table again."""
    _CACHE.clear()


@contextlib.contextmanager
def forced_tuning(**settings):
    """Use these settings (fields of :class:`KernelTuning`) on every device inside the block, e.g.
    ``forced_tuning(row_max_tiles=0)`` for the chunked kernels only. Not thread-safe: for tools and tests."""
    dataclasses.replace(DEFAULT_TUNING, **settings)  # checks the values before the block runs
    saved = dict(_FORCED)
    _FORCED.update(settings, source="forced")
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)
