"""Page stores for optimizer state: where the float32 ``exp_avg`` / ``exp_avg_sq`` pages live and how
they reach the device for an update.

A page holds ``page_elems`` elements of both moments, stored as ``[2, page_elems]`` float32
(row 0 = exp_avg, row 1 = exp_avg_sq). Three stores share one interface (:class:`PageStore`):

* :class:`ResidentStore`  every page on the device, one kernel launch per step (the budget covers
  the whole state).
* :class:`ExplicitPager`  a device pool of ``n_slots < n_pages`` slots under a byte budget, a (pinned)
  host backing store, LRU residency, loads and write-backs on two side streams overlapped with
  updates. On CPU the same code runs with a CPU "device" pool and synchronous copies, so CI tests the
  paging logic (and tests/test_optim_pager_streams.py replays its stream ordering on simulated streams).
* :class:`ManagedStore`   CUDA unified memory, prefetched to the GPU before each update; the driver
  pages it out under memory pressure (what bitsandbytes' paged optimizers do).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PageBatch = list[tuple[int, int]]
"""Pages ready for an update, as (page index, slot): the page's state is ``buffer[slot]`` of the
``[n_slots, 2, page_elems]`` buffer passed with the batch (row 0 exp_avg, row 1 exp_avg_sq)."""

UpdateFn = Callable[[torch.Tensor, PageBatch], None]


@dataclass
class PagingStats:
    """What one optimizer step cost in paging (all counts for that step only).

    ``bytes_in`` / ``bytes_out``: bytes copied host->device / device->host by the explicit pager; for
    the managed backend ``bytes_in`` is the size prefetched (the driver moves at most that much).
    """

    backend: str
    pages_total: int = 0
    pages_updated: int = 0
    pages_resident: int = 0
    pages_in: int = 0
    pages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    budget_bytes: int = 0
    state_bytes: int = 0

    def add(self, other: PagingStats) -> None:
        """Accumulates the per-step counters of ``other`` (used for running totals)."""
        self.pages_updated += other.pages_updated
        self.pages_in += other.pages_in
        self.pages_out += other.pages_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.pages_total, self.pages_resident = other.pages_total, other.pages_resident
        self.budget_bytes, self.state_bytes = other.budget_bytes, other.state_bytes


class PageStore:
    """Interface of the stores. ``n_pages`` pages of ``page_elems`` elements on ``device``."""

    backend = "base"

    def __init__(self, n_pages: int, page_elems: int, device: torch.device):
        self.n_pages = n_pages
        self.page_elems = page_elems
        self.device = device
        self.page_bytes = 2 * 4 * page_elems

    def run_step(self, pages: Sequence[int], update: UpdateFn) -> PagingStats:
        """Makes each page of ``pages`` (sorted, unique) available on the device and calls ``update``
        with batches of them; every page is passed exactly once. Returns the step's paging stats."""
        raise NotImplementedError

    def read_all(self) -> torch.Tensor:
        """A CPU float32 copy ``[n_pages, 2, page_elems]`` of the whole state (may synchronize)."""
        raise NotImplementedError

    def write_all(self, pages: torch.Tensor) -> None:
        """Replaces the whole state with ``pages`` (CPU or device, ``[n_pages, 2, page_elems]``)."""
        raise NotImplementedError

    def _stats(self, **kw) -> PagingStats:
        return PagingStats(
            backend=self.backend,
            pages_total=self.n_pages,
            state_bytes=self.n_pages * self.page_bytes,
            **kw,
        )


class ResidentStore(PageStore):
    """All pages on the device; one update call (one kernel launch) per step."""

    backend = "resident"

    def __init__(self, n_pages: int, page_elems: int, device: torch.device):
        super().__init__(n_pages, page_elems, device)
        self.pages = torch.zeros((n_pages, 2, page_elems), dtype=torch.float32, device=device)

    def run_step(self, pages: Sequence[int], update: UpdateFn) -> PagingStats:
        update(self.pages, [(pg, pg) for pg in pages])
        n = self.n_pages
        return self._stats(pages_updated=len(pages), pages_resident=n, budget_bytes=n * self.page_bytes)

    def read_all(self) -> torch.Tensor:
        return self.pages.to("cpu", copy=True)

    def write_all(self, pages: torch.Tensor) -> None:
        self.pages.copy_(pages)


STREAMS = ("compute", "h2d", "d2h")
"""The explicit pager's streams: updates on the current (compute) stream, loads on an H2D side
stream, write-backs on a D2H side stream (PCIe is full duplex: the two directions overlap)."""


