import pytest

from comfyui_wan_blockswap.wan_blockswap import (
    BlockSizes,
    BlockSwapConfigError,
    InsufficientMemoryError,
    ModelSizes,
    SwapConfig,
    plan_swap,
)
from comfyui_wan_blockswap.wan_blockswap.plan import GIB

MB = 2**20


def wan14b_like(n=40, vace=0, block=700 * MB):
    blocks = tuple(
        BlockSizes(f"blocks.{i}", "blocks", "main", block, (150 * MB, 150 * MB, 100 * MB))
        for i in range(n)
    )
    blocks += tuple(
        BlockSizes(f"vace_blocks.{i}", "vace_blocks", "vace", block, (150 * MB,))
        for i in range(vace)
    )
    return ModelSizes(blocks, other_bytes=400 * MB, txt_emb_bytes=100 * MB, img_emb_bytes=30 * MB)


def test_blocks_to_swap_spreads_swapped_blocks_evenly_ending_with_the_last():
    plan = plan_swap(wan14b_like(), SwapConfig(blocks_to_swap=12))
    indices = [int(name.split(".")[1]) for name in plan.swapped]
    assert len(indices) == 12 and indices[-1] == 39
    # evenly spaced: resident blocks between swapped ones hide the next copy
    assert {b - a for a, b in zip(indices, indices[1:])} <= {3, 4}
    assert len(plan.resident) == 28
    assert plan.num_slots == 2 and plan.slot_bytes == 700 * MB
    assert plan.resident_bytes == 400 * MB + 28 * 700 * MB
    assert plan.swapped_bytes == 12 * 700 * MB
    assert "blocks 0-1, 3-4, 6-8, 10-11" in plan.describe()
    assert "2, 5, 9, 12, 15, 19, 22, 25, 29, 32, 35, 39 in host memory" in plan.describe()


@pytest.mark.parametrize("n", [1, 5, 8, 40])
def test_spread_picks_count_distinct_blocks_including_the_last(n):
    from comfyui_wan_blockswap.wan_blockswap.plan import spread

    for count in range(n + 1):
        chosen = spread(count, n)
        assert len(chosen) == count and chosen <= set(range(n))
        assert count == 0 or n - 1 in chosen


def test_default_swaps_everything_and_nothing_swapped_needs_no_slots():
    assert len(plan_swap(wan14b_like(), SwapConfig()).swapped) == 40
    plan = plan_swap(wan14b_like(), SwapConfig(blocks_to_swap=0))
    assert (
        plan.swapped == ()
        and plan.num_slots == 0
        and plan.gpu_weight_bytes == 400 * MB + 40 * 700 * MB
    )


def test_embeddings_offload_moves_their_bytes():
    plan = plan_swap(
        wan14b_like(), SwapConfig(blocks_to_swap=0, offload_txt_emb=True, offload_img_emb=True)
    )
    assert plan.resident_bytes == 270 * MB + 40 * 700 * MB
    assert plan.swapped_bytes == 130 * MB
    assert plan.num_slots == 2 and plan.slot_bytes == 100 * MB


def test_resident_blocks_explicit():
    plan = plan_swap(wan14b_like(n=8), SwapConfig(resident_blocks=(0, 4)))
    assert plan.resident == ("blocks.0", "blocks.4")
    assert "0, 4 on GPU, 1-3, 5-7 in host memory" in plan.describe()


def test_out_of_range_names_option_range_and_block_count():
    with pytest.raises(
        BlockSwapConfigError, match=r"blocks_to_swap must be in 0\.\.40 .*40 blocks.*41"
    ):
        plan_swap(wan14b_like(), SwapConfig(blocks_to_swap=41))
    with pytest.raises(BlockSwapConfigError, match=r"resident_blocks .*0\.\.7"):
        plan_swap(wan14b_like(n=8), SwapConfig(resident_blocks=(8,)))
    with pytest.raises(BlockSwapConfigError, match=r"vace_blocks_to_swap must be in 0\.\.8"):
        plan_swap(wan14b_like(vace=8), SwapConfig(vace_blocks_to_swap=9))


