"""The engine's waiting requests, and the order admission tries them in: fair between adapters, or first come first
served.

Fair (the default) is the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language Models" (OSDI
2024): each adapter (the base model is one too) has a counter of the service its requests received, in token units
(a prompt token its prefill ran counts PROMPT_WEIGHT, a generated token OUTPUT_WEIGHT); admission tries the oldest
request of the waiting adapter with the lowest counter first. So an adapter sending a flood of requests cannot make
another adapter's requests wait behind all of them: each backlogged adapter gets its share of the rows as they
free up, whatever the others send. An adapter that had nothing waiting is lifted, when a request of its arrives, to
the lowest counter among those waiting (or, with none waiting, to the counter, as it stands then, of the last adapter
whose queue emptied) if its own is lower: time spent idle banks no credit to spend later in a burst. One adapter's
own requests keep their arrival order, and with a single adapter in use fair is first come first served.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from collections import Counter, deque
from typing import Callable, Iterator, KeysView

from server.engine_messages import EngineRequest
from server.errors import InvalidArgument, ResourceExhausted

PROMPT_WEIGHT = 1.0  # the paper's weights: a generated token costs a decode step's share, about twice a prompt token
OUTPUT_WEIGHT = 2.0


def tenant(request: EngineRequest) -> str:
    """Whom a request's service is counted to: its adapter's id ("" for the base model)."""
    return request.adapter.adapter_id if request.adapter is not None else ""


def queue_cap_message(key: str, cap: int) -> str:
    who = "the base model" if key == "" else f"adapter {key!r}"
    return f"{who} already has {cap} requests waiting (--max-queue-per-adapter); retry later"


class WaitingQueue:
    """Requests waiting for a row, one FIFO per tenant (a single one when not fair). Used by the engine thread only,
    except `__iter__` and `__len__`, which any thread may call (each reads in one step under the GIL)."""

    def __init__(self, fair: bool = True) -> None:
        self.fair = fair
        self._queues: dict[str, deque[tuple[int, EngineRequest]]] = {}  # tenant -> its (arrival number, request)
        self._all: dict[int, EngineRequest] = {}  # arrival number -> request, in arrival order
        self._counters: dict[str, float] = {}  # the service each tenant received (fair only)
        self._last: str | None = None  # the last tenant whose queue emptied (fair only)
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[EngineRequest]:
        return iter(tuple(self._all.values()))

    def append(self, request: EngineRequest) -> None:
        key = self._key(request)
        if key not in self._queues:
            if self.fair:
                self._counters[key] = max(self._counters.get(key, 0.0), self.level())
            self._queues[key] = deque()
        number = next(self._arrivals)
        self._queues[key].append((number, request))
        self._all[number] = request

    def put_back(self, request: EngineRequest) -> None:
        """A preempted request (server/preemption.py) waits again, first of its tenant's: it started before the
        others of its tenant that wait."""
        self.append(request)
        key = self._key(request)
        self._queues[key].rotate(1)

    def tenants(self) -> KeysView[str]:
        """The tenants with requests waiting (fair only: "" stands for every tenant otherwise); a view, not a copy."""
        return self._queues.keys()

    def level(self) -> float:
        """The lowest counter a newly waiting tenant may have: the lowest among the waiting, else the counter now of
        the last tenant whose queue emptied (its rows may have run on since: that service counts too)."""
        if self._queues:
            return min(self._counters[k] for k in self._queues)
        return self._counters.get(self._last, 0.0)

    def candidates(self) -> Iterator[EngineRequest]:
        """Every waiting request once, in the order admission tries them: by the counter of its tenant as it stands
        when the request comes up (a taken request's charge counts at once), then by arrival. The caller `take`s each
        request it admits; one left waiting (no slot, no room yet) keeps its place and is passed over for the rest of
        this walk, and so are its tenant's later ones only where the caller leaves them too."""
        heap = [(self._counter(k), q[0][0], k, 0) for k, q in self._queues.items()]
        heapq.heapify(heap)
        while heap:
            _, _, key, i = heapq.heappop(heap)
            request = self._queues[key][i][1]
            yield request
            queue = self._queues.get(key)
            if queue is None:  # it was its tenant's last
                continue
            if i < len(queue) and queue[i][1] is request:  # left waiting: pass over it
                i += 1
            if i < len(queue):
                heapq.heappush(heap, (self._counter(key), queue[i][0], key, i))

    def take(self, request: EngineRequest, prompt_tokens: int = 0) -> None:
        """`request` leaves the queue (admitted, cancelled or failed), its tenant charged the prompt tokens its
        prefill runs. A preempted one's state (admission took it first if it resumes) is dropped: it refers back to
        the request, and the cycle would keep both, the adapter's weights with them, until the cyclic collector ran."""
        request.resume = None
        self.charge(request, prompt_tokens=prompt_tokens)
        key = self._key(request)
        queue = self._queues[key]
        i = next(i for i, (_, r) in enumerate(queue) if r is request)
        number, _ = queue[i]
        del queue[i]
        del self._all[number]
        if not queue:
            del self._queues[key]
            if self.fair:
                self._last = key
                self._forget_idle()

    def charge(self, request: EngineRequest, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Count service to `request`'s tenant: prompt tokens its prefill ran, tokens generated for it."""
        if self.fair:
            key = tenant(request)
            counter = self._counters.get(key)
            if counter is None:  # (dropped by _forget_idle; level() looks at every waiting tenant: not per token)
                counter = self.level()
            self._counters[key] = counter + PROMPT_WEIGHT * prompt_tokens + OUTPUT_WEIGHT * output_tokens

    def beyond(self, limit: int) -> list[EngineRequest]:
        """Each tenant's requests after its first `limit` (in arrival order)."""
        seen: Counter = Counter()
        out = []
        for request in self._all.values():
            key = tenant(request)
            seen[key] += 1
            if seen[key] > limit:
                out.append(request)
        return out

    def clear(self) -> None:
        for request in list(self._all.values()):
            self.take(request)

    def _key(self, request: EngineRequest) -> str:
        return tenant(request) if self.fair else ""

    def _counter(self, key: str) -> float:
        return self._counters[key] if self.fair else 0.0

    def _forget_idle(self) -> None:
        """Drop the counters of tenants with nothing waiting that are at or below the level: one would be lifted to
        it anyway when a request of its comes (the level never falls), so only the counters above it (service
        received beyond the waiting ones') need keeping. Bounds the counters by the tenants served recently. (A
        tenant still running rows whose counter was dropped is charged from the level: a little more than exact.)"""
        if len(self._counters) > 2 * len(self._queues) + 64:
            level = self.level()
            for key in [k for k, c in self._counters.items()
                        if c <= level and k not in self._queues and k != self._last]:
                del self._counters[key]


class Pending:
    """The requests submitted and not yet admitted (in the engine's inbox or waiting), in all and by tenant, and the
    limits on them, --max-queue-size and --max-queue-per-adapter. Both count the requests beyond the rows the batch had
    free at its last admission with nothing else in the way (slots, KV or prefill budget): those take the first
    requests of a burst at the next step and never wait (a burst of batch + queue requests on an idle server had its
    last refused, or not, by the engine's timing). Fair admission may give the free rows to other adapters' later
    requests instead: the engine then refuses an adapter's excess once the rows are given out (Admission.admit).
    Any thread."""

    def __init__(self, max_queue: int, per_tenant: int, rows: int, gauge) -> None:
        self.max_queue, self.per_tenant, self.rows = max_queue, per_tenant, rows
        self.free = rows  # set by the engine before it counts the requests it admitted out: never a looser limit
        self.total = 0
        self._by: Counter = Counter()  # only the tenants with requests pending
        self._gauge = gauge  # loraplex_num_requests_waiting
        self._lock = threading.Lock()

    def enter(self, requests: list[EngineRequest], queue: Callable[[EngineRequest], None]) -> None:
        """Count `requests` (one request's completions: one tenant) in and `queue` them, or refuse them all
        (ResourceExhausted; the front end refused more than the limits ever let in at once before: check_count).
        Queued, then counted, under one lock with `leave`: whoever sees the count sees the requests in the engine's
        inbox (a test under load saw the count, ran three engine steps, and the request came later)."""
        count, key = len(requests), tenant(requests[0])
        with self._lock:
            if self.total + count > self.max_queue + self.free:
                raise ResourceExhausted(
                    f"the waiting queue is full ({self.max_queue} requests, --max-queue-size); retry later")
            mine = self._by[key]
            # the free rows are counted to the first requests, of any tenant; the cap counts a tenant's beyond them
            if self.per_tenant and mine + count > self.per_tenant + max(0, self.free - (self.total - mine)):
                raise ResourceExhausted(queue_cap_message(key, self.per_tenant))
            self.total += count
            self._by[key] += count
            for request in requests:
                queue(request)
            self._gauge.inc(count)

    def put_back(self, request: EngineRequest) -> None:
        """Count in a preempted request waiting again. It is never refused (it started), but it waits like any
        other: later arrivals are checked against the limits with it counted (its adapter's included)."""
        with self._lock:
            self.total += 1
            self._by[tenant(request)] += 1
            self._gauge.inc()

    def check_count(self, count: int) -> None:
        """InvalidArgument for more completions of one request than the limits ever let in at once."""
        queue_limit, flag = (self.max_queue, "--max-queue-size")
        if self.per_tenant and self.per_tenant < self.max_queue:
            queue_limit, flag = (self.per_tenant, "--max-queue-per-adapter")
        if count > queue_limit + self.rows:
            raise InvalidArgument(f"n is {count}, more completions than this server takes of one request at once: "
                                  f"{queue_limit + self.rows} (--max-batch-size {self.rows} rows + {flag} "
                                  f"{queue_limit}); ask for fewer")

    def leave(self, requests: list[EngineRequest]) -> None:
        """`requests` were admitted or ended before it."""
        with self._lock:
            self.total -= len(requests)
            for request in requests:
                key = tenant(request)
                self._by[key] -= 1
                if not self._by[key]:
                    del self._by[key]
            self._gauge.dec(len(requests))

    def of(self, key: str) -> int:
        """A tenant's requests pending (any thread: one dict read)."""
        return self._by.get(key, 0)
