"""Decode forwards at static shapes, captured once as CUDA graphs and replayed (`cuda_graphs=True`).

A decode step launches hundreds of small kernels; at small batch on a GPU their launch cost,
not the weights' bandwidth, sets the step time. A CUDA graph (a HIP graph on ROCm, the same
`torch.cuda` API) records the launches of one forward once and replays them with one call.

Design decisions:
- A graph needs static shapes and addresses. A decode forward's shape is (rows, tokens per row,
  prefix length read); its key here is (step layout, rows padded to a power of two, prefix
  length rounded up to a power of two, at least MIN_CONTEXT). Padding rows read slot `sink` with
  length 0 and write only to the sink (as the compiled path pads); a longer prefix read is
  exact because attention masks every key past a row's length (the dense and triton paths both
  take the lengths as a tensor).
- Each key owns its input buffers (ids, slots, lengths: copied into before a replay) and its
  output; everything else the forward builds (positions, write index, masks) is recorded in the
  graph from those buffers. Graphs are captured lazily, the first time a key is seen, up to
  `max_graphs` (then that key runs eagerly). All graphs share one memory pool (their
  intermediates reuse the same memory): safe because replays never overlap and a replay's
  output is consumed by the step's sampling, on the same stream, before the next replay.
- Weights are read in place: a weight load copies into the parameters, so the next replay sees
  it. A graph would NOT see a parameter replaced or moved (new storage), so every replay first
  compares the parameters' storage addresses with those at capture (`_weights_signature`);
  on any change all graphs are dropped and captured again: never stale weights.
- The KV cache is written in place by the graph at the rows' slots; the warm-up runs before a
  capture write the same K/V the replay then writes again (same inputs: idempotent).
- Only the model forward is captured; sampling and verification stay eager (their work is a few
  kernels per step, and their outputs feed the step's one host sync).
- On the CPU there is no graph: a "replay" runs the same static-shape forward eagerly. That is
  the path the CPU tests check against the dynamic one (same tokens, same log-probs), so the
  bucketing, padding and masking a GPU graph relies on are tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.batch import StepBatch
from ..model.decoder import Decoder
from ..model.kv_cache import KVCache
from ..step_layout import DecodeLayout

MIN_CONTEXT = 64  # smallest prefix bucket: short contexts share one graph per batch size
GRAPH_ATTENTION = ("dense", "triton")  # paths with no host-side work per step ("split" builds a BlockMask)


def bucket(n: int, floor: int = 1) -> int:
    """The power of two >= max(n, floor)."""
    n = max(n, floor)
    return 1 << (n - 1).bit_length()


class _Entry:
    __slots__ = ("ids", "slots", "lens", "out", "graph")

    def __init__(self, ids, slots, lens):
        self.ids, self.slots, self.lens, self.out, self.graph = ids, slots, lens, None, None


class StepGraphs:
    """Static-shape decode forwards keyed by (layout, padded rows, prefix bucket); see the module
    docstring. `forward(ids, slots, lens, prefix_max, layout)` returns hidden [B, T, H] for the B
    real rows, or None when the step cannot use a graph (the caller then runs it eagerly)."""

    def __init__(self, model: Decoder, cache: KVCache, attention: str, ar_layout: DecodeLayout,
                 mask_token_id: int, max_graphs: int = 64):
        if attention not in GRAPH_ATTENTION:
            raise ValueError(f"cuda_graphs needs attention in {GRAPH_ATTENTION}, got {attention!r}")
        self.model, self.cache, self.attention, self.ar_layout = model, cache, attention, ar_layout
        self.mask_token_id, self.max_graphs = mask_token_id, max_graphs
        self.device = cache.k.device
        self.capture = self.device.type == "cuda"  # CUDA and ROCm builds alike; the CPU replays eagerly
        self.entries: dict[tuple, _Entry] = {}
        self.pool = None  # the graphs' shared memory pool (torch.cuda.graph_pool_handle), made on first capture
        self.signature = self._weights_signature()
        self.captures = self.replays = self.static = self.eager = self.resets = 0

    def _weights_signature(self) -> tuple:
        """Where every parameter's storage is (and whether its pack is current): what a graph
        baked in at capture."""
        packs = tuple(p is not None and p.current() for p in self.model.packs())
        return tuple(p.data_ptr() for p in self.model.parameters()) + packs

    def reset(self) -> None:
        """Drops every graph (they are captured again on use)."""
        self.entries.clear()
        self.pool = None
        self.resets += 1

    def key(self, rows: int, prefix_max: int, layout: DecodeLayout) -> tuple[int, int] | None:
        """(padded rows, prefix bucket) for a step, or None if no static shape fits the slot."""
        extra = 1 if layout is self.ar_layout else 0  # the AR path reads its own position too
        context = min(bucket(prefix_max, MIN_CONTEXT), self.cache.slot_len - extra)
        return (bucket(rows), context) if context >= prefix_max else None

    def forward(self, ids: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor, prefix_max: int,
                layout: DecodeLayout) -> torch.Tensor | None:
        B = ids.shape[0]
        shape = self.key(B, prefix_max, layout)
        if shape is None:
            self.eager += 1
            return None
        signature = self._weights_signature()
        if signature != self.signature:
            self.reset()
            self.signature = signature
        key = (id(layout), layout.num_tokens) + shape
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_graphs:
                self.eager += 1
                return None
            entry = self._new_entry(layout, *shape)
            self.entries[key] = entry
        self._load(entry, ids, slots, lens)
        if entry.graph is None:
            self._capture(entry, layout, shape[1])
        if entry.graph is not None:
            entry.graph.replay()
            self.replays += 1
            return entry.out[:B]
        self.static += 1
        return self._body(entry, layout, shape[1])[:B]  # the CPU: the same static shapes, eagerly

    def _new_entry(self, layout: DecodeLayout, rows: int, context: int) -> _Entry:
        dev, T = self.device, layout.num_tokens
        return _Entry(torch.full((rows, T), self.mask_token_id, dtype=torch.long, device=dev),
                      torch.full((rows,), self.cache.sink, dtype=torch.long, device=dev),
                      torch.zeros(rows, dtype=torch.long, device=dev))

    def _load(self, entry: _Entry, ids: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor) -> None:
        """Copies the step's rows into the entry's buffers; padding rows read nothing and write
        only to the sink."""
        B = ids.shape[0]
        entry.ids[:B].copy_(ids)
        entry.ids[B:].fill_(self.mask_token_id)
        entry.slots[:B].copy_(slots)
        entry.slots[B:].fill_(self.cache.sink)
        entry.lens[:B].copy_(lens)
        entry.lens[B:].zero_()

    def _body(self, entry: _Entry, layout: DecodeLayout, context: int) -> torch.Tensor:
        """The forward at the entry's static shapes (what a graph records)."""
        rows, T = entry.ids.shape
        positions = entry.lens[:, None] + layout.offsets[None]
        write = (torch.arange(T, device=self.device) < layout.num_drafts)[None].expand(rows, T)
        batch = StepBatch(entry.slots, entry.lens, context, positions, layout.visible.expand(rows, T, T),
                          self.cache.write_index(entry.slots, positions, write), self.attention,
                          ar_step=layout is self.ar_layout)
        return self.model(entry.ids, batch, self.cache)

    def _capture(self, entry: _Entry, layout: DecodeLayout, context: int) -> None:
        if not self.capture:
            return
        run: Callable[[], torch.Tensor] = lambda: self._body(entry, layout, context)  # noqa: E731
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: lazy kernel and workspace set-up happens outside the graph
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            entry.out = run()
        entry.graph = graph
        self.captures += 1

    def status(self) -> dict:
        """Counts: shapes held, graphs captured, graph replays, static-shape steps run eagerly (the
        CPU), steps that fell back to the dynamic path, and resets after a weight move."""
        return {"shapes": len(self.entries), "captured": self.captures, "replays": self.replays,
                "static_eager_steps": self.static, "dynamic_steps": self.eager, "resets": self.resets,
                "device_graphs": self.capture}
