"""KV caches of the decode loop, for batches whose rows accept different numbers of tokens.

`TargetKV`: the target's HF `DynamicCache` kept *left-padded*: every row has the same physical
length T, row r's first `pad[r]` entries are padding (masked out through the 2D attention mask),
and its real entries sit at the right, contiguous, at logical positions 0..T-pad[r]-1 (passed as
`position_ids`). Because padding is only ever on the left, physical distances between real tokens
equal logical ones, so sliding-window layers (Gemma) see the right keys too. After a verify
forward, `keep(n)` keeps the first n[r] new entries of each row (rolling back the rejected ones)
and re-aligns the rows to the right with one gather per layer; columns that are padding in every
row are dropped, so T stays max(row length).

`StaticTargetKV`: the same layout in preallocated buffers of a fixed capacity (HF `StaticLayer`s,
written in place at their cumulative length; the attention mask spans the whole capacity, and
the causal mask on physical positions keeps the unused tail out, since every forward writes its
entries before any query can reach them). Every forward then sees keys of one shape and the buffers keep their
addresses, which is what `torch.compile` (and CUDA graphs) need; `keep` re-aligns rows in place.
The physical length is counted on the host (`inputs` advances it by the tokens the next forward
appends), so no shape needs a device read. A capacity that would overflow grows by doubling (a
new allocation, logged), so a wrong estimate costs a recompile, never a wrong result.

`RaggedKVCache`: the draft's per-layer context K/V with one committed length per row. Entry t of
row r is that row's position t (no padding); entries at or past a row's length are stale and must
be masked by the reader (DSpark masks context positions >= the anchor, and the anchor of row r is
its length). It offers the `length` / `get(layer)` interface `DSparkModel.propose` reads;
`rows_writer(bound)` lets `DSparkModel.append_context` write every row at its own length in one
batched scatter, and `scatter` / `prefix` serve `Eagle3Model.propose_rows`. Its owner keeps a
host `bound` on the row lengths (from the engine's per-round sync), so shapes never need a
device -> host read.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class TargetKV:
    """Left-padded target KV cache (see the module docstring). `pad` lives on the device (masks
    and positions are built from it); `pad_host` is its exact host copy, kept in step so that
    shapes (trim, physical length) never need a device -> host sync."""

    def __init__(self, cache, pad: torch.Tensor, pad_host: list[int] | None = None):
        self.cache = cache  # transformers DynamicCache
        self.pad = pad  # [B] leading padding entries per row
        self.pad_host = list(pad.tolist()) if pad_host is None else list(pad_host)

    @classmethod
    def empty(cls, pad: list[int], device=None) -> TargetKV:
        from transformers import DynamicCache

        # no config: every layer is a plain DynamicLayer that keeps all entries, so rows can be
        # cropped and re-aligned (a sliding-window layer drops old entries); the model still
        # applies its sliding-window masks on the physical positions.
        return cls(DynamicCache(), torch.tensor(pad, dtype=torch.long, device=device), pad)

    @classmethod
    def left_pad(cls, prompts: list[list[int]], pad_id: int, device=None, **cache_options):
        """Prompts -> (input ids [B, P], attention mask, position ids [B, P], an empty cache of
        this class for them, built with `cache_options`): row r is left-padded with
        P - len(prompt r) `pad_id`s; mask and positions are the cache's `inputs(P)`."""
        P = max(len(p) for p in prompts)
        pad = [P - len(p) for p in prompts]
        ids = torch.tensor([[pad_id] * n + list(p) for n, p in zip(pad, prompts)], dtype=torch.long)
        kv = cls.empty(pad, device, **cache_options)
        mask, positions = kv.inputs(P)
        return ids.to(device), mask, positions.clamp(min=0), kv  # padding columns at position 0

    @property
    def physical_length(self) -> int:
        return self.cache.get_seq_length()

    def lengths(self) -> torch.Tensor:
        """Real (logical) entries per row [B]."""
        return self.physical_length - self.pad

    def _layers(self):
        for layer in self.cache.layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise TypeError(f"TargetKV needs plain DynamicLayer caches, got {type(layer).__name__}")
            yield layer

    def inputs(self, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask [B, T + num_new] and position ids [B, num_new] for feeding `num_new`
        tokens per row after the cached ones."""
        T, dev = self.physical_length, self.pad.device
        mask = torch.arange(T + num_new, device=dev)[None, :] >= self.pad[:, None]  # [B, T+n]
        positions = self.lengths()[:, None] + torch.arange(num_new, device=dev)  # [B, n]
        return mask.long(), positions

    def keep(self, num_new: int, keep: torch.Tensor, keep_host: list[int] | None = None) -> None:
        """The last forward appended `num_new` entries per row; keep the first keep[r] of them
        (drop the rest) and right-align the rows again. `keep_host`: keep as a host list (the
        engine has it from its per-round sync; without it this syncs once)."""
        keep_host = keep.tolist() if keep_host is None else keep_host
        T_old = self.physical_length - num_new
        end = T_old + max(keep_host)  # the longest row's physical end
        shift_host = [end - T_old - k for k in keep_host]  # move row r right by this much
        pad_host = [p + s for p, s in zip(self.pad_host, shift_host)]
        trim = min(pad_host)  # columns that are padding in every row
        T_new = end - trim
        self.pad_host = [p - trim for p in pad_host]
        if max(shift_host) == 0:  # every row kept the same number: no re-alignment
            self.pad = self.pad - trim if trim else self.pad
            self._crop_left_right(trim, T_new)
            return
        shift = end - T_old - keep  # [B], the device twin of shift_host
        self.pad = self.pad + shift - trim
        self._realign(shift - trim, T_new)

    def _gather_index(self, shift: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width] source column of each new column when row r moves right by shift[r]
        (negative: left); padding columns read some valid index and stay masked."""
        src = torch.arange(width, device=shift.device)[None, :] - shift[:, None]  # [B, width]
        return src.clamp(0, self.physical_length - 1)

    def _realign(self, shift: torch.Tensor, length: int) -> None:
        """Move row r right by shift[r] columns and keep the first `length` columns."""
        src = self._gather_index(shift, length)
        for layer in self._layers():
            B, g, _, d = layer.keys.shape
            index = src[:, None, :, None].expand(B, g, length, d)  # [B, T_new] -> [B, g, T_new, d]
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)

    def _crop_left_right(self, start: int, length: int) -> None:
        if start == 0 and length == self.physical_length:
            return
        for layer in self._layers():
            layer.keys = layer.keys[:, :, start:start + length]
            layer.values = layer.values[:, :, start:start + length]

    def select(self, rows: torch.Tensor, rows_host: list[int] | None = None) -> None:
        """Keep only these rows (finished rows leave the batch); drop all-padding columns."""
        rows_host = rows.tolist() if rows_host is None else rows_host
        for layer in self._layers():
            layer.keys = layer.keys[rows]
            layer.values = layer.values[rows]
        pad_host = [self.pad_host[i] for i in rows_host]
        trim = min(pad_host, default=0)
        self.pad, self.pad_host = self.pad[rows] - trim, [p - trim for p in pad_host]
        self._crop_left_right(trim, self.physical_length - trim)


