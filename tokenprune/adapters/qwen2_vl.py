"""Qwen2-VL and Qwen2.5-VL: a Qwen2 LLM with 3-D multimodal rotary positions (M-RoPE)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import (
    VIDEO_CALL,
    LlamaStyleAdapter,
    MethodHook,
    expand_placeholder,
    layer_hidden,
    left_pad,
    rotate_half,
    tiles_of_images,
)

#: Query rows per chunk when vision attention is recomputed (bounds the (H, rows, patches) probabilities).
_QUERY_CHUNK = 1024


class Qwen2VLAdapter(LlamaStyleAdapter):
    """Qwen2-VL / Qwen2.5-VL (Wang et al. 2024; Bai et al. 2025).

    Visual tokens are the image and video placeholders of ``input_ids`` (``mm_token_type_ids``
    marks the same tokens; the model needs it to build positions). Every token has a 3-D
    (temporal, height, width) position; the model turns them into one rotary ``(cos, sin)`` per
    token before the decoder layers, so gathering cos/sin keeps each kept token's 3-D position,
    and decoding continues from the model's own ``rope_deltas``. ``positions: renumber`` keeps each
    image's kept tokens on their grid and closes the gaps around them (:mod:`tokenprune.core.positions`);
    decoding then continues from the model's ``rope_deltas`` minus what the renumbering removed.

    The visual grid of a sample with one image is its ``image_grid_thw`` (h, w) divided by the
    spatial merge size.

    **Vision-tower signals.** The tower has no CLS token. What stands for the CLS attention of a CLIP tower
    (the ``cls_attention`` scorer, VisionZip, PruMerge+, VScan) is the attention each patch *receives* at a
    vision block: the block's attention probabilities, recomputed from its captured input with its own
    weights and 2-D rotary angles, averaged over the query patches of the patch's own image (video: frame) —
    the segment the block attends within — and summed over the ``spatial_merge_size``² patches that the merger
    turns into one LLM visual token (so per image and head the values sum to 1, as a CLS row does). Vision
    keys are the patch keys before the rotary embedding (content only), averaged over the same patches.
    Qwen2.5-VL attends within windows in every block but ``fullatt_block_indexes``; a windowed block's
    attention is not over the image, so a signal asked at a windowed block is read at the next full-attention
    block (the last one if none follows): with the 7B tower's full blocks 7, 15, 23, 31, layer -2 (block 30)
    reads block 31 and layer 2 reads block 7. The tower's window order of the patches is undone with the
    image grids of its call.
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    family = "Qwen2-VL / Qwen2.5-VL"
    frame_videos = ("qwen2_vl", "qwen2_5_vl")  # Qwen3-VL's and Qwen3.5's adapters add theirs (timestamped frames)
    rope_axes = 3

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    def image_panels(self, inputs: dict, sample: int) -> list[tuple[str, torch.Tensor]]:
        """One image per sample: each visual token merges ``spatial_merge_size``² patches of its grid."""
        if "image_grid_thw" not in inputs:
            return super().image_panels(inputs, sample)
        n = int(self.visual_mask(inputs["input_ids"][sample:sample + 1]).sum())
        merge = self.model.config.vision_config.spatial_merge_size
        t, h, w = (int(x) for x in inputs["image_grid_thw"][sample])
        grid = (t * h // merge, w // merge)
        if grid[0] * grid[1] != n:
            raise ValueError(f"sample {sample}: grid {grid} does not hold its {n} visual tokens")
        return [("image", torch.arange(n).view(*grid))]

    def visual_grids(self, kwargs: dict, visual: torch.Tensor) -> list[tuple[int, int] | None] | None:
        if kwargs.get("video_grid_thw") is not None:
            return None
        thw = kwargs.get("image_grid_thw")
        if thw is None:  # generate() passes the 3-D positions instead: read the grid off them
            return self._grids_from_positions(kwargs.get("position_ids"), visual)
        merge = self.model.config.vision_config.spatial_merge_size
        counts = visual.sum(1).tolist()
        grids: list[tuple[int, int] | None] = []
        i = 0
        for n in counts:  # images are listed in order, sample after sample
            taken, mine = 0, []
            while taken < n and i < thw.shape[0]:
                t, h, w = (int(x) for x in thw[i])
                mine.append((t * h // merge, w // merge))
                taken += t * h * w // merge ** 2
                i += 1
            grids.append(mine[0] if len(mine) == 1 and taken == n else None)
        return grids

    def visual_tiles(self, visual, capture, grids):
        """Every image is a tile, of its merged grid (h/m, w/m), images in order over the batch (the tower call's
        ``grid_thw``)."""
        if capture is None:
            return super().visual_tiles(visual, capture, grids)
        merge = self.model.config.vision_config.spatial_merge_size
        sizes = []
        for t, h, w in capture.tolist():
            if t != 1:
                raise ValueError(f"a tower input of {t} frames is a video; tiles are images")
            sizes.append((h // merge, w // merge))
        return tiles_of_images(visual, [(torch.zeros(r * c, dtype=torch.long), [(r, c)]) for r, c in sizes])

    def position_tiles(self, visual, positions):
        """Each image a tile, and each frame of a video (its temporal patches: one temporal position each), read off
        the prefill's (temporal, height, width) positions: a run of visual tokens between text tokens is an image or
        a clip, a change of temporal position within it starts a frame, and a tile's grid is the height and width
        positions it spans (raster order checked). So per-tile budgets are per frame on video, in a batch that mixes
        images and clips too (whose grids no single tower call holds)."""
        if positions is None:
            return None
        t, h, w = positions[-3:].expand(-1, visual.shape[0], -1)  # (B, N) each
        tile_of = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        shapes: list[list[tuple[int, int]]] = []
        for b in range(visual.shape[0]):
            idx = visual[b].nonzero().flatten()
            mine: list[tuple[int, int]] = []
            if idx.numel():
                tb = t[b, idx].to(idx.device)
                new = torch.ones_like(idx, dtype=torch.bool)
                new[1:] = (idx[1:] != idx[:-1] + 1) | (tb[1:] != tb[:-1])  # a run starts, or a frame
                starts = new.nonzero().flatten().tolist() + [idx.numel()]
                for a, z in zip(starts[:-1], starts[1:]):
                    rows_, cols_ = h[b, idx[a:z]].to(idx.device), w[b, idx[a:z]].to(idx.device)
                    r0, c0 = int(rows_.min()), int(cols_.min())
                    grid = (int(rows_.max()) - r0 + 1, int(cols_.max()) - c0 + 1)
                    raster = (rows_ - r0) * grid[1] + (cols_ - c0)
                    if grid[0] * grid[1] != z - a or not torch.equal(raster, torch.arange(z - a, device=idx.device)):
                        raise ValueError(f"sample {b}'s visual tokens {int(idx[a])}..{int(idx[z - 1])} are no raster grid "
                                         "of their positions")
                    tile_of[b, idx[a:z]] = len(mine)
                    mine.append(grid)
            shapes.append(mine)
        return tile_of, shapes

    def video_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.model.config.video_token_id

    #: Whether the processor writes each temporal patch as its own ``<t seconds><|vision_start|>...<|vision_end|>``
    #: (Qwen3-VL, Qwen3.5) rather than one run of placeholders (Qwen2-VL, Qwen2.5-VL).
    timestamped_frames = False
    #: Frames per second the benchmark's clips are taken to have (they have none): two, so that a temporal patch of
    #: two frames is one second (Qwen2.5-VL's ``second_per_grid_ts`` 1; Qwen3-VL's timestamps 0.25, 1.25, ... s).
    video_fps = 2.0

    def frame_video_inputs(self, processor, prompts, clips):
        """Each placeholder expanded to its clip's merged cells, as the processor's own video path does, left-padded;
        the pixels from :func:`video_pixels`; each temporal patch one second for Qwen2.5-VL's time scaling (the
        benchmark's clips have no frame rate). Qwen3-VL and Qwen3.5: the chat template's ``<|vision_start|>
        <|video_pad|><|vision_end|>`` becomes, per temporal patch, its timestamp (:func:`frame_timestamps`, as
        ``<1.2 seconds>``) and its own ``<|vision_start|>``, cells and ``<|vision_end|>``, as their processor
        writes it."""
        if self.model.config.model_type not in self.frame_videos:
            return super().frame_video_inputs(processor, prompts, clips)
        tok = processor.tokenizer
        merge = processor.image_processor.merge_size
        video_token = self.model.config.video_token_id
        pixels, grids, rows = [], [], []
        for prompt, clip in zip(prompts, clips):
            pv, thw = video_pixels(processor.image_processor, clip)
            pixels.append(pv)
            grids.append(thw)
            if self.timestamped_frames:
                start, pad, end = processor.vision_start_token, processor.video_token, processor.vision_end_token
                if prompt.count(start + pad + end) != 1:
                    raise ValueError(f"a video prompt holds one {start + pad + end}, this one "
                                     f"{prompt.count(start + pad + end)}")
                cells = int(thw[0, 1:].prod()) // merge ** 2
                frames = "".join(f"<{t:.1f} seconds>{start}{pad * cells}{end}"
                                 for t in frame_timestamps(len(clip), self.video_fps, int(thw[0, 0])))
                rows.append(tok(prompt.replace(start + pad + end, frames), add_special_tokens=False)["input_ids"])
                continue
            rows.append(expand_placeholder(tok(prompt, add_special_tokens=False)["input_ids"], video_token,
                                           int(thw.prod()) // merge ** 2))
        input_ids, mask = left_pad(rows, tok.pad_token_id)
        enc = {"input_ids": input_ids, "attention_mask": mask, "pixel_values_videos": torch.cat(pixels),
               "video_grid_thw": torch.cat(grids), "mm_token_type_ids": (input_ids == video_token).long() * 2}
        if self.model.config.model_type == "qwen2_5_vl":
            enc["second_per_grid_ts"] = torch.ones(len(rows))
        return enc

    def position_frames(self, visual, positions, tile_of, video=None):
        """A video tile continues the previous tile's clip when that one is a video tile too, of the same grid, at
        an earlier temporal position: Qwen2-VL's frames are one run of placeholders, Qwen3-VL's and Qwen3.5's each
        its own between timestamps, and both move the temporal position on. (Two clips of one size with only text
        between them read as one clip.) Frame indices restart at each image and each clip."""
        if positions is None:
            return None
        t = positions[-3].expand(visual.shape[0], -1)
        video = video if video is not None else torch.zeros_like(visual)
        frame = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        for b in range(visual.shape[0]):
            prev, count = None, 0
            for tile in range(int(tile_of[b].max()) + 1 if bool((tile_of[b] >= 0).any()) else 0):
                where = tile_of[b] == tile
                key = (bool(video[b][where].all()), int(where.sum()), int(t[b][where].min()))
                same_clip = prev is not None and key[0] and prev[0] and key[1] == prev[1] and key[2] > prev[2]
                count = count + 1 if same_clip else 0
                frame[b, where] = count
                prev = key
        return frame

    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        v = config.vision_config
        if getattr(v, "fullatt_block_indexes", None) is not None and not v.fullatt_block_indexes:
            return "its vision tower has no full-attention block (fullatt_block_indexes is empty)"
        return None

    # --- vision-tower signals -------------------------------------------------------------------
    def _tower(self) -> nn.Module:
        return self.model.model.visual

    def vision_layers(self) -> nn.ModuleList | None:
        return getattr(self._tower(), "blocks", None)

    def vision_signals_unavailable(self) -> str | None:
        reason = self.vision_signals_from_config(self.model.config)
        if reason is not None:
            return reason
        blocks = self.vision_layers()
        if blocks is None or not hasattr(blocks[0], "attn") or not hasattr(blocks[0].attn, "qkv"):
            return f"the vision tower of this {self.family} model is not Qwen2-VL's (blocks[i].attn.qkv)"
        return None

    # --- a guide model (SGL) sees the images of the forward: rebuilt from the tower's call --------
    @classmethod
    def guide_images_from_config(cls, config) -> str | None:
        return None

    def vision_tower(self) -> nn.Module | None:
        return self._tower()

    def image_inputs_from_tower(self, args, kwargs):
        pixels = args[0] if args else kwargs.get("hidden_states")
        grid = self.vision_tower_capture(args, kwargs)
        return None if pixels is None or grid is None else {"pixel_values": pixels, "image_grid_thw": grid}

    def guide_inputs(self, input_ids: torch.Tensor, image_inputs: dict[str, Any]) -> dict[str, Any]:
        cfg = self.model.config
        if bool((input_ids == cfg.video_token_id).any()):
            raise ValueError("a guide model for Qwen2-VL takes images only; this forward holds video tokens")
        return {**image_inputs, "mm_token_type_ids": (input_ids == cfg.image_token_id).int()}

    def hook_image_call(self, fn):
        """The tower's forward (as by default); a call made by ``get_video_features`` is reported with
        ``VIDEO_CALL`` added to its keyword arguments (the call itself gets them unchanged), so that a forward's
        image call and video call are joined (:meth:`add_tower_call`)."""
        pending = {"video": False}

        def video_call(args, kwargs):
            pending["video"] = True  # the tower call it makes next is the videos'

        def tower_call(module, args, kwargs):
            video, pending["video"] = pending["video"], False
            fn(args, {**kwargs, VIDEO_CALL: True} if video else kwargs)

        return [MethodHook(self.model.model, "get_video_features", video_call),
                self._tower().register_forward_pre_hook(tower_call, with_kwargs=True)]

    def vision_tower_capture(self, args, kwargs):
        """(calls, 3) patch grids of the call; of a video call, ("video", grids)."""
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        return ("video", grid) if kwargs.get(VIDEO_CALL) and grid is not None else grid

    def add_tower_call(self, previous, capture):
        """A forward encodes its images, then its videos: the video call's grids follow the image call's (one
        record, the signal rows of the images then of the videos, joined)."""
        if isinstance(capture, tuple):
            if isinstance(previous, torch.Tensor):
                return torch.cat([previous, capture[1].to(previous.device)]), True
            return capture[1], False
        return capture, False

    def join_layer_captures(self, previous, capture):
        """(hidden, cu_seqlens, (cos, sin)) of both calls: the tokens, segments and rotary angles in order."""
        (h0, cu0, (cos0, sin0)), (h1, cu1, (cos1, sin1)) = previous, capture
        return (torch.cat([h0, h1]), torch.cat([cu0, cu1[1:] + cu0[-1]]),
                (torch.cat([cos0, cos1]), torch.cat([sin0, sin1])))

    def vision_patch_map(self, visual, tower=None, video=None):
        """The visual tokens in order over the batch are the signal rows in order; in a batch of images and videos
        the images' tokens (in order over the batch) take the first rows, the videos' the rest (the joined calls'
        order)."""
        if video is None or not bool(video.any()) or not bool((visual & ~video).any()):
            return super().vision_patch_map(visual, tower, video)
        rows = self.vision_signal_rows(tower)
        count = int(visual.sum())
        if rows is not None and rows != count:
            raise ValueError(f"the vision tower gave {rows} feature rows but the prompt holds {count} visual tokens")
        image = visual & ~video
        out = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        out[image] = torch.arange(int(image.sum()), device=visual.device)
        out[video] = torch.arange(int(image.sum()), count, device=visual.device)
        return out

    def vision_layer_capture(self, layer, args, kwargs):
        return layer_hidden(args, kwargs), kwargs["cu_seqlens"], kwargs["position_embeddings"]

    def _full_blocks(self) -> list[int] | None:
        """Qwen2.5-VL's full-attention blocks; None where every block attends over the whole image (Qwen2-VL)."""
        full = getattr(self.model.config.vision_config, "fullatt_block_indexes", None)
        return None if full is None else sorted(int(i) for i in full)

    def vision_signal_layer(self, layer: int) -> int:
        full = self._full_blocks()
        if full is None or layer in full:
            return layer
        later = [i for i in full if i >= layer]
        return later[0] if later else full[-1]

    @property
    def _merge_unit(self) -> int:
        return self.model.config.vision_config.spatial_merge_size ** 2

    def vision_signal_rows(self, tower):
        return None if tower is None else int(tower.prod(-1).sum()) // self._merge_unit

    def _unwindow(self, tower: torch.Tensor | None, device) -> torch.Tensor | None:
        """Merge units in the tower's (window) order -> in the LLM's order: the inverse of the window index."""
        if self._full_blocks() is None:
            return None
        if tower is None:
            raise ValueError("the image grids of the vision tower's call were not captured")
        from transformers.vision_utils import get_vision_window_index

        v = self.model.config.vision_config
        index, _ = get_vision_window_index(tower, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                                           patch_size=v.patch_size)
        return torch.argsort(index.to(device))

    def _per_token(self, rows: torch.Tensor, tower, reduce: str) -> torch.Tensor:
        """Per-patch rows (S, ...) in the tower's order -> per LLM visual token (S / unit, ...)."""
        unit = self._merge_unit
        units = rows.reshape(rows.shape[0] // unit, unit, *rows.shape[1:])
        order = self._unwindow(tower, rows.device)
        if order is not None:
            units = units[order]
        return units.sum(1) if reduce == "sum" else units.mean(1)

    def _qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.vision_layers()[layer]
        attn = block.attn
        n = hidden.shape[0]
        q, k, _ = attn.qkv(block.norm1(hidden)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        return q, k  # (S, H, hd), before the rotary embedding

    def vision_cls_attention(self, layer, captured, tower=None):
        hidden, cu_seqlens, (cos, sin) = captured
        q, k = self._qk(layer, hidden)
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q, k = (x.float() * cos + rotate_half(x.float()) * sin for x in (q, k))
        scale = float(self.vision_layers()[layer].attn.scaling)
        received = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)  # (S, H)
        bounds = cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):  # the images (frames) the block attends within
            keys = k[a:b].transpose(0, 1)  # (H, n, hd)
            for c in range(a, b, _QUERY_CHUNK):
                qs = q[c:min(c + _QUERY_CHUNK, b)].transpose(0, 1)
                received[a:b] += torch.softmax(qs @ keys.transpose(-1, -2) * scale, dim=-1).sum(1).T
            received[a:b] /= b - a  # mean over the segment's queries
        return self._per_token(received, tower, "sum")

    def vision_keys(self, layer, captured, tower=None):
        _, k = self._qk(layer, captured[0])
        return self._per_token(k, tower, "mean")

    @staticmethod
    def _grids_from_positions(pos: torch.Tensor | None, visual: torch.Tensor) -> list[tuple[int, int] | None] | None:
        """Grids from M-RoPE positions (3|4, B, N): one image's tokens span rows x cols of (height, width)."""
        if pos is None or pos.dim() != 3:
            return None
        hw = pos[-2:]  # (height, width) components, with or without the leading text row
        grids: list[tuple[int, int] | None] = []
        for b in range(visual.shape[0]):
            h, w = hw[0, b][visual[b]], hw[1, b][visual[b]]
            if h.numel() == 0:
                grids.append(None)
                continue
            rows, cols = int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1
            grids.append((rows, cols) if rows * cols == h.numel() else None)
        return grids

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int = 0) -> Any:
        if position_ids.dim() != 3:
            raise ValueError(f"Qwen2-VL rotary positions are (3, B, N); got shape {tuple(position_ids.shape)}")
        return self.language_model.rotary_emb(hidden, position_ids)

    def rope_positions(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        if position_ids is None:
            return None
        if position_ids.dim() == 2:  # 1-D positions: the same on every axis (text only)
            return position_ids[None].expand(3, -1, -1)
        return position_ids[-3:]  # generate() puts the text positions first: (4, B, N)


def frame_timestamps(frames: int, fps: float, patches: int) -> list[float]:
    """Seconds of each of ``patches`` temporal patches of a clip of ``frames`` frames at ``fps``: the mean of its
    first and last frame's times (frames 2t and 2t+1; a clip of an odd number repeats its last frame), as Qwen3-VL's
    processor dates its frames."""
    index = list(range(frames)) + [frames - 1] * (2 * patches - frames)
    return [(index[2 * t] + index[2 * t + 1]) / (2 * fps) for t in range(patches)]


def video_pixels(image_processor, frames: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values_videos (T/2 x rows x cols, C x 2 x p x p), video_grid_thw (1, 3))`` of one clip, from the image
    processor alone: each frame goes through it as an image would, and since it lays an image out as a temporal
    patch of the same frame twice, temporal patch ``t`` is frame ``2t``'s rows with their second temporal slice from
    frame ``2t + 1`` (a clip of an odd number of frames repeats its last one, as the video processors pad)."""
    tp = image_processor.temporal_patch_size
    if tp != 2:
        raise ValueError(f"a temporal patch of {tp} frames; the layout here is for 2")
    frames = list(frames) + ([frames[-1]] if len(frames) % 2 else [])
    out = [image_processor(images=[f], return_tensors="pt") for f in frames]
    grids = {tuple(o["image_grid_thw"][0].tolist()) for o in out}
    if len(grids) != 1:
        raise ValueError(f"the clip's frames have different grids {sorted(grids)}; a clip's frames share one size")
    _, rows, cols = grids.pop()
    channels = len(image_processor.image_mean)
    patches = []
    for first, second in zip(out[0::2], out[1::2]):
        a = first["pixel_values"].view(-1, channels, tp, first["pixel_values"].shape[1] // (channels * tp))
        b = second["pixel_values"].view(a.shape)
        patches.append(torch.stack([a[:, :, 0], b[:, :, 0]], dim=2).flatten(1))  # (cells, C, tp, p*p)
    return torch.cat(patches), torch.tensor([[len(frames) // tp, rows, cols]])
