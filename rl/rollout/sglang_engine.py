"""The SGLang rollout engine (`rollout.engine = "sglang"`): one SGLang server per engine, launched and driven
by this class (a Ray actor on the engine's GPUs) through the server's HTTP API, as slime does.

`generate` posts one `/generate` request per sample (token ids in, `return_logprob`), concurrently up to
`sglang_server_concurrency`; weights arrive by `/update_weights_from_tensor` (the tensors put on this GPU
and handed to the server by CUDA IPC, SGLang's own serializer); `/abort_request`, `/release_memory_occupation`,
`/resume_memory_occupation` and `/health_generate` back the rest of `rl/rollout/engine.py`'s interface.
SGLang itself is imported only here, and only for the weight serializer.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

from rl.ports import free_port
from rl.rollout.engine import Generation, SamplingParams, in_order

if TYPE_CHECKING:
    from torch import Tensor

    from rl.config import SglangConfig

log = logging.getLogger(__name__)
START_TIMEOUT_S = 900.0
"""A large model's first start (weights read, CUDA graphs captured) takes minutes."""


def server_args(o: SglangConfig, model_path: str, *, host: str, port: int, colocate: bool) -> list[str]:
    """`sglang.launch_server` arguments: the model, this engine's tensor-parallel size and every `sglang_*`
    option (slime's forwarding), `sglang_server_args` last so that they win."""
    args: dict[str, Any] = {
        "model-path": model_path, "host": host, "port": port, "tp-size": o.rollout_num_gpus_per_engine,
        "log-level": o.sglang_log_level, "max-running-requests": o.sglang_server_concurrency,
        "skip-tokenizer-init": True,  # token ids in and out: the driver owns tokenization
        "mem-fraction-static": o.sglang_mem_fraction_static,
        "context-length": o.sglang_context_length,
        "cuda-graph-bs": o.sglang_cuda_graph_bs,
        "disable-cuda-graph": o.sglang_disable_cuda_graph,
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


def generate_payload(prompt: list[int], params: SamplingParams, seed: int) -> dict[str, Any]:
    return {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                            "top_p": params.top_p, "top_k": params.top_k,
                            "stop_token_ids": list(params.stop_token_ids), "sampling_seed": seed,
                            "skip_special_tokens": False, "no_stop_trim": True},
        "return_logprob": True,
    }


def generation_of(response: Mapping[str, Any], version: int) -> Generation:
    """A `/generate` answer as a Generation: tokens and their log-probs from `output_token_logprobs`
    ([log-prob, token id, text] per token), the finish reason's type."""
    meta = response["meta_info"]
    pairs = meta.get("output_token_logprobs") or []
    reason = (meta.get("finish_reason") or {}).get("type", "length")
    return Generation(output_ids=[int(p[1]) for p in pairs], log_probs=[float(p[0]) for p in pairs],
                      finish_reason=reason if reason in ("stop", "length", "abort") else "length",
                      weight_version=version)


class SglangEngine:
    def __init__(self, model_path: str, *, options: SglangConfig, colocate: bool = False,
                 threads: int | None = None, device: str | None = None):
        import requests

        self.options, self.version = options, 0
        host = _node_address()
        port = free_port()
        self.url = f"http://{host}:{port}"
        self.http = requests.Session()
        self.pool = ThreadPoolExecutor(max_workers=options.sglang_server_concurrency)
        self.process = subprocess.Popen([sys.executable, "-m", "sglang.launch_server",
                                         *server_args(options, model_path, host=host, port=port, colocate=colocate)])
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.health():
            if self.process.poll() is not None:
                raise RuntimeError(f"the SGLang server for {model_path} exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise TimeoutError(f"the SGLang server at {self.url} did not answer within {START_TIMEOUT_S:.0f}s")
            time.sleep(2)

    def _post(self, path: str, body: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        response = self.http.post(self.url + path, json=body or {}, timeout=timeout)
        response.raise_for_status()
        return response.json() if response.content else None

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Generation]:
        return in_order(len(prompts), self.generate_stream(prompts, params, seeds))

    def generate_stream(self, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> Iterator[list[tuple[int, Generation]]]:
        version = self.version
        futures = {self.pool.submit(self._post, "/generate", generate_payload(p, params, s)): i
                   for i, (p, s) in enumerate(zip(prompts, seeds))}
        for future in as_completed(futures):
            yield [(futures[future], generation_of(future.result(), version))]

    def abort(self) -> None:
        self._post("/abort_request", {"rid": "", "abort_all": True})

    def update_weights(self, named_tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], version: int) -> None:
        import torch
        from sglang.srt.utils import MultiprocessingSerializer

        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        on_gpu = [(name, t.to("cuda", non_blocking=True)) for name, t in items]
        torch.cuda.synchronize()
        payload = MultiprocessingSerializer.serialize(on_gpu, output_str=True)
        self._post("/update_weights_from_tensor", {
            "serialized_named_tensors": [payload] * self.options.rollout_num_gpus_per_engine, "flush_cache": True})
        self.version = version

    def health(self) -> bool:
        import requests

        try:
            return self.http.get(self.url + "/health_generate", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    def release_memory(self) -> None:
        self._post("/release_memory_occupation")

    def resume_memory(self) -> None:
        self._post("/resume_memory_occupation")

    def __del__(self) -> None:
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            self.process.kill()


def _node_address() -> str:
    """This node's address as Ray knows it (the driver reaches the server there), else loopback."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: a local test
        return "127.0.0.1"
