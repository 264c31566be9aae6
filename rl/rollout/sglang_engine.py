"""The SGLang rollout engine (`rollout.engine = "sglang"`): one SGLang server per engine, launched and driven
by this class (a Ray actor on the engine's GPUs) through the server's HTTP API, as slime does. The server
has ports no other engine on its node is given, and never outlives the actor, however the actor ends.

`generate` posts one `/generate` request per sample (token ids in, `return_logprob`), concurrently up to
`sglang_server_concurrency`. Weights arrive in a weight-update session (`/begin_weight_update` …
`/end_weight_update`, required by SGLang 0.5.23): buckets of at most `rollout.update_weight_buffer_size`
bytes, each one `/update_weights_from_tensor` request carrying one payload per tensor-parallel rank (the
bucket flattened on that rank's GPU and handed over by CUDA IPC, SGLang's `flattened_bucket` format), or,
for a decoupled engine, the trainer's broadcast of each bucket (`/init_weights_update_group` once, then one
`/update_weights_from_distributed` per bucket, in one session the trainer opens and closes: `rl/weight_sync.py`).
`/abort_request`, `/flush_cache`, `/release_memory_occupation`, `/resume_memory_occupation` and
`/health_generate` back the rest of `rl/rollout/engine.py`'s interface. SGLang itself is imported only here,
and only to serialize weights. Every request and the launch command line are checked against SGLang's own
code (tests/sglang_contract.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

from rl.ports import server_ports
from rl.rollout.engine import Generation, SamplingParams, in_order
from rl.weight_sync import UPDATE_GROUP, buckets

if TYPE_CHECKING:
    from torch import Tensor

    from rl.config import SglangConfig
    from rl.weight_sync import BucketMeta

log = logging.getLogger(__name__)
START_TIMEOUT_S = 900.0
"""A large model's first start (weights read, CUDA graphs captured) takes minutes."""
IDLE_TIMEOUT_S = 60.0
"""How long a release waits for the server to finish what it has (aborted requests end within a few steps)."""
PR_SET_PDEATHSIG = 1
"""prctl's option that has the kernel signal a process when its parent dies (<linux/prctl.h>)."""


def server_args(o: SglangConfig, model_path: str, *, host: str, port: int, nccl_port: int,
                colocate: bool) -> list[str]:
    """`sglang.launch_server` arguments: the model, the server's ports, this engine's tensor-parallel size and
    every `sglang_*` option (slime's forwarding), `sglang_server_args` last so that they win."""
    args: dict[str, Any] = {
        "model-path": model_path, "host": host, "port": port,
        # its ranks' rendezvous, chosen here: left to SGLang, each server draws one at random as it starts, and
        # servers starting together on one node may draw the same
        "nccl-port": nccl_port,
        "tp-size": o.rollout_num_gpus_per_engine,
        "log-level": o.sglang_log_level, "max-running-requests": o.sglang_server_concurrency,
        "skip-tokenizer-init": True,  # token ids in and out: the driver owns tokenization
        "mem-fraction-static": o.sglang_mem_fraction_static,
        "context-length": o.sglang_context_length,
        # 0.5.23 split --cuda-graph-bs (decode batch sizes) into a decode and a prefill list
        "cuda-graph-bs-decode": o.sglang_cuda_graph_bs,
        "disable-decode-cuda-graph": o.sglang_disable_cuda_graph,
        "disable-prefill-cuda-graph": o.sglang_disable_cuda_graph,
        # without it SGLang ignores each request's sampling_seed
        "enable-deterministic-inference": o.sglang_enable_deterministic_inference,
        "enable-memory-saver": colocate,  # release/resume around training
    }
    args |= {k.replace("_", "-"): v for k, v in o.sglang_server_args.items()}
    out: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        out.append(f"--{key}")
        if isinstance(value, list):
            out += [str(v) for v in value]
        elif value is not True:
            out.append(str(value))
    return out


def server_command(o: SglangConfig, model_path: str, *, host: str, colocate: bool) -> tuple[int, list[str]]:
    """The HTTP port of an engine's server, and the command that launches it with ports no other engine on
    this node is given (`rl.ports.server_ports`): the HTTP port and its ranks' rendezvous. SGLang 0.5.23's
    server chooses no other TCP port unless given options rlhpc does not set (data-parallel attention's
    `--port`+233…, `--grpc-port`): its processes talk over IPC files (`PortArgs.init_new`), its tensor-parallel
    ranks' message queue binds a random port of 49152-65535 (zmq), and gloo's and NCCL's listeners take what the
    kernel assigns from its ephemeral range: none below the ephemeral range, where leased ports lie."""
    port, nccl_port = server_ports(2)
    return port, [sys.executable, "-m", "sglang.launch_server",
                  *server_args(o, model_path, host=host, port=port, nccl_port=nccl_port, colocate=colocate)]


