"""SGLang's own code as the judge of what the SGLang engine sends it, on a machine without CUDA.

`python tests/sglang_contract.py FOLDER` runs, in a fresh interpreter, the SGLang client
(`rl.rollout.sglang_engine.SglangClient`) through a whole cycle — generate, abort, release, resume, a
bucketed weight update to two tensor-parallel ranks, a decoupled engine's joining of the weight-update group
and a broadcast bucket in its session — against `Recorder`, a local HTTP server that records
every request, then hands each recorded body to SGLang's code from FOLDER (the pinned release, installed
without its dependencies by `make test`: `pip install --no-deps --target .sglang-contract ...`):

- the launch command line to `sglang.srt.server_args.prepare_server_args`, the parser `sglang.launch_server`
  itself runs, and the visible GPU each tensor-parallel rank then runs on, by SGLang's own formula; two
  engines' command lines (`server_command`) to it too, for the ports each server would bind;
- each request to its route as `sglang/srt/entrypoints/http_server.py` declares it (read from its source
  with `ast`: importing it starts the whole server's import chain): the route takes POST, the query
  parameters sent are its `Query` parameters, and the body goes to the request class the route names in
  `sglang.srt.managers.io_struct`, validated by pydantic as SGLang's FastAPI routes do, its keys compared
  with the class's fields (pydantic drops unknown keys silently, so a misspelt field would pass unnoticed);
  `/generate` bodies also through the route's contract gate (`entrypoints.api_contract`) and
  `SamplingParams(**sampling_params)` with `normalize` and `verify`, as the tokenizer manager does;
- each weight payload to SGLang's `MultiprocessingSerializer.deserialize` (its allow-listing unpickler) and
  `FlattenedTensorBucket`, and the tensors rebuilt compared with those sent;
- each broadcast bucket's names, dtypes and shapes against the tensors sent, the dtypes read back as SGLang's
  receiving side reads them (`getattr(torch, dtype)`: a string pydantic takes may still name no dtype).

It prints one JSON object of verdicts (None where SGLang accepted); tests/test_sglang_engine.py asserts on
them. Negative controls (the `--cuda-graph-bs` that 0.5.23 removed, a misspelt abort field, a query
parameter `/flush_cache` lacks, a dtype written as `torch.float32`) show that the judge can refuse.

What is not SGLang's own, and why (only in this interpreter, never in the test process):
- `triton` is a stub module: `sglang.srt.utils.common` imports it at the top (a ~1 GB wheel) and nothing
  here calls it.
- `sglang.srt.managers.schedule_batch` is a stub module: its import chain (model configs, multimodal
  processors) needs `torchvision`, whose registry wheels are built against CUDA torch and fail to import
  with the CPU build, and compiled kernel packages. `io_struct` takes five names from it, used only as the
  types of multimodal and hidden-state fields that rlhpc never sends. In the stubs every name is
  `typing.Any`: such a field accepts anything, and calling a stubbed name fails loudly.
"""

from __future__ import annotations

import ast
import functools
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs

ROOT = Path(__file__).resolve().parents[1]
STUBBED = ("triton", "sglang.srt.managers.schedule_batch")


