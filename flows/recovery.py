"""A run whose process died: find out, say so, close what it left open, and let it be retried.

A flow run killed outright (SIGKILL, out of memory, a lost machine) cannot report its end, and
Prefect keeps it ``Running``. Two things notice it:

- the automation ``infra.services`` creates on the Prefect server marks a flow run ``Crashed`` when
  its heartbeats (every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds) stop;
- ``ssl-pipeline retry`` looks itself: every flow run records, as labels, the host, pid and start
  time of the process that runs it; on that host a process that no longer exists (or a pid now
  used by another process) is proof enough, elsewhere the last heartbeat's age is.

A retry then closes what the dead attempt left open: its Prefect task runs still ``Running`` are
set ``Crashed``, its MLflow stage runs still ``RUNNING`` ``KILLED`` (``tasks.tracking``).
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from pathlib import Path

HOST, PID, STARTED = "ssl_pipeline.host", "ssl_pipeline.pid", "ssl_pipeline.process_start"
LIVE = ("RUNNING", "PENDING", "CANCELLING", "PAUSED")   # state types of a run that may still have a process
CRASH_AFTER_S = 120   # the window of the automation infra.services creates


def crash_after_s() -> int:
    """Seconds without a heartbeat after which a run counts as dead: $SSL_PIPELINE_CRASH_AFTER_S, else
    CRASH_AFTER_S (the automation and ``prepare_retry`` go by the same)."""
    return int(os.environ.get("SSL_PIPELINE_CRASH_AFTER_S", CRASH_AFTER_S))


def process_start(pid: int) -> str | None:
    """An identity of process ``pid`` that a reused pid does not share: the boot and the start time
    (clock ticks since boot) from /proc; None when no such process runs (or it is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": state is field 3, starttime 22
    return None if fields[0] in ("Z", "X") else f"{boot}:{fields[19]}"


def this_process() -> dict[str, str]:
    pid = os.getpid()
    return {HOST: socket.gethostname(), PID: str(pid), STARTED: process_start(pid) or "unknown"}


def record_process(flow_run_id: str) -> None:
    """Label the flow run with the process that runs it (called when the flow starts)."""
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(flow_run_id, this_process())


def crash_leftover_task_runs(flow_run_id: str) -> list[str]:
    """Task runs of this flow run that an earlier, dead attempt left Running (or Pending): set
    Crashed. Called when the flow starts, before any task of this attempt exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed
    closed = []
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING]))))
        for tr in runs:
            client.set_task_run_state(tr.id, Crashed(message="its flow run's earlier attempt died while it ran; "
                                                             "closed when the flow run was retried"), force=True)
            closed.append(tr.name)
    return closed


def last_heartbeat(api_url: str, flow_run_id: str) -> datetime | None:
    import httpx
    r = httpx.post(f"{api_url.rstrip('/')}/events/filter", timeout=30, json={"limit": 1, "filter": {
        "event": {"name": ["prefect.flow-run.heartbeat"]},
        "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}, "order": "DESC"}})
    r.raise_for_status()
    events = r.json()["events"]
    return datetime.fromisoformat(events[0]["occurred"]) if events else None


def _age(t: datetime | None) -> str:
    return "never" if t is None else f"{(datetime.now(timezone.utc) - t).total_seconds():.0f} s ago"


class NotRetryable(Exception):
    pass


def prepare_retry(flow_run_id: str, say=print) -> None:
    """Say what the flow run is; when it is still marked live but its process is provably gone,
    mark it Crashed so that Prefect retries it. Raises NotRetryable (with the reason) otherwise."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Crashed
    api = PREFECT_API_URL.value()
    with get_client(sync_client=True) as client:
        fr = _find_flow_run(client, flow_run_id)
        if fr is None:
            raise NotRetryable(f"no flow run {flow_run_id} on the Prefect server {api}")
        state = fr.state
        kind = state.type.value if state else "UNKNOWN"
        since = state.timestamp.strftime("%Y-%m-%d %H:%M:%S UTC") if state and state.timestamp else "?"
        say(f"Flow run {fr.id} ({fr.name}): {state.name if state else 'no state'} since {since}"
            + (f": {state.message}" if state and state.message else ""))
        labels = fr.labels or {}
        host, pid, started = labels.get(HOST), labels.get(PID), labels.get(STARTED)
        gone = None   # why we know its process is gone
        if host and pid:
            where = f"process {pid} on {host}"
            if host == socket.gethostname():
                now = process_start(int(pid))
                if now is not None and (started in (None, "unknown") or now == started):
                    say(f"Its {where} is alive.")
                    if kind in LIVE or kind == "CRASHED":
                        raise NotRetryable(
                            f"flow run {fr.id} is still being run by {where} (state {kind}); wait for it to end, "
                            f"or stop it (kill {pid}) and retry")
                else:
                    gone = f"its {where} no longer exists" + (" (the pid is another process's now)" if now else "")
                    say(f"Its {where} no longer exists" + (" (the pid now belongs to another process)." if now else "."))
            else:
                beat = last_heartbeat(api, str(fr.id))
                say(f"Its {where} cannot be checked from {socket.gethostname()}; last heartbeat: {_age(beat)}.")
                if kind in LIVE:
                    gone = _silent(beat, state, where)
        elif kind in LIVE:
            beat = last_heartbeat(api, str(fr.id))
            say(f"It records no process (started by an older ssl-pipeline); last heartbeat: {_age(beat)}.")
            gone = _silent(beat, state, "its process")
        if kind in LIVE:
            if gone is None:
                raise NotRetryable(f"flow run {fr.id} is {kind} and may still be running")
            msg = f"Crashed by ssl-pipeline retry: {gone}"
            client.set_flow_run_state(fr.id, Crashed(message=msg), force=True)
            say(f"Marked it Crashed ({gone}).")


def _find_flow_run(client, id_or_name: str):
    """The flow run by id, or by name (as ``prefect flow-run retry`` takes either)."""
    from uuid import UUID

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.exceptions import ObjectNotFound
    try:
        return client.read_flow_run(UUID(id_or_name))
    except ValueError:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[id_or_name])))
        if len(runs) > 1:
            raise NotRetryable(f"{len(runs)} flow runs are named {id_or_name!r}: give its id") from None
        return runs[0] if runs else None
    except ObjectNotFound:
        return None


def _silent(beat: datetime | None, state, where: str) -> str:
    """Why a run on another host counts as dead: no heartbeat for longer than the automation waits."""
    window = crash_after_s()
    last = beat or (state.timestamp if state else None)
    if last is None or (datetime.now(timezone.utc) - last).total_seconds() > window:
        return f"no heartbeat from {where} for over {window} s"
    seen = f"sent its last heartbeat {_age(beat)}" if beat else f"has sent no heartbeat since it became {state.name} ({_age(last)})"
    raise NotRetryable(f"{where} {seen}: it may still be running; a run is taken for dead after "
                       f"{window} s without a heartbeat (SSL_PIPELINE_CRASH_AFTER_S)")

