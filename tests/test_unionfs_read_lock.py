"""The read lock pyfuse3 gets from unionfs.read_lock: a mutex that does not yield when free."""

from __future__ import annotations

import types

import pytest

import trio
import trio.testing

from unionfs import read_lock, startup


def test_a_free_lock_is_taken_without_yielding() -> None:
    seen = trio.run(_a_free_lock_is_taken_without_yielding)
    assert seen == [([], [True])] * 20  # the other task ran only after the lock was left


async def _a_free_lock_is_taken_without_yielding(lock_type: type = read_lock.UncheckedLock,
                                                  ) -> list[tuple[list[bool], list[bool]]]:
    """What another ready task had done while the lock was held, and after; 20 times, since trio
    runs a batch of ready tasks in either order."""
    lock = lock_type()
    seen = []
    for _ in range(20):
        other_ran: list[bool] = []

        async def other(ran: list[bool] = other_ran) -> None:
            ran.append(True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            async with lock:
                inside = list(other_ran)
            await trio.testing.wait_all_tasks_blocked()
            seen.append((inside, list(other_ran)))
    return seen


def test_holders_exclude_each_other_and_waiters_get_it_in_turn() -> None:
    most_inside, order = trio.run(_holders_exclude_each_other_and_waiters_get_it_in_turn)
    assert most_inside == 1
    assert sorted(order) == [0, 1, 2, 3] and order[0] == 0


async def _holders_exclude_each_other_and_waiters_get_it_in_turn() -> tuple[int, list[int]]:
    lock = read_lock.UncheckedLock()
    inside: list[int] = []
    most_inside = 0
    order: list[int] = []

    async def hold(n: int) -> None:
        nonlocal most_inside
        async with lock:
            inside.append(n)
            most_inside = max(most_inside, len(inside))
            order.append(n)
            await trio.sleep(0.01)  # yields while holding: the others must wait
            inside.remove(n)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(hold, n)
            await trio.testing.wait_all_tasks_blocked()
    return most_inside, order


def test_a_waiter_cancelled_while_parked_leaves_the_lock_usable() -> None:
    taken_while_held, gave_up, taken_after = trio.run(_a_waiter_cancelled_while_parked_leaves_the_lock_usable)
    assert (taken_while_held, gave_up, taken_after) == (False, True, True)


async def _a_waiter_cancelled_while_parked_leaves_the_lock_usable() -> tuple[bool, bool, bool]:
    lock = read_lock.UncheckedLock()
    taken_while_held = taken_after = False
    async with lock:
        with trio.move_on_after(0.01) as scope:
            async with lock:
                taken_while_held = True
    async with lock:
        taken_after = True
    return taken_while_held, scope.cancelled_caught, taken_after


def test_install_gives_pyfuse3_the_view_and_nothing_with_the_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("fake_pyfuse3")
    fake.trio = trio  # type: ignore[attr-defined]
    monkeypatch.setenv(startup.NO_PATCHES_ENV, "1")
    assert read_lock.install(fake) is False and fake.trio is trio  # type: ignore[attr-defined]
    monkeypatch.delenv(startup.NO_PATCHES_ENV)
    assert read_lock.install(fake) is True
    view = fake.trio  # type: ignore[attr-defined]
    assert view.Lock is read_lock.UncheckedLock
    assert view.lowlevel is trio.lowlevel and view.open_nursery is trio.open_nursery
    assert read_lock.install(fake) is False  # once is enough
