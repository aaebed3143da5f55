"""Core is never harmed: whatever the node did, a prompt without it finds the loader's model
as core made it, and behaves and outputs exactly as core alone ([Note: private model])."""

import gc

import pytest
import torch

import tiny_models
from test_comfy_node import WIDGETS, forward, lora_like, node, run, swap_of

KEYS = [
    "diffusion_model.blocks.3.self_attn.q.weight",
    "diffusion_model.blocks.1.ffn.0.weight",
    "diffusion_model.text_embedding.0.weight",
]


@pytest.fixture(autouse=True)
def _unload(comfy):
    yield
    gc.collect()
    comfy.model_management.unload_all_models()


class CoreAlone:
    """What a prompt without the node sees and does: its output, what core loaded, and the
    loader's tensors (objects, memory and values)."""

    def __init__(self, comfy, patcher, inputs):
        self.comfy, self.patcher, self.inputs = comfy, patcher, inputs
        self.output, self.loaded = self.prompt()
        comfy.model_management.unload_all_models()  # as core leaves them unloaded
        self.tensors = {name: (t, t.device) for name, t in self.named(patcher)}
        self.sums = self.checksums()

    @staticmethod
    def named(patcher):
        return [*patcher.model.named_parameters(), *patcher.model.named_buffers()]

    def prompt(self):
        mm = self.comfy.model_management
        mm.load_models_gpu([self.patcher])
        loaded = (self.patcher.loaded_size(), self.patcher.model.model_lowvram)
        out = forward(self.patcher, self.inputs)
        self.patcher.cleanup()
        return out, loaded

    def checksums(self):
        return {name: t.double().sum().item() for name, t in self.named(self.patcher)}

    def check(self):
        """A prompt without the node now: exactly core alone."""
        for module in self.patcher.model.modules():
            assert not module._forward_pre_hooks and not module._forward_hooks
        output, loaded = self.prompt()
        assert torch.equal(output, self.output)
        assert loaded == self.loaded  # core's memory behaviour: same loaded bytes and mode
        self.comfy.model_management.unload_all_models()
        for name, t in self.named(self.patcher):
            original, device = self.tensors[name]
            assert t.device == device, name  # where core left it
            # the same parameter objects (core re-wraps those it patched, and makes new buffer
            # objects whenever it moves a model)
            if name not in self.patcher.patches and isinstance(t, torch.nn.Parameter):
                assert t is original, name
        assert self.checksums() == self.sums  # nothing wrote into the shared memory


class SwappedTiny:
    """A tiny Wan through core's loader, its output alone, and the node's swap of it (two
    blocks): the private model's resident modules (buffers too), and the names of its
    tensors that share the loader's memory."""

    def __init__(self, comfy):
        from comfyui_wan_blockswap.callbacks import comfy_adapter

        self.patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
        self.inputs = make_inputs(5)
        self.plain = run(comfy, self.patcher, self.inputs)
        comfy.model_management.unload_all_models()
        self.swapped = node(self.patcher, blocks_to_swap=2)
        model = self.swapped.model
        self.state = comfy_adapter._states[model.diffusion_model]
        self.resident = {m for _, m in comfy_adapter._resident_modules(model, self.state, True)}
        self.theirs = dict(self.patcher.model.named_parameters())
        self.ours = dict(model.named_parameters())
        swapped_ids = swap_of(self.swapped).swapped_tensor_ids()
        self.shared = [n for n, t in self.ours.items() if id(t) not in swapped_ids]

    def shares(self, names):
        """Whether the private model's tensors ``names`` are the loader's memory."""
        return all(self.ours[n].data_ptr() == self.theirs[n].data_ptr() for n in names)


