"""The SGLang engine: what it sends SGLang 0.5.23 and in which order (against `Recorder`, a local HTTP server
that records requests), and that SGLang's own code accepts all of it (`tests/sglang_contract.py`, run in a
separate interpreter with the pinned SGLang release from `.sglang-contract/`). Launching a real server needs
SGLang's full install and a GPU: that test is `gpu`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement
from sglang_contract import ROOT, Recorder

from rl.config import SglangConfig
from rl.rollout import sglang_engine
from rl.rollout.engine import SamplingParams
from rl.rollout.sglang_engine import SglangClient, buckets, generate_payload, generation_of, server_args
from rl.weight_sync import BucketMeta

CONTRACT = ROOT / ".sglang-contract"


def test_every_sglang_option_reaches_the_server_command_line():
    o = SglangConfig(rollout_num_gpus_per_engine=2, sglang_mem_fraction_static=0.7, sglang_cuda_graph_bs=[1, 2, 4],
                     sglang_disable_cuda_graph=True, sglang_context_length=4096, sglang_server_concurrency=64,
                     sglang_server_args={"chunked_prefill_size": 8192, "mem_fraction_static": 0.6})
    args = server_args(o, "/models/qwen3", host="10.0.0.1", port=30000, nccl_port=30001, colocate=True)
    text = " ".join(args)
    for expected in ("--model-path /models/qwen3", "--tp-size 2", "--context-length 4096",
                     "--max-running-requests 64", "--chunked-prefill-size 8192", "--enable-memory-saver",
                     "--skip-tokenizer-init", "--host 10.0.0.1 --port 30000 --nccl-port 30001"):
        assert expected in text
    assert "--mem-fraction-static 0.6" in text and "0.7" not in text  # sglang_server_args win
    assert "--enable-memory-saver" not in server_args(SglangConfig(), "m", host="h", port=1, nccl_port=2,
                                                      colocate=False)


def test_cuda_graph_options_use_the_flags_of_sglang_0_5():
    """0.5.23 has no --cuda-graph-bs (its parser calls it ambiguous) and deprecates --disable-cuda-graph."""
    o = SglangConfig(sglang_cuda_graph_bs=[1, 2, 4], sglang_disable_cuda_graph=True)
    args = server_args(o, "m", host="h", port=1, nccl_port=2, colocate=False)
    assert " ".join(args).count("--cuda-graph-bs-decode 1 2 4") == 1
    assert {"--disable-decode-cuda-graph", "--disable-prefill-cuda-graph"} <= set(args)
    assert not {"--cuda-graph-bs", "--disable-cuda-graph"} & set(args)


def test_per_sample_seeds_come_with_deterministic_inference_or_not_at_all():
    """SGLang reads sampling_seed only under --enable-deterministic-inference (sampling_batch_info.py)."""
    args = server_args(SglangConfig(), "m", host="h", port=1, nccl_port=2, colocate=False)
    assert "--enable-deterministic-inference" in args
    off = SglangConfig(sglang_enable_deterministic_inference=False)
    assert "--enable-deterministic-inference" not in server_args(off, "m", host="h", port=1, nccl_port=2,
                                                                 colocate=False)
    params = SamplingParams(max_new_tokens=2)
    with Recorder() as server:
        for options, seed in ((SglangConfig(), 42), (off, None)):
            SglangClient(server.url, options=options, devices=["cpu"], update_weight_buffer_size=1).generate(
                [[1, 2]], params, seeds=[42])
            assert server.requests.pop()[1]["sampling_params"].get("sampling_seed") == seed


def test_requests_carry_ids_seed_and_ask_for_log_probs_and_answers_become_generations():
    body = generate_payload([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.9, top_k=-1,
                                                      stop_token_ids=(7,)), seed=42)
    assert body["input_ids"] == [1, 2, 3] and body["return_logprob"] is True
    wanted = {"max_new_tokens": 8, "temperature": 0.9, "top_k": -1, "stop_token_ids": [7], "sampling_seed": 42}
    assert {k: body["sampling_params"][k] for k in wanted} == wanted
    g = generation_of({"meta_info": {"finish_reason": {"type": "stop", "matched": 7},
                                     "output_token_logprobs": [[-0.5, 4, None], [-0.1, 7, None]]}}, version=3)
    assert (g.output_ids, g.log_probs, g.finish_reason, g.weight_version) == ([4, 7], [-0.5, -0.1], "stop", 3)


def test_memory_is_resumed_only_after_a_release():
    """SGLang 0.5.23 fails a resume of memory it never released (`offload_tags.remove` in its scheduler):
    the first weight sync of a colocated run resumes before anything was released."""
    with Recorder() as server:
        client = SglangClient(server.url, options=SglangConfig(), devices=["cpu"], update_weight_buffer_size=1)
        client.resume_memory()
        assert server.paths == []
        client.release_memory()
        client.resume_memory()
        client.resume_memory()
        assert server.paths[1:] == ["/release_memory_occupation", "/resume_memory_occupation"]


def test_a_release_waits_until_the_server_is_idle():
    """SGLang 0.5.23 asserts in its scheduler that a release finds it idle; requests just aborted may not
    have ended. /flush_cache?timeout=T waits up to T for that, and a 400 stops the release."""
    with Recorder(refuse=(f"/flush_cache?timeout={sglang_engine.IDLE_TIMEOUT_S:g}",)) as server:
        client = SglangClient(server.url, options=SglangConfig(), devices=["cpu"], update_weight_buffer_size=1)
        with pytest.raises(Exception, match="400"):
            client.release_memory()
        assert server.paths == ["/flush_cache?timeout=60"] and not client.released


def _fake_payloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Payloads naming their tensors and device, instead of SGLang's serializer (the contract test runs that)."""
    def payloads(bucket: list[tuple[str, torch.Tensor]], devices: list[str]) -> list[str]:
        return [f"{','.join(name for name, _ in bucket)}@{device}" for device in devices]

    monkeypatch.setattr(sglang_engine, "rank_payloads", payloads)


