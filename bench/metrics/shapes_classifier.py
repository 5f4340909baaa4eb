"""A small CNN that reads the attributes of a shapes-dataset image (`stable_diffusion.shapes`).

It is the feature network of the built-in, download-free quality metrics (`bench.metrics.shapes`): one head per
label (shape, colour, size, count, position, background) on a shared 128-d penultimate layer. It is an
in-domain stand-in for CLIP / Inception: it only knows the procedural shapes world.

Trained on fresh generator images of *both* splits (it is a measuring instrument, not the generative model:
it must read held-out (shape, colour) pairs too), with mild blur / noise / colour-jitter augmentation so that
imperfect generated images are still read. Train and save the shipped weights with

    .venv/bin/python -m bench.metrics.shapes_classifier --train

and measure per-head accuracy on fresh held-out images with `--eval`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from stable_diffusion.defaults import WEIGHTS_DIR
from stable_diffusion.shapes import VOCAB, ShapesDataset, to_tensor

log = logging.getLogger("bench.metrics.shapes_classifier")

WEIGHTS = WEIGHTS_DIR / "shapes-classifier.safetensors"
HEADS: tuple[str, ...] = tuple(VOCAB)
FEATURES = 128
TRAIN_SEED = 1001  # generator seeds of the classifier's training images (not the sweep's seed 0)
EVAL_SEED = 2002  # fresh images for the accuracy figure


class ShapesClassifier(nn.Module):
    """float [N, 3, H, W] in [0, 1] (resized to 64x64 if needed) -> {head: logits}; `features` -> [N, 128]."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(3, 24, stride=2),  # 32
            block(24, 32), nn.MaxPool2d(2),  # 16
            block(32, 48), nn.MaxPool2d(2),  # 8
            block(48, 64), nn.MaxPool2d(2),  # 4
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({h: nn.Linear(FEATURES, len(VOCAB[h])) for h in HEADS})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (64, 64):
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return self.fc(self.body((x - 0.5) / 0.5))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {h: head(f) for h, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 128) -> dict[str, list[str]]:
        """Predicted label names per head for images [N, 3, H, W] in [0, 1]."""
        self.eval()
        out: dict[str, list[str]] = {h: [] for h in HEADS}
        for chunk in x.split(batch):
            logits = self(chunk.float())
            for h in HEADS:
                out[h] += [VOCAB[h][i] for i in logits[h].argmax(1).tolist()]
        return out


class PenultimateFeatures(nn.Module):
    """The classifier's 128-d penultimate layer as an `nn.Module` for `bench.metrics.fid.FID`."""

    def __init__(self, classifier: ShapesClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


def load_classifier(path: str | Path = WEIGHTS) -> ShapesClassifier:
    from safetensors.torch import load_file

    model = ShapesClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval().requires_grad_(False)


def save_classifier(model: ShapesClassifier, path: str | Path = WEIGHTS) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", "heads": ",".join(HEADS)})
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
def labelled_batch(split: str, seed: int, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n generator images (float [n, 3, 64, 64] in [0, 1]) and their label indices per head."""
    imgs, _, labels = ShapesDataset(split, seed).batch(start, n)
    targets = {h: torch.tensor([VOCAB[h].index(lab[h]) for lab in labels]) for h in HEADS}
    return to_tensor(imgs), targets


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild degradations generated images show: blur, noise, small colour/brightness shifts."""
    n = len(x)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(n, 1, 1, 1, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.5)
    x = x * (1 - w) + blur * w
    x = x * (1 + 0.08 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)) + 0.06 * (
        torch.rand(n, 1, 1, 1, generator=gen) - 0.5
    )
    x = x + torch.randn(x.shape, generator=gen) * 0.04 * torch.rand(n, 1, 1, 1, generator=gen)
    return x.clamp(0, 1)


def train(steps: int = 1000, batch: int = 64, lr: float = 2e-3, seed: int = 0, minutes: float = 10.0,
          progress: bool = True) -> ShapesClassifier:  # fmt: skip
    """Train on fresh images of both splits (index stream never repeats)."""
    torch.manual_seed(seed)
    model = ShapesClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.monotonic()
    bar = tqdm(range(steps), desc="train classifier", disable=not progress)
    for step in bar:
        n_held = batch // 4  # a quarter from the held-out pairs so every (shape, colour) pair is seen
        xa, ya = labelled_batch("train", TRAIN_SEED + seed, step * (batch - n_held), batch - n_held)
        xb, yb = labelled_batch("heldout", TRAIN_SEED + seed, step * n_held, n_held)
        x = augment(torch.cat([xa, xb]), gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[h], torch.cat([ya[h], yb[h]])) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if step % 200 == 0:
            log.info("step %d loss %.4f (%.1f min)", step, float(loss), (time.monotonic() - t0) / 60)
        if time.monotonic() - t0 > minutes * 60:
            log.warning("time budget of %.1f min reached at step %d", minutes, step)
            break
    return model.eval()


@torch.no_grad()
def evaluate(model: ShapesClassifier, split: str = "heldout", n: int = 512, seed: int = EVAL_SEED) -> dict[str, float]:
    """Per-head accuracy (and all-heads-correct) on n fresh generator images."""
    x, y = labelled_batch(split, seed, 0, n)
    pred = model.eval()(x)
    correct = {h: (pred[h].argmax(1) == y[h]) for h in HEADS}
    out = {h: float(c.float().mean()) for h, c in correct.items()}
    out["all"] = float(torch.stack(list(correct.values())).all(0).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.metrics.shapes_classifier", description=__doc__.split("\n")[0])
    p.add_argument("--train", action="store_true", help="train and save the weights")
    p.add_argument("--eval", action="store_true", help="per-head accuracy of the saved weights on held-out images")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--out", default=str(WEIGHTS))
    a = p.parse_args(argv)
    if not (a.train or a.eval):
        p.error("pass --train and/or --eval")
    torch.set_num_threads(a.threads)
    if a.train:
        t0 = time.monotonic()
        model = train(a.steps, a.batch, a.lr, a.seed, a.minutes, progress=False)
        save_classifier(model, a.out)
        print(f"trained in {(time.monotonic() - t0) / 60:.1f} min, wrote {a.out}")
    model = load_classifier(a.out)
    for split in ("heldout", "train"):
        acc = evaluate(model, split, a.n_eval)
        print(f"{split:8s} accuracy on {a.n_eval} fresh images: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
