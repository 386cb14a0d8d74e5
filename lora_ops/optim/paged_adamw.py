"""PagedAdamW: torch.optim.AdamW's update with float32 state kept in fixed-size pages that can live
off the device (see lora_ops/optim/pager.py), updated by the fused multi-tensor kernel."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lora_ops.ops import adamw as adamw_ops
from lora_ops.optim.pager import (
    ExplicitPager,
    ManagedStore,
    PageStore,
    PagingStats,
    ResidentStore,
)

_ALIGN = 16  # elements: every parameter's state starts 64-byte aligned inside its page
_PAGING = ("explicit", "managed", "none")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an FSDP2-sharded parameter or its gradient), else ``t``: AdamW is
    elementwise, so each rank updates the state of its own shard."""
    return getattr(t, "_local_tensor", t) if type(t).__name__ == "DTensor" else t


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _like_param(moment: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A moment of the local shard as a DTensor sharded like ``p`` (for torch.distributed.checkpoint),
    or as is for a plain parameter."""
    if type(p).__name__ != "DTensor":
        return moment
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(moment, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


class _Layout:
    """Where each parameter's state lives in the flat page space: parameter i owns flat elements
    ``[offset[i], offset[i] + numel)``; page p covers ``[p * page_elems, (p + 1) * page_elems)``.
    Parameters are packed (a page may hold many small LoRA tensors, a large tensor spans pages)."""

    def __init__(self, page_elems: int):
        self.page_elems = page_elems
        self.params: list[torch.Tensor] = []
        self.index: dict[int, int] = {}  # id(param) -> i
        self.offset: list[int] = []
        self.end = 0
        # page -> [(param i, begin in param, end in param, offset in page)]
        self.pieces: list[list[tuple[int, int, int, int]]] = []
        self._table: torch.Tensor | None = None
        self._page_rows: list[int] = []

    def add(self, p: torch.Tensor) -> None:
        i = len(self.params)
        self.params.append(p)
        self.index[id(p)] = i
        start = _round_up(self.end, _ALIGN)
        self.offset.append(start)
        self.end = start + _local(p).numel()
        pe = self.page_elems
        while len(self.pieces) * pe < self.end:
            self.pieces.append([])
        pos = start
        while pos < self.end:
            page, in_page = divmod(pos, pe)
            n = min(pe - in_page, self.end - pos)
            self.pieces[page].append((i, pos - start, pos - start + n, in_page))
            pos += n
        self._table = None

    @property
    def n_pages(self) -> int:
        return len(self.pieces)

    def table(self) -> tuple[torch.Tensor, list[int]]:
        """All pieces as int64 ``[n, 5]`` rows (param i, begin, end, page, offset), sorted by page, and
        the first row of each page (``rows[page] : rows[page + 1]``)."""
        if self._table is None:
            rows, starts = [], [0]
            for page, pieces in enumerate(self.pieces):
                rows += [(i, b, e, page, off) for i, b, e, off in pieces]
                starts.append(len(rows))
            self._table = torch.tensor(rows, dtype=torch.int64).view(-1, 5)
            self._page_rows = starts
        return self._table, self._page_rows

    def pages_of(self, i: int) -> range:
        n = _local(self.params[i]).numel()
        if n == 0:
            return range(0)
        return range(self.offset[i] // self.page_elems, (self.offset[i] + n - 1) // self.page_elems + 1)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW semantics: decoupled weight decay, bias correction) with float32
    state in fixed-size pages.

    Args:
        params: parameters or param groups; float32/float16/bfloat16, contiguous, all on one device.
        lr, betas, eps, weight_decay, maximize: as torch.optim.AdamW (per group).
        amsgrad: must be False (not implemented; rejected with ValueError).
        paging: ``"explicit"`` (default) a budgeted device page pool with a pinned host backing store;
            ``"managed"`` CUDA unified memory with prefetch (CUDA parameters only: ValueError otherwise;
            falls back to ``"explicit"`` with a warning where the GPU lacks concurrent managed access,
            lora_ops was built without CUDA, or the state exceeds free GPU memory);
            ``"none"`` all state resident on the device. With ``"explicit"`` and a budget that holds the
            whole state, nothing pages and the step is the resident one (``paging_backend == "resident"``).
        state_budget_bytes: device bytes for state pages (explicit). Default: on CUDA the free memory
            less a headroom of max(1 GiB, 10% of the device); on CPU the whole state (no paging).
        page_size: elements per page (each page holds both moments: ``8 * page_size`` bytes).

    State layout as torch: ``state_dict()["state"][i] = {"step", "exp_avg", "exp_avg_sq"}`` (float32
    moments shaped like the parameter, on the CPU), loadable into torch.optim.AdamW and back.
    ``self.paging_stats`` holds the last step's :class:`PagingStats`, ``self.paging_totals`` the sums.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        paging: str = "explicit",
        state_budget_bytes: int | None = None,
        page_size: int = 1 << 20,
    ):
        if paging not in _PAGING:
            raise ValueError(f"PagedAdamW: paging must be one of {_PAGING}, got {paging!r}")
        if page_size <= 0 or page_size % _ALIGN:
            raise ValueError(
                f"PagedAdamW: page_size must be a positive multiple of {_ALIGN}, got {page_size}"
            )
        if state_budget_bytes is not None and state_budget_bytes <= 0:
            raise ValueError(f"PagedAdamW: state_budget_bytes must be positive, got {state_budget_bytes}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
        }
        self._paging = paging
        self._budget = state_budget_bytes
        self._page_elems = page_size
        self._layout = _Layout(page_size)
        self._store: PageStore | None = None
        self._device: torch.device | None = None
        self._steps = torch.zeros(0, dtype=torch.float32)  # step of every layout param (float32, as torch)
        self._pages_cache: tuple[tuple[int, ...], list[int]] | None = None
        self.paging_stats: PagingStats | None = None
        self.paging_totals: PagingStats | None = None
        super().__init__(params, defaults)

    # -- construction / validation --------------------------------------------------------------
    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("PagedAdamW: a Tensor lr must have one element")
        if not 0.0 <= float(lr):
            raise ValueError(f"PagedAdamW: invalid learning rate {float(lr)}")
        if not 0.0 <= eps:
            raise ValueError(f"PagedAdamW: invalid eps {eps}")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"PagedAdamW: betas must be in [0, 1), got {(beta1, beta2)}")
        if not 0.0 <= wd:
            raise ValueError(f"PagedAdamW: invalid weight_decay {wd}")
        if group.get("amsgrad", False):
            raise ValueError("PagedAdamW: amsgrad=True is not supported (use torch.optim.AdamW for AMSGrad)")
        for p in map(_local, group["params"]):
            if p.is_complex():
                raise TypeError("PagedAdamW: complex parameters are not supported")
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"PagedAdamW: parameters must be float32, float16 or bfloat16, got {p.dtype}")
            if p.layout != torch.strided or not p.is_contiguous():
                raise ValueError("PagedAdamW: parameters must be dense and contiguous")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        if self._paging == "managed":  # unified memory is a CUDA feature: on the CPU it is a mistake
            not_cuda = next((p.device for p in self.param_groups[-1]["params"] if p.device.type != "cuda"), None)
            if not_cuda is not None:
                raise ValueError(f"PagedAdamW: paging='managed' (CUDA unified memory) needs CUDA parameters, "
                                 f"got one on {not_cuda}; use paging='explicit' (the default) or 'none'")

    # -- copy / pickle ----------------------------------------------------------------------------
    # torch's Optimizer pickles only defaults, state and param_groups. The page store is keyed by
    # id(param), which neither a copy nor a pickle keeps, so the moments travel in torch's layout
    # (per-parameter float32 exp_avg / exp_avg_sq on the CPU) and the copy builds its own store.
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        full = self._store.read_all() if self._store is not None else None
        per_param: dict[Any, dict[str, Any]] = {}
        for p, st in self.state.items():
            st = dict(st)
            if "step" in st:
                st["step"] = st["step"].clone()  # not a view of the shared step buffer
            li = self._layout.index.get(id(p))
            if full is not None and li is not None:
                st["exp_avg"], st["exp_avg_sq"] = self._param_moments(full, li)
            per_param[p] = st
        state["state"] = per_param
        state["_paged_config"] = (self._paging, self._budget, self._page_elems)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        config = state.pop("_paged_config", None)
        moments: dict[Any, dict[str, torch.Tensor]] = {}
        plain = defaultdict(dict)
        for p, st in state["state"].items():
            st = dict(st)
            moments[p] = {name: st.pop(name) for name in ("exp_avg", "exp_avg_sq") if name in st}
            plain[p] = st
        state["state"] = plain
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
        if config is None:
            return
        self._paging, self._budget, self._page_elems = config
        self._layout = _Layout(self._page_elems)
        self._store = None
        self._device = None
        self._steps = torch.zeros(0, dtype=torch.float32)
        self._pages_cache = None
        self.paging_stats = self.paging_totals = None
        self._write_moments([(p, p, m) for p, m in moments.items()])

    def _write_moments(self, moments: list[tuple[Any, torch.Tensor, dict[str, torch.Tensor]]]) -> None:
        """Builds the store over every parameter and writes ``(key, param, {"exp_avg", "exp_avg_sq"})``
        moments into it (any float dtype and device; others start from zero)."""
        if not any(g["params"] for g in self.param_groups):
            return
        store = self._ensure_store()
        self._link_steps()
        full = torch.zeros((self._layout.n_pages, 2, self._page_elems), dtype=torch.float32)
        for k, p, mom in moments:
            if p is None or not mom:
                continue
            if set(mom) != {"exp_avg", "exp_avg_sq"}:
                raise ValueError(f"PagedAdamW: state of parameter {k} must have both exp_avg and exp_avg_sq")
            i = self._layout.index[id(p)]
            for row, name in ((0, "exp_avg"), (1, "exp_avg_sq")):
                src = _local(mom[name].detach()).to("cpu", torch.float32).reshape(-1)
                if src.numel() != _local(p).numel():
                    raise ValueError(
                        f"PagedAdamW: {name} of parameter {k} has {src.numel()} elements, "
                        f"the parameter {_local(p).numel()}"
                    )
                self._scatter(full, i, row, src)
        store.write_all(full)

    # -- the page store ---------------------------------------------------------------------------
    def _ensure_store(self) -> PageStore:
        """Assigns state space to parameters not seen yet and (re)builds the store to cover them."""
        if self._store is not None and sum(len(g["params"]) for g in self.param_groups) == len(
            self._layout.params
        ):
            return self._store
        all_params = [p for g in self.param_groups for p in g["params"]]
        devices = {p.device for p in all_params}
        if len(devices) != 1:
            raise ValueError(
                f"PagedAdamW: all parameters must be on one device, got {sorted(map(str, devices))}"
            )
        self._device = next(iter(devices))
        new = [p for p in all_params if id(p) not in self._layout.index]
        if not new and self._store is not None:
            return self._store
        old = self._store.read_all() if self._store is not None else None
        for p in new:
            self._layout.add(p)
        self._link_steps()
        self._store = self._make_store(self._layout.n_pages)
        if old is not None:
            full = torch.zeros((self._layout.n_pages, 2, self._page_elems), dtype=torch.float32)
            full[: old.shape[0]] = old
            self._store.write_all(full)
        return self._store

    def _link_steps(self) -> None:
        """Sizes the step buffer to the layout and makes every state's "step" a 0-dim view of it, so one
        indexed add counts all parameters' steps (state_dict() hands out copies, as float32 scalars)."""
        params = self._layout.params
        steps = torch.zeros(len(params), dtype=torch.float32)
        for i, p in enumerate(params):
            st = self.state.get(p)
            if st is not None and "step" in st:
                steps[i] = float(st["step"])
                st["step"] = steps[i]
        self._steps = steps

    def _make_store(self, n_pages: int) -> PageStore:
        device, pe = self._device, self._page_elems
        page_bytes = 8 * pe
        paging = self._paging
        if paging == "managed":
            reason = self._managed_unavailable(n_pages * page_bytes)
            if reason is None:
                return ManagedStore(n_pages, pe, device)
            warnings.warn(
                f"PagedAdamW: paging='managed' unavailable ({reason}); using 'explicit'", stacklevel=3
            )
            paging = "explicit"
        if paging == "none":
            return ResidentStore(n_pages, pe, device)
        budget = self._budget
        if budget is None:
            if device.type == "cuda":
                free, total = torch.cuda.mem_get_info(device)
                budget = free - max(1 << 30, total // 10)
            else:
                budget = n_pages * page_bytes
        n_slots = budget // page_bytes
        if n_slots >= n_pages:
            return ResidentStore(n_pages, pe, device)
        if self._budget is None:
            n_slots = max(n_slots, 2)
        return ExplicitPager(n_pages, pe, device, n_slots)

    def _managed_unavailable(self, state_bytes: int) -> str | None:
        device = self._device
        if device.type != "cuda":
            return f"parameters are on {device}, managed memory needs CUDA"
        from lora_ops import _native

        if not _native.WITH_CUDA:
            return "lora_ops was built without CUDA"
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if not adamw_ops.managed_concurrent_access(idx):
            return f"cuda:{idx} has no concurrent managed access"
        free, _ = torch.cuda.mem_get_info(device)
        if state_bytes > free:
            # Oversubscribed managed memory can stall a shared GPU; the explicit pager has a budget.
            return f"the state ({state_bytes} B) exceeds free GPU memory ({free} B)"
        return None

    @property
    def paging_backend(self) -> str | None:
        """The store in use after the first step: 'resident', 'explicit' or 'managed'."""
        return None if self._store is None else self._store.backend

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW update of every parameter that has a gradient. Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        active_idx: list[int] = []  # layout index of each parameter updated in this step
        active_params: list[torch.Tensor] = []
        active_grads: list[torch.Tensor] = []
        group_rows: list[tuple[list[float], int]] = []  # (hparams row without step, n params)
        store = None
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            for p in with_grad:
                g = _local(p.grad)
                if g.layout != torch.strided or g.dtype != p.dtype:
                    if g.layout != torch.strided:
                        raise RuntimeError("PagedAdamW does not support sparse gradients")
                    if g.is_complex():
                        raise TypeError("PagedAdamW: complex gradients are not supported")
                    raise TypeError(
                        f"PagedAdamW: gradient dtype {g.dtype} differs from parameter dtype {p.dtype}"
                    )
            if store is None:
                store = self._ensure_store()
            index = self._layout.index
            for p in with_grad:
                i = index[id(p)]
                st = self.state[p]
                if "step" not in st:
                    st["step"] = self._steps[i]  # a view: counted in bulk below
                active_idx.append(i)
                active_params.append(_local(p))
                g = _local(p.grad)
                active_grads.append(g if g.is_contiguous() else g.contiguous())
            beta1, beta2 = group["betas"]
            row = adamw_ops.hparams_row(
                float(group["lr"]), beta1, beta2, group["weight_decay"], group["eps"], 0.0, group["maximize"]
            )
            group_rows.append((row, len(with_grad)))
        if not active_params:
            return loss

        # torch counts each parameter's step in a float32 tensor; ours are views of one buffer.
        idx_t = torch.tensor(active_idx, dtype=torch.int64)
        self._steps[idx_t] += 1
        hparams = torch.cat([torch.tensor(r, dtype=torch.float64).expand(n, 7) for r, n in group_rows])
        hparams[:, 5] = self._steps[idx_t]

        layout = self._layout
        table, _ = layout.table()
        # position[layout index] = index into the active lists, -1 for parameters without a gradient.
        position = torch.full((len(layout.params),), -1, dtype=torch.int64)
        position[idx_t] = torch.arange(len(active_idx))
        key = tuple(active_idx)
        if self._pages_cache is None or self._pages_cache[0] != key:  # usually the same set every step
            self._pages_cache = (key, sorted({pg for i in active_idx for pg in layout.pages_of(i)}))
        pages = self._pages_cache[1]

        position_list = position.tolist()
        step_pages = torch.ops.lora_ops.adamw_step_pages_  # direct: this runs once per page

        def update(buffer: torch.Tensor, batch) -> None:
            if len(batch) == 1:  # one page (explicit pager): pass only the few params it holds
                page, slot = batch[0]
                local: dict[int, int] = {}
                ps, gs, rows = [], [], []
                for i, b, e, off in layout.pieces[page]:
                    a = position_list[i]
                    if a < 0:
                        continue
                    li = local.get(a)
                    if li is None:
                        li = local[a] = len(ps)
                        ps.append(active_params[a])
                        gs.append(active_grads[a])
                    rows.append((li, b, e, slot, off))
                if rows:
                    hp = hparams[torch.tensor(list(local), dtype=torch.int64)]
                    step_pages(ps, gs, buffer, torch.tensor(rows, dtype=torch.int64), hp)
                return
            # Many pages at once (resident / managed): map every row's page to its slot, one launch.
            slot_of_page = torch.full((layout.n_pages,), -1, dtype=torch.int64)
            batch_t = torch.tensor(batch, dtype=torch.int64)
            slot_of_page[batch_t[:, 0]] = batch_t[:, 1]
            pieces = table.clone()
            pieces[:, 0] = position[pieces[:, 0]]
            pieces[:, 3] = slot_of_page[pieces[:, 3]]
            pieces = pieces[(pieces[:, 0] >= 0) & (pieces[:, 3] >= 0)]
            if pieces.shape[0]:
                step_pages(active_params, active_grads, buffer, pieces, hparams)

        stats = store.run_step(pages, update)
        self.paging_stats = stats
        if self.paging_totals is None or self.paging_totals.backend != stats.backend:
            self.paging_totals = PagingStats(backend=stats.backend)
        self.paging_totals.add(stats)
        return loss

    # -- state_dict in torch.optim.AdamW's layout ------------------------------------------------
    def _param_moments(self, full: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = _local(self._layout.params[i])
        off, n = self._layout.offset[i], p.numel()
        flat = full.view(full.shape[0], 2, -1)
        m = flat[:, 0].reshape(-1)[off : off + n].clone().view(p.shape)
        v = flat[:, 1].reshape(-1)[off : off + n].clone().view(p.shape)
        return m, v

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's layout: ``state[i] = {"step": f32 scalar, "exp_avg", "exp_avg_sq"}`` with
        float32 moments shaped like parameter i, on the CPU (this gathers every page; may synchronize).
        For an FSDP2-sharded (DTensor) parameter the moments are DTensors sharded like it, each rank
        holding its shard's, so torch.distributed.checkpoint can save and reshard them."""
        sd = super().state_dict()
        full = self._store.read_all() if self._store is not None else None
        params = [p for g in self.param_groups for p in g["params"]]
        out_state = {}
        for idx, st in sd["state"].items():
            st = dict(st)
            if "step" in st:
                st["step"] = st["step"].clone()
                li = self._layout.index.get(id(params[idx]))
                if full is not None and li is not None:
                    moments = self._param_moments(full, li)
                    st["exp_avg"], st["exp_avg_sq"] = (_like_param(m, params[idx]) for m in moments)
            out_state[idx] = st
        sd["state"] = out_state
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict of PagedAdamW or torch.optim.AdamW (moments of any float dtype, any
        device; stored here as float32). Parameters absent from ``state`` start from zero state."""
        for g in state_dict["param_groups"]:
            if g.get("amsgrad", False):
                raise ValueError("PagedAdamW: cannot load an amsgrad=True state (AMSGrad is not supported)")
        moments: dict[Any, dict[str, torch.Tensor]] = {}
        stripped: dict[Any, dict[str, Any]] = {}
        for k, st in state_dict["state"].items():
            st = dict(st)
            moments[k] = {name: st.pop(name) for name in ("exp_avg", "exp_avg_sq") if name in st}
            st.pop("max_exp_avg_sq", None)
            stripped[k] = st
        super().load_state_dict({"state": stripped, "param_groups": state_dict["param_groups"]})
        for g in self.param_groups:
            self._check_group(g)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        id_to_param = dict(zip(saved_ids, params))
        for p in params:
            st = self.state.get(p)
            if st and "step" in st:  # torch keeps step on the device when fused/capturable
                st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).detach().to("cpu").clone()
        self._pages_cache = None
        self._write_moments([(k, id_to_param.get(k), mom) for k, mom in moments.items()])

    def _scatter(self, full: torch.Tensor, i: int, row: int, src: torch.Tensor) -> None:
        pe = self._page_elems
        off = self._layout.offset[i]
        pos = 0
        while pos < src.numel():
            page, in_page = divmod(off + pos, pe)
            n = min(pe - in_page, src.numel() - pos)
            full[page, row, in_page : in_page + n] = src[pos : pos + n]
            pos += n