def unload_watch_calls(monkeypatch):
    """Every call of the unload watch's ``_apply`` from now on ([Note: unloading onto the
    shared memory]): (its module, the type of the watch it covers, whether it may point)."""
    from comfyui_wan_blockswap.callbacks import comfy_private

    calls = []
    apply = comfy_private._ApplyOntoOrigins.__call__

    def spy(self, *args, **kwargs):
        calls.append((self.owner(), type(self.covered), self.may_point()))
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(comfy_private._ApplyOntoOrigins, "__call__", spy)
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_a_prompt_without_the_node_after_one_with_it_is_core_alone(comfy, lora):
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    if lora:
        patcher = lora_like(patcher, KEYS)
    inputs = make_inputs(11)
    core = CoreAlone(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    swapped = node(patcher, blocks_to_swap=3)
    assert torch.equal(run(comfy, swapped, inputs), core.output)
    core.check()
    # and the other way round, with both loaded in one session
    assert torch.equal(run(comfy, swapped, inputs), core.output)
    core.check()


def test_core_alone_after_new_settings_an_unload_and_an_interrupt(comfy):
    mm = comfy.model_management
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_vace")
    inputs = make_inputs(12)
    core = CoreAlone(comfy, patcher, inputs)
    mm.unload_all_models()
    from comfyui_wan_blockswap.wan_blockswap import min_vram_budget_gb

    least = round(min_vram_budget_gb(patcher.model.diffusion_model) + 1e-6, 7)
    for settings in (
        dict(blocks_to_swap=2),
        dict(blocks_to_swap=4, prefetch_blocks=2),
        dict(blocks_to_swap=0, vram_budget_gb=least),  # streamed, layer by layer
    ):
        swapped = node(patcher, **settings)
        assert torch.equal(run(comfy, swapped, inputs), core.output)
        core.check()
    mm.unload_all_models()  # what /free does
    core.check()

    swapped = node(patcher, blocks_to_swap=3)
    private = swapped.model.diffusion_model

    def interrupt(module, args):
        raise mm.InterruptProcessingException()

    handle = private.blocks[1].register_forward_pre_hook(interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        run(comfy, swapped, inputs)
    handle.remove()
    swapped.cleanup()  # core's finally after sampling
    core.check()
    assert torch.equal(run(comfy, swapped, inputs), core.output)


def test_the_private_model_shares_the_loaders_memory(comfy):
    """Nothing is copied to make the private model, and an unload leaves no second copy:
    its resident tensors are the loader's memory again (the swapped ones live in our host
    buffers only)."""
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    swapped = node(patcher, blocks_to_swap=2)
    swap = swap_of(swapped)
    swapped_names = {ref.qualname for stored in swap.units for ref in stored.unit.tensors}

    def shared():
        ours = dict(swapped.model.diffusion_model.named_parameters())
        theirs = dict(patcher.model.diffusion_model.named_parameters())
        resident = [name for name in theirs if name not in swapped_names]
        assert resident and all(ours[n] is not theirs[n] for n in resident)
        return all(ours[n].data_ptr() == theirs[n].data_ptr() for n in resident)

    assert shared()
    run(comfy, swapped, make_inputs(13))
    comfy.model_management.unload_all_models()
    assert shared()
    # new settings: the swap is undone (weights restored) and made again; what is resident
    # in the new plan is the loader's memory again, not the restored copies
    swapped = node(patcher, blocks_to_swap=1)
    swap = swap_of(swapped)
    swapped_names = {ref.qualname for stored in swap.units for ref in stored.unit.tensors}
    assert shared()


def test_core_unloads_the_swapped_model_through_the_watch(comfy, monkeypatch):
    """[Note: unloading onto the shared memory]: core's whole unload of the private model
    moves every resident module that has weights of its own through the watch, and no
    swapped one; afterwards nothing of it is left and the model computes as before. On a
    GPU, where the load really moved them, the unload points them at the loader's memory
    itself: ``_on_detach`` finds nothing left to point back."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter

    calls = unload_watch_calls(monkeypatch)
    pointed_back = []
    rebind = comfy_adapter.rebind_unloaded

    def spy_rebind(*args):
        pointed_back.append(rebind(*args))
        return pointed_back[-1]

    monkeypatch.setattr(comfy_adapter, "rebind_unloaded", spy_rebind)
    tiny = SwappedTiny(comfy)
    assert tiny.resident and not tiny.resident & tiny.state.swapped_modules
    comfy.model_management.load_models_gpu([tiny.swapped])
    on_gpu = [n for n in tiny.shared if tiny.ours[n].is_cuda]
    assert bool(on_gpu) == torch.cuda.is_available()
    calls.clear(), pointed_back.clear()
    comfy.model_management.unload_all_models()
    assert {module for module, _, _ in calls} == tiny.resident
    assert pointed_back == [0]  # nothing arrived as a copy
    assert tiny.shares(tiny.shared)
    assert not any("_apply" in vars(m) for m in tiny.swapped.model.modules())
    assert torch.equal(run(comfy, tiny.swapped, tiny.inputs), tiny.plain)


def test_the_unload_watch_points_only_resident_copies_bound_for_their_origins(comfy, monkeypatch):
    """Which tensors the watch points at their origins: those of the modules it was given,
    on another device than their origin, when the unload goes to the origin's device; not
    the swap's, nor another dtype's (a weight cast to the model dtype), nor any where the
    unload goes elsewhere, nor an object patch's, nor any while hook patches are in the
    weights (asked at each move). Tensors on the meta device stand for core's GPU copies."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter, comfy_private

    pointed = []
    monkeypatch.setattr(comfy_private, "point_at", lambda t, origin: pointed.append(id(t)))
    patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
    swapped = node(patcher, blocks_to_swap=2)
    private = swapped.model
    state = comfy_adapter._states[private.diffusion_model]
    skip = swap_of(swapped).swapped_tensor_ids()
    named = list(comfy_adapter._resident_modules(private, state))
    for _, module in named:
        module.to("meta")
    cast = private.diffusion_model.head.head  # as if cast to the model dtype, on the GPU
    cast.weight = torch.nn.Parameter(cast.weight.to(torch.float16), requires_grad=False)
    expected = {
        id(t) for _, m in named for t in m.parameters(recurse=False) if t.dtype == torch.float32
    }
    keep = lambda t: t  # noqa: E731 - a move that leaves every tensor where it is
    with comfy_private.resident_weights_unload_onto_origins(private, named, "cuda", skip):
        for _, module in named:
            module._apply(keep)
    assert pointed == []  # the unload goes elsewhere
    with comfy_private.resident_weights_unload_onto_origins(private, named, "cpu", skip):
        for module in state.swapped_modules:  # not watched
            module._apply(keep, recurse=False)
        assert pointed == []
        for _, module in named:
            module._apply(keep)
    assert set(pointed) == expected and not set(pointed) & skip
    assert not any("_apply" in vars(m) for m in private.modules())
    pointed.clear()
    asked = []

    def may_point():  # hook patches in the weights until the first move is over
        asked.append(1)
        return len(asked) > 1

    with comfy_private.resident_weights_unload_onto_origins(private, named, "cpu", skip, may_point):
        for _, module in named:
            module._apply(keep, recurse=False)
    first = {id(t) for t in named[0][1].parameters(recurse=False)}
    assert first and set(pointed) == expected - first
    pointed.clear()  # an object patch's tensor is left alone
    name, module = next((n, m) for n, m in named if m.weight.dtype == torch.float32)
    with comfy_private.resident_weights_unload_onto_origins(
        private, named, "cpu", skip, skip_names={f"{name}.weight"}
    ):
        for _, each in named:
            each._apply(keep, recurse=False)
    assert id(module.weight) not in pointed and set(pointed) == expected - {id(module.weight)}


def test_an_object_patchs_module_keeps_its_own_tensors_through_the_unload(comfy, monkeypatch):
    """Core puts object patches back only after the unload's move: a module an object patch
    put under a name of the private model (a shifted sampling schedule's, whose ``sigmas``
    are of the loader's dtype and shape) is not the private model's own, so the watch leaves
    it alone and it keeps its own values, on the GPU too."""
    import copy

    calls = unload_watch_calls(monkeypatch)
    patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
    swapped = node(patcher, blocks_to_swap=2)
    shifted = copy.deepcopy(patcher.model.model_sampling)
    shifted.set_parameters(shift=13.0)
    expected = shifted.sigmas.clone()
    assert not torch.equal(expected, patcher.model.model_sampling.sigmas)
    swapped.add_object_patch("model_sampling", shifted)
    comfy.model_management.load_models_gpu([swapped])
    assert swapped.model.model_sampling is shifted
    comfy.model_management.unload_all_models()
    watched = [module for module, _, _ in calls]
    assert watched and shifted not in watched  # the private model's own modules were
    assert swapped.model.model_sampling is not shifted  # core put the original back
    assert torch.equal(shifted.sigmas.cpu(), expected)


def test_a_load_that_unloads_first_moves_weights_onto_the_loaders_memory(comfy, monkeypatch):
    """New patches make core's load unload the model first (``unpatch_model`` inside
    ``partially_load``), under the load's page-drop watch: the unload's watch goes over it
    and hands each move on to it, and both are gone afterwards."""
    from comfyui_wan_blockswap.callbacks import comfy_private

    monkeypatch.setattr(comfy_private, "file_page_dropper", lambda private: lambda: None)
    calls = unload_watch_calls(monkeypatch)
    loads = []
    moving = comfy_private._MovingApply.__call__

    def spy_moving(self, *args, **kwargs):
        loads.append((self.owner(), len(calls)))  # the unload's moves so far
        return moving(self, *args, **kwargs)

    monkeypatch.setattr(comfy_private._MovingApply, "__call__", spy_moving)
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(5)
    swapped = node(lora_like(patcher, KEYS[2:]), blocks_to_swap=2)
    first = run(comfy, swapped, inputs)
    calls.clear(), loads.clear()
    swapped.add_patches({KEYS[2]: ("diff", (torch.zeros(128, 128),))}, 1.0)  # new patches
    assert torch.equal(run(comfy, swapped, inputs), first)  # a zero patch
    # the load watches the diffusion model's modules with parameters; the unload those with
    # buffers too, and the rest of the model
    assert {covered for _, covered, _ in calls} == {comfy_private._MovingApply, type(None)}
    # once the unload is over, the load's own watch moves the modules again
    after = {module for module, unloaded in loads if unloaded == len(calls)}
    covered = {module for module, covered, _ in calls if covered is comfy_private._MovingApply}
    assert covered and covered <= after
    assert not any("_apply" in vars(m) for m in swapped.model.modules())


def test_a_partial_unload_moves_resident_weights_onto_the_loaders_memory(comfy, monkeypatch):
    """Core's partial unload (room for another model) moves the private model's resident
    modules through the watch, but not while hook patches are in the weights; on a GPU the
    moved weights are the loader's memory again, and the next load computes as before."""
    calls = unload_watch_calls(monkeypatch)
    from comfyui_wan_blockswap.callbacks import comfy_adapter

    asked, pinned = [], []  # v0.33's partial unload page-locks what it moved
    if hasattr(comfy.model_patcher.ModelPatcher, "pin_weight_to_device"):
        monkeypatch.setattr(
            comfy.model_patcher.ModelPatcher, "pin_weight_to_device", lambda p, k: pinned.append(k)
        )
        pin_unless_shared = comfy_adapter._pin_unless_shared
        monkeypatch.setattr(
            comfy_adapter,
            "_pin_unless_shared",
            lambda p, k: asked.append(k) or pin_unless_shared(p, k),
        )
    tiny = SwappedTiny(comfy)
    swapped = tiny.swapped
    for hooked in (True, False):
        comfy.model_management.load_models_gpu([swapped])
        calls.clear()
        if hooked:  # as core's hook patching leaves it
            swapped.hook_backup["diffusion_model.head.head.weight"] = (None, None)
        try:
            swapped.partially_unload(swapped.offload_device, 1e32)
        finally:
            swapped.hook_backup.clear()
        watched = [module for module, _, _ in calls]
        assert watched and set(watched) <= tiny.resident
        assert {may_point for _, _, may_point in calls} == {not hooked}
        assert not any("_apply" in vars(m) for m in swapped.model.modules())
        if not hooked:
            owner = swapped.model.get_submodule
            moved = {n for n in tiny.shared if owner(n.rsplit(".", 1)[0]) in watched}
            assert moved and tiny.shares(moved)
            # never the loader's memory page-locked in our patcher's name
            assert bool(moved & set(asked)) == hasattr(swapped, "pin_weight_to_device")
            assert not moved & set(pinned)
        assert torch.equal(run(comfy, swapped, tiny.inputs), tiny.plain)
        comfy.model_management.unload_all_models()


def test_the_node_logs_which_patcher_it_was_given(comfy, caplog):
    import logging

    patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
    with caplog.at_level(logging.INFO, logger="wan_blockswap"):
        node(patcher, **{**WIDGETS, "blocks_to_swap": 1})
    dynamic = getattr(patcher, "is_dynamic", lambda: False)()  # core 0.3 has no such method
    kind = "dynamic VRAM" if dynamic else "static"
    assert f"({kind} patcher)" in caplog.text


def test_a_model_loaded_for_dynamic_vram_computes_in_its_model_dtype(comfy):
    """Core's dynamic-VRAM loader keeps the file's dtype (bf16 here) and records the dtype the
    model computes in (``<name>_comfy_model_dtype``; fp16 on most GPUs), casting as it loads.
    The private model loads statically, so its ops cast at each use instead: outputs equal
    the model built in its compute dtype from the same (rounded) weights."""
    mm = comfy.model_management
    if not hasattr(mm, "archive_model_dtypes"):
        pytest.skip("this core has no dynamic-VRAM loading")
    reference, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    with torch.no_grad():  # the compute-dtype model, from weights rounded to the file dtype
        for tensor in reference.model.diffusion_model.parameters():
            tensor.copy_(tensor.to(torch.bfloat16))
    inputs = make_inputs(14)
    expected = run(comfy, reference, inputs)
    mm.unload_all_models()
    upstream, _ = tiny_models.comfy_load_tiny("wan_t2v")
    model = upstream.model.diffusion_model
    mm.archive_model_dtypes(model)  # what the loader records: fp32 to compute in
    with torch.no_grad():  # what it keeps: the file's bf16
        for module in model.modules():
            for name, tensor in list(module._parameters.items()):
                if tensor is not None:
                    bf16 = tensor.to(torch.bfloat16)
                    module._parameters[name] = torch.nn.Parameter(bf16, requires_grad=False)
    swapped = node(upstream, blocks_to_swap=2)
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert next(model.parameters()).dtype == torch.bfloat16  # the loader's model: as it was


def _computing_in_fp16(patcher):
    """``patcher``'s model made to compute in fp16 on the CPU, as core's static loading
    makes a Wan model on a GPU (its weights cast to fp16 at load): fp16 from bf16 values."""
    model = patcher.model
    with torch.no_grad():
        for name, tensor in list(model.diffusion_model.named_parameters()):
            # (Wan builds its patch embedding in fp32 whatever the model dtype)
            dtype = torch.float32 if name.startswith("patch_embedding.") else torch.float16
            tensor.data = tensor.data.to(torch.bfloat16).to(dtype)
    model.diffusion_model.dtype = torch.float16
    model.manual_cast_dtype = None
    return patcher


def _loaded_for_dynamic_vram(comfy):
    """A tiny Wan as core's dynamic-VRAM loader leaves it on a GPU: fp16 recorded as the
    dtype to compute in (``<name>_comfy_model_dtype``), the file's bf16 kept."""
    upstream, _ = tiny_models.comfy_load_tiny("wan_t2v")
    _computing_in_fp16(upstream)
    model = upstream.model.diffusion_model
    comfy.model_management.archive_model_dtypes(model)  # fp16 to compute in
    with torch.no_grad():  # the file's bf16 kept
        for module in model.modules():
            for name, tensor in list(module._parameters.items()):
                if tensor is not None:
                    bf16 = tensor.to(torch.bfloat16)
                    module._parameters[name] = torch.nn.Parameter(bf16, requires_grad=False)
    return upstream


def test_a_hooked_weight_set_in_the_model_dtype_shares_the_loaders_memory_again(comfy):
    """[Note: patched weights in the model dtype] Core's hook recipe asks ``set_weight`` for
    an in-place update; ours puts an fp16 tensor in instead (bf16 cannot hold the result).
    Once core has copied the original values back and unloaded, the weight points at the
    loader's memory again, not at an fp16 copy of it."""
    from comfyui_wan_blockswap.callbacks.comfy_private import existing_private, rebind_unloaded

    mm = comfy.model_management
    if not hasattr(mm, "archive_model_dtypes"):
        pytest.skip("this core has no dynamic-VRAM loading")
    upstream = _loaded_for_dynamic_vram(comfy)
    private = node(upstream, blocks_to_swap=2).model
    assert existing_private(upstream.model) is private
    key, module = next(
        (name, m)
        for name, m in private.named_modules()
        if hasattr(m, "set_weight")
        and getattr(m, "weight_comfy_model_dtype", None) == torch.float16
        and m.weight.numel() > 64  # resident, not a placeholder
    )
    origin = module.weight
    backup = origin.to(copy=True)  # core's hook backup
    module.set_weight(origin.float() + 1, inplace_update=True, seed=0)
    assert module.weight.dtype == torch.float16 and module.weight is not origin
    comfy.utils.copy_to_param(private, key + ".weight", backup)  # core's unpatch_hooks
    assert rebind_unloaded(private, set()) >= module.weight.numel() * 2
    assert module.weight.dtype == torch.bfloat16
    assert module.weight.data_ptr() == origin.data_ptr()
    assert all(
        p.dtype == torch.bfloat16 for p in upstream.model.diffusion_model.blocks.parameters()
    )


@pytest.mark.parametrize("compression", ["off", "on"])
def test_a_lora_on_a_model_loaded_for_dynamic_vram_equals_core_static(comfy, compression):
    """[Note: patched weights in the model dtype] Dynamic VRAM keeps a bf16 file's weights
    and computes Wan in fp16; core's static loading casts them to fp16 and patches a LoRA
    onto that. Through the node a LoRA on resident and swapped layers gives that output bit
    for bit, with and without transfer compression: swapped layers stay bf16 in host memory
    (the codec packs bf16) and a patched one is rewritten in fp16 in its slot."""
    mm = comfy.model_management
    if not hasattr(mm, "archive_model_dtypes"):
        pytest.skip("this core has no dynamic-VRAM loading")
    reference, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    _computing_in_fp16(reference)
    # LoRA-like patches on a layer of every block: blocks_to_swap=2 swaps some, keeps others
    keys = [k for k in reference.model.state_dict() if k.endswith("self_attn.q.weight")]
    assert len(keys) >= 4
    inputs = make_inputs(14)
    plain = run(comfy, reference, inputs)
    expected = run(comfy, lora_like(reference, keys), inputs)
    assert not torch.equal(plain, expected)  # the patches matter
    mm.unload_all_models()
    upstream = _loaded_for_dynamic_vram(comfy)
    model = upstream.model.diffusion_model
    swapped = node(lora_like(upstream, keys), blocks_to_swap=2, transfer_compression=compression)
    swap = swap_of(swapped)
    assert {t.dtype for u in swap.units for t in u.host_views if t.dim() == 2} == {torch.bfloat16}
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert torch.equal(run(comfy, node(upstream, blocks_to_swap=2), inputs), plain)
    assert next(model.parameters()).dtype == torch.bfloat16  # the loader's model: as it was


def test_packing_drops_the_mapped_file_pages_it_read(comfy):
    """Dynamic VRAM loads a file's weights mapped (``_comfy_tensor_mmap_refs``); packing reads
    them through the mapping, so after each unit the swap has the mapping's pages dropped:
    RAM holds our pinned copy, not that and the file's pages too."""

    class Mapping:
        bounces = 0

        def bounce(self):
            Mapping.bounces += 1
            return True

    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    mapping = Mapping()
    for tensor in patcher.model.diffusion_model.parameters():
        tensor.untyped_storage()._comfy_tensor_mmap_refs = (mapping, None)
    swapped = node(patcher, blocks_to_swap=3)
    assert Mapping.bounces >= len(swap_of(swapped).units) == 3


def test_dropping_compression_drops_the_mapped_file_pages_its_raw_copy_read(comfy, monkeypatch):
    """``transfer_compression="auto"`` switching to raw transfers makes a pinned raw copy of
    each unit from the weights kept in place, a mapped file's under dynamic VRAM: after each
    batch of units (HOST_THREADS, copied at once) the mapping's pages are dropped, so RAM
    holds the pinned copies and not the file's pages beside them (H100, 81 frames: 11.3 GiB
    RSS against core's 7.4 before)."""
    from comfyui_wan_blockswap.wan_blockswap import compressed_transfer, stored_unit

    monkeypatch.setattr(stored_unit, "HOST_THREADS", 2)
    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(compressed_transfer, "MIN_PACKED_ELEMENTS", 256)

    class Mapping:
        bounces = 0

        def bounce(self):
            Mapping.bounces += 1
            return True

    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v", dtype=torch.bfloat16)
    inputs = make_inputs(3)
    plain = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    mapping = Mapping()
    for tensor in patcher.model.diffusion_model.parameters():
        tensor.untyped_storage()._comfy_tensor_mmap_refs = (mapping, None)
    swapped = node(patcher, blocks_to_swap=3, transfer_compression="auto")
    swap = swap_of(swapped)
    assert all(u.transfer is not None for u in swap.units)
    before = Mapping.bounces
    swap.drop_compression()
    assert not swap.compressed
    assert Mapping.bounces - before == 2 and len(swap.units) == 3  # batches of 2 and 1
    assert torch.equal(run(comfy, swapped, inputs), plain)


def test_pages_drop_as_modules_move_and_the_watch_ends_with_the_block(comfy, monkeypatch):
    """[Note: file pages while core loads]: each DROP_PAGES_EVERY bytes of parameters that
    change device drop the mapped file's pages; moves that change nothing count nothing, and
    the modules are as they were after the block, an error inside it included, and a copy
    made inside it too."""
    import copy

    from comfyui_wan_blockswap.callbacks import comfy_private

    drops = []
    monkeypatch.setattr(comfy_private, "file_page_dropper", lambda private: lambda: drops.append(1))
    monkeypatch.setattr(comfy_private, "DROP_PAGES_EVERY", 3 * 64 * 4)  # three 64-float layers
    modules = [torch.nn.Linear(8, 8, bias=False) for _ in range(7)]
    spare = torch.nn.Linear(8, 8)
    with comfy_private.file_pages_dropped_as_modules_move(object(), [*modules, spare]):
        assert all("_apply" in vars(m) for m in modules)
        for module in modules:
            module.to("meta")
        assert len(drops) == 2  # after the 3rd and the 6th
        modules[0].to("meta")  # already there: nothing moved
        assert len(drops) == 2
        copied = copy.deepcopy(spare)
        copied.to("meta")  # the copy moves itself, not the original
        assert copied.weight.is_meta and spare.weight.device.type == "cpu"
    assert not any("_apply" in vars(m) for m in [*modules, spare, copied])
    with pytest.raises(RuntimeError):
        with comfy_private.file_pages_dropped_as_modules_move(object(), modules):
            raise RuntimeError("core's load failed")
    assert not any("_apply" in vars(m) for m in modules)
    monkeypatch.setattr(comfy_private, "file_page_dropper", lambda private: None)
    with comfy_private.file_pages_dropped_as_modules_move(object(), modules):
        assert not any("_apply" in vars(m) for m in modules)  # nothing mapped: no watch


def test_core_loads_the_swapped_model_through_the_watch(comfy, monkeypatch):
    """Core's load of the private model moves every resident module that has weights of its
    own through the watch, and no swapped one, and counts the weights it patches (a LoRA's)
    as read ([Note: file pages while core loads]); afterwards nothing of it is left."""
    from comfyui_wan_blockswap.callbacks import comfy_private

    monkeypatch.setattr(comfy_private, "file_page_dropper", lambda private: lambda: None)
    moved, counted = [], []
    apply, add = comfy_private._MovingApply.__call__, comfy_private._Watch.add

    def spy_apply(self, *args, **kwargs):
        moved.append(self.owner())
        return apply(self, *args, **kwargs)

    def spy_add(self, nbytes):
        counted.append(nbytes)
        return add(self, nbytes)

    monkeypatch.setattr(comfy_private._MovingApply, "__call__", spy_apply)
    monkeypatch.setattr(comfy_private._Watch, "add", spy_add)
    patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
    swapped = node(lora_like(patcher, KEYS), blocks_to_swap=3)
    comfy.model_management.load_models_gpu([swapped])
    swap = swap_of(swapped)
    model = swapped.model.diffusion_model
    with_weights = {m for m in model.modules() if next(m.parameters(False), None) is not None}
    assert swap.swapped_modules & with_weights  # some had weights of their own
    assert set(moved) == with_weights - swap.swapped_modules
    # the patched weights that stay resident: text_embedding.0 (blocks 1 and 3 are swapped)
    resident_patched = swapped.model.diffusion_model.text_embedding[0].weight
    assert resident_patched.numel() * resident_patched.element_size() in counted
    if torch.cuda.is_available():  # every resident weight read once: moved, or patched
        on_gpu = [p for m in set(moved) for p in m.parameters(recurse=False) if p.is_cuda]
        assert sum(counted) == sum(p.numel() * p.element_size() for p in on_gpu) > 0
    assert not any("_apply" in vars(m) for m in model.modules())
    assert "patch_weight_to_device" not in vars(swapped)
