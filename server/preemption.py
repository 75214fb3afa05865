"""Fair scheduling over the running rows, not only at admission: which running rows give their place back.

Fair admission (server/fair_queue.py) gives each adapter its share of the rows as they free up. Rows free only as
requests end, so an adapter whose long generations hold a full batch keeps every other adapter's requests waiting for
as long as those run. So, with every row taken, while the next request in fair order is of an adapter (the base model
counts as one) holding fewer rows than its share, the adapter holding the most rows, above its share, gives one back:
its row with the fewest tokens generated (the least work to run again; the latest to arrive among equals) is
preempted. Share: the rows / the adapters running or waiting (at least one).

A preempted request waits first among its adapter's, with all it had: the tokens it generated, its sampling state,
penalties and response format (server/admission.py resumes it). When a row is its again, its prompt and generated
tokens are prefilled (those the prefix cache kept when it left are copied) and it goes on where it stopped: its client
sees one longer pause between two tokens.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

from server.batch import Row
from server.engine_messages import EngineRequest
from server.fair_queue import WaitingQueue, tenant


def victim(waiting: WaitingQueue, rows: list[Row], running: list[Row], max_rows: int,
           fits: Callable[[EngineRequest, Row], bool], resumable: Callable[[Row], bool]) -> Row | None:
    """The row of `running` (the running batch's) to preempt now, if any. `rows`: every row holding a place (running or
    prefilling); `fits(request, row)`: whether `request` would be admitted once `row` left (its adapter's slot, the KV
    budget): a row is never preempted for a request that would wait anyway; `resumable(row)`: whether the row could
    resume as it runs (asked only of the candidates, past the checks every step of a full batch makes). One a step: the
    next step looks again at what admission then did (two preempted at once might be for requests of which only one
    gets the slot or the KV room, and the second row would go to its own request again, ahead of the second needy)."""
    if len(rows) < max_rows or not waiting:  # free rows: admission gives them out in fair order
        return None
    counts = Counter(tenant(r.state.request) for r in rows)
    queued = waiting.tenants()
    share = max(1, max_rows // (len(queued) + sum(1 for key in counts if key not in queued)))
    if max(counts.values()) <= share:  # (every step of a full batch asks: O(rows) when nobody is above)
        return None
    request = next(waiting.candidates())  # the next in turn, whom admission takes first
    if counts[tenant(request)] >= share:  # at its share: it waits for a row to free, as always
        return None
    over = [r for r in running if counts[tenant(r.state.request)] > share and resumable(r)]
    if not over:
        return None
    most = max(counts[tenant(r.state.request)] for r in over)
    row = min((r for r in over if counts[tenant(r.state.request)] == most),
              key=lambda r: (len(r.state.stream.ids), -r.state.request.arrival))
    return row if fits(request, row) else None