def launch(command: list[str], env: Mapping[str, str]) -> subprocess.Popen:
    """Start `command`, a server that must not outlive this process: in a session of its own, so that `stop`
    ends every process it starts, and with SIGKILL as its parent-death signal, so that the kernel kills it
    when this process dies, even of a SIGKILL (an actor killed by Ray) that leaves no code to run. SGLang's
    server sets the same signal in each process it starts (`kill_itself_when_parent_died`): they go with it."""
    # Looked up here: the child of a threaded process should run as little as it can between fork and exec.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def die_with_parent() -> None:
        # The signal comes when the thread that forked ends: Ray's actor threads live as long as the actor.
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # it died before the signal was set
            os._exit(1)

    return subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent)


def stop(process: subprocess.Popen) -> None:
    """Kill a process `launch` started and every process of its session, then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its session's id is its pid
    except ProcessLookupError:  # all gone already
        pass
    process.wait()


def generate_payload(prompt: list[int], params: SamplingParams, seed: int | None) -> dict[str, Any]:
    """A `/generate` body; `seed` None where the server would ignore it (no deterministic inference)."""
    sampling = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "top_k": params.top_k, "stop_token_ids": list(params.stop_token_ids),
                "skip_special_tokens": False, "no_stop_trim": True}
    if seed is not None:
        sampling["sampling_seed"] = seed
    return {"input_ids": prompt, "sampling_params": sampling, "return_logprob": True}


def generation_of(response: Mapping[str, Any], version: int) -> Generation:
    """A `/generate` answer as a Generation: tokens and their log-probs from `output_token_logprobs`
    ([log-prob, token id, text] per token), the finish reason's type."""
    meta = response["meta_info"]
    pairs = meta.get("output_token_logprobs") or []
    reason = (meta.get("finish_reason") or {}).get("type", "length")
    return Generation(output_ids=[int(p[1]) for p in pairs], log_probs=[float(p[0]) for p in pairs],
                      finish_reason=reason if reason in ("stop", "length", "abort") else "length",
                      weight_version=version)


def rank_payloads(bucket: list[tuple[str, Tensor]], devices: list[str]) -> list[str]:
    """One `flattened_bucket` payload per tensor-parallel rank, the bucket's bytes on that rank's device.
    Each rank is sent its own serialization: SGLang's rank r opens entry r alone, and one CUDA IPC handle
    opened by several ranks would be released once per rank (SGLang's `deserialize_own_rank`)."""
    import torch
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    flat = FlattenedTensorBucket(named_tensors=[(name, t.detach()) for name, t in bucket])
    payloads = []
    for device in devices:
        on_device = flat.get_flattened_tensor().to(device, non_blocking=True)
        if on_device.is_cuda:
            torch.cuda.synchronize(on_device.device)
            # The handle names its GPU by UUID, which SGLang's side maps back (its tp_worker applies the same
            # patch), as slime does: a colocated server sees all its engine's GPUs and the trainer its own
            # alone, so one GPU has different indices in the two processes. Only where payloads are on GPUs:
            # the patch rewrites an argument of CUDA tensors' reductions that CPU tensors' lack.
            monkey_patch_torch_reductions()
        payloads.append(MultiprocessingSerializer.serialize(
            {"flattened_tensor": on_device, "metadata": flat.get_metadata()}, output_str=True))
    return payloads