def test_vace_automatic_follows_main_share_and_explicit_count():
    plan = plan_swap(wan14b_like(vace=8), SwapConfig(blocks_to_swap=20))
    assert sum(name.startswith("vace") for name in plan.swapped) == 4
    plan = plan_swap(wan14b_like(vace=8), SwapConfig(blocks_to_swap=20, vace_blocks_to_swap=8))
    assert sum(name.startswith("vace") for name in plan.swapped) == 8


def test_a_block_list_of_a_new_role_is_planned_as_data():
    """A third block list needs no planner change: automatic share, or counted by role."""
    sizes = wan14b_like(n=8, vace=4)
    audio = tuple(
        BlockSizes(f"audio_blocks.{i}", "audio_blocks", "audio", 300 * MB, (100 * MB,))
        for i in range(4)
    )
    sizes = ModelSizes(sizes.blocks + audio, other_bytes=sizes.other_bytes)
    plan = plan_swap(sizes, SwapConfig(blocks_to_swap=4))
    assert sum(name.startswith("audio") for name in plan.swapped) == 2  # half, like main
    config = SwapConfig(blocks_to_swap=4, role_blocks_to_swap={"audio": 4, "vace": 1})
    assert config.role_counts == {"audio": 4, "vace": 1}
    plan = plan_swap(sizes, config)
    assert sum(name.startswith("audio") for name in plan.swapped) == 4
    assert sum(name.startswith("vace") for name in plan.swapped) == 1
    with pytest.raises(BlockSwapConfigError, match=r"role_blocks_to_swap\['audio'\] must be"):
        plan_swap(sizes, SwapConfig(role_blocks_to_swap={"audio": 5}))
    with pytest.raises(BlockSwapConfigError, match="disagree"):
        SwapConfig(vace_blocks_to_swap=2, role_blocks_to_swap={"vace": 3})
    with pytest.raises(BlockSwapConfigError, match="other than 'main'"):
        SwapConfig(role_blocks_to_swap={"main": 3})


def test_vram_budget_keeps_as_many_blocks_as_fit():
    sizes = wan14b_like()
    for budget_gb in (3.0, 8.0, 12.0, 20.0):
        plan = plan_swap(sizes, SwapConfig(vram_budget_gb=budget_gb, swap_unit="block"))
        assert plan.gpu_weight_bytes <= budget_gb * GIB
        # one more resident block would not fit
        more = plan.gpu_weight_bytes + 700 * MB
        assert more > budget_gb * GIB or not plan.swapped
        assert plan.swap_unit == "block"
        # "auto" may pick layers instead, but only to copy fewer bytes per forward
        auto = plan_swap(sizes, SwapConfig(vram_budget_gb=budget_gb))
        assert auto.gpu_weight_bytes <= budget_gb * GIB
        assert auto.swapped_bytes <= plan.swapped_bytes


def test_vram_budget_falls_back_to_layers_then_errors():
    sizes = wan14b_like()
    # blocks need 400 MB + 2 x 700 MB slots; layers need the remainders (40 x 300 MB) + slots
    plan = plan_swap(sizes, SwapConfig(vram_budget_gb=1.5, prefetch_blocks=0, swap_unit="auto"))
    assert plan.swap_unit == "block"
    small = ModelSizes(
        tuple(
            BlockSizes(f"blocks.{i}", "blocks", "main", 700 * MB, (300 * MB, 300 * MB))
            for i in range(4)
        ),
        other_bytes=100 * MB,
    )
    plan = plan_swap(small, SwapConfig(vram_budget_gb=1.2, swap_unit="auto"))
    assert plan.swap_unit == "layer" and plan.slot_bytes == 300 * MB
    assert plan.gpu_weight_bytes <= 1.2 * GIB
    with pytest.raises(InsufficientMemoryError, match=r"vram_budget_gb=0\.3 .*at least"):
        plan_swap(small, SwapConfig(vram_budget_gb=0.3))
    with pytest.raises(InsufficientMemoryError):
        plan_swap(small, SwapConfig(vram_budget_gb=1.2, swap_unit="block"))


