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

from stable_diffusion.checkpoint import safe_load
from stable_diffusion.errors import InputError, first_line

from ..data import file_sha256
from ..registry import METRICS, Column
from .base import PER_IMAGE, Metric, per_image_columns


def load_clip_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """open_clip's `load_checkpoint` conversions on a state dict we read ourselves (safely)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    if next(iter(state), "").startswith("module."):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise InputError(f"--clip-weights {path}: not open_clip {name} weights ({first})") from None


@METRICS.register
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
    order = 30
    intervals: ClassVar[dict[str, tuple[str, bool]]] = {
        "clip_score": ("mean", True)
    }  # bootstrap of the per-image mean; paired test vs FP32
    columns = (
        *per_image_columns(
            Column("clip_score", "100 * cos(image, text), torchmetrics semantics (empty without CLIP weights)",
                   label="CLIP score (100·cos)", better="higher"),
            *intervals["clip_score"],
        ),
        Column("clip_score_std", "std over images", plot=False),
        Column("clip_model", "open_clip model and weights sha256 prefix", plot=False),
    )  # fmt: skip

    @classmethod
    def from_options(cls, options: Any, reference: Any) -> CLIPScore:
        return cls(model_name=options.clip_model, weights_path=options.clip_weights,
                   allow_download=options.allow_download, download_tag=options.clip_tag,
                   quick_gelu=options.clip_quick_gelu)  # fmt: skip

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
        self._failed: str | None = None  # why a download failed: the columns stay empty

    def unavailable(self) -> str | None:
        if self._failed:
            return self._failed
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

    def prepare(self) -> None:
        if self.weights_path is not None or self.unavailable() is None:
            self.load()

    def _weights(self) -> Path | None:
        """The checkpoint file: the given one, or open_clip's download of `download_tag` (None if it failed)."""
        if self.weights_path is not None:
            if not self.weights_path.is_file():
                raise InputError(f"--clip-weights {self.weights_path} is not a file")
            return self.weights_path
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        try:
            return Path(download_pretrained(get_pretrained_cfg(self.model_name, self.download_tag)))
        except Exception as e:  # no network, no such tag, a full disk: the columns stay empty
            self._failed = f"download of open_clip {self.model_name}:{self.download_tag} failed ({first_line(e)})"
            return None

    def load(self) -> tuple[Any, Any, Any] | None:
        """(model, eval transform, tokenizer), loaded once; the weights only through `safe_load`."""
        if self._loaded is None and self._failed is None:
            import open_clip

            path = self._weights()
            if path is None:
                return None
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=None, force_quick_gelu=self.quick_gelu
            )
            load_clip_state(model, safe_load(path, "--clip-weights"), path, self.model_name)
            self._loaded = (model.to(self.device).eval(), preprocess, open_clip.get_tokenizer(self.model_name))
        return self._loaded

    def per_image(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """100 * cos(image_i, prompt_i), unclamped, float64 [N]."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        loaded = self.load()
        if loaded is None:
            raise InputError(self._failed or "CLIP weights unavailable")
        model, preprocess, tokenizer = loaded
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
        if self.load() is None:
            return {}  # the download failed: columns empty, unavailable() says why
        scores = self.per_image(images, prompts)
        self._n = len(scores)
        return {
            "clip_score": max(float(scores.mean()), 0.0),
            "clip_score_std": float(scores.std()) if len(scores) > 1 else None,
            "clip_model": self.model_id(),
            PER_IMAGE: {"clip_score": scores},
        }
