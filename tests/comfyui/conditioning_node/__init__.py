"""A test-only custom node: random text conditioning, so a workflow can sample a diffusion
model without a text encoder file. Copied into a throwaway ComfyUI base directory by the
server test; never part of the pack."""

import torch


class WanBlockSwapTestConditioning:
    CATEGORY = "wan_blockswap/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                "dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
            },
            # changes nothing but ComfyUI's cache key: a prompt equal to an earlier one samples
            # again instead of reusing the cached result
            "optional": {"nonce": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})},
        }

    def make(self, seed, tokens, dim, nonce=0):
        gen = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, dim, generator=gen), {}]],)


NODE_CLASS_MAPPINGS = {"WanBlockSwapTestConditioning": WanBlockSwapTestConditioning}
