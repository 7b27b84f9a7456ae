"""Frees the CPUs (GPUs) of trials that Tune stopped: the worker placement groups their Ray Train runs leave behind.

Ray Train V2 reserves a run's workers in a placement group that the run's controller actor creates. When ASHA stops
a trial, Tune ends the trial's actor, and the controller (which that actor owns) dies with it, before it can remove
the group. The GCS keeps a group made by an actor until its creator actor *and* its job are gone, so the group would
hold the stopped trial's CPUs for the rest of the sweep (V2's own ``PlacementGroupCleaner`` would remove it, but it
asks the dashboard's state API, which clusters started without a dashboard, as here, do not have). A sweep on a
small cluster would then stall after a few stops. ``remove_orphans`` removes exactly the groups the GCS would remove
when the job ended: made by an actor of this job that is dead, not detached. ``Janitor`` does it as trials end and
every few seconds while the sweep runs.
Use: ``tune.RunConfig(callbacks=[Janitor()])``; ``remove_orphans()`` after ``Tuner.fit``.
"""

from __future__ import annotations

import logging
import time

import ray
from ray._private.state import state
from ray.core.generated import gcs_pb2
from ray.tune import Callback
from ray.util.placement_group import PlacementGroup, remove_placement_group

logger = logging.getLogger(__name__)
freed = 0  # placement groups removed by this process so far (a sweep's summary reports its share)
LIVE_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


def _groups_of_this_job() -> list:
    """(placement group id bytes, state name, creator actor dead) of every non-detached group an actor of this
    driver's job created. Reads the GCS table directly: its creator fields are not in the public summary."""
    job = ray.get_runtime_context().get_job_id()
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        state_name = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name(pg.state)
        if pg.is_detached or ray.JobID(pg.creator_job_id).hex() != job or ray.ActorID(pg.creator_actor_id).is_nil():
            continue
        if state_name in LIVE_STATES:
            out.append((pg.placement_group_id, state_name, pg.creator_actor_dead))
    return out


def remove_orphans() -> int:
    """Remove this job's live placement groups whose creator actor is dead; returns how many. Never raises (a
    cluster that cannot say is left alone)."""
    global freed
    removed = 0
    try:
        for pg_id, _, dead in _groups_of_this_job():
            if dead:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
                removed += 1
    except Exception as e:  # noqa: BLE001 - cleanup must never end a sweep
        logger.warning("could not check for placement groups left by stopped trials: %s", e)
    if removed:
        freed += removed
        logger.info("removed %d placement group(s) left by stopped trials", removed)
    return removed


def settle(timeout_s: float = 10.0) -> int:
    """After a sweep: remove orphans until no group of this job is left to an actor that is still dying."""
    removed, deadline = 0, time.monotonic() + timeout_s
    while True:
        removed += remove_orphans()
        try:
            left = _groups_of_this_job()
        except Exception:  # noqa: BLE001
            return removed
        if not left or time.monotonic() > deadline:
            return removed
        time.sleep(0.5)


class Janitor(Callback):
    """A Tune callback: ``remove_orphans`` when a trial ends, and every ``every_s`` seconds (a stopped trial's
    controller dies a moment after Tune moves on)."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            remove_orphans()

    def on_trial_complete(self, iteration, trials, trial, **info):
        remove_orphans()

    def on_trial_error(self, iteration, trials, trial, **info):
        remove_orphans()
