"""The model runner: chooses the kernel backend, builds the flat forward batch from scheduled
sequences and runs the model."""

from __future__ import annotations

import logging

import torch

from radixlm.cache import KVPool
from radixlm.core.forward import ExtendSeq, ForwardBatch
from radixlm.core.images import ImageFill, image_fills
from radixlm.core.plan import ScheduledSeq, is_short_row
from radixlm.kernels.backend import Backend, choose_backend
from radixlm.models.config import ModelConfig
from radixlm.models.llama import LlamaForCausalLM
from radixlm.models.llava import LlavaForConditionalGeneration

logger = logging.getLogger(__name__)

# Without mem_fraction_static: the KV pool's share of the memory left after the weights.
_DEFAULT_KV_SHARE = {"cpu": 0.15, "cuda": 0.80}
# A pool smaller than this is refused rather than started (it would hold too few requests).
MIN_POOL_SLOTS = 256


def resolve_device(device: str | None) -> torch.device:
    """`None`/"auto" picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" is bfloat16 on GPUs and float32 on the CPU (where fp32 GEMMs are fastest)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def build_model(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    backend: Backend,
) -> LlamaForCausalLM | LlavaForConditionalGeneration:
    """Create the model over `backend` without a random init, then copy the checkpoint in;
    the backend then prepares the linear weights (its GEMM choice)."""
    model_cls = LlavaForConditionalGeneration if config.vision else LlamaForCausalLM
    with torch.device("meta"):
        model = model_cls(config, backend)
    model = model.to_empty(device=device).to(dtype)
    model.rope.__init__(  # type: ignore[misc]  # buffers are lost on meta; recompute them
        config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
    )
    model.rope.to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(weights)
    backend.prepare(model.linear_weights())
    return model.eval()


def default_num_slots(
    config: ModelConfig,
    device: torch.device,
    kv_dtype: torch.dtype,
    weight_bytes: int,
    mem_fraction: float | None = None,
) -> int:
    """Size the pool from the memory available on the device before the weights are placed."""
    per_slot = KVPool.bytes_per_slot(
        config.num_layers, config.num_kv_heads, config.head_dim, kv_dtype
    )
    return pool_slots(per_slot, weight_bytes, available_memory(device), device.type, mem_fraction)


def pool_slots(
    per_slot: int, weight_bytes: int, available: int, device_type: str, mem_fraction: float | None
) -> int:
    """KV slots for a pool that, with `mem_fraction`, takes with the weights that share of
    `available` bytes; without it, a device-dependent share of what the weights leave.
    ValueError when that is under MIN_POOL_SLOTS."""
    gib = 1 << 30
    if mem_fraction is None:
        budget = _DEFAULT_KV_SHARE.get(device_type, 0.8) * (available - weight_bytes)
        hint = "set --mem-fraction-static or --max-total-tokens"
    else:
        budget = mem_fraction * available - weight_bytes
        hint = "raise --mem-fraction-static or set --max-total-tokens"
    slots = int(budget // per_slot)
    if slots < MIN_POOL_SLOTS:
        raise ValueError(
            f"not enough memory for the KV pool: {budget / gib:.2f} GiB left for it "
            f"({available / gib:.2f} GiB available, {weight_bytes / gib:.2f} GiB of weights, "
            f"mem_fraction_static={mem_fraction}) holds {max(slots, 0)} tokens, "
            f"under {MIN_POOL_SLOTS}; {hint}"
        )
    return slots


def available_memory(device: torch.device) -> int:
    """Bytes free on the device: GPU memory, or the RAM the kernel reports as available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class ModelRunner:
    """Owns the kernel backend, the model and the KV pool; one call runs one forward over a
    mixed batch. Without a `backend`, `choose_backend` picks one for the device and dtypes."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        num_slots: int,
        kv_dtype: torch.dtype | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        kv_dtype = kv_dtype or dtype
        if backend is None:
            backend = choose_backend(device, dtype, kv_dtype)
        elif not backend.covers(device, dtype, kv_dtype):
            raise ValueError(
                f"the {backend.name} backend does not cover {dtype} with {kv_dtype} KV"
            )
        self.backend = backend
        logger.info("kernel backend: %s", backend.name)
        self.model = build_model(config, weights, device, dtype, backend)
        self.pool = KVPool(
            num_slots, config.num_layers, config.num_kv_heads, config.head_dim, kv_dtype, device
        )

    @torch.inference_mode()
    def forward(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """Logits (float32) for every sequence's rows [logit_from, end), in the order given.

        The flat batch puts short rows (`is_short_row`) last; a caller that already orders them
        so (the scheduler does) saves a reordering of the logits.
        """
        limit = self.backend.max_row_queries
        order = sorted(range(len(seqs)), key=lambda i: is_short_row(seqs[i], limit))
        batch = build_batch(
            [seqs[i] for i in order],
            self.backend,
            self.device,
            self.config.sliding_window,
            num_slots=self.pool.num_slots,
        )
        logits = self.model(batch, self.pool.k, self.pool.v)
        if order == sorted(order):
            return logits
        spans: dict[int, tuple[int, int]] = {}
        offset = 0
        for i in order:
            spans[i] = (offset, offset + seqs[i].num_logits)
            offset += seqs[i].num_logits
        back = [j for i in range(len(seqs)) for j in range(*spans[i])]
        return logits.index_select(0, torch.tensor(back, device=logits.device))

    def close(self) -> None:
        """Release what the runner holds besides memory (a tensor-parallel runner's ranks)."""


def check_slots(slots: torch.Tensor, num_slots: int) -> None:
    """Raise ValueError unless every slot id is in 0 .. num_slots (a pool's ids; 0 pads)."""
    if slots.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(slots))
    if lo < 0 or hi > num_slots:
        raise ValueError(f"KV slot ids {lo} .. {hi} outside the pool's 0 .. {num_slots}")


