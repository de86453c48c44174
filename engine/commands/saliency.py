"""``engine saliency IMAGE --out FILE.png``: the saliency network's map over an image (SAN §3.2.1)."""
from __future__ import annotations

from pathlib import Path

import click

from engine.commands.options import device_option

__all__ = ["saliency_command", "render_saliency"]


def render_saliency(image_path: Path, out: Path, *, checkpoint: Path | None = None, device: str = "cpu", alpha: float = 0.55) -> tuple[Path, float]:
    """Write the image, the saliency heat map blended over it, and the map alone side by side to ``out``.

    Returns ``(out, mean saliency)``. Raises :class:`~engine.errors.ImageReadError` for a missing or
    unreadable image and :class:`~engine.errors.CheckpointError` for a bad checkpoint.
    """
    import numpy as np
    import torch
    from PIL import Image

    from engine.device import resolve_device
    from engine.errors import InvalidInputError
    from engine.models.registry import load_model
    from engine.models.saliency import saliency_to_image
    from indexer.backbone import BackboneConfig, create_backbone, preprocess
    from indexer.images import load_image
    from indexer.san_features import SALIENCY_LEVELS

    if out.suffix.lower() != ".png":
        raise InvalidInputError(f"--out {out} must be a .png file")
    image = load_image(image_path).convert("RGB")
    target = resolve_device(device)
    network = load_model(checkpoint, device=target, family="saliency")
    backbone = create_backbone(BackboneConfig(), device=target)
    network.check_backbone(backbone.version, backbone.max_size)
    batch, _ = preprocess([image], max_size=backbone.max_size)
    with torch.no_grad():
        maps = backbone(batch.to(target), levels=list(SALIENCY_LEVELS))
        _, s1 = network(maps)
    cfg = network.config
    prob = saliency_to_image(torch.sigmoid(s1[0, 0]).cpu().numpy(), image.size, stride=cfg.stride, offset=cfg.offset, max_size=cfg.max_size)
    heat = _colormap(prob)
    rgb = np.asarray(image, np.float32)
    blend = (rgb * (1 - alpha * prob[..., None]) + heat * alpha * prob[..., None]).clip(0, 255).astype(np.uint8)
    w, h = image.size
    sheet = Image.new("RGB", (3 * w, h))
    sheet.paste(image, (0, 0))
    sheet.paste(Image.fromarray(blend), (w, 0))
    sheet.paste(Image.fromarray((prob * 255).clip(0, 255).astype(np.uint8)).convert("RGB"), (2 * w, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out, float(prob.mean())


def _colormap(prob):  # noqa: ANN001, ANN202
    """A small "hot" colour map: black → red → yellow → white, float32 ``[h, w, 3]`` in 0–255."""
    import numpy as np

    p = np.asarray(prob, np.float32)[..., None]
    r = np.clip(3 * p, 0, 1)
    g = np.clip(3 * p - 1, 0, 1)
    b = np.clip(3 * p - 2, 0, 1)
    return np.concatenate([r, g, b], axis=-1) * 255.0


@click.command("saliency")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write: the image, the saliency map over it, and the map alone.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="Saliency checkpoint (default: the shipped saliency.pt).")
@device_option
def saliency_command(image: Path, out: Path, checkpoint: Path | None, device: str) -> None:
    """Render the saliency map of IMAGE (SAN's saliency network) over it into a PNG.

    \b
    Example:
      engine saliency photo.jpg --out photo-saliency.png
    """
    path, mean = render_saliency(image, out, checkpoint=checkpoint, device=device)
    click.echo(f"wrote {path} (image | saliency over the image | saliency map; mean saliency {mean:.3f})")
