"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres tiling, newline tokens, Llama-style LLM."""

from __future__ import annotations

import torch

from tokenprune.adapters.base import MethodHook, tiles_of_images
from tokenprune.adapters.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge").

    An image becomes a base tile plus an anyres grid of tiles, unpadded to the image's aspect
    ratio, with an ``image_newline`` token closing every row of the grid; so the number of visual
    tokens differs per image and per sample. All of them, newlines included, are the image
    placeholders of ``input_ids``. The newline tokens are marked as token kind ``image_newline``
    (their input embedding is the model's learned ``image_newline`` vector), which a stage can
    ``protect`` from pruning. The visual tokens do not form one grid: grid-based operators run per
    tile (a stage's ``budget: per_tile``). Vision-tower signals are per patch of each tile the tower
    saw, laid onto the visual tokens as the model packs its features (:meth:`image_rows`).
    """

    model_types = ("llava_next",)
    family = "LLaVA-NeXT"
    token_kinds = ("image_newline",)

    @classmethod
    def fixed_resolution_from_config(cls, config):
        return None  # anyres: a smaller image takes a smaller grid of tiles

    # --- the image call: get_image_features(pixel_values, image_sizes), also run by generate() ------
    def hook_image_call(self, fn):
        """LLaVA-NeXT's tower sees flattened tiles and never the image sizes the layout needs, so the call hooked
        is the model's ``get_image_features(pixel_values, image_sizes, ...)`` (the forward and ``generate()``,
        which encodes the images before the prefill, both go through it): the bound method is wrapped on the
        instance for as long as the handle lives."""
        return [MethodHook(self.model.model, "get_image_features", fn)]

    @staticmethod
    def _call_images(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        pixels = args[0] if args else kwargs.get("pixel_values")
        sizes = args[1] if len(args) > 1 else kwargs.get("image_sizes")
        return pixels, sizes

    def image_inputs_from_tower(self, args, kwargs):
        pixels, sizes = self._call_images(args, kwargs)
        return None if pixels is None or sizes is None else {"pixel_values": pixels, "image_sizes": sizes}

    @classmethod
    def guide_images_from_config(cls, config) -> str | None:
        return None  # the model's pixel_values and image_sizes, from get_image_features

    @classmethod
    def visual_grid_from_config(cls, config) -> str | None:
        return ("a sample's visual tokens are a base tile and an unpadded anyres tile grid with newline tokens; "
                "set the stage's budget: per_tile to run it on each tile's grid")

    # --- vision-tower signals: one signal row per patch of every tile the tower saw -----------------
    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            return ("vision_feature_select_strategy is 'full': the LLM's tokens then hold each tile's CLS feature, "
                    "which no patch of the tower stands for")
        return None

    def vision_tower_capture(self, args, kwargs):
        _, sizes = self._call_images(args, kwargs)
        return None if sizes is None else [tuple(int(x) for x in s) for s in sizes.tolist()]

    def _side(self) -> int:
        v = self.model.config.vision_config
        return v.image_size // v.patch_size

    def _tiles(self, size: tuple[int, int]) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)

    def image_rows(self, size: tuple[int, int], first: int) -> torch.Tensor:
        """The signal row of each LLM visual token of one image of (height, width) ``size`` whose tiles are the
        tower's tiles ``first, first+1, ...``, -1 on its newline tokens: the base tile in raster order, then the
        anyres grid (:meth:`anyres_canvas`), each of its rows closed by a newline (as
        ``LlavaNextModel.pack_image_features`` lays the features out)."""
        return self.close_rows(first, None if self._tiles(size) == 1 else self.anyres_canvas(size, first))

    def close_rows(self, first: int, canvas: torch.Tensor | None) -> torch.Tensor:
        """The base tile's signal rows (tower tile ``first``), then ``canvas``'s rows each closed by a newline
        (-1); without a canvas, the base tile and one newline."""
        p = self._side() ** 2
        base = torch.arange(first * p, (first + 1) * p)
        if canvas is None:
            return torch.cat([base, torch.tensor([-1])])
        canvas = torch.cat([canvas, torch.full((canvas.shape[0], 1), -1, dtype=canvas.dtype)], dim=1)
        return torch.cat([base, canvas.flatten()])

    def anyres_canvas(self, size: tuple[int, int], first: int) -> torch.Tensor:
        """(rows, cols) signal rows of an image's anyres grid: tile (ty, tx) of the gh x gw grid (tower tile
        ``first + 1 + ty*gw + tx``) holds rows ty*side..(ty+1)*side-1 and the matching columns of one
        (gh*side, gw*side) canvas, unpadded to the image's aspect ratio."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        cfg = self.model.config
        side = self._side()
        p = side * side
        gh, gw = get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        y = torch.arange(gh * side)[:, None]
        x = torch.arange(gw * side)[None, :]
        tile = first + 1 + (y // side) * gw + x // side
        canvas = tile * p + (y % side) * side + x % side  # (gh*side, gw*side) signal rows
        return unpad_image(canvas[None], torch.tensor(size))[0]

    def _images_rows(self, sizes) -> list[tuple[torch.Tensor, int, int]]:
        """For each image of the tower's call (its ``sizes``, in order): (:meth:`image_rows`, its first tile among
        the call's tiles, its tile count)."""
        if sizes is None:
            raise ValueError("the image sizes of the vision tower's call were not captured")
        out, first = [], 0
        for size in sizes:
            count = self._tiles(size)
            out.append((self.image_rows(size, first), first, count))
            first += count
        return out

    def vision_patch_map(self, visual: torch.Tensor, tower=None, video=None) -> torch.Tensor:
        rows = [r for r, _, _ in self._images_rows(tower)]
        seq = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        count = int(visual.sum())
        if seq.numel() != count:
            raise ValueError(f"the images of the tower's call (sizes {tower}) lay out {seq.numel()} visual tokens "
                             f"but the prompt holds {count}")
        out = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        out[visual] = seq.to(visual.device)
        return out

    def visual_tiles(self, visual, capture, grids):
        """Every tile the tower saw is a tile: the base tile, then each anyres crop — the part of it the unpadding
        keeps (a crop it removes whole is no tile) —, images in order over the batch; newline tokens are in
        none. A crop's tokens are not contiguous in the sequence (the canvas rows run across the crops), but in
        sequence order they are its grid's raster order."""
        return tiles_of_images(visual, self.image_tile_entries(capture))

    def image_tile_entries(self, capture) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """Per image of the tower's call, in order: (the tile of each of its visual tokens, -1 for newlines; its
        tiles' (rows, cols)), as :func:`~tokenprune.adapters.base.tiles_of_images` takes them."""
        side = self._side()
        p = side * side
        images = []
        for rows, first, count in self._images_rows(capture):
            tile = torch.where(rows >= 0, rows // p - first, -1)
            present = [t for t in range(count) if bool((tile == t).any())]
            shapes = []
            for t in present:
                patch = rows[tile == t] % p
                shapes.append((int((patch // side).unique().numel()), int((patch % side).unique().numel())))
            renumber = torch.full((count + 1,), -1, dtype=torch.long)
            renumber[torch.tensor(present)] = torch.arange(len(present))
            images.append((renumber[tile], shapes))  # index -1 reads the last entry: -1
        return images

    def image_panels(self, inputs: dict, sample: int) -> list[tuple[str, torch.Tensor]]:
        """The base tile, then the unpadded anyres grid (each row closed by a newline token, which has no cell),
        as :meth:`image_rows` lays them out."""
        n = int(self.visual_mask(inputs["input_ids"][sample:sample + 1]).sum())
        if n == 0:
            raise ValueError(f"sample {sample} holds no visual tokens")
        side = self._side()
        base = side * side
        rows = self.image_rows(tuple(int(x) for x in inputs["image_sizes"][sample]), 0)
        if rows.numel() != n:
            raise ValueError(f"sample {sample}: its image size lays out {rows.numel()} visual tokens, but it holds {n}")
        panels = [("base", torch.arange(base).view(side, side))]
        lines = int((rows[base:] < 0).sum())
        if n - base > lines:  # the anyres grid, its newline column dropped
            panels.append(("anyres", torch.arange(base, n).view(lines, -1)[:, :-1].clone()))
        return panels

    def mark_token_kinds(self, embeds: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        newline = self.model.model.image_newline.to(embeds.dtype)
        return {"image_newline": visual & (embeds == newline).all(dim=-1)}