def test_vram_budget_prefers_layer_slots_when_they_copy_fewer_bytes():
    # Real Wan blocks are almost all large layers: layer slots (2 x 140 MB) leave room for more
    # resident weights than block slots (2 x 700 MB) do, so fewer bytes cross per forward.
    layers = (140 * MB, 140 * MB, 140 * MB, 140 * MB, 139 * MB)
    sizes = ModelSizes(
        tuple(BlockSizes(f"blocks.{i}", "blocks", "main", 700 * MB, layers) for i in range(8)),
        other_bytes=100 * MB,
    )
    budget = (100 + 2 * 700 + 2 * 700) * MB / GIB  # two resident blocks with block slots
    plan = plan_swap(sizes, SwapConfig(vram_budget_gb=budget))
    assert plan.swap_unit == "layer"
    assert plan.gpu_weight_bytes <= budget * GIB
    block_only = plan_swap(sizes, SwapConfig(vram_budget_gb=budget, swap_unit="block"))
    assert len(block_only.resident) == 2 and block_only.swapped_bytes > plan.swapped_bytes
    assert plan.kept_layers and all(name in plan.swapped for name, _ in plan.kept_layers)
    slack = budget * GIB - plan.gpu_weight_bytes
    assert 0 <= slack < 139 * MB


def wan_like_layers(blocks: int = 8) -> ModelSizes:
    """Wan-14B proportions: 8 attention projections of 50 MB, two FFN layers of 135 MB."""
    layers = (50 * MB,) * 8 + (135 * MB,) * 2
    return ModelSizes(
        tuple(
            BlockSizes(f"blocks.{i}", "blocks", "main", sum(layers) + MB, layers)
            for i in range(blocks)
        ),
        other_bytes=350 * MB,
    )


def test_layer_budget_streams_a_few_layers_of_every_block_spread_through_each():
    sizes = wan_like_layers()
    total = sum(b.nbytes for b in sizes.blocks) + sizes.other_bytes
    budget = 0.75 * total / GIB
    plan = plan_swap(sizes, SwapConfig(vram_budget_gb=budget, swap_unit="layer"))
    assert plan.gpu_weight_bytes <= budget * GIB
    # every block streams some layers, evenly (differing by at most one layer)
    streamed = {
        b.name: [i for i in range(10) if (b.name, i) not in set(plan.kept_layers)]
        for b in sizes.blocks
    }
    counts = [len(layers) for layers in streamed.values()]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    # the FFN layers are all kept, so the slots shrink to one attention projection
    assert all(8 not in layers and 9 not in layers for layers in streamed.values())
    assert plan.slot_bytes == 50 * MB
    # within a block the streamed layers are not bunched together
    assert all(layers == [1, 3, 5, 7][-len(layers) :] for layers in streamed.values())
    # and it copies fewer bytes than swapping whole blocks with the same budget
    old_style = [
        plan_swap(sizes, SwapConfig(vram_budget_gb=budget, swap_unit="block")).swapped_bytes
    ]
    assert plan.swapped_bytes < min(old_style)
    # nothing left out: kept + streamed + slots account for every byte
    assert plan.resident_bytes + plan.swapped_bytes == total
    assert plan.describe().startswith("blocks 0-7 partly in host memory")


def test_flux_like_two_main_lists_count_together():
    blocks = tuple(BlockSizes(f"double.{i}", "double", "main", 300 * MB) for i in range(3))
    blocks += tuple(BlockSizes(f"single.{i}", "single", "main", 100 * MB) for i in range(5))
    plan = plan_swap(ModelSizes(blocks, other_bytes=0), SwapConfig(blocks_to_swap=6))
    assert plan.swapped == ("double.0", "double.1", "single.0", "single.1", "single.2", "single.4")
    assert plan.slot_bytes == 300 * MB
    assert plan.describe().splitlines()[:2] == [
        "double 2 on GPU, 0-1 in host memory",
        "single 3 on GPU, 0-2, 4 in host memory",
    ]


