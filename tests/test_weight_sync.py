"""Weight sync from the trainer to decoupled engines, bucket by bucket (`rl/weight_sync.py`): Ray actors of
rlhpc's own `TrainWorker` and `TorchEngine`, the engine pool doing what the driver does each rollout."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import CONFIGS
from rl.rollout.engine import SamplingParams
from rl.rollout.pool import block_hashes
from rl.rollout.torch_engine import TorchEngine
from rl.weight_sync import buckets
from rlhpc.config import load_config

LIMIT = 30_000
"""Bytes per bucket: the tiny model's weights make several buckets, and some tensors exceed it alone."""
PROMPT_A, PROMPT_B = list(range(5, 37)), list(range(40, 72))
"""Two blocks of the pool's memory each."""
PARAMS = SamplingParams(max_new_tokens=4)


@pytest.fixture(scope="module")
def ray_local():
    import sys

    import ray

    # the functions this module runs inside the actors travel whole: the workers cannot import it
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def _bytes(bucket) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


def _moved(worker) -> dict[str, torch.Tensor]:
    """Shift the trainer's policy away from the engines' (both start from the same folder); its new weights."""
    import ray

    def shift(w):
        with torch.no_grad():
            for k, p in enumerate(w.backend.model.parameters()):
                p.add_(0.25 * (k + 1))
        return {name: t.clone() for name, t in w.backend.named_weights()}

    return ray.get(worker.__ray_call__.remote(shift))


