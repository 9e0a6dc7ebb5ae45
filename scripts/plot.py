"""Charts and a markdown summary of a finished (or running) run, from its metrics.jsonl.

    python scripts/plot.py runs/default
"""

import argparse
from pathlib import Path

from opd_local.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    args = parser.parse_args()
    if not (args.run_dir / "metrics.jsonl").is_file():
        parser.error(f"no metrics.jsonl in {args.run_dir}")
    table = write_report(args.run_dir)
    print(table)
    for path in sorted((args.run_dir / "charts").glob("*.png")):
        print(path)
    print(args.run_dir / "summary.md")


if __name__ == "__main__":
    main()