def test_txt_emb_role_blocks_follow_offload_txt_emb():
    blocks = (BlockSizes("b.0", "b", "main", 10), BlockSizes("r.0", "r", "txt_emb", 5))
    sizes = ModelSizes(blocks, other_bytes=1)
    assert plan_swap(sizes, SwapConfig(blocks_to_swap=0)).swapped == ()
    plan = plan_swap(sizes, SwapConfig(blocks_to_swap=0, offload_txt_emb=True))
    assert plan.swapped == ("r.0",) and plan.offload_txt_emb


def wan_streamable(n=8):
    """Wan-14B-like blocks (30 MB of small tensors each) and 440 MB outside the blocks, of
    which four large layers (a 300 MB time projection among them) may stream."""
    layers = (135 * MB, 135 * MB) + (50 * MB,) * 8
    blocks = tuple(
        BlockSizes(f"blocks.{i}", "blocks", "main", 700 * MB, layers, packable_bytes=670 * MB)
        for i in range(n)
    )
    return ModelSizes(
        blocks, other_bytes=445 * MB, stream_layer_bytes=(50 * MB, 300 * MB, 40 * MB, 50 * MB)
    )


def test_a_budget_below_every_slot_plan_streams_layer_by_layer():
    sizes = wan_streamable()
    resident = 5 * MB + 8 * 30 * MB
    slots = plan_swap(sizes, SwapConfig(vram_budget_gb=1.0))
    assert slots.window_bytes == 0 and slots.num_slots == 2  # slots still fit 1 GiB
    plan = plan_swap(sizes, SwapConfig(vram_budget_gb=0.4))
    assert plan.window_bytes == int(0.4 * GIB) - resident
    assert plan.resident_bytes == resident and plan.swap_unit == "layer"
    assert plan.swapped == tuple(f"blocks.{i}" for i in range(8)) and not plan.offload_txt_emb
    assert plan.swapped_bytes == 8 * 670 * MB + 440 * MB
    # the 300 MB layer loads alone: the GPU holds at most that, or the window
    assert plan.gpu_weight_bytes == resident + 300 * MB
    assert "streamed layer by layer" in plan.describe()
    wide = plan_swap(sizes, SwapConfig(vram_budget_gb=0.6))
    assert wide.gpu_weight_bytes == int(0.6 * GIB)


def test_a_streamed_plan_has_a_floor_and_block_units_never_stream():
    sizes = wan_streamable()
    with pytest.raises(
        InsufficientMemoryError, match=r"more than 0\.239 GiB streaming layer by layer"
    ):
        plan_swap(sizes, SwapConfig(vram_budget_gb=0.2))
    with pytest.raises(InsufficientMemoryError, match="with fixed slots"):
        plan_swap(sizes, SwapConfig(vram_budget_gb=0.4, swap_unit="block"))


def test_a_compressed_streamed_plan_reserves_no_staging_slots():
    sizes = wan_streamable()
    plan = plan_swap(sizes, SwapConfig(vram_budget_gb=0.4, transfer_compression=True))
    assert plan.window_bytes and plan.compressed and plan.staging_bytes == 0
    raw = plan_swap(sizes, SwapConfig(vram_budget_gb=0.4))
    assert not raw.compressed


def test_a_streamed_plan_counts_its_window_against_the_budget():
    plan = plan_swap(wan_streamable(), SwapConfig(vram_budget_gb=0.4))
    # the 300 MB layer may sit alone beside what stays: more VRAM than the budget, briefly
    assert plan.gpu_weight_bytes > int(0.4 * GIB)
    assert plan.budgeted_bytes == int(0.4 * GIB)
    slots = plan_swap(wan_streamable(), SwapConfig(vram_budget_gb=1.0))
    assert slots.budgeted_bytes == slots.gpu_weight_bytes
