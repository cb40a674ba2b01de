"""The store's state machine: every table in memory, changed only through a Tx.

Pure: no I/O and no clock (callers pass ``now``, a monotonic time). A Tx applies
writes immediately, keeps an undo log so a failed transaction leaves nothing
behind, and on commit returns the ``Changes`` that persistence writes to SQLite
and the watch hub uses to wake exactly the watchers of what changed. Like
Consul's raft log, each committed Tx takes the next index, and a Tx that
changed nothing takes none.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from berth.store.errors import InvalidState
from berth.store.model import Check, Entry, Service, Session, Status

R = TypeVar("R")

SERF_CHECK = "serfHealth"


@dataclass(slots=True)
class Changes:
    index: int
    # Final state per changed key; None means deleted (a tombstone at ``index``).
    kv: dict[str, Entry | None] = field(default_factory=dict)
    # ("session" | "service" | "check", id) -> record, or None when deleted.
    objects: dict[tuple[str, str], Session | Service | Check | None] = field(default_factory=dict)
    # Named indexes that moved ("kv", "catalog", "svc:<name>", ...).
    indexes: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.kv or self.objects or self.indexes)

    def topics(self) -> set[str]:
        return set(self.indexes)

    def merge(self, later: Changes) -> None:
        self.index = later.index
        self.kv.update(later.kv)
        self.objects.update(later.objects)
        self.indexes.update(later.indexes)


class SortedKeys:
    """A sorted key list for prefix scans (bisect; inserts are a memmove)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: list[str] | None = None) -> None:
        self._keys = sorted(keys or [])

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str) -> None:
        i = bisect.bisect_left(self._keys, key)
        if i == len(self._keys) or self._keys[i] != key:
            self._keys.insert(i, key)

    def remove(self, key: str) -> None:
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]

    def prefixed(self, prefix: str) -> Iterator[str]:
        keys = self._keys
        i = bisect.bisect_left(keys, prefix)
        while i < len(keys) and keys[i].startswith(prefix):
            yield keys[i]
            i += 1


class State:
    def __init__(self, node: str = "berth") -> None:
        self.node = node
        # Index 1 is "the empty store" (0 is never used, as in Consul), so the
        # first write is 2 and a watcher blocked at 1 sees it.
        self.index = 1
        self.kv: dict[str, Entry] = {}
        self.keys = SortedKeys()
        self.tombstones: dict[str, int] = {}
        self.tomb_keys = SortedKeys()
        self.sessions: dict[str, Session] = {}
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self.indexes: dict[str, int] = {}
        # key -> monotonic time before which it cannot be acquired. Like Consul,
        # kept in memory only: a restart forgets lock delays.
        self.lock_delays: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"<State index={self.index} keys={len(self.kv)} tombstones={len(self.tombstones)}"
            f" sessions={len(self.sessions)} services={len(self.services)}"
            f" checks={len(self.checks)}>"
        )

    # -- transactions ---------------------------------------------------------

    def write(self, fn: Callable[[Tx], R]) -> tuple[R, Changes]:
        """Run ``fn`` in a Tx; on any exception nothing it did remains."""
        tx = Tx(self)
        try:
            result = fn(tx)
        except BaseException:
            tx.rollback()
            raise
        return result, tx.commit()

    def load(
        self,
        index: int,
        entries: list[Entry],
        tombstones: dict[str, int],
        objects: list[Session | Service | Check],
        indexes: dict[str, int],
    ) -> None:
        self.index = max(index, 1)
        self.kv = {e.key: e for e in entries}
        self.keys = SortedKeys(list(self.kv))
        self.tombstones = dict(tombstones)
        self.tomb_keys = SortedKeys(list(tombstones))
        for obj in objects:
            if isinstance(obj, Session):
                self.sessions[obj.id] = obj
            elif isinstance(obj, Service):
                self.services[obj.id] = obj
            else:
                self.checks[obj.id] = obj
        self.indexes = dict(indexes)

    # -- reads ----------------------------------------------------------------

    def table_index(self, name: str) -> int:
        return max(self.indexes.get(name, 0), 1)

    def kv_get(self, key: str) -> tuple[int, Entry | None]:
        entry = self.kv.get(key)
        if entry is not None:
            return max(entry.modify_index, 1), entry
        return self.table_index("kv"), None

    def kv_list(self, prefix: str) -> tuple[int, list[Entry]]:
        kv = self.kv
        entries = [kv[k] for k in self.keys.prefixed(prefix)]
        return self._prefix_index(prefix, entries), entries

    def _prefix_index(self, prefix: str, entries: list[Entry]) -> int:
        if prefix == "":
            return self.table_index("kv")
        index = max((e.modify_index for e in entries), default=0)
        tombs = self.tombstones
        for key in self.tomb_keys.prefixed(prefix):
            index = max(index, tombs[key])
        return max(index, 1)

    def kv_keys(self, prefix: str, separator: str) -> tuple[int, list[str]]:
        index, entries = self.kv_list(prefix)
        if not separator:
            return index, [e.key for e in entries]
        keys: list[str] = []
        last = ""
        for entry in entries:
            cut = entry.key.find(separator, len(prefix))
            key = entry.key if cut < 0 else entry.key[: cut + len(separator)]
            if key != last:
                keys.append(key)
                last = key
        return index, keys

    def service_checks(self, service_id: str) -> list[Check]:
        return [c for c in self.checks.values() if c.service_id == service_id]

    def node_checks(self) -> list[Check]:
        return sorted((c for c in self.checks.values() if not c.service_id), key=lambda c: c.id)

    def instances(self, name: str) -> list[Service]:
        return sorted((s for s in self.services.values() if s.name == name), key=lambda s: s.id)

    def checks_referencing(self, check_id: str) -> list[Session]:
        return [
            s
            for s in self.sessions.values()
            if check_id in s.node_checks or check_id in s.service_checks
        ]


