"""The worker's pacing beside the intake: during a storm of webhooks it ignores the wake-ups
yet misses no work, and ``worker.busy_share`` sets its pause after a job."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.receiver_support import I1, I2, I3, Env, am_alert, am_payload, role_client, run


def test_paced_worker_misses_no_work_in_a_storm_of_wakes(tmp_path: Path) -> None:
    """While webhooks pour in, the worker is paced and ignores the wake-ups the intake sends after
    every commit (each would cost the intake GIL time); none of the alerts is left behind, and
    an alert arriving after the storm is taken at once."""
    # No polling to fall back on: only wake-ups and the pacing timer drive the worker here.
    env = Env(tmp_path, start_worker=True, worker={"poll_s": 60},
              guards={"cooldown_s": 0, "blast_radius": {"max_affected_fraction": 1.0}})
    storm = {"on": True}
    env.receiver.worker.foreground_busy = lambda: storm["on"]
    with role_client(env.app) as c:
        for inst in (I1, I2, I3):
            assert c.post("/webhook", json=am_payload(am_alert(instance=inst))).status_code == 202
        for _ in range(300):  # the intake's wake-ups during a storm
            env.receiver.wake()

        def outcomes() -> list[str | None]:
            return [a["outcome"] for a in c.get("/actions").json()["actions"]]

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(outcomes()) < 3 or None in outcomes()):
            time.sleep(0.05)
        assert outcomes() == ["success"] * 3
        storm["on"] = False
        t0 = time.monotonic()
        late = am_alert("VllmKvCacheNearlyFull", instance=I1, starts=datetime.now(timezone.utc) + timedelta(seconds=1))
        assert c.post("/webhook", json=am_payload(late)).status_code == 202
        while time.monotonic() - t0 < 10 and len(outcomes()) < 4:
            time.sleep(0.02)
        assert len(outcomes()) == 4 and time.monotonic() - t0 < 2.5, outcomes()


@pytest.mark.parametrize("share, pause_s", [(0.1, 0.9), (0.25, 0.3), (1.0, 0.0)])
def test_worker_busy_share_sets_the_pause_after_a_job(tmp_path: Path, share: float, pause_s: float) -> None:
    """worker.busy_share (policy): after a 0.1 s job during a storm, the next one waits so that
    jobs take at most that share of the time."""
    env = Env(tmp_path, worker={"busy_share": share})
    worker = env.receiver.worker

    async def job() -> None:
        return None

    async def go() -> float:
        task = asyncio.ensure_future(job())
        await task
        worker._started_at[task] = time.monotonic() - 0.1  # it ran for 0.1 s
        worker._task_done(task)
        return worker._next_paced_start - time.monotonic()

    assert run(go()) == pytest.approx(pause_s, abs=0.03)