class _CudaSync:
    """Streams and events of the explicit pager on a CUDA device; only events order the streams,
    and the host never waits during a step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = {"h2d": torch.cuda.Stream(device=device), "d2h": torch.cuda.Stream(device=device)}
        for st in self.side.values():
            st.wait_stream(torch.cuda.current_stream(device))

    def _stream(self, name: str):
        return torch.cuda.current_stream(self.device) if name == "compute" else self.side[name]

    def new_event(self):
        return torch.cuda.Event()

    def keep_alive(self, t: torch.Tensor) -> None:
        # `t` is used on the side streams: the caching allocator must not reuse it before they are done.
        for st in self.side.values():
            t.record_stream(st)

    def copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.side[stream]):
            dst.copy_(src, non_blocking=True)

    def compute(self, fn: Callable[[], None]) -> None:
        fn()  # kernels are asynchronous already: they go to the current stream

    def wait(self, stream: str, event) -> None:
        self._stream(stream).wait_event(event)

    def record(self, stream: str, event) -> None:
        event.record(self._stream(stream))

    def wait_stream(self, stream: str, other: str) -> None:
        self._stream(stream).wait_stream(self._stream(other))

    def synchronize(self) -> None:
        # Host-side readers of the host store need the side streams done; reads of device tensors
        # (synchronous copies to the CPU on the current stream) order themselves after the updates.
        for st in self.side.values():
            st.synchronize()


class _NullSync:
    """CPU stand-in: copies and updates run at once, in program order, so ordering is a no-op."""

    def new_event(self):
        return None

    def keep_alive(self, t: torch.Tensor) -> None:
        pass

    def copy(self, stream: str, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def compute(self, fn: Callable[[], None]) -> None:
        fn()

    def wait(self, stream: str, event) -> None:
        pass

    def record(self, stream: str, event) -> None:
        pass

    def wait_stream(self, stream: str, other: str) -> None:
        pass

    def synchronize(self) -> None:
        pass


class ExplicitPager(PageStore):
    """A device pool of ``n_slots`` page slots (``n_slots < n_pages``, at least 2) backed by a host
    store holding every page; LRU residency.

    One step, for the needed pages: pages already resident are updated first (no copy), then the
    missing ones are streamed in. Loads are issued ``lookahead`` pages ahead, so the H2D copy of page
    k+1 and the D2H write-back of the page it evicts overlap the update of page k (double buffering);
    loads and write-backs use separate streams, so the two PCIe directions overlap too. Ordering is by
    events only: a slot is written back after the event recorded behind its last update and
    overwritten after its write-back; an update waits for the event behind its slot's load. The host
    never waits during a step. Pages left resident at the end of a step are the last ones updated,
    and they go first in the next step, so a cyclic access pattern moves only
    ``n_needed - n_slots`` pages each way per step.
    """

    backend = "explicit"

    def __init__(self, n_pages: int, page_elems: int, device: torch.device, n_slots: int, lookahead: int = 2):
        super().__init__(n_pages, page_elems, device)
        if n_slots < 2:
            raise ValueError(
                f"PagedAdamW: the state budget holds {n_slots} page(s); the explicit pager needs at least 2 "
                f"(double buffering). Raise state_budget_bytes to >= {2 * self.page_bytes} or lower "
                "page_size."
            )
        self.n_slots = min(n_slots, n_pages)
        self.lookahead = max(1, min(lookahead, self.n_slots - 1))
        is_cuda = device.type == "cuda"
        self.pool = torch.zeros((self.n_slots, 2, page_elems), dtype=torch.float32, device=device)
        self.host = torch.zeros((n_pages, 2, page_elems), dtype=torch.float32, pin_memory=is_cuda)
        self.sync = (
            _CudaSync(device) if is_cuda else _NullSync()
        )  # created after the pool: it orders after it
        self.sync.keep_alive(self.pool)
        self.slot_page: list[int | None] = [None] * self.n_slots
        self.page_slot: dict[int, int] = {}
        self.slot_dirty = [False] * self.n_slots
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(self.n_slots))  # oldest first
        self.slot_done = [self.sync.new_event() for _ in range(self.n_slots)]  # behind the last update
        self.slot_ready = [self.sync.new_event() for _ in range(self.n_slots)]  # behind the last load
        self.slot_saved = [self.sync.new_event() for _ in range(self.n_slots)]  # behind the last write-back
        self.slot_done_recorded = [False] * self.n_slots

    # -- residency -------------------------------------------------------------------------------
    def _pick_victim(self, position: dict[int, int], k: int) -> int | None:
        """The least recently updated slot that is free or holds a page not still to be updated in
        this step (``position[page] < k``); None if every slot holds such a page."""
        for s in self.lru:
            pg = self.slot_page[s]
            if pg is None or position.get(pg, -1) < k:
                return s
        return None

    def _load(self, page: int, slot: int, stats: PagingStats) -> None:
        """Enqueues the write-back of the slot's dirty page (D2H stream), then the load of ``page``
        into the slot (H2D stream), each after what must precede it."""
        sync = self.sync
        old = self.slot_page[slot]
        if self.slot_done_recorded[slot]:  # the slot's last update must be finished
            sync.wait("d2h", self.slot_done[slot])
            sync.wait("h2d", self.slot_done[slot])
        if old is not None:
            if self.slot_dirty[slot]:
                sync.copy("d2h", self.host[old], self.pool[slot])
                sync.record("d2h", self.slot_saved[slot])
                sync.wait("h2d", self.slot_saved[slot])  # read the slot before overwriting it
                stats.pages_out += 1
                stats.bytes_out += self.page_bytes
            del self.page_slot[old]
        sync.copy("h2d", self.pool[slot], self.host[page])
        sync.record("h2d", self.slot_ready[slot])
        stats.pages_in += 1
        stats.bytes_in += self.page_bytes
        self.slot_page[slot] = page
        self.page_slot[page] = slot
        self.slot_dirty[slot] = False

    # -- one step --------------------------------------------------------------------------------
    def run_step(self, pages: Sequence[int], update: UpdateFn) -> PagingStats:
        stats = self._stats(budget_bytes=self.n_slots * self.page_bytes)
        sync = self.sync
        # Copies may start once everything queued before this step (e.g. a state load) is done, and a
        # load of a page must follow the write-back (previous steps, other stream) that saved it.
        sync.wait_stream("d2h", "compute")
        sync.wait_stream("h2d", "compute")
        sync.wait_stream("h2d", "d2h")
        order = [pg for pg in pages if pg in self.page_slot] + [
            pg for pg in pages if pg not in self.page_slot
        ]
        position = {pg: i for i, pg in enumerate(order)}
        loaded_now: set[int] = set()
        for k, page in enumerate(order):
            # Issue loads for this page and the next `lookahead` missing ones (double buffering).
            for ahead in order[k : k + 1 + self.lookahead]:
                if ahead in self.page_slot:
                    continue
                slot = self._pick_victim(position, k)
                if slot is None:
                    break  # every slot holds a page still to update: load it later
                self._load(ahead, slot, stats)
                loaded_now.add(ahead)
            # `page` is resident now: when its load was tried, at most `lookahead` < n_slots slots held
            # pages still to come (loaded ahead), so a victim existed.
            slot = self.page_slot[page]
            if page in loaded_now:
                sync.wait("compute", self.slot_ready[slot])
            sync.compute(lambda page=page, slot=slot: update(self.pool, [(page, slot)]))
            sync.record("compute", self.slot_done[slot])
            self.slot_done_recorded[slot] = True
            self.slot_dirty[slot] = True
            self.lru.move_to_end(slot)
        stats.pages_updated = len(order)
        stats.pages_resident = len(self.page_slot)
        return stats

    # -- whole-state access (state_dict / load_state_dict; these may synchronize) ----------------
    def read_all(self) -> torch.Tensor:
        self.sync.synchronize()  # host pages written by pending write-backs
        out = self.host.clone()
        for s, pg in enumerate(self.slot_page):
            if pg is not None:
                out[pg].copy_(self.pool[s])
        return out

    def write_all(self, pages: torch.Tensor) -> None:
        self.sync.synchronize()  # pending loads may still read the host store
        self.host.copy_(pages)
        for s, pg in enumerate(self.slot_page):
            if pg is not None:
                self.sync.compute(lambda s=s, pg=pg: self.pool[s].copy_(pages[pg], non_blocking=True))
                self.slot_dirty[s] = False  # host and slot agree
        # Copies of the next step must see the slot writes above (issued on the compute stream).
        self.sync.wait_stream("d2h", "compute")
        self.sync.wait_stream("h2d", "compute")


class ManagedStore(PageStore):
    """Pages in CUDA unified memory, prefetched to the GPU on the current stream before the update;
    the driver migrates them back to the host under memory pressure. One update call per step."""

    backend = "managed"

    def __init__(self, n_pages: int, page_elems: int, device: torch.device):
        super().__init__(n_pages, page_elems, device)
        from lora_ops.ops import adamw as adamw_ops

        self._ops = adamw_ops
        flat = adamw_ops.managed_empty(n_pages * 2 * page_elems, device.index or 0)
        flat.zero_()
        self.pages = flat.view(n_pages, 2, page_elems)

    def run_step(self, pages: Sequence[int], update: UpdateFn) -> PagingStats:
        # Prefetch contiguous runs of needed pages (one cudaMemPrefetchAsync per run).
        run_start = None
        for i, pg in enumerate(pages):
            if run_start is None:
                run_start = pg
            if i + 1 == len(pages) or pages[i + 1] != pg + 1:
                self._ops.managed_prefetch_(self.pages[run_start : pg + 1], False)
                run_start = None
        update(self.pages, [(pg, pg) for pg in pages])
        return self._stats(
            pages_updated=len(pages),
            pages_in=len(pages),
            bytes_in=len(pages) * self.page_bytes,
            pages_resident=self.n_pages,
            budget_bytes=self.n_pages * self.page_bytes,
        )

    def read_all(self) -> torch.Tensor:
        return self.pages.to("cpu", copy=True)

    def write_all(self, pages: torch.Tensor) -> None:
        self.pages.copy_(pages)
