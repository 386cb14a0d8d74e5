"""The explicit pager's stream/event ordering, checked on the CPU.

On a GPU the pager's copies (side stream) and updates (compute stream) run asynchronously, ordered
only by the events it records and waits on. Here a simulated pair of streams defers every copy and
update, then runs them in an adversarial order that respects nothing but those events (and each
stream's own order). A missing or misplaced wait then produces different numbers from the resident
run, which these tests compare bit for bit.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from test_optim_paged_adamw import PAGE, assert_state_close, clone_params, make_params, run, two_groups

import lora_ops.optim.pager as pager_mod
from lora_ops.optim import PagedAdamW


class _Event:
    def __init__(self):
        self.issued = 0  # records enqueued
        self.done = 0  # records executed


class SimSync:
    """Deferred compute / h2d / d2h streams; `policy` picks which runnable stream goes next."""

    def __init__(self, policy: str, seed: int):
        self.queues = {name: deque() for name in pager_mod.STREAMS}
        self.policy = policy
        self.rng = random.Random(seed)
        self.ops_run = 0

    def new_event(self):
        return _Event()

    def keep_alive(self, t):
        pass

    def wait(self, stream, event):  # CUDA: waits for the event's latest record at call time
        self.queues[stream].append(("wait", event, event.issued))

    def record(self, stream, event):
        event.issued += 1
        self.queues[stream].append(("record", event))

    def wait_stream(self, stream, other):
        event = _Event()
        self.record(other, event)
        self.wait(stream, event)

    def copy(self, stream, dst, src):
        self.queues[stream].append(("run", lambda: dst.copy_(src)))

    def compute(self, fn):
        self.queues["compute"].append(("run", fn))

    def synchronize(self):
        while any(self.queues.values()):
            ready = [s for s, q in self.queues.items() if q and self._runnable(q[0])]
            assert ready, "deadlock: both streams wait on events that are never recorded"
            if self.policy == "random":
                stream = self.rng.choice(ready)
            else:  # copies as early as allowed, or as late as allowed
                order = (
                    ("h2d", "d2h", "compute") if self.policy == "copy_first" else ("compute", "d2h", "h2d")
                )
                stream = next(s for s in order if s in ready)
            self._execute(self.queues[stream].popleft())

    @staticmethod
    def _runnable(op) -> bool:
        return op[0] != "wait" or op[1].done >= op[2]

    def _execute(self, op) -> None:
        self.ops_run += 1
        if op[0] == "run":
            op[1]()
        elif op[0] == "record":
            op[1].done += 1


@pytest.mark.parametrize("policy", ["copy_first", "compute_first", "random"])
@pytest.mark.parametrize("budget_pages", [2, 3, 6])
def test_deferred_streams_bitwise_equal_resident(monkeypatch, rng, policy, budget_pages):
    sims = []

    def make_sim():
        sims.append(SimSync(policy, seed=len(sims) + budget_pages))
        return sims[-1]

    monkeypatch.setattr(pager_mod, "_NullSync", make_sim)
    params = make_params(rng, "cpu")
    res_params = clone_params(params)
    skip = lambda s: (2, 6) if s % 4 == 1 else ((0,) if s % 4 == 3 else ())
    paged = PagedAdamW(two_groups(params), page_size=PAGE, state_budget_bytes=budget_pages * 8 * PAGE)
    resident = PagedAdamW(two_groups(res_params), page_size=PAGE, paging="none")
    run(paged, params, 12, seed=21, skip_fn=skip)
    run(resident, res_params, 12, seed=21, skip_fn=skip)
    assert len(sims) == 1 and sims[0].ops_run == 0  # nothing ran yet: all 12 steps are still queued
    assert_state_close(paged, resident, params, res_params, exact=True)  # state_dict() drains the queues
    assert sims[0].ops_run > 0


def test_simulator_catches_a_missing_wait(monkeypatch, rng):
    """The check above can fail: drop the waits for a slot's last update and results change."""
    monkeypatch.setattr(pager_mod, "_NullSync", lambda: SimSync("copy_first", seed=0))
    original = pager_mod.ExplicitPager._load

    def load_without_wait(self, page, slot, stats):
        self.slot_done_recorded[slot] = False  # so _load skips copy_wait(slot_done)
        return original(self, page, slot, stats)

    monkeypatch.setattr(pager_mod.ExplicitPager, "_load", load_without_wait)
    params = make_params(rng, "cpu")
    res_params = clone_params(params)
    paged = PagedAdamW(params, page_size=PAGE, state_budget_bytes=2 * 8 * PAGE)
    resident = PagedAdamW(res_params, page_size=PAGE, paging="none")
    run(paged, params, 4, seed=22)
    run(resident, res_params, 4, seed=22)
    with pytest.raises(AssertionError):
        assert_state_close(paged, resident, params, res_params, exact=True)


@pytest.mark.parametrize("policy", ["copy_first", "compute_first", "random"])
def test_deferred_streams_load_state_dict_then_continue(monkeypatch, rng, policy):
    """write_all (load_state_dict) writes resident slots on the compute stream; later loads must not
    overtake those writes."""
    monkeypatch.setattr(pager_mod, "_NullSync", lambda: SimSync(policy, seed=7))
    params = make_params(rng, "cpu")
    opt = run(PagedAdamW(two_groups(params), page_size=PAGE, paging="none"), params, 6, seed=23)
    saved = opt.state_dict()
    resumed_params = clone_params(params)
    resumed = PagedAdamW(two_groups(resumed_params), page_size=PAGE, state_budget_bytes=3 * 8 * PAGE)
    run(resumed, resumed_params, 2, seed=99)  # make slots resident and dirty first
    resumed.state_dict()  # drains the simulated streams: the host-side param copy below must come after
    for p, q in zip(resumed_params, params):
        p.data.copy_(q.detach())
    resumed.load_state_dict(saved)
    skip = lambda s: (0, 1, 2, 3) if s == 6 else ()
    run(opt, params, 6, seed=23, start=6, skip_fn=skip)
    run(resumed, resumed_params, 6, seed=23, start=6, skip_fn=skip)
    assert_state_close(resumed, opt, resumed_params, params, exact=True)
