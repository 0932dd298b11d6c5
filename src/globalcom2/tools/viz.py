"""``globalcom2 viz``: which visual tokens a method keeps, drawn like the paper's Fig. 4.

For one image and each (method, ratio): the thumbnail and the crop grid as the model sees them
(after the processor's resize and letterbox padding), dropped 14x14 patches greyed out, padding
hatched, each crop labelled with its retention ratio and kept/total tokens, and the thumbnail's
[CLS]-attention heat map. The kept mask is the ``ImageRecord`` of ``models.llava_next.compress``,
the very selection the patched model runs; nothing is recomputed here. Methods that emit merged
tokens (VisionZip's contextual tokens and [CLS] tokens) show the patches they keep as they are
(VisionZip's dominant set); the label counts the merged ones.

matplotlib is an optional extra (``pip install globalcom2[viz]``) imported only when drawing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - torch and the models are imported when drawing, not for --help
    import torch

    from ..models.base import ImageRecord


@dataclass
class Panel:
    """Pixels and masks of one (method, ratio) for one image."""

    method: str
    ratio: float
    thumbnail: np.ndarray  # (s, s, 3) float in [0, 1]
    crops: np.ndarray  # (nph * s, npw * s, 3)
    thumb_kept: np.ndarray  # (S, S) bool
    crop_kept: np.ndarray  # (nph * S, npw * S) bool
    crop_valid: np.ndarray  # (nph * S, npw * S) bool, False = letterbox padding
    heat: np.ndarray  # (S, S) thumbnail [CLS] attention
    record: ImageRecord
    stock_tokens: int
    heat_name: str = "[CLS] attention"  # what the heat map shows (the method's scorer on this family)

    def kept_patch_counts(self) -> list[int]:
        """Patches drawn as kept, per view (thumbnail first, then crops in row-major order)."""
        nph, npw = self.record.grid
        s = self.record.side
        crops = self.crop_kept.reshape(nph, s, npw, s).transpose(0, 2, 1, 3).reshape(nph * npw, -1).sum(1)
        return [int(self.thumb_kept.sum()), *(int(c) for c in crops)]


def _mpl():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("globalcom2.viz needs matplotlib: pip install globalcom2[viz]") from err
    return plt


def _image_token(processor) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def _denormalize(view: torch.Tensor, processor) -> np.ndarray:
    import torch

    ip = getattr(processor, "image_processor", processor)
    mean = torch.tensor(getattr(ip, "image_mean", [0.0, 0.0, 0.0]), dtype=torch.float32)[:, None, None]
    std = torch.tensor(getattr(ip, "image_std", [1.0, 1.0, 1.0]), dtype=torch.float32)[:, None, None]
    return (view.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def panels(model, processor, image, methods=("globalcom2",), ratios=(0.25,)) -> list[Panel]:
    """Run each (method, ratio) on ``image`` through the model's own selection and collect what to draw.

    Every family goes through its adapter: the processor's output (plus ``processor_kwargs``), ``resolve``,
    ``prepare_images`` (the patched model's own path), ``view_pixels`` and ``patch_masks``. A method whose
    default form prunes inside the language model but that has a vision-side form (DART) is drawn in that
    form (``form="embedding"``); FastV and SparseVLM cannot be drawn.
    """
    import torch

    from .. import make_config
    from ..core import scoring
    from ..models import adapter_for

    family = adapter_for(model)
    family.check_model(model)
    configs = []
    for m in methods:
        for r in ratios:
            cfg = make_config(m, retention_ratio=r)
            if cfg.where != "vision" and "embedding" in cfg.forms:  # DART: draw its vision-side form
                cfg = make_config(cfg, form="embedding")
            if cfg.where != "vision":
                raise ValueError(
                    f"method {m!r} prunes inside the language model; only vision-side methods can be drawn "
                    f"(e.g. {', '.join(n for n in ('globalcom2', 'fastervlm', 'uniform'))})"
                )
            configs.append((m, r, family.resolve(cfg, model.config)))
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs = processor(images=[image], text=[_image_token(processor)], return_tensors="pt")
    pv = inputs["pixel_values"].to(device, dtype)
    call = {
        **{k: inputs[k] for k in family.vision_kwargs if k in inputs},
        **family.processor_kwargs(processor, [image]),
    }
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs.get("attention_mask")
    out = []
    for m, r, cfg in configs:
        with torch.no_grad():
            batch = family.prepare_images(model, cfg, pv, call, input_ids, attention_mask)
        (rec,), (stock_tokens,) = batch.records, batch.stock_counts
        scorer = scoring.resolve_scorer(cfg.requires.scorer, family.has_cls, family.tower_name)
        nph, npw = rec.grid
        S = rec.side
        thumb_px, crop_px = family.view_pixels(pv, rec)
        thumb = _denormalize(thumb_px, processor)
        tiles = [_denormalize(v, processor) for v in crop_px]
        mosaic = np.concatenate([np.concatenate(tiles[i * npw : (i + 1) * npw], axis=1) for i in range(nph)], axis=0)
        kept = rec.kept_mask().cpu()  # (1 + n, N): exactly the tokens the LLM receives
        crop_kept, crop_valid = (x.numpy() for x in family.patch_masks(rec, model.config))
        out.append(
            Panel(
                method=m,
                ratio=r,
                thumbnail=thumb,
                crops=mosaic,
                thumb_kept=kept[0].view(S, S).numpy(),
                crop_kept=crop_kept,
                crop_valid=crop_valid,
                heat=rec.scores[0].float().view(S, S).cpu().numpy(),
                record=rec,
                stock_tokens=stock_tokens,
                heat_name="[CLS] attention" if scorer == "cls" else f"score ({scorer})",
            )
        )
    return out


def _shade(pixels: np.ndarray, kept: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Grey out dropped patches; darken letterbox padding."""
    # token of every pixel row/column; views need not be a multiple of the patch (SigLIP: 384 px, 14 px patches)
    rows = np.arange(pixels.shape[0]) * kept.shape[0] // pixels.shape[0]
    cols = np.arange(pixels.shape[1]) * kept.shape[1] // pixels.shape[1]
    k = kept[rows[:, None], cols[None, :]][..., None]
    grey = pixels * 0.25 + 0.55
    out = np.where(k, pixels, grey)
    if valid is not None:
        v = valid[rows[:, None], cols[None, :]][..., None]
        out = np.where(v, out, out * 0.35)
    return out


def render(
    model,
    processor,
    image,
    method: str = "globalcom2",
    ratio: float = 0.25,
    methods=None,
    ratios=None,
    title: str | None = None,
    random_weights: bool = False,
):
    """A matplotlib Figure: one row per (method, ratio), panels thumbnail / crops / heat map."""
    plt = _mpl()
    ps = panels(model, processor, image, tuple(methods or [method]), tuple(ratios or [ratio]))
    fig, axes = plt.subplots(len(ps), 3, figsize=(13, 4.2 * len(ps)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.6, 1.1]})  # fmt: skip
    for row, pn in zip(axes, ps):
        rec = pn.record
        S = rec.side
        nph, npw = rec.grid
        ax = row[0]
        ax.imshow(_shade(pn.thumbnail, pn.thumb_kept))
        ax.set_title(f"thumbnail: kept {int(pn.thumb_kept.sum())}/{S * S}", fontsize=9)
        ax = row[1]
        ax.imshow(_shade(pn.crops, pn.crop_kept, pn.crop_valid))
        h, w = pn.crops.shape[:2]
        for i in range(1, nph):
            ax.axhline(i * h / nph - 0.5, color="white", lw=1.5)
        for j in range(1, npw):
            ax.axvline(j * w / npw - 0.5, color="white", lw=1.5)
        counts = rec.kept_per_view().tolist()[1:]  # tokens (= patches drawn, unless the family resizes)
        for idx, (r_j, k) in enumerate(zip(rec.selection.crop_ratios.tolist(), counts)):
            i, j = divmod(idx, npw)
            total = int(rec.valid[idx].sum())
            ax.text((j + 0.03) * w / npw, (i + 0.08) * h / nph, f"r={r_j:.3f}\n{k}/{total}", color="white",
                    fontsize=8, va="top", bbox=dict(facecolor="black", alpha=0.55, pad=2, lw=0))  # fmt: skip
        ax.set_title(f"crops {nph}x{npw} (padding darkened)", fontsize=9)
        ax = row[2]
        im = ax.imshow(pn.heat, cmap="magma")
        ax.set_title(f"thumbnail {pn.heat_name}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        for a in row:
            a.set_xticks([])
            a.set_yticks([])
        label = f"{pn.method}, R={pn.ratio:g}\n{rec.num_tokens}/{pn.stock_tokens} visual tokens"
        extra = rec.selection.extra
        if extra is not None and extra.shape[0]:  # merged / [CLS] tokens have no single patch to draw
            label += f"\n({extra.shape[0]} merged/[CLS] not drawn)"
        row[0].set_ylabel(label, fontsize=10)
    head = title or "Visual tokens kept (grey = dropped)"
    if random_weights:
        head += "  --  RANDOM WEIGHTS (demo model): the pattern is not meaningful"
    fig.suptitle(head, fontsize=11)
    fig.tight_layout()
    return fig


def render_image(*args, **kwargs):
    """``render`` as a PIL image."""
    import io

    from PIL import Image

    fig = render(*args, **kwargs)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _mpl().close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``globalcom2 viz``."""
    from . import common
    from .common import Parser, method_config

    ap = Parser(prog="globalcom2 viz", description=common.summary(__doc__))
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local checkpoint of a supported family (LLaVA-NeXT, OneVision, InternVL -hf)")
    src.add_argument("--demo", action="store_true", help="tiny random-weight model and a generated image")
    ap.add_argument("--image", help="image file (required with --model)")
    ap.add_argument("--family", default="llava_next",
                    help="model family of the --demo model: llava_next (default), llava_onevision, internvl, ... "
                    "(a --model checkpoint names its own)")  # fmt: skip
    ap.add_argument("--method", nargs="+", default=["globalcom2"], help="one or more vision-side methods")
    ap.add_argument("--ratio", nargs="+", type=float, default=[0.25], help="one or more retention ratios")
    ap.add_argument("--out", default="globalcom2-viz.png", help="PNG to write")
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    args = ap.parse_args(argv)
    if args.model and not args.image:
        ap.error("--image is required with --model")
    common.known_family(ap, args.family)
    from .. import make_config
    from ..models import adapter_for

    for m in args.method:
        for r in args.ratio:
            cfg = method_config(ap, m, r)
            if cfg.where != "vision" and "embedding" not in cfg.forms:
                ap.fail("--method", m, "prunes inside the language model; only vision-side methods can be drawn")
    common.checkpoint_dir(ap, "--model", args.model)
    common.existing_file(ap, "--image", args.image)  # before any model is loaded
    common.writable(ap, "--out", args.out)
    from ..testing import DEMO_MODELS, demo_image

    if args.demo:
        model, processor = DEMO_MODELS[args.family]()
    else:
        from .common import load_checkpoint

        try:
            model, processor = load_checkpoint(args.model)
        except TypeError as err:
            ap.fail("--model", args.model, err)
    try:
        image = demo_image(height=400, width=640) if not args.image else _open(args.image)
    except OSError as err:
        ap.fail("--image", args.image, f"not an image PIL can read ({err})")
    for m in args.method:  # what the family cannot run, named before any work
        try:
            adapter_for(model).resolve(make_config(m, retention_ratio=args.ratio[0]), model.config)
        except ValueError as err:
            ap.fail("--method", m, err)
    model = model.to(common.resolve_device(args.device)).eval()
    fig = render(model, processor, image, methods=args.method, ratios=args.ratio, random_weights=args.demo)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    _mpl().close(fig)  # pyplot keeps every figure it made until closed: main() may run many times in one process
    print(f"saved {args.out}")
    return 0


def _open(path: str):
    from PIL import Image

    return Image.open(path).convert("RGB")
