"""Training one SCXNN member (thesis 3.3.4): the project's one training loop.

Stages:
  1. initialise the encoder (ImageNet weights from a local file when configured, else random);
  2. hard labels: classification + reconstruction, loss = CE + lambda x MSE, the reconstruction
     target being the image inside the dilated mask of the member's own finding (zeros when the
     finding is absent; an image with the finding but no mask drawn adds no MSE term);
  3. weak labels: decoder frozen, classifier trained (the encoder too if `train_encoder`).
Each stage: Adam, lr halved after `plateau_patience` epochs without a better validation loss,
stop once the lr falls below `min_lr` (or at `max_epochs`); the best validation epoch is kept.

A checkpoint is written after every epoch and `resume` continues exactly where it stopped:
shuffling and augmentation draw from generators seeded by (seed, member, stage, epoch, sample),
so nothing random lives outside the checkpoint. Under `torchrun` each process trains on its
share of every epoch through DistributedDataParallel; only rank 0 writes files.

The pieces it drives: member_data.py (samples and stage plans), member_targets.py (classes and
reconstruction targets), member_loss.py, member_records.py (checkpoint and metrics files) and
distributed.py (processes and devices).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from scxnn_node.model.member import MemberNet, load_imagenet_encoder
from training.config import TrainingConfig
from training.distributed import DistInfo, data_parallel, resolve_device
from training.member_data import MemberSamples, StagePlan
from training.member_loss import class_weights_for, multitask_loss
from training.member_records import load_checkpoint, save_checkpoint
from training.run_layout import CHECKPOINT_FILE, RunError

log = logging.getLogger(__name__)

STAGES = ("hard", "weak")


class TrainingInterrupted(Exception):
    """Raised when a run stops early on purpose (`stop_after_epochs`); the checkpoint holds it."""


class _TrainingView(nn.Module):
    """The member's training forward as `forward`, which DistributedDataParallel wraps."""

    def __init__(self, member: MemberNet, with_recon: bool) -> None:
        super().__init__()
        self.member = member
        self.with_recon = with_recon

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.with_recon:
            return self.member.forward_multitask(x)
        return self.member(x), None


