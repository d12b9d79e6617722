"""Zero-shot classification and image<->text retrieval for examples/train_clip.py.

Both run the model as it trains (int8 / fp8 layers and autocast included), under torch.no_grad, so
they measure the low-precision model itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import open_clip
import torch

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


@torch.no_grad()
def zero_shot_predictions(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    loader: torch.utils.data.DataLoader,
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Top-1 predictions of the prompt-ensemble zero-shot classifier (CLIP, section 3.1.4).

    Args:
        model: an open_clip CLIP model (not DDP-wrapped).
        tokenizer: its tokenizer.
        classnames: the class names, in label order.
        loader: yields (images, labels, dropped) batches (see clip_data.collate_eval).
        templates: prompt templates with one "{}" for the class name; their embeddings are averaged.
        device: where the model is.
        autocast: a context-manager factory wrapping each forward (the training precision).

    Returns:
        (predictions, labels, dropped): predicted and true labels of every readable image, and how
        many unreadable images were dropped.
    """
    was_training = model.training
    model.eval()
    with autocast():
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer, classnames, templates, num_classes_per_batch=50, device=device
        ).float()
    predictions, labels, dropped = [], [], 0
    for images, batch_labels, batch_dropped in loader:
        dropped += batch_dropped
        if not len(images):
            continue
        with autocast():
            features = model.encode_image(images.to(device), normalize=True)
        predictions.append((features.float() @ classifier).argmax(dim=-1).cpu())
        labels.append(batch_labels)
    model.train(was_training)
    if not predictions:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), dropped
    return torch.cat(predictions), torch.cat(labels), dropped


@torch.no_grad()
def retrieval_recall_at_1(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Image->text and text->image recall@1 over held-out pairs.

    A pair's caption may be shared word for word by other pairs (synthetic captions are short), so
    retrieving any item whose caption equals the query's counts as a hit, as retrieving any of an
    image's reference captions does on COCO.

    Args:
        model: an open_clip CLIP model (not DDP-wrapped).
        loader: yields (images, tokens, skipped, captions) batches (see clip_data.Collate).
        device, autocast: as for `zero_shot_predictions`.

    Returns:
        {"image_to_text_R@1": ..., "text_to_image_R@1": ..., "pairs": n}.
    """
    was_training = model.training
    model.eval()
    image_features, text_features, captions = [], [], []
    for images, tokens, _, batch_captions in loader:
        with autocast():
            image_features.append(model.encode_image(images.to(device), normalize=True).float())
            text_features.append(model.encode_text(tokens.to(device), normalize=True).float())
        captions.extend(batch_captions)
    model.train(was_training)
    similarity = torch.cat(image_features) @ torch.cat(text_features).T  # (images, texts)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions], device=similarity.device)
    image_to_text = (caption_id[similarity.argmax(dim=1)] == caption_id).float().mean().item()
    text_to_image = (caption_id[similarity.argmax(dim=0)] == caption_id).float().mean().item()
    return {"image_to_text_R@1": image_to_text, "text_to_image_R@1": text_to_image, "pairs": len(captions)}


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, classes: Sequence[int] | None = None) -> float:
    """Top-1 accuracy, over the samples whose label is in `classes` if given (NaN if there are none)."""
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(list(classes), dtype=labels.dtype))
        predictions, labels = predictions[keep], labels[keep]
    return (predictions == labels).float().mean().item() if len(labels) else float("nan")


__all__ = ["DEFAULT_TEMPLATES", "zero_shot_predictions", "retrieval_recall_at_1", "accuracy"]
