"""The GRPO driver: rollout → reward → advantage → train → weight sync, once per rollout, on Ray.

The same driver runs on a laptop (`rlhpc run`, Ray started locally) and inside a Slurm allocation (Ray
started across its nodes). It resumes from the newest complete checkpoint of its `load` folder.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rl import checkpoint
from rl.advantages import estimate, needs_kl
from rl.batch import TrainSample, balanced_shares, pad_rows, split_for_ranks
from rl.config import RLConfig
from rl.data import PromptDataset
from rl.errors import RunError
from rl.evaluate import summarize
from rl.heartbeat import Heartbeat
from rl.interrupt import Interrupted, StopRequest
from rl.losses import approx_kl
from rl.metrics import MetricsLog, Progress, rollout_row
from rl.rollout.ahead import Generated, RolloutsAhead
from rl.rollout.client import EngineClient
from rl.rollout.engine import SamplingParams, engine_factory
from rl.rollout.pool import EnginePool
from rl.rollout.sampling import Sampler
from rl.timings import SAVE_MARGIN, Timings

logger = logging.getLogger(__name__)
WORKER_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "TOKENIZERS_PARALLELISM": "false"}


PLACEMENT_TIMEOUT_S = 120
STEPS_PLANNED_ON = 4
EVAL_SEED_SALT = 1_000_003
"""Added (times the eval set's position, from 1) to the run seed of evaluation samples: a prime, so that their
seeds are those of no training sample and of no other eval set."""
"""How many of the latest rollouts the stop before the job's end plans with (the longest of them)."""


def _check_inputs(cfg: RLConfig) -> None:
    problems = [f"{field}: {path} does not exist" for field, path in cfg.missing_paths()]
    if not problems and not (cfg.ckpt.hf_checkpoint / "config.json").exists():
        problems.append(f"ckpt.hf_checkpoint: {cfg.ckpt.hf_checkpoint} is not a Hugging Face model folder "
                        "(no config.json)")
    if problems:
        raise RunError("; ".join(problems))


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to {folder}: {e.strerror}") from None


class Driver:
    def __init__(self, cfg: RLConfig, run_dir: Path, ray_address: str | None = None, stop: StopRequest | None = None,
                 start_record: Path | None = None):
        from transformers import AutoTokenizer

        _check_inputs(cfg)
        self.cfg, self.run_dir, self.ray_address = cfg, Path(run_dir), ray_address
        self.stop = stop or StopRequest()
        self.start_record = start_record
        self.heartbeat = Heartbeat(self.run_dir)
        self.groups: list[Any] = []
        """Ray placement groups of the actors."""
        self.ahead: RolloutsAhead | None = None
        """Async training's generator of rollouts ahead of training."""
        self.timings = Timings.read(run_dir)
        """How long a save and a rollout take: whether a stop leaves time for a save, when to stop before the
        job's end. Kept in the run folder, so that an attempt knows them before measuring its own."""
        self.recent_steps: list[float] = []
        """Seconds of this attempt's last rollouts (the newest `STEPS_PLANNED_ON`)."""
        self.saving: checkpoint.InBackground | None = None
        """The checkpoint being written in the background (`ckpt.async_save`)."""
        self.workers: list[Any] = []
        """The training workers (Ray actors), by rank."""
        self.pool: EnginePool | None = None
        self.placement: list[tuple[str, int]] = []
        """Each worker's (node address, pid)."""
        self.layout: list[tuple[int, int, bool]] = []
        """Each worker's (data-parallel rank, data-parallel size, whether it reports for its rank)."""
        self.dp_size = 1
        self.last_row_t = 0.0
        """When the last metrics row was written (samples_per_s counts from it)."""
        self.skipped_in_a_row = 0
        """Optimizer steps skipped in a row for a non-finite loss or gradient norm (the policy's or the critic's)."""
        self.save_dir = cfg.save_dir(self.run_dir)
        self.load_dir = Path(cfg.ckpt.load) if cfg.ckpt.load else self.save_dir
        _writable(self.run_dir)
        _writable(self.save_dir)
        r = cfg.rollout
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)

        def prompts(path: Path, input_key: str, label_key: str | None) -> PromptDataset:
            return PromptDataset(path, input_key=input_key, label_key=label_key, metadata_key=r.metadata_key,
                                 tokenizer=self.tokenizer, apply_chat_template=r.apply_chat_template,
                                 chat_template_kwargs=r.apply_chat_template_kwargs,
                                 max_prompt_len=r.rollout_max_prompt_len)

        self.dataset = prompts(r.prompt_data, r.input_key, r.label_key)
        self.eval_sets = {
            name: prompts(path, cfg.eval.eval_input_key or r.input_key, cfg.eval.eval_label_key or r.label_key)
            for name, path in cfg.eval.eval_prompt_data.items()
        }
        self.sampler = Sampler(cfg, self.tokenizer, self.dataset)
        self.num_rollout = cfg.num_rollout_for(len(self.dataset))
        self.total_steps = self.num_rollout * r.num_steps_per_rollout
        self.stop_ids = tuple(dict.fromkeys([*r.rollout_stop_token_ids, self.tokenizer.eos_token_id]))
        ref = cfg.ckpt.ref_load
        self.init_from = str(ref if ref is not None and (ref / "config.json").exists() else cfg.ckpt.hf_checkpoint)

    # --- actors ----------------------------------------------------------------------------------------

    def start_actors(self) -> None:
        """Training workers in a placement group of one bundle per node (`actor_num_nodes`; strictly spread
        over nodes when several, strictly packed on one otherwise); decoupled rollout engines in a second
        group of one bundle each (`rollout_num_gpus / rollout_num_gpus_per_engine` of them), or, with
        `colocate`, one on every `rollout_num_gpus_per_engine` training GPUs of each node, hosted by the first
        of their workers (`rl/placement.py`)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rl.placement import actors_per_node, colocated_engines, cpu_slot, node_of
        from rl.rollout.engine import gpus_per_engine
        from rl.train.worker import CHECKPOINT, TrainWorker

        if not ray.is_initialized():
            ray.init(address=self.ray_address, include_dashboard=False, configure_logging=False,
                     log_to_driver=True)
        p = self.cfg.perf
        world = p.actor_num_nodes * p.actor_num_gpus_per_node
        n_engines = 0 if p.colocate else max(
            1, (self.cfg.sglang.rollout_num_gpus or 1) // self.cfg.sglang.rollout_num_gpus_per_engine)
        alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        if len(alive) < p.actor_num_nodes:
            raise RunError(f"perf.actor_num_nodes = {p.actor_num_nodes} but Ray has {len(alive)} node(s)")
        slot = cpu_slot(min(int(r.get("CPU", 1)) for r in alive),
                        actors_per_node(p.actor_num_gpus_per_node, p.actor_num_nodes, n_engines))
        threads = p.cpu_threads or max(1, int(slot))
        gpus = 1 if torch.cuda.is_available() else 0

        def reserve(what: str, bundles: list[dict[str, float]], strategy: str) -> Any:
            group = placement_group(bundles, strategy=strategy)
            self.groups.append(group)
            if not group.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
                raise RunError(f"the {what} did not fit on the cluster within {PLACEMENT_TIMEOUT_S}s: "
                               f"{len(bundles)} x {bundles[0]} asked ({strategy}), nodes have {alive}")
            return group

        # Training: one bundle per node. Engines (decoupled): one bundle each, packed where they fit. On CPU
        # the bundles hold CPUs only, the same placement.
        bundle = {"CPU": slot * p.actor_num_gpus_per_node, **({"GPU": p.actor_num_gpus_per_node} if gpus else {})}
        training = reserve("training workers", [bundle] * p.actor_num_nodes,
                           "STRICT_SPREAD" if p.actor_num_nodes > 1 else "STRICT_PACK")
        per_engine = gpus_per_engine(self.cfg)
        engine_gpus = gpus * per_engine
        engines = reserve("rollout engines", [{"CPU": slot, **({"GPU": engine_gpus} if gpus else {})}] * n_engines,
                          "PACK") if n_engines else None

        def in_bundle(rank: int) -> dict[str, Any]:
            return {"num_cpus": slot, "num_gpus": gpus, "runtime_env": {"env_vars": WORKER_ENV},
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        training, placement_group_bundle_index=node_of(rank, p.actor_num_gpus_per_node))}

        # torch.distributed's rendezvous lives with rank 0, wherever the group put it; a lone rank needs none
        # (and finding one costs a worker process's start).
        master, port = ray.get(ray.remote(_address_and_free_port).options(
            **{**in_bundle(0), "num_cpus": 0, "num_gpus": 0}).remote()) if world > 1 else ("", 0)
        # a colocated one generates: it answers abort; `saved` waits for a background save while it trains
        worker_cls = EnginePool.actor_class(TrainWorker, CHECKPOINT)
        self.workers = [
            worker_cls.options(**in_bundle(rank)).remote(
                self.cfg, rank=rank, world_size=world, master_addr=master, master_port=port,
                init_from=self.init_from, total_steps=self.total_steps, threads=threads,
                host_engine=p.colocate)
            for rank in range(world)
        ]
        engine, engine_kwargs = engine_factory(self.cfg)
        engine_cls = EnginePool.actor_class(engine)

        def make_engine(index: int) -> Any:
            assert engines is not None, "decoupled engines have their placement group"
            return engine_cls.options(num_cpus=slot, num_gpus=engine_gpus, runtime_env={"env_vars": WORKER_ENV},
                                      scheduling_strategy=PlacementGroupSchedulingStrategy(
                                          engines, placement_group_bundle_index=index)).remote(
                self.init_from, threads=threads, **engine_kwargs)

        self.pool = (EnginePool(None, 0, self.cfg.rollout, engines=[
            self.workers[ranks[0]] for ranks in colocated_engines(world, per_engine)]) if p.colocate else
                     EnginePool(make_engine, n_engines, self.cfg.rollout, ranks_per_engine=per_engine))
        self.placement = ray.get([w.node.remote() for w in self.workers])  # also surfaces start-up errors
        self.layout = ray.get([w.data_parallel.remote() for w in self.workers])
        self.dp_size = self.layout[0][1]

    def stop_actors(self) -> None:
        import ray

        if self.pool is not None:
            self.pool.kill()
        for actor in self.workers:
            ray.kill(actor)
        for group in self.groups:
            ray.util.remove_placement_group(group)

    # --- one rollout -----------------------------------------------------------------------------------

    def generated(self, rollout_id: int, abandon: Callable[[], bool]) -> Generated:
        """The rollout's groups; raises Interrupted as soon as `abandon()` turns true (nothing has changed
        but the sampler, whose state the caller kept)."""
        start = time.perf_counter()
        samples, dropped = self.sampler.rollout(rollout_id, self.sampling_params(),
                                                EngineClient(self.pool, self.tokenizer, abandon))
        return Generated(rollout_id, samples, dropped, time.perf_counter() - start)

    def sampling_params(self, *, evaluation: bool = False) -> SamplingParams:
        r, e = self.cfg.rollout, self.cfg.eval
        max_new = r.max_response_len
        params = SamplingParams(max_new_tokens=max_new, temperature=r.rollout_temperature, top_p=r.rollout_top_p,
                                top_k=r.rollout_top_k, stop_token_ids=self.stop_ids, stop=tuple(r.rollout_stop))
        if not evaluation:
            return params
        return SamplingParams(
            max_new_tokens=e.eval_max_response_len or max_new,
            temperature=r.rollout_temperature if e.eval_temperature is None else e.eval_temperature,
            top_p=r.rollout_top_p if e.eval_top_p is None else e.eval_top_p,
            top_k=r.rollout_top_k if e.eval_top_k is None else e.eval_top_k,
            stop_token_ids=self.stop_ids, stop=tuple(r.rollout_stop))

    def advantages(self, train: list[TrainSample]) -> list[list[float]] | None:
        """Fill in each sample's per-token advantages for the configured estimator (`rl.advantages.estimate`);
        return the policy's log-probs when the estimator needed them, so that training does not compute them
        again."""
        g = self.cfg.grpo
        rewards = torch.tensor([s.reward for s in train], dtype=torch.float32)
        mask = pad_rows([s.loss_mask for s in train])
        width = mask.shape[1]
        old = kl = values = None
        if needs_kl(g):
            old, ref = self.per_rank("compute_log_probs", train), self.per_rank("compute_log_probs", train, True)
            kl = approx_kl(pad_rows(old, width), pad_rows(ref, width), g.kl_loss_type) * mask
        if g.advantage_estimator == "ppo":
            values = self.per_rank("compute_values", train)
        adv, returns = estimate(g, rewards, mask, self.cfg.rollout.n_samples_per_prompt, kl=kl,
                                values=None if values is None else pad_rows(values, width))
        for i, s in enumerate(train):
            s.advantages = adv[i, : s.response_length].tolist()
            if values is not None and returns is not None:
                s.values, s.returns = values[i], returns[i, : s.response_length].tolist()
        return old

    def per_rank(self, method: str, train: list[TrainSample], *args: Any) -> list[Any]:
        """A per-sample computation of the training workers (log-probs, values), each data-parallel rank on
        its share."""
        shares = split_for_ranks(len(train), self.dp_size)
        return [x for part in self._reported([getattr(w, method).remote([train[i] for i in shares[d]], *args)
                                              for w, (d, _, _) in zip(self.workers, self.layout)])
                for x in part]

    def _reported(self, calls: list[Any]) -> list[Any]:
        """The results of one call per worker, one per data-parallel rank in rank order (the reporting ranks')."""
        import ray

        results = ray.get(calls)
        by_rank = {d: r for (d, _, reports), r in zip(self.layout, results) if reports}
        return [by_rank[d] for d in range(self.dp_size)]

    def train(self, train: list[TrainSample], old: list[list[float]] | None = None) -> dict[str, float]:
        """`num_steps_per_rollout` optimizer steps, in one call to each worker; `old` are the policy's
        log-probs if already computed (else the workers score the samples of the later steps first)."""
        r, g = self.cfg.rollout, self.cfg.grpo
        gbs, n = r.global_batch_size, r.num_steps_per_rollout
        assert gbs is not None, "the config's validation derives it"
        if g.use_rollout_logprobs:
            old = [s.rollout_log_probs for s in train]
        elif n == 1:
            old = None  # one step: the ratio is 1 at the step's start, nothing to compare against
        steps = [range(k * gbs, (k + 1) * gbs) for k in range(n)]
        sizes = [(gbs, sum(sum(train[i].loss_mask) for i in batch)) for batch in steps]
        # shares[k][d]: the samples of step k that data-parallel rank d trains on
        shares = [[[batch[i] for i in share] for share in (
            balanced_shares([len(train[i].tokens) for i in batch], self.dp_size) if r.balance_data
            else split_for_ranks(gbs, self.dp_size))] for batch in steps]
        calls = []
        for w, (d, _, _) in zip(self.workers, self.layout):
            mine = [step[d] for step in shares]
            calls.append(w.train.remote([[train[i] for i in s] for s in mine], sizes,
                                        [None if old is None else [old[i] for i in s] for s in mine]))
        by_rank = self._reported(calls)
        totals: dict[str, float] = {}
        for k in range(n):
            step = _across_ranks([steps_metrics[k] for steps_metrics in by_rank])
            self.count_skipped(step)
            for name, value in step.items():  # skipped steps are counted, the rest averaged over the steps
                totals[name] = totals.get(name, 0.0) + (value if name.endswith("skipped_steps") else value / n)
        return totals

    def count_skipped(self, step: dict[str, float]) -> None:
        """Count a step the backends skipped for a non-finite loss or gradient norm; at
        `max_consecutive_nonfinite_steps` in a row the run stops, before this rollout writes anything (a run
        that only produces NaN would otherwise go on to its end; checkpoints wait out a run of skipped steps,
        so the latest one is from before it)."""
        skipped = step.get("skipped_steps") or step.get("critic_skipped_steps")
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        limit = self.cfg.optimizer.max_consecutive_nonfinite_steps
        if self.skipped_in_a_row >= limit:
            raise RunError(f"{limit} optimizer steps in a row had a non-finite loss or gradient norm and were skipped "
                           f"(optimizer.max_consecutive_nonfinite_steps); the latest checkpoint is "
                           f"{checkpoint.latest(self.save_dir) or 'none'}")

    def sync_weights(self, version: int) -> float:
        """The policy's weights to every engine: colocated, each engine takes them from its own workers."""
        import ray

        start = time.perf_counter()
        assert self.pool is not None, "start_actors first"
        if self.cfg.perf.colocate:
            ray.get([w.sync_engine.remote(version) for w in self.workers])
            self.pool.forget_prefixes()  # the engines flushed their caches when they released memory for training
        else:
            self.pool.sync_weights(self.workers, version)
        return time.perf_counter() - start

    def evaluate(self, rollout_id: int) -> dict[str, float]:
        out: dict[str, float] = {}
        n = self.cfg.eval.n_samples_per_eval_prompt
        for k, (name, dataset) in enumerate(self.eval_sets.items()):
            samples = self.sampler.evaluate(dataset, rollout_id, n, self.sampling_params(evaluation=True),
                                            EngineClient(self.pool, self.tokenizer), salt=EVAL_SEED_SALT * (k + 1))
            out |= summarize(name, [s.scored_reward for s in samples], n)
        return out

    def save(self, completed: int) -> Path:
        """Checkpoint `completed` rollouts; with `ckpt.async_save` only begin it (`finish_saving` waits for it),
        once the one before is sealed."""
        import ray

        self.heartbeat.beat(completed, "save")
        self.finish_saving()
        start = time.monotonic()
        sampler_state, pending = self.ahead.settle() if self.ahead else (self.sampler.state_dict(), [])
        state = {"rollout_id": completed, **sampler_state, "pending": [g.to_json() for g in pending],
                 "seed": self.cfg.run.seed}

        def begin(tmp: Path) -> None:
            ray.get([w.save.remote(str(tmp)) for w in self.workers])
            (tmp / "state.json").write_text(json.dumps(state))

        def written() -> None:
            from rl.train.worker import CHECKPOINT

            ray.get([w.saved.options(concurrency_group=CHECKPOINT).remote() for w in self.workers])
            self.timings.save_s = time.monotonic() - start

        try:
            if self.cfg.ckpt.async_save:
                self.saving = checkpoint.InBackground(self.save_dir, completed, begin, written, self.cfg.ckpt.keep_last)
                return self.saving.folder
            folder = checkpoint.write(self.save_dir, completed, begin, self.cfg.ckpt.keep_last)
        except checkpoint.CheckpointError as e:
            raise RunError(str(e)) from None
        self.timings.save_s = time.monotonic() - start
        self.timings.write(self.run_dir)
        return folder

    def finish_saving(self) -> None:
        """Wait for the checkpoint being written in the background, if any, to be sealed."""
        if self.saving is None:
            return
        saving, self.saving = self.saving, None
        try:
            saving.result()
        except checkpoint.CheckpointError as e:
            raise RunError(str(e)) from None
        self.timings.write(self.run_dir)

    def save_before_stopping(self, completed: int) -> None:
        """The checkpoint of a stop (begun: the caller waits for it), unless the time left is too short for one
        (then the last complete one stands, and the rollouts since are redone)."""
        self.finish_saving()
        left, save_s = self.stop.time_left(), self.timings.save_s
        if left is not None and save_s is not None and left < SAVE_MARGIN * save_s:
            logger.warning("stopping at rollout %d without a checkpoint: %.0fs left, a save takes %.0fs", completed,
                           left, save_s)
            return
        self.save(completed)

    def out_of_time(self, rollout_id: int) -> bool:
        """Whether the job's end (known from Slurm) leaves no room for another rollout and a save after it:
        then the run stops here, as at a signal but without one, saving while there is time."""
        left = self.stop.time_left()
        if left is None or self.timings.room_for(left):
            return False
        logger.info("stopping before rollout %d: %.0fs left, a rollout takes up to %.0fs and a save %.0fs",
                    rollout_id, left, self.timings.step_s, self.timings.save_s or 0)
        self.stop.set(reason="deadline")
        return True

    def measured_step(self, seconds: float) -> None:
        """Plan with the longest of the recent rollouts: their length varies with the responses'."""
        self.recent_steps = [*self.recent_steps, seconds][-STEPS_PLANNED_ON:]
        self.timings.step_s = max(self.recent_steps)
        self.timings.write(self.run_dir)

    def resume(self) -> tuple[int, list[Generated]]:
        """Load the newest complete checkpoint, if any; returns the first rollout to run and the rollouts
        generated ahead of it (async training)."""
        import ray

        folder = checkpoint.latest(self.load_dir, load=lambda f: ray.get([w.load.remote(str(f)) for w in self.workers]))
        if folder is None:
            return 0, []
        state = json.loads((folder / "state.json").read_text())
        self.sampler.load_state_dict(state)
        return int(state["rollout_id"]), [Generated.from_json(g) for g in state.get("pending", [])]

    # --- the loop --------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.start_actors()
        try:
            start, pending = self.resume()
            self.heartbeat.beat(start, "start")
            log = MetricsLog(self.run_dir, tensorboard=cfg.run.use_tensorboard, resume_from=start,
                             wandb=cfg if cfg.run.use_wandb else None)
            if self.start_record is not None:
                self.start_record.write_text(json.dumps({"resumed_from": start, "redone": log.dropped,
                                                         "time": time.time()}))
            progress = Progress(self.num_rollout, start)
            # What is alive now lives as long as the run: a full collection no longer walks it (with torch and
            # transformers loaded one took 0.1-0.2 s, and came every few rollouts).
            gc.freeze()
            self.sync_weights(start)
            pending_eval = self.eval_before_train() if start == 0 else {}  # before generation ahead begins
            if cfg.rollout.async_train:
                self.ahead = RolloutsAhead(self.generated, self.sampler, first=start, end=self.num_rollout,
                                           ahead=cfg.rollout.async_buffer_size, stop=self.stop.is_set,
                                           pending=pending)
            stopped_at = self.rollouts(start, log, progress, pending_eval)
            progress.close()
            log.close()
            rows = log.rows()
            return {"run_dir": str(self.run_dir), "rollouts": len(rows), "rows": rows, "workers": self.placement,
                    "stopped_at": stopped_at, "stop_reason": self.stop.reason if stopped_at is not None else None}
        finally:
            if self.ahead:
                self.ahead.close()
            self.stop_actors()

    def rollouts(self, start: int, log: MetricsLog, progress: Progress, pending_eval: dict[str, float]) -> int | None:
        """From rollout `start` on: generate, train, sync the weights, checkpoint when due; `pending_eval` goes
        into the first row. Returns the rollout a stop came before (its state saved where time allowed), None
        once all are done."""
        saved = start
        self.last_row_t = time.perf_counter()
        for rollout_id in range(start, self.num_rollout):
            # Safe points: before a rollout, and inside its generation (abandoned; nothing has changed yet).
            position = self.sampler.state_dict() if self.ahead is None else None
            step_start = time.monotonic()
            try:
                if self.stop.is_set() or self.out_of_time(rollout_id):
                    raise Interrupted
                self.heartbeat.beat(rollout_id, "rollout")
                batch = self.ahead.take(rollout_id) if self.ahead else self.generated(rollout_id, self.stop.is_set)
            except Interrupted:
                if self.ahead:
                    self.ahead.close()
                elif position is not None:
                    self.sampler.load_state_dict(position)
                if saved != rollout_id:
                    self.save_before_stopping(rollout_id)
                self.finish_saving()
                self.heartbeat.beat(rollout_id, "stopped")
                return rollout_id
            row = self.learn(batch, pending_eval)
            pending_eval = {}
            self.measured_step(time.monotonic() - step_start)
            if self.save_due(rollout_id + 1):
                row["checkpoint"] = str(self.save(rollout_id + 1))
                saved = rollout_id + 1
            log.write(row)
            progress.update(row)
        self.finish_saving()
        self.heartbeat.beat(self.num_rollout, "done")
        return None

    def save_due(self, completed: int) -> bool:
        """A checkpoint after the last rollout and every `save_interval`, except during a run of skipped steps
        (the latest checkpoint then stays one from before them)."""
        return completed == self.num_rollout or (due(completed, self.cfg.ckpt.save_interval)
                                                 and not self.skipped_in_a_row)

    def eval_before_train(self) -> dict[str, float]:
        """A new run's evaluation of the initial policy, for the first rollout's row (`eval_before_train/`)."""
        if not self.eval_sets or self.cfg.eval.skip_eval_before_train:
            return {}
        self.heartbeat.beat(0, "eval")
        return {k.replace("eval/", "eval_before_train/", 1): v for k, v in self.evaluate(-1).items()}

    def learn(self, batch: Generated, pending_eval: dict[str, float]) -> dict[str, Any]:
        """Train on a generated rollout and update the engines' weights (with async training, every
        `update_weights_interval` rollouts, once no generation is in progress); return its metrics row."""
        import ray

        rollout_id, samples = batch.rollout_id, batch.samples
        train = [TrainSample(tokens=s.tokens, response_length=s.response_length, loss_mask=s.loss_mask,
                             reward=s.scored_reward, rollout_log_probs=s.rollout_log_probs,
                             weight_version=min(s.weight_versions, default=0))
                 for s in samples]
        self.heartbeat.beat(rollout_id, "train")
        t1 = time.perf_counter()
        if self.cfg.perf.colocate:
            ray.get([w.to_training.remote() for w in self.workers])
        train_metrics = self.train(train, self.advantages(train))
        t2 = time.perf_counter()
        sync_s = 0.0
        if self.ahead is None or due(rollout_id + 1, self.cfg.rollout.update_weights_interval):
            self.heartbeat.beat(rollout_id, "sync")
            if self.ahead:
                self.ahead.settle()
            sync_s = self.sync_weights(rollout_id + 1)
        assert self.pool is not None, "start_actors first"
        row = rollout_row(rollout_id, samples, min(t.weight_version for t in train), train_metrics, {
            "time_rollout_s": batch.seconds,
            "time_train_s": t2 - t1,
            "time_sync_s": sync_s,
            "engine_restarts": self.pool.restarts,
            **({"dynamic_sampling_dropped_groups": batch.dropped} if self.sampler.keep_group else {}),
            **({"partial_rollout_buffered_groups": len(self.sampler.buffer)} if self.cfg.rollout.partial_rollout
               else {}),
            "samples_per_s": len(samples) / (time.perf_counter() - self.last_row_t),  # since the last row
            **pending_eval,
            "num_rollout": self.num_rollout,
            "timestamp": time.time(),
        })
        if self.eval_sets and due(rollout_id + 1, self.cfg.eval.eval_interval):
            self.heartbeat.beat(rollout_id, "eval")
            row |= self.evaluate(rollout_id)
        self.last_row_t = time.perf_counter()
        return row


def due(completed: int, interval: int | None) -> bool:
    """Whether an action every `interval` rollouts (None: never) falls after `completed` rollouts."""
    return bool(interval and completed % interval == 0)


def _across_ranks(results: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from every rank's: loss terms are partial sums of the global mean on each rank;
    gradient norms, learning rates and skipped steps (the policy's, and the critic's under `critic_`) are the same
    on all."""
    same = ("grad_norm", "lr", "skipped_steps")
    return {k: results[0][k] if k.removeprefix("critic_") in same else sum(m[k] for m in results) for k in results[0]}


def _address_and_free_port() -> tuple[str, int]:
    import ray

    from rl.ports import free_port

    return ray.util.get_node_ip_address(), free_port()


def run(cfg: RLConfig, run_dir: Path | None = None, ray_address: str | None = None,
        stop: StopRequest | None = None, start_record: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the GRPO loop of `cfg`, writing into its run folder; on the Ray cluster at `ray_address`
    when given, else on a Ray started here. Once `stop` is set the loop stops at its next safe point (see
    `rl.interrupt`), checkpoints if time allows, and returns with `stopped_at` set to the rollout it would have
    run next. `start_record` (a file) receives the checkpoint resumed from and the rollouts redone."""
    return Driver(cfg, run_dir or cfg.run_dir(), ray_address, stop, start_record).run()