class RecordingEngine(TorchEngine):
    """The torch engine noting what a sync does to it: "begin" and "end" of each weight-update session, and
    the bytes of each load it makes itself between them (the broadcast path); while `fail`, its loads fail."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events: list[str | int] = []
        self.fail = False

    def begin_weight_update(self) -> None:
        super().begin_weight_update()
        self.events.append("begin")

    def end_weight_update(self) -> None:
        super().end_weight_update()
        self.events.append("end")

    def update_weights(self, named_tensors, version: int) -> None:
        if self.fail:
            raise RuntimeError("a load failed by the test")
        named = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        self.events.append(_bytes(named))
        super().update_weights(named, version)


def _engine_state(engine) -> tuple[dict[str, torch.Tensor], list[str | int], int]:
    import ray

    return ray.get(engine.__ray_call__.remote(lambda e: (
        {n: p.detach().clone() for n, p in e.model.named_parameters()}, e.events, e.weight_version)))


@pytest.mark.parametrize("fault_tolerant", [False, True], ids=["broadcast", "object-store"])
def test_decoupled_engines_get_the_trainers_weights_bucket_by_bucket(ray_local, tmp_path, tiny_model_dir,
                                                                     fault_tolerant):
    import ray

    from rl.rollout.pool import EnginePool
    from rl.train.worker import TrainWorker

    cfg = load_config(CONFIGS / "tiny_cpu.toml", [
        f"ckpt.hf_checkpoint='{tiny_model_dir}'", f"run.output_dir='{tmp_path}'",
        f"rollout.update_weight_buffer_size={LIMIT}", f"rollout.use_fault_tolerance={str(fault_tolerant).lower()}"])
    worker = EnginePool.actor_class(TrainWorker).options(num_cpus=0).remote(
        cfg, rank=0, world_size=1, master_addr="", master_port=0, init_from=str(tiny_model_dir), total_steps=1,
        threads=1, host_engine=False)
    engine_cls = EnginePool.actor_class(RecordingEngine)
    # placing requests as for SGLang engines, which keep a prefix cache from one call to the next
    pool = EnginePool(lambda slot: engine_cls.options(num_cpus=0).remote(str(tiny_model_dir), threads=1), 2,
                      cfg.rollout.model_copy(update={"engine": "sglang"}))
    trained = _moved(worker)
    first = pool.generate([PROMPT_A, PROMPT_B], PARAMS, seeds=[1, 2])  # by load: A on engine 0, B on 1
    turn_two = PROMPT_B + first[1].output_ids + list(range(80, 100))
    pool.generate([turn_two], PARAMS, seeds=[3])  # by load alone, engine 0
    assert pool.prefixes.matched(block_hashes(turn_two)) == [0, 3]  # where B's first turn was served

    pool.sync_weights([worker], version=3)
    assert pool.prefixes.matched(block_hashes(turn_two)) == [0, 0]  # the engines flushed their caches

    expected_buckets = [_bytes(b) for b in buckets(trained.items(), LIMIT)]
    assert len(expected_buckets) > 2 and any(size > LIMIT for size in expected_buckets)
    for engine in pool.engines:
        weights, events, version = _engine_state(engine)
        assert version == 3
        assert weights.keys() == trained.keys()
        for name in trained:
            assert torch.equal(weights[name], trained[name]), name
        if not fault_tolerant:
            # each broadcast bucket loaded as it came, none above the limit but a lone tensor, all in one session
            assert events == ["begin", *expected_buckets, "end"]
        else:  # the kept buckets as one update: an SGLang engine's one session
            assert events == [sum(expected_buckets)]
    if fault_tolerant:  # the buckets went through the object store one by one, and are kept for a replacement
        kept, version = pool.weights
        assert version == 3 and [_bytes(ray.get(ref)) for ref in kept] == expected_buckets
        pool.generate([PROMPT_A, PROMPT_B], PARAMS, seeds=[1, 2])
        pool.replace(0, "was killed by the test")
        assert [pool.prefixes.matched(block_hashes(p)) for p in (PROMPT_A, PROMPT_B)] == [[0, 0], [0, 2]]
        weights, _, version = _engine_state(pool.engines[0])
        assert version == 3 and all(torch.equal(weights[n], trained[n]) for n in trained)
    else:
        # a failed load fails the sync, whose sessions are closed all the same: the next sync can open them
        ray.get(pool.engines[1].__ray_call__.remote(lambda e: setattr(e, "fail", True)))
        with pytest.raises(ray.exceptions.RayTaskError, match="a load failed by the test"):
            pool.sync_weights([worker], version=4)
        assert [_engine_state(e)[1][-1] for e in pool.engines] == ["end", "end"]
        ray.get(pool.engines[1].__ray_call__.remote(lambda e: setattr(e, "fail", False)))
        # the group is joined once: a second sync broadcasts again over it
        pool.sync_weights([worker], version=5)
        assert all(_engine_state(e)[2] == 5 for e in pool.engines)
    pool.kill()
    ray.kill(worker)


def test_a_colocated_engine_of_two_gpus_takes_each_ranks_own_payload_in_one_request(ray_local, tmp_path,
                                                                                    tiny_model_dir):
    """Colocated, an SGLang engine of two GPUs hosted by rank 0 of two training ranks: each bucket is one
    `/update_weights_from_tensor` whose payloads are made by each rank on its own GPU from its own weights, in
    tensor-parallel order. The payloads here name their rank and tensors' sums instead of SGLang's CUDA IPC handles
    (tests/sglang_contract.py checks those against SGLang)."""
    import ray
    import torch.distributed as dist

    from rl.ports import free_port
    from rl.train.worker import TrainWorker
    from sglang_contract import Recorder

    class WithRecordedEngine(TrainWorker):
        def __init__(self, url: str, cfg, **kwargs):
            import rl.train.worker
            from rl.rollout import sglang_engine

            def payloads(bucket, devices):
                return [f"{dist.get_rank()}:" + ",".join(f"{n}={float(t.sum()):.5g}" for n, t in bucket)]

            def client(init_from, *, device, gpus=None, **_):
                self.gpus = gpus
                return sglang_engine.SglangClient(url, options=cfg.sglang, devices=[device],
                                                  update_weight_buffer_size=LIMIT)

            sglang_engine.rank_payloads = payloads
            rl.train.worker.engine_factory = lambda cfg: (client, {})
            super().__init__(cfg, **kwargs)

    cfg = load_config(CONFIGS / "tiny_cpu.toml", [
        f"ckpt.hf_checkpoint='{tiny_model_dir}'", f"run.output_dir='{tmp_path}'", "perf.colocate=true",
        "perf.actor_num_gpus_per_node=2", "rollout.engine='sglang'", "sglang.rollout_num_gpus_per_engine=2",
        f"rollout.update_weight_buffer_size={LIMIT}"])
    port = free_port("127.0.0.1")
    with Recorder() as server:
        workers = [ray.remote(WithRecordedEngine).options(num_cpus=0).remote(
            server.url, cfg, rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port,
            init_from=str(tiny_model_dir), total_steps=1, threads=1, host_engine=True) for rank in range(2)]
        hosts = ray.get([w.__ray_call__.remote(lambda w: w.engine is not None) for w in workers])
        assert hosts == [True, False]
        assert ray.get(workers[0].__ray_call__.remote(lambda w: w.gpus)) is None  # no GPUs: the host's view
        trained = _moved(workers[0])  # rank 0's weights now differ from rank 1's
        ray.get([w.sync_engine.remote(4) for w in workers])
        requests = list(server.requests)
        server.refuse = ("/update_weights_from_tensor",)  # the host fails: the other rank is not left waiting
        failing = [w.sync_engine.remote(5) for w in workers]
        ray.get(failing[1], timeout=60)
        with pytest.raises(ray.exceptions.RayTaskError, match="400"):
            ray.get(failing[0])
    sums = [",".join(f"{n}={float(t.sum()):.5g}" for n, t in bucket) for bucket in buckets(trained.items(), LIMIT)]
    assert len(sums) > 2
    assert [path for path, _ in requests] == (["/begin_weight_update"] + ["/update_weights_from_tensor"] *
                                              len(sums) + ["/flush_cache?timeout=60", "/end_weight_update"])
    own_payloads = [body["serialized_named_tensors"] for _, body in requests[1:-2]]
    assert [p[0] for p in own_payloads] == [f"0:{b}" for b in sums]
    assert [p[1] for p in own_payloads] != [f"1:{b}" for b in sums]  # rank 1's own (unmoved) weights
    assert [body["weight_version"] for _, body in requests[1:-2]] == ["4"] * len(sums)
    for w in workers:
        ray.kill(w)


def _megatron_rank(rank: int, world: int, port: int, config: str, model: str, out: str) -> None:
    import megatron_cpu

    megatron_cpu.install()
    import torch.distributed as dist

    from rl.train.worker import TrainWorker
    from test_megatron_backend import SETTINGS

    cfg = load_config(config, [*SETTINGS, "perf.pipeline_model_parallel_size=2",
                               f"rollout.update_weight_buffer_size={LIMIT}"])
    worker = TrainWorker(cfg, rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port,
                         init_from=model, total_steps=1, threads=1, host_engine=False)
    gathered_objects: list = []
    real = dist.all_gather_object

    def recording(object_list, obj, group=None):
        gathered_objects.append(obj)
        return real(object_list, obj, group=group)

    dist.all_gather_object = recording
    sent = [[(n, t.clone()) for n, t in bucket] for bucket in worker.weight_buckets()]
    own = {n: t.clone() for n, t in worker.backend.named_weights()}  # what a colocated engine takes

    def tensors_in(x) -> int:
        if isinstance(x, torch.Tensor):
            return 1
        if isinstance(x, dict):
            x = list(x.values())
        return sum(tensors_in(v) for v in x) if isinstance(x, (list, tuple)) else 0

    torch.save({"buckets": sent, "own": own, "tensors_in_objects": tensors_in(gathered_objects)}, f"{out}.{rank}")


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_megatron_pipeline_stages_send_rank_0_one_parameter_at_a_time(write_config, tiny_model_dir, tmp_path):
    """Megatron-core run for real on the host over gloo (`tests/test_megatron_backend.py`), two pipeline stages:
    rank 0 yields the whole model in bounded buckets, equal to the checkpoint it started from, and no
    parameter travels inside an object (the stages' tensors go by collectives). Each rank's own `named_weights`
    is the whole model too, as a colocated engine on the other stage's GPU needs."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    from conftest import MINIMAL
    from rl.ports import free_port

    out = str(tmp_path / "out")
    mp.spawn(_megatron_rank, args=(2, free_port("127.0.0.1"), str(write_config(MINIMAL)), str(tiny_model_dir), out),
             nprocs=2)
    head, other = (torch.load(f"{out}.{r}", weights_only=True) for r in range(2))
    assert other["buckets"] == [] and head["tensors_in_objects"] == other["tensors_in_objects"] == 0
    assert len(head["buckets"]) > 2
    assert all(_bytes(b) <= LIMIT or len(b) == 1 for b in head["buckets"])
    weights = dict(pair for bucket in head["buckets"] for pair in bucket)
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    for rank in (head, other):
        assert rank["own"].keys() == expected.keys()
        assert all(torch.equal(rank["own"][name], tensor) for name, tensor in expected.items())
