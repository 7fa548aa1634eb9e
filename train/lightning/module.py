"""GPTModule: gptrain's GPT as a LightningModule, trained with gptrain's own recipe.

The optimizer is train.optim.build_optimizer's (AdamW with weight-decay groups, or Muon + AdamW as one
optimizer), the learning rate (and Muon's momentum) train.optim.apply_schedule's, stepped once per
optimizer step by StepSchedule; Lightning does the accumulation (loss / accumulate_grad_batches),
clipping (gradient_clip_val) and precision. So a Lightning run makes the same updates as
`python -m train` with the same config.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.optim.lr_scheduler import LRScheduler

from model import GPT
from model.loss import loss_totals
from train.config import Config
from train.optim import apply_schedule, build_optimizer


class StepSchedule(LRScheduler):
    """train.optim.apply_schedule as a torch scheduler: last_epoch counts optimizer steps, and each step()
    sets every group's learning rate (and Muon's momentum) for the next one. Its state is the step alone,
    as the schedule is a function of the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config):
        self.cfg = cfg
        super().__init__(optimizer)  # steps once: the rates of step 0

    def get_lr(self) -> list[float]:
        c = self.cfg
        apply_schedule(self.optimizer, self.last_epoch, c.optim, c.schedule, c.train.max_steps)
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self._last_lr = self.get_lr()


class GPTModule(L.LightningModule):
    """training_step: one micro-batch's mean loss. The loss logged per optimizer step is the mean over its
    micro-batches (and ranks), as train/loop.py logs it; validation sums per-token losses and counts
    (model.loss.loss_totals) over every batch and rank before dividing, as train/loop.py's evaluate."""

    def __init__(self, cfg: Config, model: GPT, metadata: dict, val_weights: list[float]):
        super().__init__()
        self.cfg, self.model = cfg, model
        self.metadata = metadata  # the artifact's: tokenizer, eot_id, dataset
        self.val_weights = val_weights  # one per val dataloader (data.mix's weights; [1.0] for data.dir)
        self.val_loss: float | None = None
        self.val_step: int | None = None
        self._losses: list[torch.Tensor] = []
        self._val: dict[int, list[torch.Tensor]] = {}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (micro_batch, seq_len) int64 each
        loss = self.model(x, y)
        self._losses.append(loss.detach())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the last micro-batch's backward, before clipping and the step."""
        loss = sum(self._losses) / len(self._losses)
        self._losses.clear()
        lr = next(g["lr"] for g in optimizer.param_groups if g.get("name") != "muon")
        self.log("loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
        self.log("lr", lr, on_step=True, on_epoch=False, prog_bar=False)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        total, count = loss_totals(self.model, [batch])
        sums = self._val.setdefault(dataloader_idx, [torch.zeros_like(total), torch.zeros_like(count)])
        sums[0] += total
        sums[1] += count

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        reduce = self.trainer.strategy.reduce
        losses = [
            (reduce(t, reduce_op="sum") / reduce(n, reduce_op="sum")).item() for _, (t, n) in sorted(self._val.items())
        ]
        self._val.clear()
        w = self.val_weights
        self.val_loss = sum(wi * li for wi, li in zip(w, losses, strict=True)) / sum(w)
        self.val_step = self.global_step
        self.log("val_loss", self.val_loss, prog_bar=True)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.cfg.optim)
        schedule = {"scheduler": StepSchedule(optimizer, self.cfg), "interval": "step", "frequency": 1}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What train/lightning/artifact.py turns into gptrain's model artifact, as plain data."""
        checkpoint["gptrain"] = {
            "model_config": self.model.config.to_dict(),
            "metadata": {**self.metadata, "step": self.global_step, "val_loss": self.val_loss},
        }
