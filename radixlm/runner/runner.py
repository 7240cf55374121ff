"""The model runner: builds the flat forward batch from scheduled sequences and runs the model."""

from __future__ import annotations

import torch

from radixlm.cache import KVPool
from radixlm.core.forward import ExtendSeq, ForwardBatch
from radixlm.core.plan import ScheduledSeq, is_short_row
from radixlm.kernels import cpu as cpu_kernels
from radixlm.models.config import ModelConfig
from radixlm.models.llama import LlamaForCausalLM

# Share of the memory left after the weights that the KV pool takes when no size is given.
_CPU_KV_SHARE = 0.15
_GPU_KV_SHARE = 0.80


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
    config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> LlamaForCausalLM:
    """Create the model without a random init, then copy the checkpoint in."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    model.rope.__init__(  # type: ignore[misc]  # buffers are lost on meta; recompute them
        config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
    )
    model.rope.to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(weights)
    return model.eval()


def default_num_slots(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> int:
    """Size the pool from the memory left on the device."""
    per_slot = KVPool.bytes_per_slot(config.num_layers, config.num_kv_heads, config.head_dim, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * _GPU_KV_SHARE
    else:
        budget = _available_ram() * _CPU_KV_SHARE
    return max(int(budget // per_slot), 256)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class ModelRunner:
    """Owns the model and the KV pool; one call runs one forward over a mixed batch."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        num_slots: int,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self.model = build_model(config, weights, device, dtype)
        self.pool = KVPool(
            num_slots,
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
            kv_dtype or dtype,
            device,
        )
        # Short rows attend in the compiled CPU kernel where it covers these dtypes (it is built
        # here, once per machine, before any request waits on it), else in the torch path.
        self.row_kernel = device.type == "cpu" and cpu_kernels.row_attention_supported(
            torch.empty(0, dtype=dtype), self.pool.k[0]
        )

    @torch.inference_mode()
    def forward(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """Logits (float32) for every sequence's rows [logit_from, end), in the order given.

        The flat batch puts short rows (`is_short_row`) last; a caller that already orders them
        so (the scheduler does) saves a reordering of the logits.
        """
        order = sorted(range(len(seqs)), key=lambda i: is_short_row(seqs[i]))
        logits = self.model(self.build_batch([seqs[i] for i in order]), self.pool.k, self.pool.v)
        if order == sorted(order):
            return logits
        spans: dict[int, tuple[int, int]] = {}
        offset = 0
        for i in order:
            spans[i] = (offset, offset + seqs[i].num_logits)
            offset += seqs[i].num_logits
        back = [j for i in range(len(seqs)) for j in range(*spans[i])]
        return logits.index_select(0, torch.tensor(back, device=logits.device))

    def build_batch(self, seqs: list[ScheduledSeq]) -> ForwardBatch:
        """Flatten scheduled sequences into the tensors the model reads."""
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        out_slots: list[torch.Tensor] = []
        logits_index: list[int] = []
        extends: list[ExtendSeq] = []
        rows: list[ScheduledSeq] = []
        num_extend = 0
        for seq in seqs:
            q_start, q_len = len(ids), len(seq.new_ids)
            ids.extend(seq.new_ids)
            positions.extend(range(seq.start, seq.end))
            out_slots.append(seq.kv_slots[seq.start : seq.end])
            logits_index.extend(range(q_start + seq.logit_from - seq.start, q_start + q_len))
            if is_short_row(seq):
                rows.append(seq)
                continue
            assert not rows, "extends must come before short rows"
            extends.append(ExtendSeq(q_start, q_len, seq.start, seq.kv_slots.to(dev)))
            num_extend += q_len
        row_kv = row_query = row_valid = row_mask = row_spans = None
        if rows:
            row_kv = torch.nn.utils.rnn.pad_sequence([s.kv_slots for s in rows], batch_first=True)
            row_kv = row_kv.to(dev)
            starts = torch.tensor([s.start for s in rows], device=dev)
            lens = torch.tensor([len(s.new_ids) for s in rows], device=dev)
            first = torch.cumsum(lens, 0) - lens
            if self.row_kernel:
                row_spans = torch.stack([first, lens, starts + lens])
            else:
                q = torch.arange(int(lens.max()), device=dev)
                row_valid = q[None, :] < lens[:, None]
                # A padded query repeats its row's last one, so its softmax stays finite.
                last = torch.minimum(q[None, :], lens[:, None] - 1)
                row_query = first[:, None] + last
                visible_to = (starts[:, None] + last)[:, :, None]
                row_mask = torch.arange(row_kv.shape[1], device=dev)[None, None, :] <= visible_to
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            out_slots=torch.cat(out_slots).to(dev),
            extends=extends,
            num_extend_tokens=num_extend,
            row_kv=row_kv,
            row_query=row_query,
            row_valid=row_valid,
            row_mask=row_mask,
            row_spans=row_spans,
            logits_index=torch.tensor(logits_index, dtype=torch.int64, device=dev),
        )
