"""SharedArena: a slot per process, zones found by name with a region per process, shared
cells (swap), running out of room (ArenaFull), and dead processes' volatile parts zeroed
(by sweep, or when a new process takes over the slot) while their persistent parts stay.

Processes are real: children are forked with ``os.fork`` and leave with ``os._exit``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from ferryman.limits.arena import (
    _PIDS_AT,
    _SLOT,
    MAX_PROCESSES,
    MAX_ZONES,
    SWEEP_INTERVAL,
    ArenaFull,
    SharedArena,
    _start_time,
    fork_generation,
)
from forked import in_child

SIZE = 64 << 20


@pytest.fixture
def arena() -> SharedArena:
    """A fresh, small arena (address space only: untouched pages cost nothing)."""
    return SharedArena(SIZE)


def _page(arena: SharedArena) -> int:
    """The allocation unit, measured: what a zone without regions takes."""
    before = arena.used
    arena.zone("(measuring the page)", 1)
    return arena.used - before


# -- making an arena ------------------------------------------------------------------------


def test_too_small_a_size_is_refused() -> None:
    """The header, the slot table and the zone directory must fit."""
    with pytest.raises(ValueError, match="at least"):
        SharedArena(4096)


def test_a_fresh_arena_has_only_its_header_allocated(arena: SharedArena) -> None:
    """``used`` starts at the header (page-aligned) and ``size`` is what was asked."""
    assert arena.size == SIZE
    assert 0 < arena.used < SIZE
    assert arena.used % 4096 == 0
    assert arena.holders() == [0] * MAX_PROCESSES


def test_the_smallest_accepted_arena_holds_a_zone() -> None:
    """An arena of the size the constructor calls the minimum can hold a zone (else the
    minimum is an arena that can do nothing but raise ArenaFull)."""
    with pytest.raises(ValueError, match="at least") as info:
        SharedArena(4096)
    minimum = int(str(info.value).split("at least")[1].split()[0])
    small = SharedArena(minimum)
    small.zone("z", 0)  # (a zone header only, no region)


# -- slots ----------------------------------------------------------------------------------


def test_a_process_takes_one_slot_and_keeps_it(arena: SharedArena) -> None:
    """The first free slot, recorded with the pid; asking again gives the same one."""
    slot = arena.slot()
    assert slot == 0
    assert arena.slot() == slot
    holders = arena.holders()
    assert len(holders) == MAX_PROCESSES
    assert holders[slot] == os.getpid()
    assert holders.count(0) == MAX_PROCESSES - 1


def test_a_forked_child_takes_a_slot_of_its_own(arena: SharedArena) -> None:
    """A child of a process that holds a slot does not reuse its parent's slot; its slot
    stays recorded after it exits, until a sweep frees it."""
    parent_slot = arena.slot()

    def child() -> tuple[int, int]:
        slot = arena.slot()
        return slot, arena.holders()[slot]

    pid, (child_slot, holder) = in_child(child)
    assert child_slot != parent_slot
    assert child_slot == 1  # (the first free one)
    assert holder == pid
    assert arena.slot() == parent_slot  # (the parent's is untouched)
    holders = arena.holders()
    assert holders[parent_slot] == os.getpid()
    assert holders[child_slot] == pid  # dead, not yet swept
    assert arena.sweep() == 1
    assert arena.holders()[child_slot] == 0


def test_slots_run_out_with_max_processes_alive_and_are_reused_once_they_die(
    arena: SharedArena,
) -> None:
    """MAX_PROCESSES live holders: one more process gets ArenaFull. Once they have died,
    their slots are taken over (without a sweep)."""
    arena.slot()  # this process: slot 0
    release_r, release_w = os.pipe()  # the children wait for its EOF
    report_r, report_w = os.pipe()
    pids = []
    try:
        for _ in range(MAX_PROCESSES):
            pid = os.fork()
            if pid == 0:  # the child
                try:
                    os.close(release_w)
                    try:
                        answer = b"%03d\n" % arena.slot()
                    except ArenaFull:
                        answer = b"ful\n"
                    os.write(report_w, answer)
                    os.read(release_r, 1)
                finally:
                    os._exit(0)
            pids.append(pid)
        os.close(report_w)
        answers = b""
        deadline = time.monotonic() + 30
        while answers.count(b"\n") < MAX_PROCESSES and time.monotonic() < deadline:
            answers += os.read(report_r, 4096)
        lines = answers.split()
        assert len(lines) == MAX_PROCESSES
        assert lines.count(b"ful") == 1  # the one that came last
        assert sorted(int(x) for x in lines if x != b"ful") == list(range(1, MAX_PROCESSES))
    finally:
        os.close(release_w)  # (the children leave)
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(release_r)
        os.close(report_r)
    assert 0 not in arena.holders()  # dead holders, never swept

    def child() -> int:
        return arena.slot()

    _pid, slot = in_child(child)
    assert slot == 1  # the first dead holder's slot


# -- zones and regions ----------------------------------------------------------------------


def test_a_region_is_zeroed_and_owned_by_one_process(arena: SharedArena) -> None:
    """``own()`` is this process's region (zeroed, ``region_size`` bytes, the same memory
    each time); ``regions()`` and ``region_of()`` show it under this process's slot."""
    zone = arena.zone("z", 64, 32)
    assert (zone.name, zone.region_size, zone.volatile_from) == ("z", 64, 32)
    assert zone.regions() == []  # (no process has a region yet)
    region = zone.own()
    assert len(region) == 64 and bytes(region) == bytes(64)
    region[:4] = b"abcd"
    assert bytes(zone.own()[:4]) == b"abcd"
    slot = arena.slot()
    [(where, view)] = zone.regions()
    assert where == slot and bytes(view[:4]) == b"abcd"
    mine = zone.region_of(slot)
    assert mine is not None and bytes(mine[:4]) == b"abcd"
    assert zone.region_of(slot + 1) is None


