"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, anyres_max tiling, Qwen2 LLM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenprune.adapters.base import (
    VIDEO_CALL,
    MethodHook,
    expand_placeholder,
    left_pad,
    received_attention,
    tiles_of_images,
)
from tokenprune.adapters.llava_next import LlavaNextAdapter


def _anyres_max(aspect: str) -> int:
    """The tile budget N of a ``vision_aspect_ratio`` ``anyres_max_N``."""
    return int(aspect.removeprefix("anyres_max_"))


def bilinear_nearest(size_in: int, size_out: int) -> torch.Tensor:
    """For each of ``size_out`` outputs of a bilinear resize (``align_corners=False``) of ``size_in`` inputs, the
    input it takes the largest weight from: the one nearest its source coordinate ``(i + 0.5) * in / out - 0.5``."""
    src = (torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5
    return src.clamp(min=0).round().long().clamp(max=size_in - 1)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (Li et al. 2024, "LLaVA-OneVision: Easy Visual Task Transfer").

    The layout is LLaVA-NeXT's (a base tile, then the unpadded anyres grid with an ``image_newline`` closing each
    row; all of them ``<image>`` placeholders), with three differences this adapter follows:

    - ``vision_aspect_ratio: anyres_max_N``: an unpadded grid larger than about N tiles is resized (bilinear) to N
      tiles' worth of tokens before the newlines are added, so a visual token of a large image mixes up to four
      neighbouring patches. Its vision-tower signal row is that of the patch it takes the largest weight from
      (:func:`bilinear_nearest`); the tokens are an exact function of the patches, their signals an approximation.
    - an image of a sample with several images is its base tile alone (``batch_num_images``), closed by one newline.
    - the tower is SigLIP, which has no CLS token: the vision ``cls_attention`` signal is the attention each patch
      receives at the layer, averaged over the queries of its tile (as VisionZip scores CLS-free towers), and
      ``vision_feature_select_strategy: full`` keeps every patch.

    Videos: each frame's features are pooled (bilinear) to a ``ceil(s/2) x ceil(s/2)`` grid (s the tile's side in
    patches), the frames follow one another and one ``image_newline`` token closes the clip; all of them are the
    video placeholders of ``input_ids``. Each frame is a tile (per-tile budgets are per frame) and a clip's frames
    are consecutive tiles (:meth:`layout_tiles`, :meth:`position_frames`), read off the prompt: a clip is a run of
    video placeholders. Vision-tower signals of a clip are pooled as the model pools its features: each frame's
    per-patch signal (attention received, CLS attention, keys) resized bilinearly to the pooled grid, so a video
    token's signal is the same mix of its patches' signals as its feature is of theirs (:meth:`pool_frames`).
    In a batch of images and clips the tower runs twice (images, then clips): the two calls' records and layer
    captures are joined (:meth:`add_tower_call`), the frames' signal rows after the image tiles'.
    """

    model_types = ("llava_onevision",)
    family = "LLaVA-OneVision"
    frame_videos = ("llava_onevision",)  # a frame is the image processor's base tile (the video processor's resize)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    def video_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return input_ids == self.model.config.video_token_id

    def _frame_side(self) -> int:
        """Side of a video frame's pooled grid (``apply_pooling``: the tile's patch grid halved, rounded up)."""
        return math.ceil(self._side() / 2)

    def _clips(self, visual: torch.Tensor, video: torch.Tensor, sample: int) -> list[tuple[int, int]]:
        """(start, length) in ``sample``'s visual tokens of each run of video placeholders: a clip."""
        kinds = video[sample][visual[sample]].tolist()
        clips, start = [], None
        for i, is_video in enumerate(kinds + [False]):
            if is_video and start is None:
                start = i
            elif not is_video and start is not None:
                clips.append((start, i - start))
                start = None
        return clips

    def layout_tiles(self, visual, video, capture, grids):
        """Images (the tower's call, as LLaVA-NeXT's) and clips in the order the prompt holds them; a clip of F
        frames is F tiles of the pooled grid and its closing newline (in no tile)."""
        g = self._frame_side()
        images = iter(self.image_tile_entries(capture) if capture is not None else [])
        entries = []
        for b in range(visual.shape[0]):
            clips = dict(self._clips(visual, video, b))
            n, pos = int(visual[b].sum()), 0
            while pos < n:
                if pos in clips:
                    length = clips[pos]
                    frames, rest = divmod(length - 1, g * g)
                    if rest or frames < 1:
                        raise ValueError(f"sample {b}: a run of {length} video tokens is no clip of {g}x{g}-token "
                                         "frames and a closing newline")
                    tile = torch.cat([torch.arange(frames).repeat_interleave(g * g), torch.tensor([-1])])
                    entries.append((tile, [(g, g)] * frames))
                    pos += length
                    continue
                entry = next(images, None)
                if entry is None:
                    raise ValueError(f"sample {b}'s image tokens outrun the images of the tower's call")
                entries.append(entry)
                pos += entry[0].numel()
        return tiles_of_images(visual, entries)

    def position_frames(self, visual, positions, tile_of, video=None):
        """A clip's frames are its tiles in order: each video token's frame is its tile less the clip's first tile;
        an image's tokens are frame 0."""
        if video is None or not bool(video.any()):
            return None
        frame = torch.where(tile_of >= 0, 0, -1)
        for b in range(visual.shape[0]):
            idx = visual[b].nonzero().flatten()
            for start, length in self._clips(visual, video, b):
                cols = idx[start:start + length]
                tiles = tile_of[b, cols]
                first = int(tiles[tiles >= 0].min())
                frame[b, cols] = torch.where(tiles >= 0, tiles - first, -1)
        return frame

    def frame_video_inputs(self, processor, prompts, clips):
        """Each frame is the image processor's base tile of it (the frame resized to the tower's tile, as the video
        processor resizes frames, through the image processor's PIL path); each ``<video>`` placeholder expanded to
        the clip's pooled tokens and its closing newline, as the processor's own video path does; left-padded. The
        model takes one frame count a batch: clips of different lengths are refused."""
        counts = sorted({len(c) for c in clips})
        if len(counts) != 1:
            raise ValueError(f"{self.family} takes one frame count for every clip of a batch; these clips have "
                             f"{counts} frames (run them in batches of one length, or batch_size=1)")
        tok = processor.tokenizer
        video_token = self.model.config.video_token_id
        per_clip = counts[0] * self._frame_side() ** 2 + 1
        pixels, rows = [], []
        for prompt, clip in zip(prompts, clips):
            tiles = [processor.image_processor(images=[f], return_tensors="pt")["pixel_values"][0, 0] for f in clip]
            pixels.append(torch.stack(tiles))
            rows.append(expand_placeholder(tok(prompt, add_special_tokens=False)["input_ids"], video_token, per_clip))
        input_ids, mask = left_pad(rows, tok.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values_videos": torch.stack(pixels)}

    # --- the video call: get_video_features(pixel_values_videos, ...), each frame a tile of the tower --------
    def hook_image_call(self, fn):
        """The image call (as LLaVA-NeXT's) and ``get_video_features``, reported with ``VIDEO_CALL`` added to its
        keyword arguments so that :meth:`vision_tower_capture` tells the two apart."""

        def video_call(args, kwargs):
            fn(args, {**kwargs, VIDEO_CALL: True})

        return super().hook_image_call(fn) + [MethodHook(self.model.model, "get_video_features", video_call)]

    def add_tower_call(self, previous, capture):
        """The forward encodes the images, then the clips: a video call after an image call joins it (the record
        keeps the images and adds ``videos``; the layers' captures are the image tiles, then the frames); any other
        call starts a new record."""
        if isinstance(capture, dict) and "videos" in capture and isinstance(previous, dict) \
                and "videos" not in previous and previous["images"]:
            return {**previous, "videos": capture["videos"]}, True
        return capture, False

    def join_layer_captures(self, previous, capture):
        return torch.cat([previous, capture])  # (tiles, P, D): the image tiles, then the frames (one tile size)

    def _image_tiles(self, tower) -> int:
        """Tiles the tower saw for the images of record ``tower`` (the signal rows before the frames' are theirs)."""
        return sum(self._tiles((h, w)) if tiled else 1 for h, w, tiled in tower["images"])

    def vision_patch_map(self, visual: torch.Tensor, tower=None, video=None) -> torch.Tensor:
        """Images as LLaVA-NeXT's; after a video call, each clip's pooled tokens, frame after frame, are the pooled
        signal rows of its frames (:meth:`pool_frames`: after the images' rows; clip ``c`` of the call is the
        ``c``-th clip of the batch), the closing newline none."""
        if not (isinstance(tower, dict) and "videos" in tower):
            if video is not None and bool(video.any()):
                raise ValueError("the batch holds clips but the tower's latest call took images")
            return super().vision_patch_map(visual, tower, video)
        video = torch.zeros_like(visual) if video is None else video
        clips, frames = tower["videos"]
        g = self._frame_side() ** 2
        first = self._image_tiles(tower) * self._side() ** 2  # the frames' rows follow the image tiles'
        images = iter([rows for rows, _, _ in self._images_rows(tower)] if tower["images"] else [])
        out = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        c = 0
        for b in range(visual.shape[0]):
            idx = visual[b].nonzero().flatten()
            spans = dict(self._clips(visual, video, b))
            pos = 0
            while pos < idx.numel():
                if pos in spans:
                    length = spans[pos]
                    if c >= clips or length != frames * g + 1:
                        raise ValueError(f"sample {b}'s clip of {length} video tokens is not clip {c} of the tower's "
                                         f"call ({clips} clips of {frames} frames of {g} pooled tokens and a newline)")
                    out[b, idx[pos:pos + length - 1]] = torch.arange(first + c * frames * g,
                                                                     first + (c + 1) * frames * g, device=visual.device)
                    c, pos = c + 1, pos + length
                    continue
                rows = next(images, None)
                if rows is None:
                    raise ValueError(f"sample {b}'s image tokens outrun the images of the tower's call")
                out[b, idx[pos:pos + rows.numel()]] = rows.to(visual.device)
                pos += rows.numel()
        if c != clips or next(images, None) is not None:
            raise ValueError(f"the prompt's clips and images are not the tower's calls' ({clips} clips)")
        return out

    def pool_frames(self, rows: torch.Tensor, tower) -> torch.Tensor:
        """Per-patch signal ``rows`` (tiles * P, ...) of the calls of record ``tower``: the frames' rows (after the
        image tiles') pooled per frame as ``apply_pooling`` pools the features (bilinear, ``align_corners=False``,
        to ``ceil(s/2)`` per side), g*g a frame; the image tiles' rows as they are."""
        if not (isinstance(tower, dict) and "videos" in tower):
            return rows
        side, g = self._side(), self._frame_side()
        first = self._image_tiles(tower) * side * side
        rest = rows.shape[1:]
        grid = rows[first:].reshape(-1, side, side, math.prod(rest)).permute(0, 3, 1, 2).float()
        pooled = F.interpolate(grid, size=(g, g), mode="bilinear")
        return torch.cat([rows[:first], pooled.permute(0, 2, 3, 1).reshape(-1, *rest).to(rows.dtype)])

    @staticmethod
    def _call_option(args: tuple, kwargs: dict, name: str, index: int):
        """``get_image_features(pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy,
        vision_aspect_ratio, batch_num_images)``: argument ``name`` at position ``index``, if given."""
        return args[index] if len(args) > index else kwargs.get(name)

    def image_inputs_from_tower(self, args, kwargs):
        out = super().image_inputs_from_tower(args, kwargs)
        count = self._call_option(args, kwargs, "batch_num_images", 5)
        if out is not None and count is not None:
            out["batch_num_images"] = count
        return out

    def vision_tower_capture(self, args, kwargs):
        """[(height, width, tiled)] per image of the call, with ``tiled`` False for an image that is its base tile
        alone (a sample with several images), and the call's ``vision_aspect_ratio``; of a video call, ``videos``:
        (clips, frames) of its (clips, frames, C, H, W) pixels."""
        if kwargs.get(VIDEO_CALL):
            pixels = args[0] if args else kwargs.get("pixel_values_videos")
            return None if pixels is None else {"images": [], "aspect": None,
                                                "videos": (int(pixels.shape[0]), int(pixels.shape[1]))}
        _, sizes = self._call_images(args, kwargs)
        if sizes is None:
            return None
        count = self._call_option(args, kwargs, "batch_num_images", 5)
        sizes = [tuple(int(x) for x in s) for s in sizes.tolist()]
        tiled = [True] * len(sizes) if count is None else [int(n) == 1 for n in count for _ in range(int(n))]
        aspect = self._call_option(args, kwargs, "vision_aspect_ratio", 4) or self.model.config.vision_aspect_ratio
        return {"images": [(h, w, t) for (h, w), t in zip(sizes, tiled)], "aspect": aspect}

    def image_rows(self, size: tuple[int, int], first: int, tiled: bool = True, aspect: str | None = None
                   ) -> torch.Tensor:
        """As :meth:`LlavaNextAdapter.image_rows`, as ``LlavaOnevisionModel.pack_image_features`` lays the features
        out: an untiled image is its base tile and one newline; a tiled one's unpadded grid of h x w patches is
        resized to ``int(h // r) x int(w // r)`` tokens when ``r = sqrt(h*w / (N * side^2)) > 1.1`` (N from
        ``anyres_max_N``), each token's row that of its nearest source patch."""
        if not tiled or self._tiles(size) == 1:
            return self.close_rows(first, None)
        kept = self.anyres_canvas(size, first)
        h, w = kept.shape
        aspect = aspect or self.model.config.vision_aspect_ratio
        ratio = math.sqrt(h * w / (_anyres_max(aspect) * self._side() ** 2))
        if ratio > 1.1:
            kept = kept[bilinear_nearest(h, int(h // ratio))][:, bilinear_nearest(w, int(w // ratio))]
        return self.close_rows(first, kept)

    def _images_rows(self, capture) -> list[tuple[torch.Tensor, int, int]]:
        if capture is None:
            raise ValueError("the image sizes of the vision tower's call were not captured")
        out, first = [], 0
        for h, w, tiled in capture["images"]:
            count = self._tiles((h, w)) if tiled else 1
            out.append((self.image_rows((h, w), first, tiled, capture["aspect"]), first, count))
            first += count
        return out

    # --- vision-tower signals: SigLIP (no CLS) or a CLIP-like tower ---------------------------------
    def _has_cls(self) -> bool:
        return self.model.config.vision_config.model_type != "siglip_vision_model"

    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        strategy = getattr(config, "vision_feature_select_strategy", "full")
        if config.vision_config.model_type == "siglip_vision_model":
            if strategy != "full":
                return ("vision_feature_select_strategy is 'default' on a SigLIP tower, which has no CLS token: the "
                        "model drops its first patch, which no visual token stands for")
            return None
        return LlavaNextAdapter.vision_signals_from_config(config)

    def _tokens_per_image(self) -> tuple[int, int]:
        if self._has_cls():
            return super()._tokens_per_image()
        return self._side() ** 2, 0

    def vision_cls_attention(self, layer, captured, tower=None):
        """With a CLS token, its attention (as LLaVA's); on SigLIP, the attention each patch receives, averaged
        over the tile's queries (the tower attends within each tile). A video call's rows pooled per frame."""
        if self._has_cls():
            return self.pool_frames(super().vision_cls_attention(layer, captured, tower), tower)
        received = received_attention(*self._qk(layer, captured))  # (tiles, H, P)
        return self.pool_frames(received.permute(0, 2, 1).reshape(-1, received.shape[1]), tower)

    def vision_received_attention(self, layer, captured, tower=None):
        if self._has_cls():
            return self.pool_frames(super().vision_received_attention(layer, captured, tower), tower)
        return self.vision_cls_attention(layer, captured, tower)  # SigLIP: already the received attention

    def vision_keys(self, layer, captured, tower=None):
        return self.pool_frames(super().vision_keys(layer, captured, tower), tower)
