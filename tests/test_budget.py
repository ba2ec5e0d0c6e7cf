"""`--time-budget` (cvt.budget): the duration syntax, the fit of a run's length to its budget, and budgeted runs
end to end with a fake clock (one second a step), so the fitted lengths are exact and no test depends on speed."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from conftest import TINY, sigterm_at
from cvt import budget as B
from cvt import engine
from cvt.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, seconds", [
    (540, 540.0), ("540", 540.0), ("540s", 540.0), ("9m", 540.0), ("9m30s", 570.0), ("1h", 3600.0),
    ("1.5h", 5400.0), ("1h30m", 5400.0), (" 2M ", 120.0), (12.5, 12.5),
])
def test_parse_duration(text, seconds):
    assert B.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "9x", "9m9", "-5m", "0", "0s", "nan", True, "1h-5m", "9 minutes"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="duration"):
        B.parse_duration(text)


def test_evaluations_between():
    # 10 steps an epoch, evaluated every epoch: a run to step 25 evaluates at 10, 20 and at its end (25).
    assert B.evaluations_between(0, 25, 10, 1) == 3
    assert B.evaluations_between(0, 20, 10, 1) == 2  # the end of epoch 2 is the last step
    assert B.evaluations_between(12, 20, 10, 1) == 1
    assert B.evaluations_between(0, 40, 10, 2) == 2  # epochs 2 and 4 (the last)
    assert B.evaluations_between(0, 30, 10, 2) == 2  # epoch 2, and the last (3)
    assert B.evaluations_between(20, 20, 10, 1) == 0


def test_fit_steps_takes_the_most_that_fits():
    kw = dict(steps_per_epoch=10, eval_every=1, most=100)
    # 1 s a step, 2 s an evaluation, 3 s gone after 3 steps: 0.97 x 40 - 3 = 35.8 s left. To step 30 costs
    # 27 + 3 x 2 = 33 s; to step 31, 28 + 4 x 2 = 36 s (its short fourth epoch brings an evaluation).
    assert B.fit_steps(budget_s=40, elapsed_s=3, done=3, step_s=1.0, eval_s=2.0, **kw) == 30
    assert B.fit_steps(budget_s=1e6, elapsed_s=3, done=3, step_s=1.0, eval_s=2.0, **kw) == 100  # the recipe's
    assert B.fit_steps(budget_s=1, elapsed_s=3, done=3, step_s=1.0, eval_s=2.0, **kw) == 3  # over: stop now
    assert B.fit_steps(budget_s=1, elapsed_s=0, done=0, step_s=5.0, eval_s=2.0, **kw) == 1  # at least one step
    for budget_s in (20, 37, 55, 80):
        total = B.fit_steps(budget_s=budget_s, elapsed_s=3, done=3, step_s=1.0, eval_s=2.0, **kw)
        cost = (total - 3) + 2 * B.evaluations_between(3, total, 10, 1)
        more = (total + 1 - 3) + 2 * B.evaluations_between(3, total + 1, 10, 1)
        assert cost <= 0.97 * budget_s - 3 < more


def test_time_budget_measures_after_settling():
    tb = B.TimeBudget(100.0, most=50, steps_per_epoch=10, eval_every=1, val_batches=4)
    fired = [tb.on_step(step, now=0.5 * step) for step in range(1, 40)]
    assert fired.index(True) + 1 == 1 + B.SETTLE_STEPS + B.MEASURE_STEPS and sum(fired) == 1
    assert tb.step_s == pytest.approx(0.5)
    tb.fit(elapsed_s=12.0, done=24)  # no evaluation measured yet: estimated as 0.5 x step x validation batches
    assert tb.fits[-1]["eval_s"] is None and tb.total == 50
    state = tb.state()
    other = B.TimeBudget(100.0, most=50, steps_per_epoch=10, eval_every=1, val_batches=4)
    other.load_state(json.loads(json.dumps(state)))
    assert other.state() == state


# ---------------------------------------------------------------------------------------------------------------
# Budgeted runs with a fake clock: every optimizer step takes one second, evaluations none.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_clock(monkeypatch):
    def on_step(self, step, now):
        if self.step_s is None and step >= 3:
            self.step_s = 1.0
            return True
        return False

    def refit(run, stats, *, evaluated, epoch_end_s):
        engine._fit_budget(run, done=run.trainer.schedule.step_count, step_s=1.0, eval_s=0.0)

    monkeypatch.setattr(B.TimeBudget, "on_step", on_step)
    monkeypatch.setattr(engine.Run, "wall", lambda self: float(self.trainer.schedule.step_count))
    monkeypatch.setattr(engine, "_refit", refit)


def _train(tmp_path, fake_fmnist, *extra, out="run"):
    run = tmp_path / out
    argv = ["train", *TINY, "--data-dir", str(fake_fmnist), "--batch-size", "4", "--epochs", "3", "--out",
            str(run), *extra]
    return main(argv), run


def test_budgeted_run_fits_its_length_and_anneals(tmp_path, fake_fmnist, fake_clock):
    # 64 images in batches of 4: 16 steps an epoch, 48 in the recipe. A 30 s budget at 1 s a step leaves
    # 0.97 x 30 - 3 = 26.1 s at step 3, an evaluation estimated at 0.5 x 1 s x 5 validation batches = 2.5 s: 21
    # more steps and two evaluations (26 s) fit, 22 (27 s) do not: 24 steps. At the end of epoch 1 (16 s gone) the
    # measured 0 s evaluation refits it to 29.1 - 16 = 13 more steps: 29.
    rc, run = _train(tmp_path, fake_fmnist, "--time-budget", "30s", "--set", "min_lr=1e-5")
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    tb = summary["time_budget"]
    assert tb["budget_s"] == 30 and tb["planned_steps"] == 48
    assert [f["total"] for f in tb["fits"]] == [24, 29]
    assert tb["trained_steps"] == 29 and summary["epochs"] == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val_top1"] is not None
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["scheduler"]["step"] == 29 and state["time_budget"]["total"] == 29
    assert math.isclose(rows[-1]["lr"], 1e-5, rel_tol=1e-6)  # the cosine ended at the fitted last step


def test_a_budget_the_recipe_fits_in_changes_nothing(tmp_path, fake_fmnist, fake_clock):
    rc, run = _train(tmp_path, fake_fmnist, "--time-budget", "1h", "--epochs", "2")
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time_budget"]["trained_steps"] == 32 and summary["epochs"] == 2


def test_budgeted_run_resumes_its_fitted_schedule(tmp_path, fake_fmnist, fake_clock):
    extra = ("--time-budget", "30s")
    rc, straight = _train(tmp_path, fake_fmnist, *extra, out="straight")
    assert rc == 0
    with sigterm_at(epoch=1, step=4):
        rc, resumed = _train(tmp_path, fake_fmnist, *extra, out="resumed")
    assert rc == 128 + signal.SIGTERM
    assert main(["train", "--out", str(resumed), "--resume"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["time_budget"]["total"] == b["time_budget"]["total"] == 29
    assert max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"]) <= 1e-6


def test_time_budget_errors_are_one_line(tmp_path, fake_fmnist, capsys):
    rc, _ = _train(tmp_path, fake_fmnist, "--time-budget", "nine minutes")
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "time_budget must be a duration like 9m" in err[0]
