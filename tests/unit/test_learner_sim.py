"""benchmarks/learner_sim.py: the regret it reports is fair (paired outcomes, an oracle that
follows the drift) and the ordering a user would expect holds on a short run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import learner_sim  # noqa: E402


def test_the_same_incident_and_strategy_give_the_same_outcome_for_every_learner() -> None:
    a, b = learner_sim.World(3, 12.0, 50), learner_sim.World(3, 12.0, 50)
    ia, ib = a.incidents()[:100], b.incidents()[:100]
    assert ia == ib
    # b's learner chose differently before: the outcome of a given choice does not depend on it.
    for inc in ib[:40]:
        b.outcome(inc, next(iter(learner_sim.FAILURES[inc.failure][2])))
    for x, y in zip(ia[40:], ib[40:]):
        s = next(iter(learner_sim.FAILURES[x.failure][2]))
        assert a.outcome(x, s) == b.outcome(y, s)


def test_the_oracle_follows_the_drift_in_its_situation_only() -> None:
    w = learner_sim.World(0, 12.0, 10)
    inc = next(i for i in w.incidents() if (i.failure, i.kv_high) == learner_sim.DRIFT[:2])
    w.n = 0
    assert w.best(inc)[0] == "lower_queue_limits"
    w.n = 10
    assert w.best(inc)[0] == "enable_backpressure"
    other = next(i for i in w.incidents() if i.failure == "queue_overload" and not i.kv_high)
    assert w.best(other)[0] == "enable_backpressure"  # best there before and after


def test_short_run_orders_oracle_learner_random(capsys: pytest.CaptureFixture[str]) -> None:
    assert learner_sim.main(["--seeds", "1", "--incidents", "300", "--drift-at", "150",
                             "--learners", "ucb,random,oracle_safety_rules", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["learners"]
    regret = {k: v["regret_n"] for k, v in res.items()}
    assert regret["oracle_safety_rules"] < regret["ucb"] < regret["random"], regret
    ph = res["ucb"]["phases"]
    assert sum(ph.values()) == pytest.approx(regret["ucb"])
    assert sum(res["ucb"]["causes"].values()) == pytest.approx(regret["ucb"])


def test_bad_arguments_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for args, msg in ((["--learners", "nope"], "unknown learner"),
                      (["--config", '{"discount": 2}'], "discount"),
                      (["--config", "{x"], "not JSON")):
        with pytest.raises(SystemExit):
            learner_sim.main(args)
        assert msg in capsys.readouterr().err