def test_the_region_list_is_rebuilt_only_when_a_region_is_added(arena: SharedArena) -> None:
    """``regions()`` returns the same list while no process added a region, and a new
    list (with the other process's region and bytes) once one did."""
    zone = arena.zone("z", 16)
    zone.own()[:] = b"P" * 16
    first = zone.regions()
    assert zone.regions() is first

    def child() -> int:
        zone.own()[:] = b"C" * 16
        return arena.slot()

    _pid, child_slot = in_child(child)
    after = zone.regions()
    assert after is not first
    assert {slot: bytes(view) for slot, view in after} == {
        arena.slot(): b"P" * 16,
        child_slot: b"C" * 16,
    }


def test_regions_are_allocated_in_pages(arena: SharedArena) -> None:
    """A region takes whole pages (``used`` grows by them), once per process."""
    page = _page(arena)
    assert page == 4096
    zone = arena.zone("big", 3 * page + 1)
    before = arena.used
    zone.own()
    assert arena.used - before == 4 * page
    zone.own()
    assert arena.used - before == 4 * page  # (the same region)


def test_a_zone_is_found_again_by_name_and_sizes(arena: SharedArena) -> None:
    """The same name and sizes: the same zone (no new allocation). Other sizes: another
    zone with its own memory. Asked again with the first sizes: the first zone's memory,
    found in the arena's directory."""
    first = arena.zone("limit", 64, 32)
    first.own()[:3] = b"one"
    assert arena.zone("limit", 64, 32) is first
    used = arena.used
    other = arena.zone("limit", 128, 64)
    assert other.region_size == 128
    assert bytes(other.own()[:3]) == bytes(3)  # (its own memory)
    other.own()[:3] = b"two"
    assert arena.used > used
    used = arena.used
    again = arena.zone("limit", 64, 32)
    assert bytes(again.own()[:3]) == b"one"
    assert bytes(arena.zone("limit", 128, 64).own()[:3]) == b"two"
    assert arena.used == used  # (nothing allocated for zones found again)
    assert bytes(arena.zone("limit", 64, 16).own()[:3]) == bytes(3)  # volatile_from counts


def test_a_zone_made_in_another_process_is_found_by_name(arena: SharedArena) -> None:
    """A zone made by a child after the fork (as a worker reloading its config does) is
    found by the parent, with the child's region and counts in it."""

    def child() -> int:
        arena.zone("made-late", 24, 8).own()[:] = b"x" * 24
        return arena.slot()

    _pid, child_slot = in_child(child)
    zone = arena.zone("made-late", 24, 8)
    assert [(slot, bytes(view)) for slot, view in zone.regions()] == [(child_slot, b"x" * 24)]
    assert arena.zone("made-late", 24, 16).regions() == []  # (other sizes: another zone)


@pytest.mark.parametrize("volatile_from", [-1, 65])
def test_volatile_from_must_be_within_the_region(
    arena: SharedArena, volatile_from: int
) -> None:
    """0 <= volatile_from <= region_size."""
    with pytest.raises(ValueError, match="volatile_from"):
        arena.zone("z", 64, volatile_from)


def test_by_default_nothing_is_volatile(arena: SharedArena) -> None:
    """Without ``volatile_from`` the whole region is persistent; 0 and region_size are
    both allowed."""
    assert arena.zone("a", 64).volatile_from == 64
    assert arena.zone("b", 64, 0).volatile_from == 0
    assert arena.zone("c", 64, 64).volatile_from == 64


# -- running out of room --------------------------------------------------------------------


