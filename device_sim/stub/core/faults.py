"""Fault plans: which connections and requests the emulator spoils on purpose, and how.

A plan is a JSON document (docs/emulator.md, "Fault plans"):

    {"seed": 7, "rules": [{"match": {...}, "probability": 0.2, "first": 10,
                           "window": {"start_s": 5, "duration_s": 3}, "action": {...}}]}

The plan decides; the edges execute. Request-level edges (HTTPS, MQTT, AMQP) call
`Faults.decide(transport, operation, registration_id)` once per request; the listeners
call `Faults.on_connection(transport)` once per accepted connection. Both return a
`FaultAction` or None. Nothing here does I/O, so a plan can be tested alone.

A protocol carried inside a WebSocket runs its own loop unchanged, inside
`carried_over("websocket")`: its requests then match rules naming `websocket` as well as
rules naming the inner protocol (`mqtt`, `amqp`); docs/emulator.md ("Fault plans").

Rules are read in order. A rule whose `match` fits is counted as matched; it fires when
every condition it names holds (its seeded draw against `probability`, its match number
against `first`, the time since the plan started against `window`). Latency of every
firing rule adds up; the first firing rule with any other action decides the answer and
ends the walk. Each rule draws from its own `random.Random(f"{seed}:{index}")`, so the
same plan and the same order of requests give the same fired sequence.
"""

from __future__ import annotations

import contextvars
import fnmatch
import json
import random
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from .errors import Reply, error_reply
from .json_body import text_deeper_than

TRANSPORTS = ("https", "mqtt", "amqp", "websocket")
OPERATIONS = ("register", "poll", "status_lookup", "service")
CLOSE_POINTS = ("before_tls", "after_tls", "after_request")
CONNECTION_POINTS = ("before_tls", "after_tls")
MAX_PLAN_BYTES = 64 * 1024
MAX_DEPTH = 6
MAX_RULES = 200
MAX_SECONDS = 3600.0  # latency, holds, silences: an hour is already absurd for a bench

PLAN_KEYS = {"seed", "rules", "name"}
RULE_KEYS = {"match", "probability", "first", "window", "action", "name"}
MATCH_KEYS = {"transport", "operation", "registration_id"}
WINDOW_KEYS = {"start_s", "duration_s"}
ACTION_KEYS = {"status", "retry_after", "latency_ms", "assigning_s", "close", "reset",
               "silent", "refuse_connections", "non_json"}
# Kinds that decide what the client gets; latency may come with any of them.
ANSWER_KINDS = ("status", "non_json", "assigning_s", "close", "reset", "silent", "refuse_connections")


class FaultPlanError(ValueError):
    """A plan that cannot be used; the message names the field and what to write instead."""


@dataclass(frozen=True)
class FaultAction:
    """What an edge does to one connection or request (None fields: nothing of that kind).

    `latency_s` is already drawn. `close`/`reset` name the point (CLOSE_POINTS); after a
    request, the request is processed and its answer is lost. `status` with `non_json`
    answers that status with a body that is not JSON (status 200 when none is given).
    """

    latency_s: float = 0.0
    status: int | None = None
    retry_after: int | None = None
    non_json: bool = False
    assigning_s: float | None = None
    close: str | None = None
    reset: str | None = None
    silent_s: float | None = None
    refuse: bool = False
    rule: int | None = None  # index of the rule that chose the answer

    @property
    def drops_after_request(self) -> bool:
        return "after_request" in (self.close, self.reset)


@dataclass(frozen=True)
class Rule:
    index: int
    transports: frozenset | None
    operations: frozenset | None
    pattern: str | None  # lower-case glob
    probability: float
    first: int | None
    window: tuple[float, float] | None
    latency_ms: tuple[float, float] | None
    answer: FaultAction | None
    connection_level: bool
    source: dict

    def selects(self, transports: tuple[str, ...], operation: str | None, registration_id: str | None) -> bool:
        if self.transports is not None and self.transports.isdisjoint(transports):
            return False
        if self.operations is not None and operation not in self.operations:
            return False
        if self.pattern is not None:
            return registration_id is not None and fnmatch.fnmatchcase(registration_id.lower(), self.pattern)
        return True


@dataclass(frozen=True)
class FaultPlan:
    seed: int
    rules: tuple[Rule, ...]
    source: dict


# --------------------------------------------------------------------------- parsing


