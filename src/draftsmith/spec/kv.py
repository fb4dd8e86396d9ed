"""KV caches of the decode loop, for batches whose rows accept different numbers of tokens.

`TargetKV`: the target's HF `DynamicCache` kept *left-padded*: every row has the same physical
length T, row r's first `pad[r]` entries are padding (masked out through the 2D attention mask),
and its real entries sit at the right, contiguous, at logical positions 0..T-pad[r]-1 (passed as
`position_ids`). Because padding is only ever on the left, physical distances between real tokens
equal logical ones, so sliding-window layers (Gemma) see the right keys too. After a verify
forward, `keep(n)` keeps the first n[r] new entries of each row (rolling back the rejected ones)
and re-aligns the rows to the right with one gather per layer; columns that are padding in every
row are dropped, so T stays max(row length).

`RaggedKVCache`: the draft's per-layer context K/V with one committed length per row. Entry t of
row r is that row's position t (no padding); entries at or past a row's length are stale and must
be masked by the reader (DSpark masks context positions >= the anchor, and the anchor of row r is
its length). It offers the `length` / `get(layer)` interface `DSparkModel.propose` reads, and
`write(...)` lets `DSparkModel.append_context` project new rows at per-row start positions.
"""

from __future__ import annotations

import torch


class TargetKV:
    """Left-padded target KV cache (see the module docstring)."""

    def __init__(self, cache, pad: torch.Tensor):
        self.cache = cache  # transformers DynamicCache
        self.pad = pad  # [B] leading padding entries per row

    @classmethod
    def empty(cls, pad: torch.Tensor) -> TargetKV:
        from transformers import DynamicCache

        # no config: every layer is a plain DynamicLayer that keeps all entries, so rows can be
        # cropped and re-aligned (a sliding-window layer drops old entries); the model still
        # applies its sliding-window masks on the physical positions.
        return cls(DynamicCache(), pad)

    @classmethod
    def left_pad(cls, prompts: list[list[int]], pad_id: int, device=None):
        """Prompts -> (input ids [B, P], attention mask [B, P], position ids [B, P], an empty
        TargetKV for them): row r is left-padded with P - len(prompt r) `pad_id`s."""
        P = max(len(p) for p in prompts)
        pad = torch.tensor([P - len(p) for p in prompts], dtype=torch.long, device=device)
        ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        col = torch.arange(P, device=device)[None, :]  # [1, P]
        mask = (col >= pad[:, None]).long()  # [B, P]
        positions = (col - pad[:, None]).clamp(min=0)  # [B, P]
        return ids, mask, positions, cls.empty(pad)

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

    def keep(self, num_new: int, keep: torch.Tensor) -> None:
        """The last forward appended `num_new` entries per row; keep the first keep[r] of them
        (drop the rest) and right-align the rows again."""
        T_old = self.physical_length - num_new
        ends = T_old + keep  # [B] physical end of each row's real entries
        shift = ends.max() - ends  # [B] move row r right by this much
        pad = self.pad + shift
        trim = int(pad.min())  # columns that are padding in every row
        T_new = int(ends.max()) - trim
        self.pad = pad - trim
        if int(shift.max()) == 0:
            self._crop_left_right(trim, T_new)
            return
        src = torch.arange(T_new, device=keep.device)[None, :] + trim - shift[:, None]  # [B, T_new]
        src = src.clamp(min=0)  # padding slots read some valid index; masked anyway
        for layer in self._layers():
            B, g, _, d = layer.keys.shape
            index = src[:, None, :, None].expand(B, g, T_new, d)  # [B, T_new] -> [B, g, T_new, d]
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)

    def _crop_left_right(self, start: int, length: int) -> None:
        if start == 0 and length == self.physical_length:
            return
        for layer in self._layers():
            layer.keys = layer.keys[:, :, start:start + length]
            layer.values = layer.values[:, :, start:start + length]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished rows leave the batch); drop all-padding columns."""
        for layer in self._layers():
            layer.keys = layer.keys[rows]
            layer.values = layer.values[rows]
        self.pad = self.pad[rows]
        trim = int(self.pad.min()) if self.pad.numel() else 0
        self.pad = self.pad - trim
        self._crop_left_right(trim, self.physical_length - trim)


class RaggedKVCache:
    """Per-layer context K/V [B, g, T, d] with a committed length per row (module docstring)."""

    def __init__(self, num_layers: int, batch_size: int, device=None):
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self.row_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        """Physical length: the longest row (stale entries of shorter rows are masked by readers)."""
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

    def writer(self, rows: torch.Tensor, start: int) -> _RowWriter:
        """A cache view for `DSparkModel.append_context`: it reads `length` (= start, the
        position of the first new entry) and `append(layer, k [b, g, n, d], v)` writes rows
        `rows` at entries start..start+n-1. Lengths are set afterwards with `set_lengths`."""
        return _RowWriter(self, rows, start)

    def set_lengths(self, lengths: torch.Tensor) -> None:
        self.row_lengths = lengths.to(self.row_lengths)

    def select(self, rows: torch.Tensor) -> None:
        self._k = [None if k is None else k[rows] for k in self._k]
        self._v = [None if v is None else v[rows] for v in self._v]
        self.row_lengths = self.row_lengths[rows]


class _RowWriter:
    def __init__(self, cache: RaggedKVCache, rows: torch.Tensor, start: int):
        self.cache, self.rows, self.length = cache, rows, start

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        c, n = self.cache, k.shape[2]
        c._reserve(layer, k, self.length + n)
        c._k[layer][self.rows, :, self.length:self.length + n] = k
        c._v[layer][self.rows, :, self.length:self.length + n] = v