def test_arena_full_when_the_bytes_run_out() -> None:
    """Room for three pages after the header: a zone, its region, a second zone; then
    neither a region nor a zone fits. What was allocated keeps working."""
    base = SharedArena(SIZE).used
    arena = SharedArena(base + 3 * 4096)
    one = arena.zone("one", 100)
    one.own()[:3] = b"one"
    two = arena.zone("two", 100)
    assert arena.used == arena.size
    with pytest.raises(ArenaFull):
        two.own()
    with pytest.raises(ArenaFull):
        arena.zone("three", 100)
    assert bytes(one.own()[:3]) == b"one"
    assert arena.zone("two", 100).regions() == []  # (found, not allocated)


def test_arena_full_after_max_zones(arena: SharedArena) -> None:
    """The directory holds MAX_ZONES zones; one more raises ArenaFull, those made are
    still found."""
    for i in range(MAX_ZONES):
        arena.zone(f"zone-{i}", 8)
    with pytest.raises(ArenaFull):
        arena.zone("one too many", 8)
    used = arena.used
    arena.zone("zone-7", 8)
    assert arena.used == used


def test_a_swap_cell_counts_as_a_zone(arena: SharedArena) -> None:
    """Shared cells live in the zone directory, so they too run into MAX_ZONES."""
    for i in range(MAX_ZONES):
        arena.zone(f"zone-{i}", 8)
    with pytest.raises(ArenaFull):
        arena.swap("cell", 1)


# -- shared cells ---------------------------------------------------------------------------


def test_swap_returns_what_the_cell_held(arena: SharedArena) -> None:
    """A new cell holds 0; each swap returns the previous value (64-bit signed); cells
    are independent by name."""
    assert arena.swap("a", 5) == 0
    assert arena.swap("a", 7) == 5
    assert arena.swap("b", 1) == 0
    assert arena.swap("a", -3) == 7
    assert arena.swap("a", 2**62) == -3
    assert arena.swap("a", 0) == 2**62
    assert arena.swap("b", 0) == 1


def test_swap_cells_are_shared_with_other_processes(arena: SharedArena) -> None:
    """A cell set in one process is seen, and set, by another (so of the workers that
    see an outage only the first logs it)."""
    assert arena.swap("outage", 1) == 0

    def child() -> tuple[int, int]:
        return arena.swap("outage", 1), arena.swap("other", 9)

    _pid, (seen, other) = in_child(child)
    assert (seen, other) == (1, 0)  # the child was not the first
    assert arena.swap("other", 0) == 9
    assert arena.swap("outage", 0) == 1


# -- dead processes -------------------------------------------------------------------------


def _fill_region(zone_name: str, size: int, volatile_from: int, arena: SharedArena
                 ) -> Callable[[], int]:
    """A child's work: fill its region of a zone with 0xab, return its slot."""

    def body() -> int:
        arena.zone(zone_name, size, volatile_from).own()[:] = b"\xab" * size
        return arena.slot()

    return body


def test_sweep_frees_a_dead_process_slot_and_zeroes_only_the_volatile_part(
    arena: SharedArena,
) -> None:
    """The dead child's slot is freed; in its regions the bytes from volatile_from on are
    zeroed (concurrency units), those before it (rate windows) are kept. A live process's
    region is left alone, and a second sweep finds nothing more."""
    zone = arena.zone("z", 16, 8)
    all_volatile = arena.zone("v", 8, 0)
    zone.own()[:] = b"\xcd" * 16  # this (live) process's

    def child() -> int:
        zone.own()[:] = b"\xab" * 16
        all_volatile.own()[:] = b"\xab" * 8
        return arena.slot()

    pid, slot = in_child(child)
    assert arena.holders()[slot] == pid
    dead = zone.region_of(slot)
    assert dead is not None and bytes(dead) == b"\xab" * 16  # (not swept yet)
    assert arena.sweep() == 1
    assert arena.holders()[slot] == 0
    dead = zone.region_of(slot)
    assert dead is not None and bytes(dead) == b"\xab" * 8 + bytes(8)
    dead_v = all_volatile.region_of(slot)
    assert dead_v is not None and bytes(dead_v) == bytes(8)
    assert bytes(zone.own()) == b"\xcd" * 16
    assert arena.holders()[arena.slot()] == os.getpid()
    assert arena.sweep() == 0


def test_sweep_zeroes_the_volatile_part_of_every_zone(arena: SharedArena) -> None:
    """A dead process's regions in all zones are swept at once."""
    zones = [arena.zone(f"z{i}", 32, 16) for i in range(3)]

    def child() -> int:
        for zone in zones:
            zone.own()[:] = b"\x01" * 32
        return arena.slot()

    _pid, slot = in_child(child)
    assert arena.sweep() == 1
    for zone in zones:
        region = zone.region_of(slot)
        assert region is not None and bytes(region) == b"\x01" * 16 + bytes(16)