def test_weights_go_in_one_update_session_in_bounded_buckets_one_payload_per_tp_rank(monkeypatch):
    """SGLang 0.5.23 refuses update_weights_from_tensor outside begin_weight_update … end_weight_update. The
    prefix cache is flushed once, at the session's end, not after each bucket (SGLang's default)."""
    _fake_payloads(monkeypatch)
    weights = {"a": torch.zeros(100), "b": torch.zeros(100), "c": torch.zeros(300), "d": torch.zeros(10)}
    with Recorder() as server:
        client = SglangClient(server.url, options=SglangConfig(rollout_num_gpus_per_engine=2),
                              devices=["cuda:0", "cuda:1"], update_weight_buffer_size=800)
        client.update_weights(weights, version=5)
        assert server.paths == ["/begin_weight_update"] + ["/update_weights_from_tensor"] * 3 + [
            "/flush_cache?timeout=60", "/end_weight_update"]
        updates = [body for path, body in server.requests if path == "/update_weights_from_tensor"]
        assert [u["serialized_named_tensors"] for u in updates] == [
            ["a,b@cuda:0", "a,b@cuda:1"], ["c@cuda:0", "c@cuda:1"], ["d@cuda:0", "d@cuda:1"]]
        assert all(u["load_format"] == "flattened_bucket" and u["weight_version"] == "5" and not u["flush_cache"]
                   for u in updates)
        assert client.version == 5


def test_a_failed_update_still_closes_the_session_and_keeps_the_old_version(monkeypatch):
    _fake_payloads(monkeypatch)
    with Recorder(refuse=("/update_weights_from_tensor",)) as server:
        client = SglangClient(server.url, options=SglangConfig(), devices=["cpu"], update_weight_buffer_size=1)
        with pytest.raises(Exception, match="400"):
            client.update_weights({"a": torch.zeros(1)}, version=1)
        assert server.paths[-1] == "/end_weight_update" and client.version == 0


def test_broadcast_buckets_arrive_in_the_session_of_the_whole_sync_which_is_ended_only_if_opened():
    """A decoupled engine's buckets come within the one session the trainer opens on every engine for the
    whole sync (`TrainWorker.broadcast_weights`). A failed sync ends every engine's, but SGLang answers 400 to
    ending a session never opened: an engine whose begin was refused sends no end."""
    meta = BucketMeta.of([("a", torch.zeros(2, dtype=torch.bfloat16))])
    with Recorder() as server:
        client = SglangClient(server.url, options=SglangConfig(), devices=["cpu"], update_weight_buffer_size=1)
        client.begin_weight_update()
        client.update_weights_from_distributed(meta, version=2)
        client.update_weights_from_distributed(meta, version=2)
        client.end_weight_update()
        client.end_weight_update()
        assert server.paths == ["/begin_weight_update", *["/update_weights_from_distributed"] * 2,
                                "/flush_cache?timeout=60", "/end_weight_update"]
        assert server.requests[1][1]["dtypes"] == ["bfloat16"] and not server.requests[1][1]["flush_cache"]
        assert client.version == 2
    with Recorder(refuse=("/begin_weight_update",)) as server:
        client = SglangClient(server.url, options=SglangConfig(), devices=["cpu"], update_weight_buffer_size=1)
        with pytest.raises(Exception, match="400"):
            client.begin_weight_update()
        client.end_weight_update()
        assert server.paths == ["/begin_weight_update"]


