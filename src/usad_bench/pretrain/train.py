"""``usad-bench pretrain``: Ultrasound-CLIP's semantic-aware objective on any open_clip model, with Lightning.

Output folder:

* ``model.safetensors``: the open_clip state dict; ``--pretrained OUT/model.safetensors`` loads it
  anywhere in the suite (with the same ``--backbone`` name);
* ``pretrain.json``: configuration, corpus, final losses, images/s and wall time;
* ``checkpoints/last.ckpt``: Lightning's resumable state (``--resume`` continues from it);
* ``logs/``: Lightning's CSV log (and wandb's, with ``--wandb``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import open_clip
import torch
from safetensors.torch import save_file

from usad_bench.backbone import BackboneSpec, register_tiny_model
from usad_bench.errors import UsadError
from usad_bench.io import atomic_path, write_json
from usad_bench.pretrain.data import PairDataset, collate, read_pairs
from usad_bench.pretrain.objective import semantic_aware_loss

log = logging.getLogger(__name__)

SYNTHETIC_NOTE = (
    "pretrained on synthetic images only, for offline checks and teaching, not a clinical model; "
    "figures made with it are synthetic, not results"
)


@dataclass
class PretrainConfig:
    backbone: str = "usad-tiny"
    init: str | None = None  # starting weights (tag or file); None = random
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    semantic_weight: float = 1.0  # Ultrasound-CLIP's similarity_weight
    temperature: float = 0.07  # semantic temperature (targets and KL)
    augment: bool = True  # flips and gain / contrast jitter (scanner variation)
    seed: int = 0
    accelerator: str = "auto"
    devices: str = "1"
    precision: str = "32-true"
    save_dtype: str = "fp16"  # weights file dtype: fp16 halves the size (the tiny model's vocabulary is 3M params)
    limit_images: int | None = None  # use the first N rows only (quick checks)
    threads: int = 0  # CPU threads for torch; 0 = torch's default. A fixed count keeps CPU runs bit-identical
    extra: dict = field(default_factory=dict)


class SemanticCLIPModule(L.LightningModule):
    """Trains every weight of an open_clip model with :func:`semantic_aware_loss`."""

    def __init__(self, model: torch.nn.Module, tokenizer, cfg: PretrainConfig, dataset: PairDataset, steps: int):
        super().__init__()
        self.model, self.tokenizer, self.cfg, self.dataset, self.steps = model, tokenizer, cfg, dataset, steps
        preprocess = open_clip.get_model_preprocess_cfg(model)
        self.register_buffer(
            "mean", torch.tensor(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
        )
        self.register_buffer("std", torch.tensor(preprocess.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1))

    def on_train_epoch_start(self) -> None:
        self.dataset.epoch = self.current_epoch  # new caption wordings every epoch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = self._prepare(batch["images"])  # (B, 3, S, S)
        tokens = self.tokenizer(batch["captions"]).to(self.device)  # (B, C)
        image_emb = self.model.encode_image(images, normalize=True)
        text_emb = self.model.encode_text(tokens, normalize=True)
        similarity = self.dataset.similarity(batch["indices"]).to(self.device)
        parts = semantic_aware_loss(
            image_emb,
            text_emb,
            self.model.logit_scale.exp(),
            similarity,
            self.cfg.semantic_weight,
            self.cfg.temperature,
        )
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, prog_bar=True, batch_size=images.shape[0])
        return parts["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():  # as open_clip's trainer: keep the inverse temperature <= 100
            self.model.logit_scale.clamp_(0, math.log(100))

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> augmented, normalised float images."""
        x = images.float() / 255.0
        if self.cfg.augment:
            b = x.shape[0]
            flip = torch.rand(b, device=x.device) < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)  # left-right only: the skin stays on top
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            contrast = torch.empty(b, 1, 1, 1, device=x.device).uniform_(0.7, 1.35)
            shift = torch.empty(b, 1, 1, 1, device=x.device).uniform_(-0.12, 0.15)
            x = ((x - mean) * contrast + mean + shift).clamp(0, 1)  # another gain / dynamic range
        return (x - self.mean) / self.std

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=self.cfg.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        warmup = max(1, int(self.cfg.warmup_fraction * self.steps))

        def schedule(step: int) -> float:  # linear warm-up, cosine decay (open_clip's default)
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, self.steps - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_model(cfg: PretrainConfig) -> tuple[torch.nn.Module, object, int]:
    """The trainable open_clip model, its tokenizer and input size."""
    register_tiny_model()
    spec = BackboneSpec(name=cfg.backbone, pretrained=cfg.init)
    pretrained = None
    if not spec.is_random:
        from usad_bench.backbone import _resolve_weights

        pretrained, _ = _resolve_weights(spec)
    try:
        model = open_clip.create_model(cfg.backbone, pretrained=pretrained)
    except RuntimeError as exc:
        raise UsadError(f"could not build {cfg.backbone!r} for pretraining: {str(exc).splitlines()[0]}") from exc
    size = model.visual.image_size
    return model, open_clip.get_tokenizer(cfg.backbone), int(size[0] if isinstance(size, (tuple, list)) else size)


