"""What a run has done so far, besides its weights: the data stream's place and the run totals.

A checkpoint saves both (as its progress), so that a resumed run draws the next groups and keeps
counting where the killed one stopped.
"""

from __future__ import annotations

import hashlib
import json
import random

from opd_local.data import PromptGroup


class GroupStream:
    """A deterministic stream of PromptGroups: each epoch visits every group once, shuffled with seed + epoch."""

    def __init__(self, groups: list[PromptGroup], seed: int, shuffle: bool = True):
        if not groups:
            raise ValueError("GroupStream needs at least one prompt group")
        self.groups = list(groups)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        # Detects a resume against different data, which could not reproduce the run: the rows' ids and
        # their content, as both prompts' token ids (so a changed row or tokenizer counts too).
        digest = hashlib.sha256()
        for g in self.groups:
            digest.update(json.dumps([g.row.row_id, g.student_prompt_ids, g.teacher_prompt_ids]).encode())
        self.fingerprint = digest.hexdigest()[:16]
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.groups)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_groups(self, n: int) -> list[PromptGroup]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), len(self._order) - self.position)
            out.extend(self.groups[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def first_groups(self, n: int) -> list[PromptGroup]:
        """The first `n` groups of epoch 0: the rows a run trains on first, whatever it has drawn so far."""
        return [self.groups[i] for i in self._epoch_order(0)[:n]]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "shuffle", "fingerprint"):
            if state[key] != getattr(self, key):
                what = "the training rows (ids or content) differ from the checkpoint's" if key == "fingerprint" else f"data stream {key}"
                raise ValueError(
                    f"cannot resume: {what} ({key} was {state[key]!r}, now {getattr(self, key)!r}); a resume must read the same rows"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)


# Each run total and the per-step metric (summed over ranks) it adds up.
TOTALS_OF = {
    "groups/sampled_total": "groups/sampled",
    "groups/filtered_total": "groups/filtered",
    "groups/failed_total": "groups/failed",
    "opd/active_tokens_total": "opd/active_tokens",
}


class RunTotals:
    """Totals over every step so far, logged each step as the `_total` metrics (docs/design.md, "Metrics")."""

    def __init__(self):
        self.totals = {name: 0 for name in TOTALS_OF}

    def add(self, step_metrics: dict[str, float]) -> dict[str, int]:
        """Add one step's counts; returns the totals as metrics."""
        for name, per_step in TOTALS_OF.items():
            self.totals[name] += int(step_metrics[per_step])
        return dict(self.totals)

    def state_dict(self) -> dict[str, int]:
        return dict(self.totals)

    def load_state_dict(self, state: dict) -> None:
        missing = set(TOTALS_OF) - set(state)
        if missing:
            raise ValueError(f"cannot resume: the checkpoint's run totals lack {sorted(missing)}")
        self.totals = {name: int(state[name]) for name in TOTALS_OF}
