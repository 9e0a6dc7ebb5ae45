"""Train a student by on-policy distillation from a privileged teacher.

    python scripts/train.py [--config run.yaml ...] [--section.key value ...] [--debug]
    torchrun --nproc_per_node=8 scripts/train.py [...]

A setting, file or checkpoint that cannot run is refused on one line, with exit code 2, before
anything in the run directory is written; --debug prints the traceback instead.
"""

from opd_local.cpu_threads import configure_cpu_threads

configure_cpu_threads()  # before torch is imported: libgomp reads its settings once, when it loads

from opd_local.cli import train_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(train_main(description=__doc__))
