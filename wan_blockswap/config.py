"""User-facing options, validated once at construction.

Only checks that need no model live here; ranges that depend on the model (block counts)
are checked by :func:`wan_blockswap.plan.plan_swap`, which knows the block lists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from .donor_allocation import (
    DEFAULT_DONOR,
    EXAMPLE,
    AllocationEntry,
    allocation_for_donor,
    format_allocation,
    normalize_device,
    parse_allocation,
)
from .errors import BlockSwapConfigError
from .layout import MAIN_ROLE, TXT_EMB_ROLE

SwapUnitMode = Literal["auto", "block", "layer"]
SWAP_UNIT_MODES: tuple[str, ...] = ("auto", "block", "layer")
MAX_PREFETCH_BLOCKS = 16
# Tokens per chunk of a block's token-wise parts: Wan-14B's FFN intermediate
# for 8,192 tokens is 216 MiB at 16 bits, against 864 MiB for 81 frames of 832x480 at once,
# and its matrix products stay large enough to run at full rate ([Note: token chunks]).
DEFAULT_CHUNK_TOKENS = 8192
# The option that counts a role's blocks for the user, where it has one of its own
ROLE_OPTIONS = {"vace": "vace_blocks_to_swap"}


@dataclass(frozen=True)
class SwapConfig:
    """How a model's transformer blocks are split between the GPU and pinned host memory.

    At most one of ``blocks_to_swap``, ``resident_blocks`` and ``vram_budget_gb`` may be given;
    with none of them every block is swapped (the smallest VRAM footprint).

    Attributes:
        blocks_to_swap: number of blocks of the main block lists (in execution order, counted
            over all main lists together, e.g. Flux double then single blocks) that live in host
            memory, spread evenly (the last block included). ``None``: decided by the other options.
        vace_blocks_to_swap: VACE blocks to swap; ``0`` means automatic (the same fraction as
            the main blocks). Short for ``role_blocks_to_swap={"vace": n}``.
        role_blocks_to_swap: blocks to swap of each block list role other than ``"main"``
            and ``"txt_emb"`` (``{"vace": 4}``); a role not named, or ``0``, is automatic
            (the same fraction as the main blocks).
        offload_txt_emb: stream the text embedding from host memory too.
        offload_img_emb: stream the image embedding (i2v CLIP projection) from host memory too.
        prefetch_blocks: look-ahead depth; the GPU holds ``prefetch_blocks + 1`` swap slots.
            ``0`` loads each block only when the previous one finished (least VRAM, no overlap).
            In a streamed plan (see ``vram_budget_gb``): layers are prefetched ahead of the one
            in use until they hold this many blocks' worth of streamed bytes, within the
            window.
        non_blocking: asynchronous host-to-device copies. ``False`` makes the host wait for each
            copy (debugging aid; no overlap).
        resident_blocks: explicit indices (over the main block lists) that stay on the GPU;
            every other main block is swapped.
        vram_budget_gb: GiB of VRAM the weights may use: non-block weights kept on the GPU,
            resident blocks and the swap slots. The engine works out how many blocks to swap
            from the real block sizes. Below what any slot plan needs, every large layer
            streams (outside the blocks too), each in GPU memory of its own size, with at most
            the budget's remainder on the GPU at once; a layer larger than that loads alone
            (see ``wan_blockswap.min_vram_budget_gb``).
        swap_unit: ``"block"`` swaps whole blocks; ``"layer"`` swaps each block's large layers
            separately (smaller slots, more copies); ``"auto"`` uses blocks unless the budget
            only fits layer slots.
        transfer_compression: send bf16 weights over the link losslessly packed (1.5 bytes
            per weight instead of 2, decoded on the GPU bit for bit). ``True``: up to a
            quarter off a forward when copies dominate (few tokens: images, short or small
            videos), 1-2.5% slower when compute dominates (long videos), where copies are
            hidden anyway. ``"auto"``: compressed, until the second to fourth forwards all show
            compute hiding the raw copies; then raw from pinned memory (see
            ``compression_switch``).
            Costs 52 MiB of VRAM for staging; while compressed, the swapped weights stay in
            pageable RAM beside the pinned packed copy (about 0.77x). No effect on other
            dtypes.
        chunk_tokens: run each block's token-wise parts (``BlockListLayout.token_wise``:
            Wan's feed-forward network) over at most this many tokens at a time, without
            autograd, so their intermediate (2.7x the hidden size on Wan) never exists for every
            token at once; each such part then swaps as one unit. Outputs equal the whole's
            where the shorter matrix products round alike: measured on the H200, not promised
            (see [Note: token chunks]). ``0``: never, and outputs bit-identical as before.
        debug: log the plan and per-block copy/compute times each forward (adds a host sync
            per forward).
        donor_device: where swapped blocks are stored: ``"cpu"`` (pinned host memory) or
            ``"cuda:N"``, another GPU, whose copies then go peer to peer. Short for
            ``donor_allocation="cuda:N,*"``.
        donor_allocation: how swapped blocks are split over several stores, in DisTorch's
            syntax: ``"cuda:1,8gb;cpu,*"`` (the first 8 GiB of swapped blocks on the second
            GPU, the rest in host memory), percentages of the swapped bytes, ``*`` for the
            rest (see ``donor_allocation``). Each block is stored whole on one device.
    """

    blocks_to_swap: int | None = None
    vace_blocks_to_swap: int = 0
    offload_txt_emb: bool = False
    offload_img_emb: bool = False
    prefetch_blocks: int = 1
    non_blocking: bool = True
    resident_blocks: tuple[int, ...] | None = None
    vram_budget_gb: float | None = None
    swap_unit: SwapUnitMode = "auto"
    transfer_compression: bool | Literal["auto"] = False
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    debug: bool = False
    role_blocks_to_swap: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    donor_device: str = DEFAULT_DONOR
    donor_allocation: str | None = None

    def __post_init__(self) -> None:
        self._check_donors()
        roles = self.role_blocks_to_swap
        if not isinstance(roles, (Mapping, tuple)):
            raise BlockSwapConfigError(
                f"role_blocks_to_swap must map block list roles to counts, got {roles!r}"
            )
        pairs = tuple(sorted(dict(roles).items()))  # a tuple: the config stays hashable
        for role, count in pairs:
            if not isinstance(role, str) or role in (MAIN_ROLE, TXT_EMB_ROLE):
                raise BlockSwapConfigError(
                    f"role_blocks_to_swap takes roles other than {MAIN_ROLE!r} (see "
                    f"blocks_to_swap) and {TXT_EMB_ROLE!r} (see offload_txt_emb), got {role!r}"
                )
            _check_int(f"role_blocks_to_swap[{role!r}]", count, 0, None)
        object.__setattr__(self, "role_blocks_to_swap", pairs)
        _check_optional_int("blocks_to_swap", self.blocks_to_swap)
        _check_int("vace_blocks_to_swap", self.vace_blocks_to_swap, 0, None)
        _check_int("prefetch_blocks", self.prefetch_blocks, 0, MAX_PREFETCH_BLOCKS)
        _check_int("chunk_tokens", self.chunk_tokens, 0, None)
        if not (isinstance(self.transfer_compression, bool) or self.transfer_compression == "auto"):
            raise BlockSwapConfigError(
                f"transfer_compression must be True, False or 'auto', got "
                f"{self.transfer_compression!r}"
            )
        for name in ("offload_txt_emb", "offload_img_emb", "non_blocking", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise BlockSwapConfigError(
                    f"{name} must be True or False, got {getattr(self, name)!r}"
                )
        if self.resident_blocks is not None:
            indices = tuple(self.resident_blocks)
            for index in indices:
                _check_int("resident_blocks entries", index, 0, None)
            if len(set(indices)) != len(indices):
                raise BlockSwapConfigError(f"resident_blocks has duplicates: {indices}")
            object.__setattr__(self, "resident_blocks", tuple(sorted(indices)))
        if self.vram_budget_gb is not None:
            budget = self.vram_budget_gb
            if isinstance(budget, bool) or not isinstance(budget, (int, float)):
                raise BlockSwapConfigError(
                    f"vram_budget_gb must be a number of GiB, got {budget!r}"
                )
            if not math.isfinite(budget) or budget <= 0:
                raise BlockSwapConfigError(
                    f"vram_budget_gb must be a positive number of GiB, got {budget!r}"
                )
        if self.swap_unit not in SWAP_UNIT_MODES:
            raise BlockSwapConfigError(
                f"swap_unit must be one of {SWAP_UNIT_MODES}, got {self.swap_unit!r}"
            )
        for role, option in ROLE_OPTIONS.items():  # the edge: an option names the role
            value, given = getattr(self, option), dict(pairs).get(role, 0)
            if value and given and given != value:
                raise BlockSwapConfigError(
                    f"{option}={value} and role_blocks_to_swap[{role!r}]={given} disagree; "
                    f"give one of them"
                )
        chosen = [
            name
            for name in ("blocks_to_swap", "resident_blocks", "vram_budget_gb")
            if getattr(self, name) is not None
        ]
        if len(chosen) > 1:
            raise BlockSwapConfigError(
                f"give only one of blocks_to_swap, resident_blocks and vram_budget_gb; "
                f"got {', '.join(chosen)}"
            )

    def _check_donors(self) -> None:
        """Validate both donor options and keep the allocation in its canonical spelling."""
        if not isinstance(self.donor_device, str):
            raise BlockSwapConfigError(
                f"donor_device must be 'cpu' or 'cuda:N', got {self.donor_device!r}"
            )
        donor = normalize_device(self.donor_device)
        object.__setattr__(self, "donor_device", donor)
        if self.donor_allocation is None:
            return
        if not isinstance(self.donor_allocation, str):
            raise BlockSwapConfigError(
                f"donor_allocation must be a string such as {EXAMPLE!r}, got "
                f"{self.donor_allocation!r}"
            )
        entries = parse_allocation(self.donor_allocation)
        if donor != DEFAULT_DONOR:
            raise BlockSwapConfigError(
                f"give donor_device={donor!r} or donor_allocation="
                f"{self.donor_allocation!r}, not both (donor_device={donor!r} is short for "
                f"donor_allocation={allocation_for_donor(donor)!r})"
            )
        object.__setattr__(self, "donor_allocation", format_allocation(entries))

    @property
    def storage_entries(self) -> tuple[AllocationEntry, ...]:
        """Where swapped units are stored, parsed (``cpu,*`` by default)."""
        text = self.donor_allocation or allocation_for_donor(self.donor_device)
        return parse_allocation(text)

    @property
    def stores_on_donor_gpus(self) -> bool:
        """Whether any swapped unit may be stored on a GPU rather than in host memory."""
        return any(entry.device != DEFAULT_DONOR for entry in self.storage_entries)

    @property
    def role_counts(self) -> dict[str, int]:
        """Blocks to swap per role other than main and txt_emb (0: automatic), with the
        options that name a role (``vace_blocks_to_swap``) folded in."""
        counts = dict(self.role_blocks_to_swap)
        for role, option in ROLE_OPTIONS.items():
            counts[role] = getattr(self, option) or counts.get(role, 0)
        return counts

    @staticmethod
    def role_option(role: str) -> str:
        """The option a user sets to count ``role``'s blocks."""
        return ROLE_OPTIONS.get(role, f"role_blocks_to_swap[{role!r}]")

    @property
    def num_slots(self) -> int:
        """Fixed GPU swap slots: the block in use plus the look-ahead."""
        return self.prefetch_blocks + 1

    def replace(self, **changes: Any) -> "SwapConfig":
        """A copy with ``changes`` applied, validated like a fresh config."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self) if f.init}
        if unknown:
            raise BlockSwapConfigError(f"unknown SwapConfig options: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, **options: Any) -> "SwapConfig":
        """Build from keyword options (node widgets, CLI flags), rejecting unknown names."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(options) - known
        if unknown:
            raise BlockSwapConfigError(
                f"unknown SwapConfig options: {sorted(unknown)}; known options: {sorted(known)}"
            )
        return cls(**options)


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BlockSwapConfigError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise BlockSwapConfigError(f"{name} must be in {allowed}, got {value}")


def _check_optional_int(name: str, value: Any) -> None:
    if value is not None:
        _check_int(name, value, 0, None)
