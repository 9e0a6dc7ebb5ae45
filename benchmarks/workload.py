"""The workload the benchmarks share: the trainer's default model and its bundled GSM8K student prompts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from opd_local.config import Config
from opd_local.data import PromptGroup, load_rows, tokenize_groups
from opd_local.models import load_tokenizer, resolve_model_path


@dataclass
class Workload:
    cfg: Config
    device: torch.device
    model_path: str
    tokenizer: object
    groups: list[PromptGroup]

    @property
    def prompts(self) -> list[list[int]]:
        return [g.student_prompt_ids for g in self.groups]


def add_workload_args(parser: argparse.ArgumentParser, samples: int) -> None:
    parser.add_argument("--model", default=Config().model.student, help="Hugging Face id, directory, or the embedded SmolLM2")
    parser.add_argument("--groups", type=int, default=4, help="prompts")
    parser.add_argument("--samples", type=int, default=samples, help="completions per prompt")
    parser.add_argument("--max_tokens", type=int, default=128, help="completion length cap")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported, with p10/p90")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of each timed call before its repeats")


def load_workload(args: argparse.Namespace) -> Workload:
    cfg = Config()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model_path(args.model, cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    rows = load_rows(cfg.data.train, cfg.data.train_split, max_rows=args.groups)
    groups, _ = tokenize_groups(rows, tokenizer, cfg.data.max_prompt_tokens)
    return Workload(cfg, device, path, tokenizer, groups)
