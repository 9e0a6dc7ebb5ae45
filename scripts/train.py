"""Train a student by on-policy distillation from a privileged teacher.

    python scripts/train.py [--config run.yaml] [--section.key value ...]
    torchrun --nproc_per_node=8 scripts/train.py [...]
"""

from opd_local.config import parse_config
from opd_local.loop import train


def main() -> None:
    cfg = parse_config(description=__doc__)
    run_dir = train(cfg)
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    main()