def build_batch(
    seqs: list[ScheduledSeq],
    backend: Backend,
    device: torch.device,
    window: int | None = None,
    *,
    num_slots: int | None = None,
) -> ForwardBatch:
    """Flatten scheduled sequences (extends first) into the tensors the model reads; the short
    rows' attention metadata is `backend`'s. `window`: the model's sliding window, if any.
    Each sequence needs one slot per position (ValueError otherwise); with `num_slots` (the
    pool's), every slot a sequence reads or writes must be one of the pool's (1 .. num_slots;
    0 pads): compiled kernels index the pool unchecked."""
    ids: list[int] = []
    positions: list[int] = []
    out_slots: list[torch.Tensor] = []
    logits_index: list[int] = []
    extends: list[ExtendSeq] = []
    images: list[ImageFill] = []
    rows: list[ScheduledSeq] = []
    num_extend = 0
    for seq in seqs:
        if len(seq.kv_slots) != seq.end:  # the kernels would index past its slots
            raise ValueError(
                f"a sequence of {seq.end} positions ({seq.start} cached) has "
                f"{len(seq.kv_slots)} KV slots"
            )
        q_start, q_len = len(ids), len(seq.new_ids)
        ids.extend(seq.new_ids)
        positions.extend(range(seq.start, seq.end))
        out_slots.append(seq.kv_slots[seq.start : seq.end])
        logits_index.extend(range(q_start + seq.logit_from - seq.start, q_start + q_len))
        if seq.images:
            images += image_fills(seq.images, seq.start, seq.end, q_start)
        if is_short_row(seq, backend.max_row_queries):
            rows.append(seq)
            continue
        assert not rows, "extends must come before short rows"
        if num_slots is not None:
            check_slots(seq.kv_slots, num_slots)
        extends.append(ExtendSeq(q_start, q_len, seq.start, seq.kv_slots.to(device)))
        num_extend += q_len
    layout = None
    if rows:
        kv = torch.nn.utils.rnn.pad_sequence([s.kv_slots for s in rows], batch_first=True)
        if num_slots is not None:
            check_slots(kv, num_slots)
        starts = torch.tensor([s.start for s in rows], device=device)
        lens = torch.tensor([len(s.new_ids) for s in rows], device=device)
        layout = backend.row_layout(kv.to(device), starts, lens, window)
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        out_slots=torch.cat(out_slots).to(device),
        extends=extends,
        num_extend_tokens=num_extend,
        rows=layout,
        logits_index=torch.tensor(logits_index, dtype=torch.int64, device=device),
        window=window,
        images=images,
        extend_layout=backend.extend_layout(extends, window),
    )
