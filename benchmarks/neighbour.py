"""A plain torch training loop, the neighbour for benchmarks/bench_contention.py.

    python benchmarks/neighbour.py [--seconds 0 (forever)] [--width 1024] [--batch 256]

A 4-layer MLP (width x width, GELU) trained on fixed random data with AdamW, at torch's default thread
count (its intra-op pool is libgomp's, which spin-waits between parallel regions by default), until killed
or --seconds pass. Prints its steps per second on exit (SIGTERM).
"""

import argparse
import signal
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(args.width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(args.batch, args.width), torch.randn(args.batch, 1)
    steps, start = 0, time.perf_counter()

    def done(*_):
        elapsed = time.perf_counter() - start
        print(f"neighbour: {steps} steps in {elapsed:.1f} s ({steps / max(elapsed, 1e-9):.2f} steps/s), "
              f"{torch.get_num_threads()} threads", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, done)
    while not args.seconds or time.perf_counter() - start < args.seconds:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    done()


if __name__ == "__main__":
    main()
