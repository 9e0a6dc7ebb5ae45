"""Tile shapes of the Triton fused-linear kernels (`kernels.triton.linear_logprob`): the fixed tiles, the
autotuning candidates, the dot-product settings per dtype, and whether an N fills a GPU's row-block grids."""

from __future__ import annotations

import torch
import triton

from kernels.triton.common import INTERPRET

# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps). On sm_90, BLOCK_H = 64 spills registers in the gradient kernels
# (ptxas: 255 registers and 112-384 bytes of stack) and 32 does not. tl.dot needs every tile side >= 16,
# and the interpreter, which is slow, gets the smallest tiles. GPU_TILES is the first autotuning candidate.
GPU_TILES = (64, 128, 32, 8)
INTERPRETER_TILES = (16, 32, 16, 1)
DEFAULT_TILES = INTERPRETER_TILES if INTERPRET else GPU_TILES
FWD_TILE_CANDIDATES = [GPU_TILES, (128, 128, 32, 8), (64, 256, 32, 8), (128, 64, 64, 4), (64, 128, 64, 4)]
GRAD_TILE_CANDIDATES = [GPU_TILES, (128, 128, 32, 8), (128, 64, 32, 4), (64, 64, 32, 4)]
# Below this many row blocks per SM the row-block grids leave SMs idle: the chunked cuBLAS path runs instead.
MIN_ROW_BLOCKS_PER_SM = 1


def autotuned(kernel, candidates, reset_to_zero=None):
    """`kernel` autotuned over `candidates` tiles per (V, H); `reset_to_zero` names its accumulators."""
    configs = [
        triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh), num_warps=warps) for bn, bv, bh, warps in candidates
    ]
    return triton.autotune(configs=configs, key=["V", "H"], reset_to_zero=reset_to_zero)(kernel)


def fills_gpu(n: int, sm_count: int) -> bool:
    """Whether N rows give the row-block grids (at the smallest candidate BLOCK_N) work for every SM."""
    smallest = min(c[0] for c in FWD_TILE_CANDIDATES + GRAD_TILE_CANDIDATES)
    return triton.cdiv(n, smallest) >= MIN_ROW_BLOCKS_PER_SM * sm_count


def tile_kwargs(tiles) -> dict | None:
    """Tile kwargs; None (autotune) on a GPU when none are given."""
    if tiles is None and not INTERPRET:
        return None
    block_n, block_v, block_h, warps = tiles or DEFAULT_TILES
    for side in (block_n, block_v, block_h):
        if side < 16 or side & (side - 1):
            raise ValueError(f"tiles must be powers of two >= 16 (tl.dot), got {tiles}")
    return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps)


def dot_args(dtype: torch.dtype) -> dict:
    # fp32 inputs follow torch's own fp32 matmul setting: full precision by default ("highest"), TF32
    # tensor cores once torch.set_float32_matmul_precision("high") allows them.
    ieee = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return dict(UPCAST=INTERPRET and dtype == torch.bfloat16, PRECISION="ieee" if ieee else "tf32")
