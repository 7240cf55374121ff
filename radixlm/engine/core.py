"""The engine core: scheduler, runner, sampler and grammars composed into one step, behind a
message loop (in a thread or a process)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from radixlm.cache import RadixCache, SlotAllocator
from radixlm.cache.disk_tier import DiskTier, open_disk_tier
from radixlm.core.finish import FinishReason
from radixlm.core.messages import (
    AbortRequest,
    CheckInvariant,
    ClearDiskCache,
    ControlCall,
    ControlReply,
    ControlRequest,
    CoreInfo,
    CoreStats,
    DrainCacheEvents,
    FlushCache,
    GenerateRequest,
    GetStats,
    Message,
    TokenOutput,
)
from radixlm.core.plan import SampledReq, StepPlan
from radixlm.core.request import Req
from radixlm.distributed.runner import TensorParallelRunner, tp_pool_slots
from radixlm.engine.args import EngineArgs
from radixlm.engine.cache_events import CacheEventLog
from radixlm.engine.cache_tenancy import CacheTenancy
from radixlm.grammar import GrammarSpec
from radixlm.grammar.manager import GrammarManager
from radixlm.models.default import default_model_path
from radixlm.models.loader import load_model_files, resolve_model_folder
from radixlm.multimodal.processor import image_spec
from radixlm.runner.runner import ModelRunner, default_num_slots, resolve_device, resolve_dtype
from radixlm.sampling import Sampler
from radixlm.sampling.step import sample_step
from radixlm.scheduler.scheduler import Scheduler, SchedulerConfig
from radixlm.speculative.cost import measure_step_cost
from radixlm.speculative.speculator import Speculator
from radixlm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineCore:
    """Loads the model and owns everything the forward pass touches."""

    def __init__(self, args: EngineArgs) -> None:
        t0 = time.perf_counter()
        self.args = args
        self.model_path = args.model_path or default_model_path()
        config, weights = load_model_files(self.model_path)
        self.tokenizer = Tokenizer.load(self.model_path, args.chat_template)
        self.model_config = config
        self.image_spec = image_spec(
            resolve_model_folder(self.model_path, weights=False), config, self.tokenizer
        )
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        kv_dtype = (
            dtype if args.kv_cache_dtype == "auto" else resolve_dtype(args.kv_cache_dtype, device)
        )
        if args.tp_size > 1:
            num_slots = args.max_total_tokens or tp_pool_slots(
                config, args.tp_size, device, kv_dtype, weights, dtype, args.mem_fraction_static
            )
            self.runner: ModelRunner = TensorParallelRunner(
                self.model_path, config, weights, device, dtype, num_slots, kv_dtype, args.tp_size
            )
        else:
            num_slots = args.max_total_tokens or default_num_slots(
                config,
                device,
                kv_dtype,
                weight_bytes=sum(w.numel() for w in weights.values()) * dtype.itemsize,
                mem_fraction=args.mem_fraction_static,
            )
            self.runner = ModelRunner(config, weights, device, dtype, num_slots, kv_dtype)
        del weights
        spec = args.spec_config
        # Timed while every slot is free: the timed steps write K/V into the pool.
        step_cost = None if spec is None else measure_step_cost(self.runner.forward, num_slots)
        self.allocator = SlotAllocator(num_slots)
        self.cache = RadixCache(self.allocator, disable=args.disable_radix_cache)
        self.disk_tier: DiskTier | None = None
        if args.kv_cache_dir and not args.disable_radix_cache:
            self.disk_tier = open_disk_tier(
                args.kv_cache_dir,
                args.kv_disk_size,
                args.kv_disk_policy,
                self.model_path,
                dtype,
                self.cache,
                self.runner.pool,
            )
        self.cache_events = CacheEventLog(self.cache)
        self.tenancy = CacheTenancy(self.cache)
        context_len = min(
            args.context_length or config.max_position_embeddings, config.max_position_embeddings
        )
        default_chunk = 8192 if device.type == "cuda" else 2048
        sched_config = SchedulerConfig(
            context_len=context_len,
            chunked_prefill_size=args.chunked_prefill_size or default_chunk,
            max_running_requests=args.max_running_requests
            or (1024 if device.type == "cuda" else 256),
            schedule_policy=args.schedule_policy,
            max_wait_s=args.max_wait_s,
            request_timeout_s=args.request_timeout,
            target_itl_s=args.target_itl_ms / 1000 or None,
            max_row_queries=self.runner.backend.max_row_queries,
        )
        self.speculator = None
        if spec is not None and step_cost is not None:
            self.speculator = Speculator(spec, self.cache, step_cost)
        self.scheduler = Scheduler(
            self.cache, self.allocator, self.tokenizer, sched_config, self.speculator
        )
        self.sampler = Sampler(device, seed=args.random_seed)
        self.grammar = GrammarManager(
            self.tokenizer, config.vocab_size, jump_forward=not args.disable_jump_forward
        )
        self.load_seconds = time.perf_counter() - t0
        logger.info(
            "loaded %s in %.1fs on %s (%s, %s kernels): %d KV slots, context %d",
            self.model_path,
            self.load_seconds,
            device,
            dtype,
            self.runner.backend.name,
            num_slots,
            context_len,
        )

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[TokenOutput]:
        """Schedule, run the forward, sample, update; returns the step's outputs."""
        self._queue_compiled()
        self.tenancy.pins.expire()
        plan = self.scheduler.schedule()
        if plan:
            t0 = time.perf_counter()
            logits = self.runner.forward(plan.seqs)
            self.scheduler.update(plan, self._sample(plan, logits))
            self.scheduler.observe_step(time.perf_counter() - t0)
        return self.scheduler.take_outputs()

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> list[SampledReq]:
        """The plan's samples; if the batch fails (a grammar or sampling error), each request is
        sampled alone, so that only the requests that fail alone end, with the error."""
        try:
            return sample_step(self.sampler, plan, logits, self.grammar.fill_masks(plan))
        except Exception:
            logger.exception("sampling a batch of %d failed; retrying one by one", len(plan.reqs))
        results: list[SampledReq] = []
        offset = 0
        for r in plan.reqs:
            rows = logits[offset : offset + r.seq.num_logits]
            offset += r.seq.num_logits
            single = StepPlan([r])
            try:
                results += sample_step(self.sampler, single, rows, self.grammar.fill_masks(single))
            except Exception as e:
                logger.exception("sampling request %s failed", r.req.rid)
                results.append(SampledReq(error=f"internal error: {type(e).__name__}: {e}"))
        return results

    def _queue_compiled(self) -> None:
        """Requests whose grammar is ready join the scheduler's queue; failed ones end."""
        if not self.grammar.num_pending:
            return
        idle = not (self.scheduler.waiting or self.scheduler.running)
        ready, failed = self.grammar.poll(self.scheduler.config.context_len, block=idle)
        for req, message in failed:
            self.scheduler.reject(req, FinishReason.abort(message))
        for req in ready:
            self.scheduler.add(req)

    @property
    def has_work(self) -> bool:
        """Whether step() would do anything."""
        return self.scheduler.has_work or bool(self.grammar.num_pending)

    # ---- messages ------------------------------------------------------------------------------

    def add(self, msg: GenerateRequest) -> None:
        """Take a new request: to the grammar compiler if it has a grammar, else to the queue."""
        req = Req.from_message(msg, self.tokenizer.eos_token_ids)
        if req.salt is not None:
            req.public_len = self.tenancy.public.boundary(req.input_ids)
        if self.disk_tier is not None and req.salt is None:
            self.disk_tier.prefetch(req.input_ids)
        if GrammarSpec.from_params(msg.params) is not None and self.scheduler.check(req) is None:
            self.grammar.submit(req)  # queued by _queue_compiled once its grammar is ready
        else:
            self.scheduler.add(req)

    def abort(self, rid: str, message: str = "aborted by the client") -> None:
        """End a request wherever it is, even while its grammar compiles."""
        if self.scheduler.abort(rid, message):
            return
        compiling = self.grammar.discard(rid)
        if compiling is not None:
            self.scheduler.reject(compiling, FinishReason.abort(message))

    def check_invariant(self) -> None:
        """Raise AssertionError unless every KV slot has exactly one owner."""
        self.scheduler.check_invariant()

    def handle(
        self, msg: GenerateRequest | AbortRequest | ControlRequest
    ) -> ControlReply | TokenOutput | None:
        """Apply one incoming message; control calls are answered at once, and a request that
        cannot even be taken in ends at once with an abort naming the error."""
        if isinstance(msg, GenerateRequest):
            try:
                self.add(msg)
            except Exception as e:  # a bug on one request's way in must not end the engine
                logger.exception("cannot take in request %s", msg.rid)
                reason = FinishReason.abort(f"internal error: {type(e).__name__}: {e}")
                return TokenOutput(msg.rid, [], len(msg.input_ids), 0, finish_reason=reason)
        elif isinstance(msg, AbortRequest):
            self.abort(msg.rid, msg.message)
        else:
            try:
                value: object = self.control(msg.call)
            except Exception as e:  # a failed call (a broken invariant) answers with its error
                value = e
            return ControlReply(msg.call_id, value)
        return None

    def control(self, call: ControlCall) -> object:
        """Synchronous calls: cache flush, disk tier clear, statistics, cache events, the slot
        invariant check."""
        self.tenancy.pins.expire()
        if isinstance(call, FlushCache):
            if not (self.scheduler.running or self.scheduler.waiting):
                self.tenancy.pins.clear()  # an admin's flush ends every pin
            return self.scheduler.flush_cache()
        if isinstance(call, ClearDiskCache):
            if self.disk_tier is None:
                return None
            held = self.disk_tier.disk_tokens
            self.cache.clear_tier()
            return held
        if isinstance(call, GetStats):
            return self.stats()
        if isinstance(call, DrainCacheEvents):
            return self.cache_events.drain(call.snapshot)
        if isinstance(call, CheckInvariant):
            self.scheduler.check_invariant()
            return True
        return self.tenancy.control(call)

    def stats(self) -> CoreStats:
        """Numbers for /metrics, /server_info and tests."""
        s, tier = self.scheduler, self.disk_tier
        used = self.allocator.num_slots - self.allocator.num_free - self.cache.evictable_size
        return CoreStats(
            num_running_reqs=len(s.running),
            num_queue_reqs=len(s.waiting),
            num_used_tokens=used,
            token_usage=used / self.allocator.num_slots,
            max_total_num_tokens=self.allocator.num_slots,
            cached_tree_tokens=self.cache.total_size(),
            num_forward_passes=s.num_forward_passes,
            num_retractions=s.num_retractions,
            spec={} if self.speculator is None else self.speculator.stats(),
            cache_hit_tokens_pool=s.admission.hit_tokens_pool,
            cache_hit_tokens_disk=s.admission.hit_tokens_disk,
            disk_cache_tokens=tier.disk_tokens if tier is not None else 0,
            disk_cache_bytes=tier.store.used_bytes if tier is not None else 0,
        )

    def info(self) -> CoreInfo:
        """What the frontend needs to know about this core."""
        return CoreInfo(
            model_path=self.model_path,
            context_len=self.scheduler.config.context_len,
            vocab_size=self.model_config.vocab_size,
            max_total_num_tokens=self.allocator.num_slots,
            chunked_prefill_size=self.scheduler.config.chunked_prefill_size,
            max_running_requests=self.scheduler.config.max_running_requests,
            device=str(self.runner.device),
            dtype=str(self.runner.dtype).removeprefix("torch."),
            kernel_backend=self.runner.backend.name,
            load_seconds=self.load_seconds,
            image=self.image_spec,
            gemm=self.runner.backend.gemm,
        )

    def close(self) -> None:
        """Release what outlives the loop: the disk tier writes what it keeps (in bounded
        time) and frees its directory."""
        if self.disk_tier is not None:
            self.disk_tier.close()
            self.disk_tier = None

    def run(
        self,
        receive: Callable[[bool], list[Message]],
        emit: Callable[[list[Any]], None],
    ) -> None:
        """The loop: take messages (blocking only when idle), step, emit outputs; None stops.
        The runner and the disk tier (close()) are closed when the loop ends, however it ends."""
        with torch.inference_mode(), contextlib.closing(self.runner):
            try:
                self._loop(receive, emit)
            finally:
                self.close()

    def _loop(
        self, receive: Callable[[bool], list[Message]], emit: Callable[[list[Any]], None]
    ) -> None:
        while True:
            replies: list[Any] = []
            for msg in receive(not self.has_work):
                if msg is None:
                    return
                reply = self.handle(msg)
                if reply is not None:
                    replies.append(reply)
            if replies:
                emit(replies)
            if self.has_work:
                outputs = self.step()
                if outputs:
                    emit(outputs)
