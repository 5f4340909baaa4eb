"""CLIP score of each image against its prompt, with open_clip and torchmetrics' semantics.

Why open_clip rather than torchmetrics' own CLIPScore: torchmetrics loads only Hugging Face checkpoints by
name (it would download them); open_clip loads a user-given file offline and knows every CLIP variant.
The number is torchmetrics': 100 * cos(image embedding, text embedding) per image, averaged, and the
average clamped at 0 (`max(mean, 0)`, as torchmetrics 1.9 `CLIPScore.compute` does; with real CLIP weights
cosines are positive, so this equals the paper's per-image clamp). The std column is over the unclamped
per-image scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from ..data import file_sha256
from .base import PER_IMAGE, Metric


class CLIPScore(Metric):
    """CLIP score (torchmetrics semantics) with an open_clip model.

    model_name: open_clip architecture (default ViT-L-14, the torchmetrics / SD-literature default).
    weights_path: an open_clip checkpoint (`--clip-weights`), e.g. `open_clip_model.safetensors` of
        hf timm/vit_large_patch14_clip_224.openai; loaded with `create_model_and_transforms(pretrained=PATH)`.
    allow_download: opt-in; loads open_clip's pretrained tag `download_tag` ("openai") from the network.
    quick_gelu: OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain "ViT-L-14" config uses
        GELU, so leave this True for OpenAI weights and set False for LAION/DataComp weights.
    """

    name = "clip_score"
    columns = ("clip_score", "clip_score_std", "clip_model")
    intervals: ClassVar[dict[str, tuple[str, bool]]] = {
        "clip_score": ("mean", True)
    }  # bootstrap of the per-image mean; paired test vs FP32

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        weights_path: str | Path | None = None,
        *,
        allow_download: bool = False,
        download_tag: str = "openai",
        quick_gelu: bool = True,
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ) -> None:
        self.model_name = model_name
        self.weights_path = Path(weights_path) if weights_path else None
        self.allow_download = allow_download
        self.download_tag = download_tag
        self.quick_gelu = quick_gelu
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._loaded: tuple[Any, Any, Any] | None = None
        self._weights_sha: str | None = None
        self._n: int | None = None

    def unavailable(self) -> str | None:
        if self.weights_path is not None and not self.weights_path.is_file():
            return (
                f"--clip-weights {self.weights_path} is not a file; pass an open_clip checkpoint of {self.model_name}"
            )
        if self.weights_path is None and not self.allow_download:
            return (
                f"no CLIP weights: pass --clip-weights PATH (an open_clip {self.model_name} file) or --allow-download"
            )
        return None

    def weights_id(self) -> str:
        """sha256 of the weights file, or the open_clip tag when downloaded."""
        if self.weights_path is None:
            return f"open_clip:{self.download_tag}"
        if self._weights_sha is None:
            self._weights_sha = file_sha256(self.weights_path)
        return self._weights_sha

    def model_id(self) -> str:
        gelu = "+quickgelu" if self.quick_gelu else ""
        return f"{self.model_name}{gelu}:{self.weights_id()[:12]}"

    def protocol(self) -> dict[str, Any]:
        available = self.unavailable() is None
        return {
            "model": self.model_name,
            "quick_gelu": self.quick_gelu,
            "weights": self.weights_id() if available else None,
            "n_images": self._n,
            "preprocess": "round(x * 255) to uint8 PIL, then open_clip's eval transform (resize, center crop, "
            "normalize)",
            "text": "open_clip tokenizer (truncated to the model's context length)",
            "score": "max(mean_i 100 * cos(img_i, text_i), 0) as torchmetrics CLIPScore; std unclamped",
        }

    def load(self) -> tuple[Any, Any, Any]:
        """(model, eval transform, tokenizer), loaded once."""
        if self._loaded is None:
            import open_clip

            pretrained = str(self.weights_path) if self.weights_path else self.download_tag
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=pretrained, device=self.device, force_quick_gelu=self.quick_gelu
            )
            self._loaded = (model.eval(), preprocess, open_clip.get_tokenizer(self.model_name))
        return self._loaded

    def per_image(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """100 * cos(image_i, prompt_i), unclamped, float64 [N]."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        model, preprocess, tokenizer = self.load()
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scores = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = pixels[start : start + self.batch_size]
                x = torch.stack([preprocess(Image.fromarray(a)) for a in batch]).to(self.device)
                text = tokenizer(prompts[start : start + self.batch_size]).to(self.device)
                img = model.encode_image(x, normalize=True)
                txt = model.encode_text(text, normalize=True)
                scores.append(100 * (img * txt).sum(-1).double().cpu())
        return torch.cat(scores)

    def compute(self, images: torch.Tensor, prompts: list[str], baseline: torch.Tensor | None) -> dict[str, Any]:
        scores = self.per_image(images, prompts)
        self._n = len(scores)
        return {
            "clip_score": max(float(scores.mean()), 0.0),
            "clip_score_std": float(scores.std()) if len(scores) > 1 else None,
            "clip_model": self.model_id(),
            PER_IMAGE: {"clip_score": scores},
        }