def test_a_colocated_server_is_launched_on_its_engines_gpus(monkeypatch, tmp_path):
    """The host worker sees its own GPU alone (Ray narrows it): its server is given every GPU of the engine."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the ports' registry (`rl.ports.server_ports`)
    launched: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(sglang_engine, "launch", lambda argv, env: launched.append((argv, env)))
    monkeypatch.setattr(sglang_engine, "stop", lambda process: None)
    monkeypatch.setattr(SglangClient, "health", lambda self: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6")
    options = SglangConfig(rollout_num_gpus_per_engine=2)
    sglang_engine.SglangEngine("m", options=options, update_weight_buffer_size=1, colocate=True, gpus="6,3")
    sglang_engine.SglangEngine("m", options=options, update_weight_buffer_size=1)  # decoupled: its actor's GPUs
    [(argv, env), (_, inherited)] = launched
    assert env["CUDA_VISIBLE_DEVICES"] == "6,3" and "--tp-size 2" in " ".join(argv)
    assert inherited["CUDA_VISIBLE_DEVICES"] == "6"


STAND_IN = ("import os, subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '600'])\n"
            "with open(sys.argv[1] + '.part', 'w') as f:\n"
            "    f.write(f'{os.getpid()} {child.pid}')\n"
            "os.rename(sys.argv[1] + '.part', sys.argv[1])\n"
            "time.sleep(600)\n")
"""A stand-in server: it starts a process of its own, notes both pids in the file named, and waits."""


def _pids(path: Path, process: subprocess.Popen) -> list[int]:
    """The pids a stand-in server notes in `path` once it has started (`process` its launcher)."""
    while not path.exists():
        assert process.poll() is None, process.args
        time.sleep(0.05)
    return [int(pid) for pid in path.read_text().split()]


def _ended(pid: int) -> bool:
    """Whether `pid` has ended, as a zombie no one has reaped yet included; waited for up to a minute."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_a_server_dies_with_the_process_that_launched_it_even_of_a_sigkill(tmp_path):
    """Ray kills an engine's actor with SIGKILL, which leaves the actor no code to run: the kernel kills its
    server then (the parent-death signal `launch` sets). The server's own processes are not its concern here:
    SGLang's set the same signal themselves."""
    pids = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                               "from rl.rollout.sglang_engine import launch\n"
                               "launch(sys.argv[1:], os.environ)\n"
                               "time.sleep(600)\n", sys.executable, "-c", STAND_IN, str(pids)], cwd=ROOT)
    server, _ = _pids(pids, parent)
    parent.kill()
    parent.wait()
    try:
        assert _ended(server)
    finally:
        os.killpg(server, signal.SIGKILL)  # its session, the stand-in's own process in it


def test_stopping_a_server_ends_every_process_it_started(tmp_path):
    pids = tmp_path / "pids"
    process = sglang_engine.launch([sys.executable, "-c", STAND_IN, str(pids)], os.environ)
    _, server_child = _pids(pids, process)
    sglang_engine.stop(process)
    assert process.returncode == -signal.SIGKILL and _ended(server_child)


def test_buckets_hold_at_most_the_limit_a_larger_tensor_alone_and_are_taken_lazily():
    taken: list[str] = []

    def weights():
        for name, n in (("a", 3), ("b", 3), ("big", 50), ("c", 1), ("d", 4)):
            taken.append(name)
            yield name, torch.zeros(n, dtype=torch.float32)

    out = buckets(weights(), limit=24)
    assert [name for name, _ in next(out)] == ["a", "b"] and taken == ["a", "b", "big"]
    assert [[name for name, _ in b] for b in out] == [["big"], ["c", "d"]]