class Tx:
    """One atomic write. Mutations apply at once and are undone on rollback."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.index = state.index + 1
        self.changes = Changes(self.index)
        self._undo: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<Tx index={self.index} pending={len(self._undo)}>"

    def commit(self) -> Changes:
        if self.changes:
            self.state.index = self.index
        self._undo.clear()
        return self.changes

    def rollback(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.changes = Changes(self.index)

    # -- primitive mutations (each recorded for undo and for persistence) -----

    def _bump(self, name: str) -> None:
        indexes = self.state.indexes
        if name not in self.changes.indexes:
            old = indexes.get(name)
            self._undo.append(lambda: _restore(indexes, name, old))
        indexes[name] = self.index
        self.changes.indexes[name] = self.index

    def _record(self, table: dict[str, Any], kind: str, key: str, value: Any) -> None:
        old = table.get(key)
        self._undo.append(lambda: _restore(table, key, old))
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
        if kind == "kv":
            self.changes.kv[key] = value
        else:
            self.changes.objects[(kind, key)] = value

    def put_entry(self, entry: Entry) -> None:
        state = self.state
        if entry.key not in state.kv:
            state.keys.add(entry.key)
            self._undo.append(lambda: state.keys.remove(entry.key))
        if entry.key in state.tombstones:
            old = state.tombstones.pop(entry.key)
            state.tomb_keys.remove(entry.key)
            self._undo.append(lambda: self._untomb(entry.key, old))
        self._record(state.kv, "kv", entry.key, entry)
        self._bump("kv")

    def delete_entry(self, key: str) -> None:
        state = self.state
        if key not in state.kv:
            return
        state.keys.remove(key)
        self._undo.append(lambda: state.keys.add(key))
        old = state.tombstones.get(key)
        state.tombstones[key] = self.index
        state.tomb_keys.add(key)
        self._undo.append(lambda: self._untomb(key, old))
        self._record(state.kv, "kv", key, None)
        self._bump("kv")

    def _untomb(self, key: str, old: int | None) -> None:
        state = self.state
        if old is None:
            state.tombstones.pop(key, None)
            state.tomb_keys.remove(key)
        else:
            state.tombstones[key] = old
            state.tomb_keys.add(key)

    def put_session(self, session: Session | None, session_id: str) -> None:
        self._record(self.state.sessions, "session", session_id, session)
        self._bump("sessions")

    def put_service(self, service: Service | None, service_id: str, name: str) -> None:
        self._record(self.state.services, "service", service_id, service)
        self._bump("catalog")
        self._bump("svc:" + name)

    def put_check(self, check: Check | None, check_id: str, service_name: str) -> None:
        self._record(self.state.checks, "check", check_id, check)
        self._bump("checks")
        if service_name:
            self._bump("svc:" + service_name)
        else:
            # A node check is part of every service's health on this node.
            for name in {s.name for s in self.state.services.values()}:
                self._bump("svc:" + name)

    # -- KV commands ----------------------------------------------------------

    def kv_set(self, key: str, value: bytes | None, flags: int) -> bool:
        old = self.state.kv.get(key)
        if old is None:
            self.put_entry(Entry(key, value, flags, self.index, self.index))
        else:
            self.put_entry(
                replace(old, value=value, flags=flags, modify_index=self.index, _encoded=None)
            )
        return True

    def kv_cas(self, key: str, value: bytes | None, flags: int, index: int) -> bool:
        old = self.state.kv.get(key)
        if (index == 0 and old is not None) or (
            index != 0 and (old is None or old.modify_index != index)
        ):
            return False
        return self.kv_set(key, value, flags)

    def kv_acquire(
        self, key: str, value: bytes | None, flags: int, session_id: str, now: float
    ) -> bool:
        state = self.state
        if session_id not in state.sessions:
            raise InvalidState(f'invalid session "{session_id}"')
        until = state.lock_delays.get(key)
        if until is not None:
            if until > now:
                return False
            del state.lock_delays[key]
        old = state.kv.get(key)
        if old is not None and old.session:
            if old.session != session_id:
                return False
            self.put_entry(
                replace(old, value=value, flags=flags, modify_index=self.index, _encoded=None)
            )
            return True
        lock_index = (old.lock_index if old else 0) + 1
        create_index = old.create_index if old else self.index
        self.put_entry(Entry(key, value, flags, create_index, self.index, lock_index, session_id))
        return True

    def kv_release(self, key: str, value: bytes | None, flags: int, session_id: str) -> bool:
        old = self.state.kv.get(key)
        if old is None or old.session != session_id:
            return False
        self.put_entry(
            replace(
                old,
                value=value,
                flags=flags,
                session=None,
                modify_index=self.index,
                _encoded=None,
            )
        )
        return True

    def kv_delete(self, key: str) -> bool:
        self.delete_entry(key)
        return True

    def kv_delete_cas(self, key: str, index: int) -> bool:
        old = self.state.kv.get(key)
        # cas=0 never deletes (Consul); a missing key only "matches" nothing.
        if index == 0 or old is None or old.modify_index != index:
            return False
        self.delete_entry(key)
        return True

    def kv_delete_tree(self, prefix: str) -> bool:
        for key in list(self.state.keys.prefixed(prefix)):
            self.delete_entry(key)
        return True

    # -- sessions -------------------------------------------------------------

    def session_create(self, session: Session) -> str:
        state = self.state
        if session.node != state.node:
            raise InvalidState(f"Missing node registration: {session.node!r}")
        for check_id in (*session.node_checks, *session.service_checks):
            if check_id == SERF_CHECK:
                continue
            check = state.checks.get(check_id)
            if check is None:
                raise InvalidState(f"Missing check '{check_id}' registration")
            if check.status == "critical":
                raise InvalidState(f"Check '{check_id}' is in critical state")
        self.put_session(
            replace(session, create_index=self.index, modify_index=self.index), session.id
        )
        return session.id

    def session_destroy(self, session_id: str, now: float) -> bool:
        """Destroy or invalidate: held keys are released or deleted per Behavior,
        and become unacquirable for the session's LockDelay."""
        state = self.state
        session = state.sessions.get(session_id)
        if session is None:
            return True
        held = [e for e in state.kv.values() if e.session == session_id]
        for entry in held:
            if session.behavior == "delete":
                self.delete_entry(entry.key)
            else:
                self.put_entry(replace(entry, session=None, modify_index=self.index, _encoded=None))
            if session.lock_delay_ns > 0:
                state.lock_delays[entry.key] = now + session.lock_delay_ns / 1e9
        self.put_session(None, session_id)
        return True

    # -- agent: services and checks --------------------------------------------

    def register_service(
        self, service: Service, checks: list[Check], replace_existing_checks: bool, now: float
    ) -> None:
        state = self.state
        old = state.services.get(service.id)
        if old is not None and old.name != service.name:
            # Renaming moves the instance: the old name's watchers must see it leave.
            self._bump("svc:" + old.name)
        create_index = old.create_index if old else self.index
        service = replace(service, create_index=create_index, modify_index=self.index)
        # An identical re-registration (a periodic sync) writes nothing and wakes nobody.
        if old is None or not _same_service(old, service):
            self.put_service(service, service.id, service.name)
        keep = {c.id for c in checks}
        for existing in state.service_checks(service.id):
            if existing.id not in keep and replace_existing_checks:
                self.deregister_check(existing.id, now)
            elif existing.id not in keep and (existing.service_name, existing.service_tags) != (
                service.name,
                service.tags,
            ):
                # A kept check follows its service's name and tags; with a stale
                # name its changes would wake the old name's watchers.
                self.put_check(
                    replace(
                        existing,
                        service_name=service.name,
                        service_tags=service.tags,
                        modify_index=self.index,
                    ),
                    existing.id,
                    service.name,
                )
        for check in checks:
            self.register_check(check, now)

    def register_check(self, check: Check, now: float) -> None:
        old = self.state.checks.get(check.id)
        if old is not None:
            # Like a Consul agent, re-registering keeps a check's current state:
            # a service that re-registers on every restart must not flap to critical.
            check = replace(
                check, status=old.status, output=old.output, create_index=old.create_index
            )
        else:
            check = replace(check, create_index=self.index)
        if old is not None and _same_check(old, check):
            return
        if old is not None and old.service_name and old.service_name != check.service_name:
            # The check moves to another service: the one it left changes health too.
            self._bump("svc:" + old.service_name)
        self.put_check(replace(check, modify_index=self.index), check.id, check.service_name)
        if check.status == "critical":
            self._invalidate_sessions_of(check.id, now)

    def deregister_service(self, service_id: str, now: float) -> bool:
        state = self.state
        service = state.services.get(service_id)
        if service is None:
            return False
        for check in state.service_checks(service_id):
            self.deregister_check(check.id, now)
        self.put_service(None, service_id, service.name)
        return True

    def deregister_check(self, check_id: str, now: float) -> bool:
        check = self.state.checks.get(check_id)
        if check is None:
            return False
        self.put_check(None, check_id, check.service_name)
        self._invalidate_sessions_of(check_id, now)
        return True

    def update_check(self, check_id: str, status: Status, output: str, now: float) -> bool:
        """Set a check's status; no write (and no index) when nothing changed."""
        check = self.state.checks.get(check_id)
        if check is None:
            return False
        if check.status == status and check.output == output:
            return False
        self.put_check(
            replace(check, status=status, output=output, modify_index=self.index),
            check_id,
            check.service_name,
        )
        if status == "critical":
            self._invalidate_sessions_of(check_id, now)
        return True

    def _invalidate_sessions_of(self, check_id: str, now: float) -> None:
        for session in self.state.checks_referencing(check_id):
            self.session_destroy(session.id, now)


def _same_check(a: Check, b: Check) -> bool:
    return replace(a, modify_index=0) == replace(b, modify_index=0)


def _same_service(a: Service, b: Service) -> bool:
    return replace(a, modify_index=0) == replace(b, modify_index=0)


def _restore(table: dict[str, Any], key: str, old: Any) -> None:
    if old is None:
        table.pop(key, None)
    else:
        table[key] = old
