"""Event counters and gauges with /proc/vmstat names (mm/vmstat.c vmstat_text)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

# Event counters, in the order /proc/vmstat prints them, plus the seeds' fast_gup names.
EVENT_COUNTERS: tuple[str, ...] = (
    "nr_foll_pin_acquired",
    "nr_foll_pin_released",
    "pgpgin",
    "pgpgout",
    "pgalloc_normal",
    "pgalloc_movable",
    "pgfree",
    "pgfault",
    "pgmajfault",
    "pgreuse",
    "pgmigrate_success",
    "pgmigrate_fail",
    "thp_fault_alloc",
    "thp_fault_fallback",
    "thp_split_page",
    "thp_split_pmd",
    "cow_ksm",
    "fast_gup",
    "fast_gup_slow",
)


class VmStat:
    """Global vm_event_states plus gauges computed on read (the nr_* zone/node counters)."""

    def __init__(self) -> None:
        self.events: dict[str, int] = dict.fromkeys(EVENT_COUNTERS, 0)
        self._gauges: dict[str, Callable[[], int]] = {}

    def count(self, name: str, delta: int = 1) -> None:
        """count_vm_events(): add ``delta`` to an event counter."""
        self.events[name] += delta

    def register_gauge(self, name: str, read: Callable[[], int]) -> None:
        """Expose a state counter (nr_free_pages …) whose value is read when vmstat is read."""
        self._gauges[name] = read

    def __getitem__(self, name: str) -> int:
        if name in self._gauges:
            return self._gauges[name]()
        return self.events[name]

    def items(self) -> Iterator[tuple[str, int]]:
        """All counters as /proc/vmstat prints them: gauges (nr_*) first, then events."""
        for name, read in self._gauges.items():
            yield name, read()
        yield from self.events.items()
