"""The read lock pyfuse3 gets from unionfs.read_lock: a mutex that does not yield when free."""

from __future__ import annotations

import types

import pytest

import trio
import trio.testing

from unionfs import read_lock, startup


def test_a_free_lock_is_taken_without_yielding() -> None:
    trio.run(_a_free_lock_is_taken_without_yielding)


async def _a_free_lock_is_taken_without_yielding(lock_type: type = read_lock.UncheckedLock) -> None:
    lock = lock_type()
    for _ in range(20):  # trio runs a batch of ready tasks in either order: ask often
        other_ran: list[bool] = []

        async def other(ran: list[bool] = other_ran) -> None:
            ran.append(True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            async with lock:
                assert other_ran == []  # no checkpoint on the way in
            await trio.testing.wait_all_tasks_blocked()
            assert other_ran == [True]


def test_holders_exclude_each_other_and_waiters_get_it_in_turn() -> None:
    trio.run(_holders_exclude_each_other_and_waiters_get_it_in_turn)


async def _holders_exclude_each_other_and_waiters_get_it_in_turn() -> None:
    lock = read_lock.UncheckedLock()
    inside: list[int] = []
    order: list[int] = []

    async def hold(n: int) -> None:
        async with lock:
            inside.append(n)
            assert len(inside) == 1
            order.append(n)
            await trio.sleep(0.01)  # yields while holding: the others must wait
            inside.remove(n)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(hold, n)
            await trio.testing.wait_all_tasks_blocked()
    assert sorted(order) == [0, 1, 2, 3]
    assert order[0] == 0


def test_a_waiter_cancelled_while_parked_leaves_the_lock_usable() -> None:
    trio.run(_a_waiter_cancelled_while_parked_leaves_the_lock_usable)


async def _a_waiter_cancelled_while_parked_leaves_the_lock_usable() -> None:
    lock = read_lock.UncheckedLock()
    async with lock:
        with trio.move_on_after(0.01) as scope:
            async with lock:
                raise AssertionError("taken while held")
        assert scope.cancelled_caught
    async with lock:
        pass


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