def pretrain(manifest: Path, out: Path, cfg: PretrainConfig, resume: bool = False, wandb: bool = False) -> Path:
    """Train, then write ``out/model.safetensors`` and ``out/pretrain.json``; return the weights path."""
    out = Path(out)
    records = read_pairs(Path(manifest))[: cfg.limit_images or None]
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.manual_seed(cfg.seed)  # the random initial weights
    model, tokenizer, image_size = build_model(cfg)
    dataset = PairDataset(records, image_size, seed=cfg.seed)
    if len(dataset) < 2:
        raise UsadError(f"{manifest}: pretraining needs at least 2 captioned images, got {len(dataset)}")
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=min(cfg.batch_size, len(dataset)), shuffle=True, drop_last=True, collate_fn=collate,
        generator=generator,
    )  # fmt: skip
    module = SemanticCLIPModule(model, tokenizer, cfg, dataset, steps=cfg.epochs * len(loader))
    trainer = _trainer(cfg, out, wandb)
    ckpt = out / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=str(ckpt) if resume and ckpt.is_file() else None)
    seconds = time.perf_counter() - started
    weights = export_weights(model, out / "model.safetensors", cfg.save_dtype)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    write_json(
        out / "pretrain.json",
        {
            "config": asdict(cfg),
            "manifest": str(Path(manifest).resolve()),
            "n_pairs": len(dataset),
            "steps": int(trainer.global_step),
            "final": metrics,
            "train_s": round(seconds, 1),
            "images_per_s": round(trainer.global_step * loader.batch_size / max(seconds, 1e-9), 1),
            "weights": weights.name,
            "note": SYNTHETIC_NOTE if _is_synthetic(records) else "",
        },
    )
    return weights


def _trainer(cfg: PretrainConfig, out: Path, wandb: bool) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(str(out), name="logs", version="")]
    if wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project="usad_bench", name=f"pretrain-{out.name}", save_dir=str(out)))
    devices = int(cfg.devices) if str(cfg.devices).isdigit() else cfg.devices
    return L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=devices,
        precision=cfg.precision,
        deterministic=True,
        logger=loggers,
        callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0)],
        log_every_n_steps=1,  # every step: small runs get a log too, and the CSV stays small
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def export_weights(model: torch.nn.Module, path: Path, dtype: str = "fp16") -> Path:
    """The open_clip state dict as safetensors (atomic); open_clip casts it back on load."""
    cast = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if cast is None:
        raise UsadError(f"save dtype must be fp16, bf16 or fp32, got {dtype!r}")
    state = {
        k: (v.detach().to("cpu", cast) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})  # one key: safetensors orders metadata arbitrarily
    return path


def _is_synthetic(records) -> bool:
    return all(r.sample.dataset == "synth" for r in records)