def test_a_zombie_is_dead(arena: SharedArena) -> None:
    """A child that exited but was not reaped yet is swept too."""
    pid, slot = in_child(_fill_region("z", 8, 0, arena), reap=False)
    try:
        deadline = time.monotonic() + 5
        freed = 0
        while not freed and time.monotonic() < deadline:
            freed = arena.sweep()
            if not freed:
                time.sleep(0.01)
        assert freed == 1
        region = arena.zone("z", 8, 0).region_of(slot)
        assert region is not None and bytes(region) == bytes(8)
    finally:
        os.waitpid(pid, 0)


def test_sweep_with_now_runs_at_most_once_per_interval(arena: SharedArena) -> None:
    """``sweep(now)`` does nothing before ``SWEEP_INTERVAL`` has passed since the last
    one; ``sweep()`` (no ``now``) always runs."""
    assert arena.sweep(1000.0) == 0  # (due: nothing dead)
    _pid, slot = in_child(_fill_region("z", 8, 0, arena))
    assert arena.sweep(1000.0 + SWEEP_INTERVAL / 2) == 0  # (not due)
    assert arena.holders()[slot] != 0
    assert arena.sweep(1000.0 + SWEEP_INTERVAL) == 1
    assert arena.holders()[slot] == 0
    _pid, slot = in_child(_fill_region("z", 8, 0, arena))
    assert arena.sweep(1000.0 + SWEEP_INTERVAL) == 0  # (not due again yet)
    assert arena.sweep() == 1  # (forced)


def test_a_process_taking_over_a_dead_slot_finds_its_volatile_part_zeroed(
    arena: SharedArena,
) -> None:
    """Before any sweep, a new process that takes the slot of a dead one gets that
    region with the volatile part zeroed and the persistent part kept, in every zone."""
    arena.slot()  # this process: slot 0
    half = arena.zone("half", 16, 8)
    whole = arena.zone("whole", 8, 0)

    def dies_with_counts() -> int:
        half.own()[:] = b"\xab" * 16
        whole.own()[:] = b"\xab" * 8
        return arena.slot()

    dead_pid, dead_slot = in_child(dies_with_counts)
    assert arena.holders()[dead_slot] == dead_pid

    def takes_over() -> tuple[int, bytes, bytes]:
        return arena.slot(), bytes(half.own()), bytes(whole.own())

    new_pid, (slot, half_bytes, whole_bytes) = in_child(takes_over)
    assert slot == dead_slot
    assert half_bytes == b"\xab" * 8 + bytes(8)
    assert whole_bytes == bytes(8)
    assert arena.holders()[slot] == new_pid


def test_a_live_process_slot_is_never_taken_over(arena: SharedArena) -> None:
    """While this process lives, a child never takes its slot nor zeroes its region."""
    zone = arena.zone("z", 8, 0)
    zone.own()[:] = b"\x07" * 8
    mine = arena.slot()
    for _ in range(3):
        _pid, slot = in_child(lambda: arena.slot())
        assert slot != mine
    assert arena.sweep() == 1  # (the children share one slot, taken over each time)
    assert bytes(zone.own()) == b"\x07" * 8


def test_a_slot_whose_process_started_at_another_time_is_taken_over(
    arena: SharedArena,
) -> None:
    """A slot records its process's pid and start time: a slot holding this pid with
    another start time was a dead process's whose pid came back; taking it over zeroes
    its volatile part."""
    zone = arena.zone("z", 8192, volatile_from=4096)
    view = zone.own()
    view[4096] = 7  # (this process's unit, for now)
    slot = arena.slot()
    pid, start = _SLOT.unpack_from(arena._mm, _PIDS_AT + slot * _SLOT.size)
    assert (pid, start) == (os.getpid(), _start_time(os.getpid()))
    _SLOT.pack_into(arena._mm, _PIDS_AT + slot * _SLOT.size, pid, start - 1)
    fork_generation[0] += 1  # (as if this were a new process with the same pid)
    try:
        assert arena.slot() == slot
        assert zone.own()[4096] == 0
        assert _SLOT.unpack_from(arena._mm, _PIDS_AT + slot * _SLOT.size) == (pid, start)
    finally:
        fork_generation[0] -= 1


def test_the_lock_of_a_process_that_died_holding_it_is_free() -> None:
    """A child takes the arena's lock and dies without releasing it: the kernel frees
    it, and the parent's next structural change goes through at once."""
    arena = SharedArena(SIZE)
    pid = os.fork()
    if pid == 0:
        held = arena._locked()
        held.__enter__()
        os._exit(0)  # (never released)
    os.waitpid(pid, 0)
    started = time.monotonic()
    arena.zone("after", 4096)
    assert time.monotonic() - started < 0.1
