"""The gateway's route table: which replicas serve each model, and their health.

The controller decides which model version is deployed on which replicas and
tells the gateway through `RouteTable` (in-process) or the admin HTTP API
(`serving.gateway.admin`, which speaks the JSON form of `Deployment`).

Blue/green: `set_active` swaps a model's route in one step, so every request
admitted afterwards uses the new replicas, while requests admitted before keep
the `ModelRoute` object they were admitted with and finish on the old replicas.
The controller polls `inflight(old_replica_url)` until it reaches 0 and only
then stops the old replicas.

Beside a model's production route the table may hold a canary and a shadow route
(`Variant`, `set_variant`): each is a `ModelRoute` of its own (own batcher, own
in-flight count), replaced and drained like a production route, saved in the same
snapshot, and removed with the model.

All methods are thread-safe (a controller may run in another thread); the
gateway's event loop only takes the lock for a few dictionary operations.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from serving.deployment import Deployment, RouteSnapshot, Variant

Choose = Callable[["ModelRoute", "ModelRoute"], "ModelRoute"]
"""choose(production route, canary route) -> the route one request takes."""


@dataclass
class ReplicaState:
    """Health and load of one replica URL (shared by every route that uses it)."""

    url: str
    healthy: bool = True
    active: int = 0  # backend calls being sent to it right now
    last_error: str | None = None
    changed_at: float = field(default_factory=time.time)
    # Marked down by the controller: stays down until it marks it up (no probing).
    held_down: bool = False


@dataclass
class ErrorNote:
    """The last error seen for a route."""

    at: float
    status: int
    message: str


class ModelRoute:
    """Runtime state of one admitted deployment (one object per `set_active`)."""

    def __init__(self, deployment: Deployment, variant: Variant | None = None) -> None:
        self.deployment = deployment
        self.variant = variant  # None: the production route
        self.admitted = 0  # requests admitted on this route and not finished
        self.retired = False
        self.last_error: ErrorNote | None = None
        self.batcher: Any = None  # owned by the dispatcher, created lazily
        self._cursor = itertools.count()

    def next_tiebreak(self) -> int:
        """Rotating counter used to spread ties between equally loaded replicas."""
        return next(self._cursor)


class RouteTable:
    """The in-memory table of active deployments, replica health and in-flight counts.

    The default model of `POST /invocations` is sticky: the configured one, else
    the first model deployed that is still deployed, so deploying another model
    never changes what `/invocations` answers.

    `loaded` is False while the table is known to be incomplete (a gateway that
    restored nothing and has not heard from the controller yet); the first
    change sets it. `on_change(table)` is called after every change of the
    active deployments (to persist them).
    """

    def __init__(
        self,
        default_model: str | None = None,
        on_change: Callable[[RouteTable], None] | None = None,
    ) -> None:
        self.default_model = default_model
        self.on_change = on_change
        self.loaded = True
        self._lock = threading.Lock()
        # Copy-on-write: readers take the current dict without locking.
        self._active: dict[str, ModelRoute] = {}
        self._retired: list[ModelRoute] = []
        # (model, role) -> the canary's or shadow's route; copy-on-write as `_active`.
        self._variants: dict[tuple[str, str], ModelRoute] = {}
        self._replicas: dict[str, ReplicaState] = {}
        # Models in the order they were first deployed: the first is the sticky default.
        self._order: list[str] = []
        # The published generation (serving/coordination.py) this table holds in full:
        # 0 until a coordinated gateway has caught up, or when it is not coordinated.
        self.generation = 0

    # --- controller side -------------------------------------------------------------------

    def set_active(self, deployment: Deployment) -> Deployment | None:
        """Make `deployment` the active one for its model; return the one it replaced.

        Idempotent: setting the active deployment again (whatever its `since`)
        changes nothing and returns None, so a reconcile loop can repeat itself.
        """
        route = ModelRoute(deployment)
        with self._lock:
            previous = self._active.get(deployment.model)
            if previous is not None and replace(deployment, since=0) == replace(
                previous.deployment, since=0
            ):
                self.loaded = True
                return None
            self._mark_fresh(deployment)
            active = dict(self._active)
            active[deployment.model] = route
            self._active = active
            if deployment.model not in self._order:
                # Copy-on-write as `_active`: resolve_default reads it without the lock.
                self._order = [*self._order, deployment.model]
            if previous is not None:
                self._retire(previous)
            self.loaded = True
        self._changed()
        return previous.deployment if previous is not None else None

    def note_pushed(self, generation: int | None) -> None:
        """Count a pushed change of published ``generation`` as applied.

        Only the next generation counts: after a missed push the table is not whole,
        and the route sync (serving/gateway/route_sync.py) applies the full table.
        """
        if generation is not None and generation == self.generation + 1:
            self.generation = generation

    def _mark_fresh(self, deployment: Deployment) -> None:
        for url in deployment.replicas:
            state = self._replicas.setdefault(url, ReplicaState(url))
            if not state.healthy or state.held_down:
                # The controller puts a deployment after smoke-testing its replicas,
                # so a down mark on one of them (say, a reused URL's) is stale.
                state.healthy, state.held_down = True, False
                state.changed_at = time.time()

    def set_variant(self, variant: Variant) -> Variant | None:
        """Make `variant` its model's canary or shadow; return the one it replaced.

        Idempotent like `set_active`. KeyError when the model has no production route:
        a canary's share is of production's traffic.
        """
        key = (variant.model, variant.role)
        with self._lock:
            if variant.model not in self._active:
                raise KeyError(variant.model)
            previous = self._variants.get(key)
            if previous is not None and variant.same_as(previous.variant):
                return None
            self._mark_fresh(variant.deployment)
            variants = dict(self._variants)
            variants[key] = ModelRoute(variant.deployment, variant)
            self._variants = variants
            if previous is not None:
                self._retire(previous)
        self._changed()
        return previous.variant if previous is not None else None

    def remove_variant(self, model: str, role: str) -> Variant | None:
        """Stop the model's canary or shadow (in-flight requests finish); the removed one."""
        with self._lock:
            variants = dict(self._variants)
            previous = variants.pop((model, role), None)
            self._variants = variants
            if previous is not None:
                self._retire(previous)
        if previous is not None:
            self._changed()
        return previous.variant if previous is not None else None

    def variant(self, model: str, role: str) -> ModelRoute | None:
        """The model's active canary or shadow route, or None."""
        return self._variants.get((model, role))

    def variants(self) -> list[ModelRoute]:
        """Active canary and shadow routes, sorted by model and role."""
        return [self._variants[k] for k in sorted(self._variants)]

    def remove(self, model: str) -> Deployment | None:
        """Stop routing to `model` (its canary and shadow too); in-flight requests finish.
        Return the removed deployment."""
        with self._lock:
            active = dict(self._active)
            previous = active.pop(model, None)
            self._active = active
            if previous is not None:
                self._order = [m for m in self._order if m != model]
                self._retire(previous)
                variants = dict(self._variants)
                for key in [k for k in variants if k[0] == model]:
                    self._retire(variants.pop(key))
                self._variants = variants
            self.loaded = True
        if previous is not None:
            self._changed()
        return previous.deployment if previous is not None else None

    def snapshot(self) -> RouteSnapshot:
        """The active deployments in deployment order; the first is the sticky default
        (a configured `default_model` still takes precedence over it)."""
        with self._lock:
            active = self._active
            deployments = tuple(active[m].deployment for m in self._order if m in active)
            variants = tuple(r.variant for r in self.variants() if r.variant is not None)
        default = deployments[0].model if deployments else None
        return RouteSnapshot(deployments, default, variants)

    def restore(self, snapshot: RouteSnapshot) -> None:
        """Load a snapshot into an empty table (at start), keeping its default first."""
        ordered = sorted(
            snapshot.deployments, key=lambda d: d.model != snapshot.default_model
        )  # stable: the rest keep their order
        with self._lock:
            if self._active:
                raise RuntimeError("restore() needs an empty route table")
            for deployment in ordered:
                for url in deployment.replicas:
                    self._replicas.setdefault(url, ReplicaState(url))
            self._order = [d.model for d in ordered]
            self._active = {d.model: ModelRoute(d) for d in ordered}
            for variant in snapshot.variants:
                if variant.model in self._active:
                    for url in variant.deployment.replicas:
                        self._replicas.setdefault(url, ReplicaState(url))
                    key = (variant.model, variant.role)
                    self._variants[key] = ModelRoute(variant.deployment, variant)
            self.loaded = True

    def inflight(self, replica_url: str) -> int:
        """Requests that may still use `replica_url` (safe to stop the replica at 0).

        Counts every admitted, unfinished request of every route (active or
        replaced) that lists the URL, because a queued or retried request may
        still pick any replica of its route.
        """
        url = replica_url.rstrip("/")
        with self._lock:
            self._prune_retired()
            routes = self._all_routes()
            return sum(r.admitted for r in routes if url in r.deployment.replicas)

    def inflight_by_replica(self) -> dict[str, int]:
        """`inflight` for every replica URL the table knows, active or draining."""
        with self._lock:
            self._prune_retired()
            routes = self._all_routes()
        counts: dict[str, int] = {}
        for route in routes:
            for url in route.deployment.replicas:
                counts[url] = counts.get(url, 0) + route.admitted
        return counts

    def mark_down(self, replica_url: str, error: str, hold: bool = False) -> None:
        """Route around a replica until it is marked up again.

        A replica marked down after an error is probed and comes back by itself
        once it answers; with `hold` (the controller's call) it stays down
        until `mark_up`.
        """
        state = self._state(replica_url)
        if state.healthy:
            state.changed_at = time.time()
        state.healthy = False
        state.last_error = error
        state.held_down = state.held_down or hold

    def mark_up(self, replica_url: str) -> None:
        """Send traffic to a replica again."""
        state = self._state(replica_url)
        if not state.healthy:
            state.changed_at = time.time()
        state.healthy = True
        state.held_down = False

    def replicas_to_probe(self) -> list[str]:
        """Replicas marked down after errors (not held down by the controller)."""
        with self._lock:
            return [s.url for s in self._replicas.values() if not s.healthy and not s.held_down]

    # --- gateway side ----------------------------------------------------------------------

    def get(self, model: str) -> ModelRoute | None:
        """The active route of `model`, or None."""
        return self._active.get(model)

    def resolve_default(self) -> tuple[ModelRoute | None, str]:
        """The route for `/invocations`, or None and the reason."""
        active = self._active
        if self.default_model is not None:
            route = active.get(self.default_model)
            if route is None:
                return None, f"The default model '{self.default_model}' is not deployed."
            return route, ""
        # The first deployed model still deployed (the order list holds only active ones).
        for model in self._order:
            route = active.get(model)
            if route is not None:
                return route, ""
        return None, "No model is deployed."

    def admit(
        self, model: str | None, choose: Choose | None = None
    ) -> tuple[ModelRoute | None, str]:
        """Look up and admit a request in one step, so a switch cannot slip between them.

        With a canary deployed, `choose(production, canary)` (fast, pure) says which of
        the two routes the request takes.
        """
        with self._lock:
            if model is None:
                route, reason = self.resolve_default()
            else:
                route = self._active.get(model)
                reason = "" if route else f"Model '{model}' is not deployed."
            if route is not None:
                canary = self._variants.get((route.deployment.model, "canary"))
                if canary is not None and choose is not None:
                    route = choose(route, canary)
                route.admitted += 1
        return route, reason

    def admit_variant(self, model: str, role: str) -> ModelRoute | None:
        """Admit one request on the model's canary or shadow route (None: there is none)."""
        with self._lock:
            route = self._variants.get((model, role))
            if route is not None:
                route.admitted += 1
        return route

    def release(self, route: ModelRoute) -> None:
        """Mark one admitted request of `route` finished."""
        with self._lock:
            route.admitted -= 1

    def routes(self) -> list[ModelRoute]:
        """Active routes, sorted by model name."""
        return [self._active[k] for k in sorted(self._active)]

    def draining(self) -> list[ModelRoute]:
        """Replaced or removed routes that still have requests in flight."""
        with self._lock:
            self._prune_retired()
            return list(self._retired)

    def replica(self, url: str) -> ReplicaState:
        """Health/load record of a replica URL."""
        return self._state(url)

    def choose_replica(self, route: ModelRoute, exclude: tuple[str, ...] = ()) -> str | None:
        """Pick the least busy healthy replica of `route`, not in `exclude`.

        When every candidate is marked down we still return one: a stale mark
        must not make a model unavailable, and a refused connection is cheap.
        """
        candidates = [u for u in route.deployment.replicas if u not in exclude]
        if not candidates:
            return None
        states = self._replicas
        healthy = [u for u in candidates if self._state_fast(states, u).healthy] or candidates
        if len(healthy) == 1:
            return healthy[0]
        offset = route.next_tiebreak()
        n = len(healthy)
        # Rotate the start so ties between equally loaded replicas alternate.
        ordered = [healthy[(offset + i) % n] for i in range(n)]
        return min(ordered, key=lambda u: self._state_fast(states, u).active)

    def circuit_open(self, route: ModelRoute) -> bool:
        """Whether every replica of `route` is marked down: its requests then fail fast
        (503) until the probe loop or the controller marks one up again."""
        states = self._replicas
        return not any(self._state_fast(states, u).healthy for u in route.deployment.replicas)

    def healthy_count(self, route: ModelRoute) -> int:
        """How many of the route's replicas are marked healthy."""
        states = self._replicas
        return sum(1 for u in route.deployment.replicas if self._state_fast(states, u).healthy)

    # --- internals -------------------------------------------------------------------------

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def _state_fast(self, states: dict[str, ReplicaState], url: str) -> ReplicaState:
        state = states.get(url)
        return state if state is not None else self._state(url)

    def _state(self, url: str) -> ReplicaState:
        url = url.rstrip("/")
        state = self._replicas.get(url)
        if state is None:
            with self._lock:
                state = self._replicas.setdefault(url, ReplicaState(url))
        return state

    def _all_routes(self) -> list[ModelRoute]:
        # Every route a request may be admitted on, or still be running on.
        return [*self._active.values(), *self._variants.values(), *self._retired]

    def _retire(self, route: ModelRoute) -> None:
        route.retired = True
        self._retired.append(route)
        self._prune_retired()

    def _prune_retired(self) -> None:
        # Forget drained routes and the health records no route refers to any more.
        self._retired = [r for r in self._retired if r.admitted > 0]
        used = {u for r in self._all_routes() for u in r.deployment.replicas}
        for url in [u for u in self._replicas if u not in used]:
            del self._replicas[url]