def parse_plan(data: bytes | str | dict) -> FaultPlan:
    """A validated plan from JSON text (or an already parsed object); FaultPlanError names
    the first bad field, e.g. "rules[2].action.close: ..."."""
    if isinstance(data, (bytes, str)):
        data = _load(data)
    if not isinstance(data, dict):
        raise FaultPlanError("plan: must be a JSON object like {\"seed\": 7, \"rules\": [...]}")
    _no_unknown(data, PLAN_KEYS, "plan")
    seed = data.get("seed", 0)
    if not _is_int(seed):
        raise FaultPlanError("seed: must be a whole number")
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise FaultPlanError("rules: must be a list of rules")
    if len(rules) > MAX_RULES:
        raise FaultPlanError(f"rules: at most {MAX_RULES} rules")
    return FaultPlan(seed, tuple(_rule(i, r) for i, r in enumerate(rules)), data)


def _load(text: bytes | str) -> object:
    if len(text) > MAX_PLAN_BYTES:
        raise FaultPlanError(f"plan: larger than {MAX_PLAN_BYTES} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise FaultPlanError("plan: not UTF-8 text") from None
    if text_deeper_than(text, MAX_DEPTH):
        raise FaultPlanError(f"plan: nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise FaultPlanError(f"plan: not valid JSON ({exc})") from None


def _rule(index: int, data: object) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(data, dict):
        raise FaultPlanError(f"{where}: must be an object with match and action")
    _no_unknown(data, RULE_KEYS, where)
    match = data.get("match", {})
    if not isinstance(match, dict):
        raise FaultPlanError(f"{where}.match: must be an object (use {{}} to match everything)")
    _no_unknown(match, MATCH_KEYS, f"{where}.match")
    transports = _choice(match.get("transport"), TRANSPORTS, f"{where}.match.transport")
    operations = _choice(match.get("operation"), OPERATIONS, f"{where}.match.operation")
    pattern = match.get("registration_id")
    if pattern is not None and (not isinstance(pattern, str) or not pattern):
        raise FaultPlanError(f"{where}.match.registration_id: must be a glob such as \"line1-*\"")
    probability = data.get("probability", 1.0)
    if not _is_number(probability) or not 0 <= probability <= 1:
        raise FaultPlanError(f"{where}.probability: must be a number from 0 to 1")
    first = data.get("first")
    if first is not None and (not _is_int(first) or first < 1):
        raise FaultPlanError(f"{where}.first: must be a whole number >= 1 (fire on the first N matches)")
    window = _window(data.get("window"), f"{where}.window")
    action = data.get("action")
    if not isinstance(action, dict) or not action:
        raise FaultPlanError(f"{where}.action: required, an object such as {{\"status\": 503}}")
    latency, answer = _action(action, f"{where}.action", index)
    connection_level = answer is not None and (answer.refuse or answer.silent_s is not None
                                               or answer.close in CONNECTION_POINTS
                                               or answer.reset in CONNECTION_POINTS)
    if connection_level and (operations is not None or pattern is not None):
        raise FaultPlanError(f"{where}.match: a connection-level action comes before any request, so it "
                             "can select by transport only (drop operation and registration_id)")
    if answer is not None and answer.assigning_s is not None and operations != frozenset({"register"}):
        raise FaultPlanError(f"{where}.match.operation: assigning_s holds a new operation, so the rule "
                             "must match operation \"register\"")
    if connection_level and latency is not None:
        raise FaultPlanError(f"{where}.action.latency_ms: latency applies to requests, not to "
                             "connection-level actions; put it in a rule of its own")
    return Rule(index, transports, operations, pattern.lower() if pattern else None, float(probability),
                first, window, latency, answer, connection_level, data)


def _action(data: dict, where: str, index: int) -> tuple[tuple[float, float] | None, FaultAction | None]:
    _no_unknown(data, ACTION_KEYS, where)
    kinds = [k for k in ANSWER_KINDS if k in data and k != "status"]
    if "non_json" in kinds and "status" in data:
        kinds.remove("non_json")  # a status answered with a broken body: one answer
    if "status" in data and kinds:
        raise FaultPlanError(f"{where}: status cannot be combined with {kinds[0]}; use one rule per action")
    if len(kinds) > 1:
        raise FaultPlanError(f"{where}: {kinds[0]} and {kinds[1]} exclude each other; use one rule per action")
    latency = _latency(data["latency_ms"], f"{where}.latency_ms") if "latency_ms" in data else None
    fields: dict = {}
    if "status" in data:
        status = data["status"]
        if not _is_int(status) or not 200 <= status <= 599:
            raise FaultPlanError(f"{where}.status: must be an HTTP status 200..599 (e.g. 429, 503)")
        if status < 400 and "non_json" not in data:
            raise FaultPlanError(f"{where}.status: below 400 only with non_json (an error status is 400..599)")
        fields["status"] = status
    if "retry_after" in data:
        value = data["retry_after"]
        if "status" not in data:
            raise FaultPlanError(f"{where}.retry_after: goes with a status (e.g. 429 or 503)")
        if not _is_int(value) or not 0 <= value <= 3600:
            raise FaultPlanError(f"{where}.retry_after: must be whole seconds 0..3600")
        fields["retry_after"] = value
    if "non_json" in data:
        if data["non_json"] is not True:
            raise FaultPlanError(f"{where}.non_json: must be true")
        fields["non_json"] = True
    if "assigning_s" in data:
        fields["assigning_s"] = _seconds(data["assigning_s"], f"{where}.assigning_s")
    for point_kind in ("close", "reset"):
        if point_kind in data:
            point = data[point_kind]
            if point is True and point_kind == "reset":
                point = "before_tls"
            if point not in CLOSE_POINTS:
                raise FaultPlanError(f"{where}.{point_kind}: must be one of {', '.join(CLOSE_POINTS)}")
            fields[point_kind] = point
    if "silent" in data:
        value = data["silent"]
        fields["silent_s"] = 60.0 if value is True else _seconds(value, f"{where}.silent")
    if "refuse_connections" in data:
        if data["refuse_connections"] is not True:
            raise FaultPlanError(f"{where}.refuse_connections: must be true")
        fields["refuse"] = True
    answer = FaultAction(rule=index, **fields) if fields else None
    return latency, answer


def _latency(value: object, where: str) -> tuple[float, float]:
    if _is_number(value):
        low = high = float(value)
    elif isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value):
        low, high = float(value[0]), float(value[1])
    else:
        raise FaultPlanError(f"{where}: must be milliseconds, fixed (200) or uniform between two ([50, 400])")
    if not 0 <= low <= high <= MAX_SECONDS * 1000:
        raise FaultPlanError(f"{where}: must be 0 <= min <= max <= {int(MAX_SECONDS * 1000)} ms")
    return low, high


def _window(value: object, where: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FaultPlanError(f"{where}: must be an object {{\"start_s\": 5, \"duration_s\": 3}}")
    _no_unknown(value, WINDOW_KEYS, where)
    start = value.get("start_s", 0)
    if "duration_s" not in value:
        raise FaultPlanError(f"{where}.duration_s: required (seconds the window stays open)")
    if not _is_number(start) or start < 0:
        raise FaultPlanError(f"{where}.start_s: must be seconds >= 0 from the plan's start")
    return float(start), _seconds(value["duration_s"], f"{where}.duration_s")


def _seconds(value: object, where: str) -> float:
    if not _is_number(value) or not 0 <= value <= MAX_SECONDS:
        raise FaultPlanError(f"{where}: must be seconds from 0 to {int(MAX_SECONDS)}")
    return float(value)


def _choice(value: object, allowed: tuple[str, ...], where: str) -> frozenset | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v in allowed for v in values):
        raise FaultPlanError(f"{where}: must be one of {', '.join(allowed)} (or a list of them)")
    return frozenset(values)


def _no_unknown(data: dict, known: set, where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise FaultPlanError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


# --------------------------------------------------------------------------- answers

# What a proxy in front of a service sends when the service behind it is gone.
NON_JSON_BODY = b"<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"


def fault_reply(action: FaultAction | None) -> Reply | None:
    """The answer an action puts in place of the real one (None: the request is served).

    A non-JSON body is `bytes`; edges send bytes as they are, with a text/html type."""
    if action is None or (action.status is None and not action.non_json):
        return None
    headers = {} if action.retry_after is None else {"Retry-After": str(action.retry_after)}
    if action.non_json:
        return Reply(action.status or 200, NON_JSON_BODY, headers)
    return error_reply(action.status * 1000, f"fault injected by the emulator's fault plan "
                       f"(rule {action.rule})", headers=headers)


# --------------------------------------------------------------------------- deciding


@dataclass
class Carrier:
    """The protocol a connection's loop runs inside (a WebSocket), and the last request
    action decided under it, so the carrier's edge knows an answer was to be lost."""

    name: str
    last: FaultAction | None = None

    @property
    def dropped(self) -> bool:
        return self.last is not None and self.last.drops_after_request


_CARRIER: contextvars.ContextVar[Carrier | None] = contextvars.ContextVar("fault_carrier", default=None)


@contextmanager
def carried_over(name: str):
    """Run an inner protocol's loop as carried by `name` (a `Carrier` is yielded)."""
    carrier = Carrier(name)
    token = _CARRIER.set(carrier)
    try:
        yield carrier
    finally:
        _CARRIER.reset(token)


def _names(transport: str) -> tuple[str, ...]:
    carrier = _CARRIER.get()
    return (transport,) if carrier is None else (carrier.name, transport)


@dataclass
class RuleState:
    rng: random.Random
    matched: int = 0
    fired: int = 0
    fired_by_operation: Counter = field(default_factory=Counter)


class Faults:
    """The live plan of one emulator (None = no faults); thread-safe, swapped with `set`.

    `clock` is monotonic seconds; windows count from the moment the plan was set.
    """

    def __init__(self, plan: FaultPlan | None = None, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._plan: FaultPlan | None = None
        self._states: list[RuleState] = []
        self._started = 0.0
        self._started_utc = 0.0
        self.set(plan)

    @property
    def plan(self) -> FaultPlan | None:
        return self._plan

    def set(self, plan: FaultPlan | None) -> None:
        """Replace the plan (counters start again from zero); new requests see it at once."""
        with self._lock:
            self._plan = plan
            self._states = [] if plan is None else [RuleState(random.Random(f"{plan.seed}:{rule.index}"))
                                                    for rule in plan.rules]
            self._started = self.clock()
            self._started_utc = time.time()

    def decide(self, transport: str, operation: str, registration_id: str | None = None,
               now: float | None = None) -> FaultAction | None:
        """What to do to one request (None: serve it normally)."""
        if self._plan is None:
            return None
        action = self._walk(_names(transport), operation, registration_id, now, connection=False)
        carrier = _CARRIER.get()
        if carrier is not None:
            carrier.last = action
        return action

    def on_connection(self, transport: str, now: float | None = None, *,
                      named_only: bool = False) -> FaultAction | None:
        """What to do to one accepted connection, before its TLS handshake (None: serve it).

        `named_only`: only rules that name a transport (a WebSocket upgrade, whose
        connection already met the rules for every transport when it was accepted)."""
        if self._plan is None:
            return None
        return self._walk(_names(transport), None, None, now, connection=True, named_only=named_only)

    def _walk(self, transports, operation, registration_id, now, connection: bool,
              named_only: bool = False) -> FaultAction | None:
        with self._lock:
            plan = self._plan
            if plan is None:
                return None
            elapsed = (self.clock() if now is None else now) - self._started
            latency = 0.0
            for rule, state in zip(plan.rules, self._states):
                if rule.connection_level != connection or not rule.selects(transports, operation, registration_id):
                    continue
                if named_only and rule.transports is None:
                    continue
                state.matched += 1
                if not self._fires(rule, state, elapsed):
                    continue
                state.fired += 1
                state.fired_by_operation[operation or "connection"] += 1
                if rule.latency_ms is not None:
                    latency += state.rng.uniform(*rule.latency_ms) / 1000
                if rule.answer is not None:
                    return replace(rule.answer, latency_s=latency)
            return FaultAction(latency_s=latency) if latency else None

    @staticmethod
    def _fires(rule: Rule, state: RuleState, elapsed: float) -> bool:
        # The draw happens on every match, so the sequence depends only on the seed and
        # the order of matches, not on which other conditions held.
        draw = state.rng.random()
        if rule.window is not None:
            start, duration = rule.window
            if not start <= elapsed < start + duration:
                return False
        if rule.first is not None and state.matched > rule.first:
            return False
        return draw < rule.probability

    def report(self) -> dict | None:
        """The plan as given, when it started, and the counters of every rule."""
        with self._lock:
            if self._plan is None:
                return None
            rules = [{"index": rule.index, **rule.source, "matched": state.matched, "fired": state.fired,
                      "firedByOperation": dict(state.fired_by_operation)}
                     for rule, state in zip(self._plan.rules, self._states)]
            return {"seed": self._plan.seed, "startedUtc": _utc(self._started_utc),
                    "elapsedSeconds": round(self.clock() - self._started, 3), "rules": rules}

    def summary(self) -> dict | None:
        """A few words for the ready line: seed and rule count."""
        plan = self._plan
        return None if plan is None else {"seed": plan.seed, "rules": len(plan.rules)}


def _utc(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
