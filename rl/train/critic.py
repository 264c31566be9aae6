"""PPO's critic on the torch path: the policy's architecture with a scalar head (transformers'
`…ForTokenClassification` with one label, from the same checkpoint), trained with the clipped value loss.
V_t is read where the policy reads the logits of response token t: the value of the state before it.
Everything else (micro-batches, data parallelism, optimizer, schedule, checkpoints) is the policy
backend's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rl.batch import TrainSample, pad_rows
from rl.train.objective import value_objective
from rl.train.torch_backend import TorchBackend

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class TorchCritic(TorchBackend):
    def _load(self, init_from: str | Path) -> PreTrainedModel:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(init_from, dtype=torch.float32, num_labels=1)

    def _base_lr(self) -> float:
        return self.cfg.optimizer.critic_lr or self.cfg.optimizer.lr

    def _needs_reference(self) -> bool:
        return False

    def _values(self, model: torch.nn.Module, samples: list[TrainSample]) -> Tensor:
        out, _, valid = self._at_responses(model, samples)
        return out[..., 0] * valid

    @torch.no_grad()
    def compute_values(self, samples: list[TrainSample]) -> list[list[float]]:
        """V_t of each sample's response tokens."""
        return self._per_response_token(lambda batch: self._values(self.model, batch), samples)

    def _micro_batch_loss(self, samples: list[TrainSample], old_log_probs: list[list[float]] | None,
                          num_samples: int, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
        values = self._values(self.module, samples)

        def rows(per_sample: Sequence[Sequence[float] | None]) -> Tensor:
            return pad_rows([r or [0.0] * s.response_length for r, s in zip(per_sample, samples)],
                            values.shape[1]).to(self.device)

        return value_objective(self.cfg.grpo, values=values, old_values=rows([s.values for s in samples]),
                               returns=rows([s.returns for s in samples]), mask=rows([s.loss_mask for s in samples]),
                               num_samples=num_samples, num_tokens=num_tokens)
