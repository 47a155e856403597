"""The serving modes: what each one caches and hands off, and which roles serve it.

One table, read by the scheduler (placement flags), the workers (roles), the launcher
(which instances a mode needs), the CLI, the benchmarks and the tests:

| mode              | roles           | first leg caches | hand-off inserts | decode caches | KV back to prefill |
| ----------------- | --------------- | ---------------- | ---------------- | ------------- | ------------------ |
| colocated-nocache | colocated       | no               | (no hand-off)    |               |                    |
| colocated         | colocated       | yes              | (no hand-off)    |               |                    |
| pd-basic          | prefill, decode | no               | no               | no            | no                 |
| pd-caching-1      | prefill, decode | yes              | no               | no            | no                 |
| pd-caching-2      | prefill, decode | yes              | yes              | yes           | no                 |
| pd-caching-3      | prefill, decode | yes              | yes              | yes           | yes                |

The scheduler's configuration names a *base* mode (`colocated` or a P/D mode) plus a
`caching` switch for colocated serving; `Mode.of(base, caching)` gives the table's row.
"""

from __future__ import annotations

from dataclasses import dataclass

# Every role a worker (and its MemPool daemon) can play.
ROLES = ("colocated", "prefill", "decode")


@dataclass(frozen=True)
class Mode:
    name: str  # as the admin socket, the CLI and the benchmarks spell it
    disaggregated: bool  # prefill and decode run on different instances
    cache: bool  # the first leg matches its prompt before computing and inserts it after
    handoff_insert: bool  # prefill -> decode KV goes into the decode daemon's index
    decode_cache: bool  # the decode worker inserts the whole history when it ends
    return_kv: bool  # ... and sends the decode-phase KV back to the prefill daemon

    @property
    def base(self) -> str:
        """The scheduler's `mode` setting (colocated-nocache is colocated, caching off)."""
        return "colocated" if not self.disaggregated else self.name

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles that must have at least one instance for this mode to serve."""
        return ("prefill", "decode") if self.disaggregated else ("colocated",)

    @property
    def first_role(self) -> str:
        """The role whose instance gets the request first."""
        return self.roles[0]

    @staticmethod
    def of(base: str, caching: bool = True) -> Mode:
        """The row for a scheduler setting: a base mode plus colocated caching on or off."""
        if base == "colocated" and not caching:
            return MODES["colocated-nocache"]
        return parse_mode(base, base_only=True)


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("colocated-nocache", False, False, False, False, False),
        Mode("colocated", False, True, False, False, False),
        Mode("pd-basic", True, False, False, False, False),
        Mode("pd-caching-1", True, True, False, False, False),
        Mode("pd-caching-2", True, True, True, True, False),
        Mode("pd-caching-3", True, True, True, True, True),
    )
}
# The modes a scheduler or launcher is configured with (colocated-nocache is `caching`).
BASE_MODES = tuple(name for name in MODES if name != "colocated-nocache")
PD_MODES = tuple(name for name, m in MODES.items() if m.disaggregated)


def parse_mode(name: str, *, base_only: bool = False) -> Mode:
    """The mode called `name`; a ValueError listing the choices otherwise."""
    names = BASE_MODES if base_only else tuple(MODES)
    if name not in names:
        raise ValueError(f"unknown mode {name!r}; choose one of {'|'.join(names)}")
    return MODES[name]