class StaticTargetKV(TargetKV):
    """`TargetKV` in fixed-capacity buffers written in place (module docstring)."""

    def __init__(self, cache, pad: torch.Tensor, pad_host: list[int], capacity: int):
        super().__init__(cache, pad, pad_host)
        self.capacity = capacity
        self.length_host = 0  # physical entries, counted on the host

    @classmethod
    def empty(cls, pad: list[int], device=None, *, num_layers: int = 0, capacity: int = 0) -> StaticTargetKV:
        from transformers.cache_utils import Cache, StaticLayer

        if num_layers < 1 or capacity < 1:
            raise ValueError(f"a static target cache needs num_layers and capacity >= 1 (got "
                             f"{num_layers}, {capacity})")
        cache = Cache(layers=[StaticLayer(capacity) for _ in range(num_layers)])
        return cls(cache, torch.tensor(pad, dtype=torch.long, device=device), pad, capacity)

    @property
    def physical_length(self) -> int:
        return self.length_host

    def _layers(self):
        yield from self.cache.layers

    def inputs(self, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask [B, capacity] (real entries of the cached rows and the new ones) and position ids
        [B, num_new]; the host length advances by num_new, which the next forward appends."""
        T, dev = self.length_host, self.pad.device
        if T + num_new > self.capacity:
            self._grow(max(2 * self.capacity, T + num_new))
        col = torch.arange(self.capacity, device=dev)[None, :]  # [1, C]
        mask = (col >= self.pad[:, None]) & (col < T + num_new)  # [B, C]
        positions = (T - self.pad)[:, None] + torch.arange(num_new, device=dev)  # [B, n]
        self.length_host = T + num_new
        return mask.long(), positions

    def _grow(self, capacity: int) -> None:
        log.info("static target cache: %d entries needed, capacity %d -> %d (new buffers)",
                 self.length_host, self.capacity, capacity)
        for layer in self._layers():
            layer.max_cache_len = capacity
            if layer.is_initialized:
                for name in ("keys", "values"):
                    old = getattr(layer, name)
                    new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])  # [B, g, C', d]
                    new[:, :, :old.shape[2]] = old
                    setattr(layer, name, new)
        self.capacity = capacity

    def _set_length(self, length: int) -> None:
        self.length_host = length
        for layer in self._layers():
            if layer.is_initialized:
                layer.cumulative_length.fill_(length)

    def _realign(self, shift: torch.Tensor, length: int) -> None:
        """In place over the whole capacity: the buffers keep their addresses."""
        src = self._gather_index(shift, self.capacity)
        for layer in self._layers():
            B, g, C, d = layer.keys.shape
            index = src[:, None, :, None].expand(B, g, C, d)  # [B, C] -> [B, g, C, d]
            layer.keys.copy_(layer.keys.gather(2, index))
            layer.values.copy_(layer.values.gather(2, index))
        self._set_length(length)

    def _crop_left_right(self, start: int, length: int) -> None:
        if start:
            self._realign(torch.full_like(self.pad, -start), length)
        else:
            self._set_length(length)

    def select(self, rows: torch.Tensor, rows_host: list[int] | None = None) -> None:
        rows_host = rows.tolist() if rows_host is None else rows_host
        for layer in self._layers():
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]
                layer.batch_size = len(rows_host)
        pad_host = [self.pad_host[i] for i in rows_host]
        trim = min(pad_host, default=0)
        self.pad, self.pad_host = self.pad[rows], pad_host
        if not rows_host:
            self._set_length(0)
        elif trim:
            self.pad, self.pad_host = self.pad - trim, [p - trim for p in pad_host]
            self._crop_left_right(trim, self.length_host - trim)


class RaggedKVCache:
    """Per-layer context K/V [B, g, T, d] with a committed length per row (module docstring)."""

    def __init__(self, num_layers: int, batch_size: int, device=None):
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self.row_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.bound: int | None = 0  # host: >= every row length (None: unknown, ask the device)

    @property
    def length(self) -> int:
        """Physical length: at least the longest row (stale entries of shorter rows are masked
        by readers); the host `bound` when the owner keeps one, else one device sync."""
        if self.bound is not None:
            return self.bound
        return int(self.row_lengths.max()) if self.row_lengths.numel() else 0

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._k[layer] is None:
            return None
        T = self.length
        return self._k[layer][:, :, :T], self._v[layer][:, :, :T]

    def _reserve(self, layer: int, like: torch.Tensor, needed: int) -> None:
        """Grow the layer's buffers (zeros, so stale slots stay finite) to hold `needed` entries."""
        buf = self._k[layer]
        if buf is not None and buf.shape[2] >= needed:
            return
        B = self.row_lengths.numel()
        cap = max(16, 2 * needed)
        new_k = like.new_zeros(B, like.shape[1], cap, like.shape[3])  # [B, g, cap, d]
        new_v = like.new_zeros(B, like.shape[1], cap, like.shape[3])
        if buf is not None:
            new_k[:, :, :buf.shape[2]] = buf
            new_v[:, :, :buf.shape[2]] = self._v[layer]
        self._k[layer], self._v[layer] = new_k, new_v

    def scatter(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                bound: int) -> None:
        """Write k/v [B, g, n, d] of row r at entries positions[r] ([B, n]); `bound` (host) is
        more than every position, so the buffers grow without a device -> host sync."""
        self._reserve(layer, k, bound)
        B, g, n, d = k.shape
        index = positions[:, None, :, None].expand(B, g, n, d)  # [B, n] -> [B, g, n, d]
        self._k[layer].scatter_(2, index, k)
        self._v[layer].scatter_(2, index, v)

    def prefix(self, layer: int, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries 0..bound-1 of every row ([B, g, bound, d]; readers mask each row's stale
        entries)."""
        return self._k[layer][:, :, :bound], self._v[layer][:, :, :bound]

    def rows_writer(self, bound: int) -> _ScatterWriter:
        """A cache view for `DSparkModel.append_context` that writes every row at its own
        length: `length` reads row_lengths [B], `append(layer, k [B, g, n, d], v)` writes row r
        at entries row_lengths[r].. . bound (host): >= every row length."""
        return _ScatterWriter(self, bound)

    def set_lengths(self, lengths: torch.Tensor, bound: int | None = None) -> None:
        """New row lengths; bound (host): >= every one of them (None: unknown)."""
        self.row_lengths = lengths.to(self.row_lengths)
        self.bound = bound

    def select(self, rows: torch.Tensor) -> None:
        self._k = [None if k is None else k[rows] for k in self._k]
        self._v = [None if v is None else v[rows] for v in self._v]
        self.row_lengths = self.row_lengths[rows]


class _ScatterWriter:
    def __init__(self, cache: RaggedKVCache, bound: int):
        self.cache, self.bound, self.length = cache, bound, cache.row_lengths

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        positions = self.length[:, None] + torch.arange(n, device=k.device)  # [B, n]
        self.cache.scatter(layer, k, v, positions, self.bound + n)
