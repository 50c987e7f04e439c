"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2-VL's token layout, interleaved M-RoPE, DeepStack."""

from __future__ import annotations

from tokenprune.adapters.base import MethodHook
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (Qwen Team 2025, "Qwen3-VL Technical Report").

    The MoE variant (``qwen3_vl_moe``) routes each token on its own, so pruning changes no kept token's experts.
    Its visual tokens, grids, tiles and vision-tower signals are Qwen2-VL's (image and video placeholders; a
    merger of 2x2 patches; a CLS-free tower whose blocks all attend over the whole image). Two differences:

    - M-RoPE with interleaved sections: the rotary ``(cos, sin)`` the LLM builds once per token already holds the
      interleaving, and tokenprune gathers them per kept token as for Qwen2-VL (``positions: renumber`` renumbers
      the same three axes).
    - **DeepStack**: the features of several vision layers (``deepstack_visual_indexes``) are added to the hidden
      states of the visual tokens after each of the first decoder layers (``visual_pos_masks``). After a stage has
      pruned, each later injection goes to the visual tokens still flowing, each its own feature row
      (:meth:`hook_visual_injection`), so a kept token receives exactly what it receives in the unpruned model and
      a dropped one's features go with it. A merged token keeps its own token's rows (the features of the tokens
      merged into it are not added to it).
    """

    model_types = ("qwen3_vl", "qwen3_vl_moe")
    family = "Qwen3-VL"
    frame_videos = ("qwen3_vl", "qwen3_vl_moe")
    timestamped_frames = True  # each temporal patch after its own timestamp

    def hook_visual_injection(self, fn):
        """The LLM's ``_deepstack_process(hidden_states, visual_pos_masks, visual_embeds)``, wrapped on the
        instance: its mask and feature rows are those of the tokens flowing now."""
        def rewrite(args, kwargs):
            hidden, mask, features = args
            mask, features = fn(mask, features)
            return (hidden, mask, features), kwargs

        return [MethodHook(self.language_model, "_deepstack_process", rewrite)]
