"""`--time-budget`: a run's schedule sized to the wall-clock time it may take on the machine at hand.

The recipe's `epochs x steps` is the most a budgeted run trains. After its first steps the run knows what a step
costs here, and fits its length: the largest number of optimizer steps such that the run so far, the steps left and
the evaluations (and epoch-end saves) they bring end inside the budget. The cosine then decays to that step, so the
run ends annealed instead of cut off. The fit is redone at each epoch's end with the measured step and evaluation
times, and the fitted length travels in the checkpoint, so `--resume` continues the same schedule.

Time is the run's wall clock as `summary.json` counts it (`wall_seconds`: building the model and data, training,
evaluations, checkpoints; across resumes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([hms])")

# Steps left out of the step-time measurement: the first ones pay for allocations, oneDNN's kernel choice, caches.
SETTLE_STEPS = 3
# Steps measured before the first fit (fewer when the epoch is shorter).
MEASURE_STEPS = 20
# Headroom: the fitted run aims at this share of the budget (the step time wanders by a few percent on a VM).
TARGET_SHARE = 0.97
EVAL_SHARE = 0.5


def parse_duration(value: Any) -> float:
    """Seconds from `540`, `"540"`, `"540s"`, `"9m"`, `"9m30s"`, `"1h"`, `"1.5h"`; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"a duration like 9m, 540s or 1h30m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"a duration like 9m, 540s or 1h30m, got {value!r}") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return seconds


def evaluations_between(done: int, total: int, steps_per_epoch: int, eval_every: int) -> int:
    """Evaluations (each with its epoch-end saves) after step `done` up to a run that ends at step `total`: the end
    of every `eval_every`-th epoch on the way, and the last step's, which is always evaluated."""
    if total <= done:
        return 0
    epochs = -(-total // steps_per_epoch)  # the last, perhaps short, epoch included
    first = done // steps_per_epoch + 1  # the first epoch that ends after `done`
    due = sum(1 for e in range(first, epochs) if e % eval_every == 0)
    return due + 1


def fit_steps(*, budget_s: float, elapsed_s: float, done: int, step_s: float, eval_s: float, most: int,
              steps_per_epoch: int, eval_every: int) -> int:
    """The most optimizer steps in all (at least `done`, at most `most`) whose remaining steps and evaluations end
    inside `TARGET_SHARE` of `budget_s`, `elapsed_s` having gone by after `done` steps."""
    room = TARGET_SHARE * budget_s - elapsed_s

    def cost(total: int) -> float:
        return (total - done) * step_s + evaluations_between(done, total, steps_per_epoch, eval_every) * eval_s

    if cost(most) <= room:
        return most
    lo, hi = done, most  # cost grows with total: the largest total with cost(total) <= room, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return max(lo, 1)  # a run trains at least one step


@dataclass
class TimeBudget:
    """A run's budget and what it measured. `total` is the fitted number of optimizer steps (the recipe's until
    the first fit); `state()` goes into the checkpoint."""

    budget_s: float
    most: int  # the recipe's epochs x steps
    steps_per_epoch: int
    eval_every: int
    # Until an evaluation is measured, it is taken to cost this share of a training step per validation batch
    # (a forward is about a third of a training step; half leaves room for the saves around it).
    val_batches: float
    total: int = 0
    step_s: float | None = None
    eval_s: float | None = None
    fits: list[dict[str, Any]] = field(default_factory=list)
    _marks: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.total = self.total or self.most

    def on_step(self, step: int, now: float) -> bool:
        """Called after the run's optimizer step number `step` (1-based, over the whole run) at clock `now`; True
        when the step time has just been measured, and the run should fit its length."""
        if self.step_s is not None:
            return False
        self._marks.setdefault(step, now)
        first = min(self._marks)
        start = first + SETTLE_STEPS
        if step >= start + MEASURE_STEPS and start in self._marks:
            self.step_s = (now - self._marks[start]) / (step - start)
            return True
        return False

    def fit(self, *, elapsed_s: float, done: int, step_s: float | None = None, eval_s: float | None = None) -> int:
        """Refit `total` from the time gone by, with newer step / evaluation times when given."""
        if step_s is not None:
            self.step_s = step_s
        if eval_s is not None:
            self.eval_s = eval_s
        if self.step_s is None:
            return self.total
        self.total = fit_steps(
            budget_s=self.budget_s, elapsed_s=elapsed_s, done=done, step_s=self.step_s,
            eval_s=self.eval_s if self.eval_s is not None else EVAL_SHARE * self.step_s * self.val_batches,
            most=self.most,
            steps_per_epoch=self.steps_per_epoch, eval_every=self.eval_every,
        )
        self.fits.append({"at_step": done, "elapsed_s": round(elapsed_s, 1), "step_s": round(self.step_s, 5),
                          "eval_s": None if self.eval_s is None else round(self.eval_s, 2), "total": self.total})
        return self.total

    @property
    def epochs(self) -> int:
        """Epochs the fitted run trains, its last one perhaps short."""
        return -(-self.total // self.steps_per_epoch)

    def epoch_steps(self, epoch: int) -> int:
        """Optimizer steps in (0-based) `epoch` of the fitted run."""
        return max(0, min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch))

    def state(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "total": self.total, "step_s": self.step_s, "eval_s": self.eval_s,
                "fits": self.fits}

    def load_state(self, state: dict[str, Any]) -> None:
        self.total, self.step_s, self.eval_s = int(state["total"]), state["step_s"], state["eval_s"]
        self.fits = list(state.get("fits", []))

    def summary(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "planned_steps": self.most, "trained_steps": self.total,
                "step_s": None if self.step_s is None else round(self.step_s, 5),
                "eval_s": None if self.eval_s is None else round(self.eval_s, 2), "fits": self.fits}