class SglangClient:
    """The HTTP side of an SGLang server at `url` whose tensor-parallel rank r runs on `devices[r]`."""

    def __init__(self, url: str, *, options: SglangConfig, devices: list[str], update_weight_buffer_size: int):
        import requests

        self.url, self.options, self.devices, self.version = url, options, devices, 0
        self.update_weight_buffer_size = update_weight_buffer_size
        self.http = requests.Session()
        self.pool = ThreadPoolExecutor(max_workers=options.sglang_server_concurrency)
        self.released = False
        """True between release_memory and resume_memory: SGLang fails a resume of what it never released."""
        self.in_update_session = False
        """True between a begin_weight_update that SGLang accepted and its end_weight_update."""

    def _post(self, path: str, body: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        response = self.http.post(self.url + path, json=body or {}, timeout=timeout)
        response.raise_for_status()
        return response.json() if response.content else None

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Generation]:
        return in_order(len(prompts), self.generate_stream(prompts, params, seeds))

    def generate_stream(self, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> Iterator[list[tuple[int, Generation]]]:
        version = self.version
        seeded = self.options.sglang_enable_deterministic_inference
        futures = {self.pool.submit(self._post, "/generate", generate_payload(p, params, s if seeded else None)): i
                   for i, (p, s) in enumerate(zip(prompts, seeds))}
        for future in as_completed(futures):
            yield [(futures[future], generation_of(future.result(), version))]

    def abort(self) -> None:
        self._post("/abort_request", {"rid": "", "abort_all": True})

    def update_weights(self, named_tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], version: int) -> None:
        """Every tensor-parallel rank's payloads made here, on `devices`."""
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        self.update_weights_from_payloads((rank_payloads(bucket, self.devices)
                                           for bucket in buckets(items, self.update_weight_buffer_size)), version)

    def update_weights_from_payloads(self, payloads: Iterable[list[str]], version: int) -> None:
        """One `/update_weights_from_tensor` per bucket, given as its payload for each tensor-parallel rank in
        rank order (a colocated engine's are made by the training rank on each GPU), in one session."""
        import torch

        self.begin_weight_update()
        try:
            for bucket_payloads in payloads:
                self._post("/update_weights_from_tensor", {
                    "serialized_named_tensors": bucket_payloads,
                    "load_format": "flattened_bucket", "weight_version": str(version), "flush_cache": False})
                if torch.cuda.is_initialized():
                    # a buffer shared by CUDA IPC is freed once collected after the server lets go of it:
                    # collected bucket by bucket, they do not add up (slime does the same)
                    torch.cuda.ipc_collect()
        finally:
            self.end_weight_update()
        self.version = version

    def begin_weight_update(self) -> None:
        """Open SGLang's weight-update session: 0.5.23 refuses an update outside one, and a second one."""
        self._post("/begin_weight_update")
        self.in_update_session = True

    def end_weight_update(self) -> None:
        """Close the session `begin_weight_update` opened, if it did: a sync that failed anywhere, even in
        some engine's begin, closes every engine's this way (SGLang refuses to end a session never opened).
        The prefix cache the old weights computed is flushed once here, for the whole sync, and for one that
        failed half-way too: each bucket's request leaves it (`flush_cache` false; SGLang's default flushes
        after every bucket)."""
        if self.in_update_session:
            self.in_update_session = False
            try:
                self._flush_cache()
            finally:
                self._post("/end_weight_update")

    def init_weights_update_group(self, master_address: str, master_port: int, rank: int, world_size: int,
                                  backend: str) -> None:
        """Join the weight-update group: this server's tensor-parallel rank r as group rank `rank + r`."""
        self._post("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank,
            "world_size": world_size, "group_name": UPDATE_GROUP, "backend": backend})

    def update_weights_from_distributed(self, meta: BucketMeta, version: int) -> None:
        """The server receives the bucket from the trainer's broadcast itself, within the session the trainer
        opened on every engine for the whole sync (`begin_weight_update`)."""
        self._post("/update_weights_from_distributed", {
            "names": list(meta.names), "dtypes": [str(d).removeprefix("torch.") for d in meta.dtypes],
            "shapes": [list(s) for s in meta.shapes], "group_name": UPDATE_GROUP, "weight_version": str(version),
            "flush_cache": False})
        self.version = version

    def health(self) -> bool:
        import requests

        try:
            return self.http.get(self.url + "/health_generate", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    def _flush_cache(self) -> None:
        """Empty the prefix cache once the server is idle (it waits up to `IDLE_TIMEOUT_S`, else answers 400)."""
        self._post(f"/flush_cache?timeout={IDLE_TIMEOUT_S:g}")

    def release_memory(self) -> None:
        # SGLang's scheduler asserts that a release finds it idle (aborted requests may still be ending):
        # the flush waits for that
        self._flush_cache()
        self._post("/release_memory_occupation")
        self.released = True

    def resume_memory(self) -> None:
        if self.released:
            self._post("/resume_memory_occupation")
            self.released = False


class SglangEngine(SglangClient):
    """An SGLang server launched on this actor's GPUs (rank r on cuda:r), or on `gpus` (the
    CUDA_VISIBLE_DEVICES of a colocated engine's server, `rl.placement.server_gpus`), and the client to it."""

    def __init__(self, model_path: str, *, options: SglangConfig, update_weight_buffer_size: int,
                 colocate: bool = False, threads: int | None = None, device: str | None = None,
                 gpus: str | None = None):
        host = _node_address()
        port, command = server_command(options, model_path, host=host, colocate=colocate)
        super().__init__(f"http://{host}:{port}", options=options, update_weight_buffer_size=update_weight_buffer_size,
                         devices=[f"cuda:{r}" for r in range(options.rollout_num_gpus_per_engine)])
        env = os.environ if gpus is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
        self.process = launch(command, env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.health():
            if self.process.poll() is not None:
                raise RuntimeError(f"the SGLang server for {model_path} exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                stop(self.process)
                raise TimeoutError(f"the SGLang server at {self.url} did not answer within {START_TIMEOUT_S:.0f}s")
            time.sleep(2)

    def __del__(self) -> None:
        if getattr(self, "process", None) is not None:
            stop(self.process)


def _node_address() -> str:
    """This node's address as Ray knows it (the driver reaches the server there), else loopback."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: a local test
        return "127.0.0.1"