@pytest.fixture(scope="module")
def sglang_verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SGLang's own verdicts on everything the engine sends (tests/sglang_contract.py); the ports it hands out
    are noted in a registry of its own (`rl.ports.server_ports` keeps it in the temporary folder)."""
    if not any(CONTRACT.glob("sglang-*.dist-info")):
        pytest.skip(f"SGLang is not in {CONTRACT} (make test installs it there, without its dependencies)")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "sglang_contract.py"), str(CONTRACT)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("ports"))})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_the_sglang_checked_is_in_the_supported_range(sglang_verdicts):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (supported,) = [Requirement(r) for r in extras["sglang"] if Requirement(r).name == "sglang"]
    assert supported.specifier.contains(sglang_verdicts["sglang"])


def test_sglangs_own_parser_takes_the_launch_command_line(sglang_verdicts):
    assert sglang_verdicts["argv_refusal"] is None
    assert "ambiguous option: --cuda-graph-bs" in sglang_verdicts["control_argv_refusal"]  # the judge can refuse


def test_engines_launched_on_one_node_bind_ports_of_their_own(sglang_verdicts):
    """SGLang would otherwise draw each server's rendezvous port at random as it starts: two servers starting
    together on one node could draw the same."""
    assert sglang_verdicts["launched"] == [["-m", "sglang.launch_server"]] * 2
    first, second = sglang_verdicts["engine_ports"]
    assert None not in first + second
    assert len(set(first + second)) == 4


def test_each_tp_rank_runs_on_the_gpu_of_its_training_rank(sglang_verdicts):
    """A colocated server's CUDA_VISIBLE_DEVICES lists its engine's training GPUs in rank order
    (`rl.placement.server_gpus`): SGLang must put TP rank r on the r-th."""
    assert sglang_verdicts["tp_rank_gpus"] == [0, 1]


def test_sglangs_own_request_classes_accept_every_body_sent(sglang_verdicts):
    assert {"/generate", "/abort_request", "/flush_cache", "/release_memory_occupation", "/resume_memory_occupation",
            "/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update", "/init_weights_update_group",
            "/update_weights_from_distributed"} == set(sglang_verdicts["paths"])
    assert {k: v for k, v in sglang_verdicts["body_refusals"].items() if v is not None} == {}
    assert "abort_al" in sglang_verdicts["control_body_refusal"]  # the judge can refuse
    assert "timeout_s" in sglang_verdicts["control_query_refusal"]


def test_each_tp_rank_gets_its_own_payload_that_sglang_rebuilds_exactly(sglang_verdicts):
    assert len(sglang_verdicts["weights_refusals"]) == 2  # two buckets, the first of two dtypes
    assert sglang_verdicts["weights_refusals"] == [None, None]


def test_sglang_would_receive_each_broadcast_tensor_as_sent(sglang_verdicts):
    assert sglang_verdicts["broadcast_refusals"] == [None]
    assert "no dtype from 'torch." in sglang_verdicts["control_broadcast_refusal"]  # the judge can refuse


@pytest.mark.gpu
def test_a_real_sglang_server_generates_with_log_probs_and_takes_new_weights(tiny_model_dir):
    pytest.importorskip("sglang", reason="SGLang is not installed (its wheels are too large to carry here)")
    from transformers import AutoModelForCausalLM

    from rl.rollout.sglang_engine import SglangEngine

    engine = SglangEngine(str(tiny_model_dir), options=SglangConfig(sglang_mem_fraction_static=0.3),
                          update_weight_buffer_size=1 << 20)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    first = engine.generate([[1, 2, 3]] * 4, params, seeds=[0, 1, 2, 3])
    assert all(len(g.output_ids) == len(g.log_probs) > 0 for g in first)
    assert engine.generate([[1, 2, 3]] * 4, params, seeds=[0, 1, 2, 3]) == first  # deterministic inference
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    uniform = -math.log(model.config.vocab_size)
    assert not all(abs(lp - uniform) < 1e-3 for g in first for lp in g.log_probs)
    engine.resume_memory()  # a colocated run's first sync: nothing released yet
    engine.update_weights({k: v * 0 for k, v in model.state_dict().items()}, version=1)
    after = engine.generate([[1, 2, 3]], params, seeds=[0])[0]
    # All-zero weights give all-zero logits: every token is drawn from the uniform distribution.
    assert after.weight_version == 1 and all(abs(lp - uniform) < 1e-3 for lp in after.log_probs)