class Recorder(ThreadingHTTPServer):
    """An HTTP server on loopback that records `(path, JSON body)` of each POST and answers as SGLang does
    when all goes well; a path in `refuse` is answered 400 with success false."""

    def __init__(self, refuse: tuple[str, ...] = ()):
        self.requests: list[tuple[str, Any]] = []
        self.refuse = refuse
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._answer(200, None)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
        self.server.requests.append((self.path, body))
        if self.path in self.server.refuse:
            self._answer(400, {"success": False, "message": "refused"})
        elif self.path == "/generate":
            self._answer(200, {"meta_info": {"finish_reason": {"type": "length"},
                                             "output_token_logprobs": [[-0.5, 4, None]]}})
        elif self.path == "/abort_request":
            self._answer(200, None)
        else:
            self._answer(200, {"success": True, "message": "Success"})

    def _answer(self, status: int, body: Any) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def import_sglang(folder: Path) -> None:
    """SGLang importable from `folder`, with the two stubs the module docstring gives reasons for."""
    import importlib.abc
    import importlib.machinery
    import types
    import typing

    # Both cache at import whether triton or torchvision exist: imported first, they see neither stub.
    import torch._dynamo  # noqa: F401
    import transformers.utils.import_utils  # noqa: F401

    class AnyModule(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return typing.Any

    class Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
            return importlib.machinery.ModuleSpec(name, self) if name in STUBBED else None

        def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
            return AnyModule(spec.name)

        def exec_module(self, module: types.ModuleType) -> None:
            pass

    sys.path.append(str(folder))
    sys.meta_path.insert(0, Stubs())


def refusal(call: Any) -> str | None:
    """None if `call()` returns, else what SGLang said (argparse's exit included)."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            call()
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


class Route(NamedTuple):
    methods: frozenset[str]
    body: str | None
    """The name of its request class in io_struct; None: the route reads no body."""
    query: frozenset[str]


@functools.cache
def routes(http_server: Path) -> dict[str, Route]:
    """The routes `http_server.py` declares with `@app.<method>(path)` or `@app.api_route(path, methods=…)`."""
    out: dict[str, Route] = {}
    for node in ast.walk(ast.parse(http_server.read_text())):
        if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            continue
        params = node.args.args
        defaults = [None] * (len(params) - len(node.args.defaults)) + node.args.defaults
        query = frozenset(p.arg for p, d in zip(params, defaults)
                          if isinstance(d, ast.Call) and ast.unparse(d.func) == "Query")
        bodies = []
        for p, d in zip(params, defaults):
            annotation = p.annotation
            if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
                annotation = annotation.slice.elts[0]  # type: ignore[attr-defined]
            if d is None and isinstance(annotation, ast.Name) and annotation.id not in ("Request", "Response"):
                bodies.append(annotation.id)
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func).startswith("app.")
                    and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                continue
            kind = ast.unparse(decorator.func).removeprefix("app.")
            methods = ([ast.literal_eval(k.value) for k in decorator.keywords if k.arg == "methods"] or [["GET"]])[0]
            out[decorator.args[0].value] = Route(
                frozenset(methods if kind == "api_route" else [kind.upper()]), bodies[0] if bodies else None, query)
    return out


def body_refusal(target: str, body: Any) -> str | None:
    """What SGLang's route for `target` (a path, maybe with a query) and its request class say of `body`
    (None: accepted, every key a field)."""
    import dataclasses

    import msgspec
    import pydantic
    import sglang
    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.managers import io_struct
    from sglang.srt.sampling.sampling_params import SamplingParams  # a msgspec struct: unknown keys refused

    path, _, query = target.partition("?")
    route = routes(Path(sglang.__file__).parent / "srt" / "entrypoints" / "http_server.py").get(path)
    if route is None or "POST" not in route.methods:
        return f"SGLang has no POST {path}"
    if unknown := sorted(set(parse_qs(query)) - route.query):
        return f"not query parameters of {path}: {unknown}"
    if route.body is None:
        return None if not body else f"{path} reads no body"
    cls = getattr(io_struct, route.body)
    fields = ({f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls)
              else {f.name for f in msgspec.structs.fields(cls)})
    unknown = sorted(set(body) - fields)
    if unknown:
        return f"not fields of {cls.__name__}: {unknown}"
    if error := refusal(lambda: pydantic.TypeAdapter(cls).validate_python(body)):
        return error
    if path == "/generate":
        if error := generate_contract_error(body):
            return error

        def sampling() -> None:
            params = SamplingParams(**body["sampling_params"])
            params.normalize(None)
            params.verify(vocab_size=1 << 20)

        return refusal(sampling)
    return None


def weights_refusal(body: Any, sent: dict[str, Any]) -> str | None:
    """None if each TP rank's payload is its own and SGLang rebuilds from it exactly the tensors sent."""
    import torch
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    payloads = body["serialized_named_tensors"]
    if len(set(payloads)) != len(payloads):
        return "the same payload for several TP ranks"
    for rank, payload in enumerate(payloads):
        data = MultiprocessingSerializer.deserialize(payload)
        bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
        for name, tensor in bucket.reconstruct_tensors():
            if not torch.equal(tensor, sent[name]):
                return f"rank {rank}: {name} differs from what was sent"
    return None


def broadcast_refusal(body: Any, sent: dict[str, Any]) -> str | None:
    """None if an `/update_weights_from_distributed` body describes tensors of `sent` exactly, its dtypes read
    as SGLang's `WeightUpdater.receive_weights_from_distributed` reads them to allocate what it receives
    (that module's imports need a GPU install, so its one line is repeated here)."""
    import torch

    for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"], strict=True):
        received = getattr(torch, dtype, None)
        if not isinstance(received, torch.dtype):
            return f"{name}: SGLang reads no dtype from {dtype!r}"
        if (received, list(shape)) != (sent[name].dtype, list(sent[name].shape)):
            return f"{name}: SGLang would receive {dtype} {shape}, the trainer sends {sent[name].dtype} " \
                   f"{list(sent[name].shape)}"
    return None


def tp_rank_gpus(argv: list[str]) -> list[int]:
    """The visible GPU each tensor-parallel rank of the server launched with `argv` runs on, by SGLang's own
    formula (`weight_cache.protocol.compute_local_gpu_id`, which mirrors the engine's scheduler launch):
    `rl.placement.server_gpus` lists a colocated engine's training GPUs in this order."""
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.weight_cache.protocol import compute_local_gpu_id

    args = prepare_server_args(argv)
    return [compute_local_gpu_id(0, rank, 1, args.tp_size, base_gpu_id=args.base_gpu_id, gpu_id_step=args.gpu_id_step)
            for rank in range(args.tp_size)]


def bound_ports(argv: list[str]) -> list[int | None]:
    """The TCP ports a server launched with `argv` binds, by SGLang's own reading of it: its HTTP port and its
    ranks' rendezvous (`PortArgs.init_new` takes `nccl_port` as given; None: drawn at random as it starts)."""
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(argv)
    return [args.port, args.nccl_port]


def main(folder: Path) -> dict[str, Any]:
    import_sglang(folder)
    from importlib.metadata import version

    import torch
    from sglang.srt.server_args import prepare_server_args

    from rl.config import SglangConfig
    from rl.rollout.engine import SamplingParams
    from rl.rollout.sglang_engine import SglangClient, server_args, server_command
    from rl.weight_sync import BucketMeta

    options = SglangConfig(rollout_num_gpus_per_engine=2, sglang_mem_fraction_static=0.7, sglang_cuda_graph_bs=[1, 2],
                           sglang_disable_cuda_graph=True, sglang_context_length=4096,
                           sglang_server_args={"chunked_prefill_size": 8192})
    argv = server_args(options, "/models/qwen3", host="127.0.0.1", port=30000, nccl_port=30001, colocate=True)
    # two engines launched on one node, as two engines' actors launch them
    commands = [server_command(options, "/models/qwen3", host="127.0.0.1", colocate=False)[1] for _ in range(2)]
    generator = torch.Generator().manual_seed(0)
    sent = {"embed.weight": torch.randn(64, 8, generator=generator).bfloat16(),
            "norm.weight": torch.randn(8, generator=generator),
            "head.weight": torch.randn(64, 8, generator=generator).bfloat16()}
    with Recorder() as server:
        client = SglangClient(server.url, options=options, devices=["cpu", "cpu"], update_weight_buffer_size=2048)
        client.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4, temperature=0.8, top_k=5,
                                                            stop_token_ids=(7,)), seeds=[11, 2**63 - 1])
        client.abort()
        client.release_memory()
        client.resume_memory()
        client.update_weights(sent, version=3)
        # as a decoupled engine: the group joined once, then each sync's buckets within one session
        client.init_weights_update_group("10.0.0.1", 29500, rank=1, world_size=3, backend="nccl")
        client.begin_weight_update()
        client.update_weights_from_distributed(BucketMeta.of(list(sent.items())), version=4)
        client.end_weight_update()
        requests = list(server.requests)
    broadcasts = [body for path, body in requests if path == "/update_weights_from_distributed"]
    return {
        "sglang": version("sglang"),
        "argv": argv,
        "argv_refusal": refusal(lambda: prepare_server_args(argv)),
        "tp_rank_gpus": tp_rank_gpus(argv),
        "launched": [command[1:3] for command in commands],
        "engine_ports": [bound_ports(command[3:]) for command in commands],
        "paths": [path.partition("?")[0] for path, _ in requests],
        "body_refusals": {f"{i} {path}": body_refusal(path, body) for i, (path, body) in enumerate(requests)},
        "weights_refusals": [weights_refusal(body, sent) for path, body in requests
                             if path == "/update_weights_from_tensor"],
        "broadcast_refusals": [broadcast_refusal(body, sent) for body in broadcasts],
        "control_broadcast_refusal": broadcast_refusal({**broadcasts[0], "dtypes": [
            f"torch.{d}" for d in broadcasts[0]["dtypes"]]}, sent),
        "control_argv_refusal": refusal(lambda: prepare_server_args(["--model-path", "m", "--cuda-graph-bs", "1"])),
        "control_body_refusal": body_refusal("/abort_request", {"rid": "", "abort_al": True}),
        "control_query_refusal": body_refusal("/flush_cache?timeout_s=1", {}),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