class MemberTrainer:
    """Trains one member through the stages; owns its directory in the run."""

    def __init__(
        self,
        config: TrainingConfig,
        finding: str,
        member_dir: Path,
        dist_info: DistInfo | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.tc = config.training
        self.finding = finding
        self.member_index = config.catalogue.index_of(finding)
        self.dir = member_dir
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(self.tc.device, self.dist)
        self.progress = progress and self.dist.is_main
        self.size = config.preprocessing.size
        cuda = self.device.type == "cuda"
        self.channels_last = self.tc.channels_last == "on" or (
            self.tc.channels_last == "auto" and cuda
        )
        amp = self.tc.amp
        if amp == "auto":
            amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16 and cuda
        )
        if self.dist.distributed:
            log.info(
                "member %s: rank %d of %d on %s",
                finding,
                self.dist.rank,
                self.dist.world,
                self.device,
            )

    # -- building blocks -------------------------------------------------------------------

    def _new_member(self) -> MemberNet:
        torch.manual_seed(self.config.seed * 1000 + self.member_index)
        member = MemberNet(self.config.architecture, with_decoder=True)
        if self.config.imagenet_weights is not None:
            load_imagenet_encoder(member, self.config.imagenet_weights)  # stage 1
        member.to(self.device)
        if self.channels_last:
            member.to(memory_format=torch.channels_last)
        return member

    def _set_trainable(self, member: MemberNet, plan: StagePlan) -> list[nn.Parameter]:
        assert member.decoder is not None
        for p in member.parameters():
            p.requires_grad_(True)
        if not plan.with_recon:
            for p in member.decoder.parameters():
                p.requires_grad_(False)
            if not plan.train_encoder:
                for p in member.encoder.parameters():
                    p.requires_grad_(False)
        return [p for p in member.parameters() if p.requires_grad]

    @staticmethod
    def _set_modes(member: MemberNet, plan: StagePlan, training: bool) -> None:
        member.train(training)
        if training and not plan.with_recon:
            # Frozen parts keep their batch-norm statistics too.
            assert member.decoder is not None
            member.decoder.eval()
            if not plan.train_encoder:
                member.encoder.eval()

    def _loader(self, dataset: MemberSamples, order: np.ndarray) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.tc.batch_size,
            sampler=order.tolist(),
            num_workers=self.tc.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self) -> Any:
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    def _seed_parts(self, stage_index: int) -> list[int]:
        return [self.config.seed, self.member_index, stage_index]

    def _epoch_order(self, n: int, stage_index: int, epoch: int) -> np.ndarray:
        order = np.random.default_rng([*self._seed_parts(stage_index), epoch]).permutation(n)
        if self.dist.distributed:
            # Pad to a multiple of the world size so every rank runs the same number of steps.
            padded = np.resize(order, -(-n // self.dist.world) * self.dist.world)
            order = padded[self.dist.rank :: self.dist.world]
        if len(order) > 1 and len(order) % self.tc.batch_size == 1:
            order = order[:-1]  # batch norm cannot train on a batch of one; reshuffled next epoch
        return order

    # -- one epoch ---------------------------------------------------------------------------

    def _train_epoch(
        self,
        model: nn.Module,
        member: MemberNet,
        plan: StagePlan,
        stage_index: int,
        epoch: int,
        optimiser: torch.optim.Optimizer,
        class_weights: torch.Tensor | None,
    ) -> dict[str, float]:
        dataset = MemberSamples(
            plan.train,
            self.finding,
            self.size,
            self.tc.mask_dilation_px,
            self.tc.augmentation,
            self._seed_parts(stage_index),
            plan.with_recon,
        )
        dataset.set_epoch(epoch)
        order = self._epoch_order(len(dataset), stage_index, epoch)
        self._set_modes(member, plan, True)
        sums = np.zeros(3)
        count = 0
        bar = tqdm(
            self._loader(dataset, order),
            desc=f"{self.finding} {plan.name} epoch {epoch + 1}",
            unit="batch",
            leave=False,
            disable=not self.progress,
        )
        for images, classes, targets, known in bar:
            x = self._to_input(images)
            with self._autocast():
                logits, recon = model(x)
            loss, ce, mse = multitask_loss(
                logits,
                classes.to(self.device),
                recon,
                targets.to(self.device) if plan.with_recon else None,
                known.to(self.device),
                class_weights,
                self.tc.recon_weight,
            )
            optimiser.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(optimiser)
            self.scaler.update()
            n = len(classes)
            sums += np.array([loss.item(), ce.item(), mse.item()]) * n
            count += n
            bar.set_postfix(loss=f"{sums[0] / count:.4f}")
        bar.close()
        totals = torch.tensor([*sums, count], dtype=torch.float64, device=self.device)
        if self.dist.distributed:
            dist.all_reduce(totals)
        s = totals.cpu().numpy()
        # Plain floats: the checkpoint holds only tensors and Python values (weights_only load).
        return {
            k: float(s[i] / s[3]) for i, k in enumerate(("train_loss", "train_ce", "train_mse"))
        }

    @torch.no_grad()
    def _validate(
        self, member: MemberNet, plan: StagePlan, class_weights: torch.Tensor | None
    ) -> dict[str, float]:
        items = plan.val or plan.train  # without validation data the training loss decides
        dataset = MemberSamples(
            items, self.finding, self.size, self.tc.mask_dilation_px, None, [], plan.with_recon
        )
        self._set_modes(member, plan, False)
        view = _TrainingView(member, plan.with_recon)
        sums = np.zeros(4)
        count = 0
        for images, classes, targets, known in self._loader(dataset, np.arange(len(dataset))):
            with self._autocast():
                logits, recon = view(self._to_input(images))
            classes = classes.to(self.device)
            loss, ce, mse = multitask_loss(
                logits,
                classes,
                recon,
                targets.to(self.device) if plan.with_recon else None,
                known.to(self.device),
                class_weights,
                self.tc.recon_weight,
            )
            correct = (logits.argmax(1) == classes).sum().item()
            n = len(classes)
            sums += np.array([loss.item() * n, ce.item() * n, mse.item() * n, correct])
            count += n
        keys = ("val_loss", "val_ce", "val_mse", "val_accuracy")
        return {k: float(sums[i] / count) for i, k in enumerate(keys)}

    # -- checkpoints and records -------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / CHECKPOINT_FILE

    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_checkpoint(self.dir, state)
        if self.dist.distributed:
            dist.barrier()

    # -- the stages --------------------------------------------------------------------------

    def train(
        self,
        plans: Sequence[StagePlan],
        resume: bool = False,
        stop_after_epochs: int | None = None,
    ) -> MemberNet:
        """Run the stages; returns the trained member (with decoder) on the CPU."""
        if self.checkpoint_path.exists() and not resume:
            raise RunError(
                f"{self.checkpoint_path} exists: pass --resume to continue that training, or "
                "use a new run directory"
            )
        member = self._new_member()
        if self.dist.is_main:
            log.info(
                "member %s: training on %s, precision %s, channels_last %s",
                self.finding,
                self.device,
                str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
                self.channels_last,
            )
        state: dict[str, Any] = {
            "fingerprint": self.config.fingerprint(),
            "stage": 0,
            "epoch": 0,
            "stage_done": False,
            "history": [],
        }
        if resume and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path, self.config.fingerprint())
            member.load_state_dict(state["model"])
            log.info(
                "member %s: resuming at stage %s, epoch %d",
                self.finding,
                STAGES[min(state["stage"], len(STAGES) - 1)],
                state["epoch"],
            )
        epochs_run = 0
        for stage_index, plan in enumerate(plans):
            if stage_index < state["stage"] or (
                stage_index == state["stage"] and state["stage_done"]
            ):
                continue
            if not plan.train or plan.max_epochs == 0:
                log.info(
                    "member %s: no %s-label training data; stage skipped", self.finding, plan.name
                )
                state.update(stage=stage_index + 1, epoch=0, stage_done=False)
                continue
            continuing = (
                state["stage"] == stage_index and state["epoch"] > 0 and "optimiser" in state
            )
            params = self._set_trainable(member, plan)
            optimiser = torch.optim.Adam(
                params, lr=self.tc.optimiser.lr, weight_decay=self.tc.optimiser.weight_decay
            )
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimiser,
                mode="min",
                factor=self.tc.optimiser.lr_factor,
                patience=self.tc.optimiser.plateau_patience,
            )
            start_epoch, best_val, best_model = 0, float("inf"), None
            if continuing:
                optimiser.load_state_dict(state["optimiser"])
                scheduler.load_state_dict(state["scheduler"])
                self.scaler.load_state_dict(state["scaler"])
                start_epoch, best_val, best_model = (
                    state["epoch"],
                    state["best_val"],
                    state["best_model"],
                )
            labels = np.array([i.label for i in plan.train])
            weights = class_weights_for(labels).to(self.device) if self.tc.class_weighting else None
            model = data_parallel(_TrainingView(member, plan.with_recon), self.device, self.dist)
            for epoch in range(start_epoch, plan.max_epochs):
                started = time.monotonic()
                row: dict[str, Any] = {"stage": plan.name, "epoch": epoch + 1}
                row["lr"] = optimiser.param_groups[0]["lr"]
                row.update(
                    self._train_epoch(model, member, plan, stage_index, epoch, optimiser, weights)
                )
                row["train_seconds"] = round(time.monotonic() - started, 3)
                row.update(self._validate(member, plan, weights))
                row["seconds"] = round(time.monotonic() - started, 3)
                scheduler.step(row["val_loss"])
                if row["val_loss"] < best_val:
                    best_val = row["val_loss"]
                    best_model = copy.deepcopy(member.state_dict())
                stop = optimiser.param_groups[0]["lr"] < self.tc.optimiser.min_lr
                done = stop or epoch + 1 == plan.max_epochs
                if done and best_model is not None:
                    member.load_state_dict(best_model)
                state.update(
                    stage=stage_index,
                    epoch=epoch + 1,
                    stage_done=done,
                    model=member.state_dict(),
                    optimiser=optimiser.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=self.scaler.state_dict(),
                    best_val=best_val,
                    best_model=best_model,
                )
                state["history"].append(row)
                self._save_checkpoint(state)
                if self.dist.is_main:
                    log.info(
                        "member %s %s epoch %d: train %.4f val %.4f acc %.3f lr %.2g (%.0f s)",
                        self.finding,
                        plan.name,
                        epoch + 1,
                        row["train_loss"],
                        row["val_loss"],
                        row["val_accuracy"],
                        row["lr"],
                        row["seconds"],
                    )
                epochs_run += 1
                if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                    raise TrainingInterrupted(
                        f"member {self.finding}: stopped after {epochs_run} epoch(s) as asked; "
                        "continue with --resume"
                    )
                if done:
                    break
            state.update(stage=stage_index + 1, epoch=0, stage_done=False)
        member.eval()
        for p in member.parameters():
            p.requires_grad_(True)
        return member.to("cpu", memory_format=torch.contiguous_format)
