"""Run an ablation grid and write its table and chart.

    python scripts/ablate.py configs/ablations/privileged-vs-plain.yaml [--out_dir DIR] [--gpus auto]

Each (variant, seed) trains in its own process, one after another, or one per GPU at a time.
Restarting skips the runs that finished and resumes a killed one from its checkpoint. The table
(mean ± std over seeds) goes to OUT_DIR/results.md and the overlay of held-out trace-gap curves
to OUT_DIR/trace_gap.png.
"""

from __future__ import annotations

import argparse

from sweep import load_grid, run_sweep, write_results  # scripts/sweep.py, beside this file


def visible_gpus(choice: str) -> list[str]:
    if choice == "none":
        return []
    if choice != "auto":
        return [g.strip() for g in choice.split(",") if g.strip()]
    import torch

    count = torch.cuda.device_count()
    return [str(i) for i in range(count)] if count > 1 else []  # one GPU: runs share it one after another


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="grid YAML: out_dir, base, axes, seeds")
    parser.add_argument("--out_dir", default=None, help="overrides the grid's out_dir")
    parser.add_argument(
        "--gpus", default="auto", help="auto (one run per GPU when there are several), none, or ids like 0,1,2,3"
    )
    parser.add_argument("--report_only", action="store_true", help="only rebuild the table and chart")
    args = parser.parse_args()
    grid = load_grid(args.grid, args.out_dir)
    if not args.report_only:
        run_sweep(grid, visible_gpus(args.gpus))
    print(write_results(grid))
    print(f"table: {grid.out_dir / 'results.md'}  chart: {grid.out_dir / 'trace_gap.png'}")


if __name__ == "__main__":
    main()
