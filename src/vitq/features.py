"""Image encoders without a classification head (DINOv2, CLIP and SigLIP towers, any ViT built with
``num_classes=0``): quality without a head.

* **Embedding agreement** with the float model, image by image: cosine similarity (mean, and the 5th percentile -
  the images it hurts most) and the SQNR of the quantized embeddings against the float ones.
* **k-NN top-1** (the DINO protocol: k = 20 nearest train-split embeddings by cosine, votes weighted by
  ``exp(cos / 0.07)``) on labelled data, with each model's own train-split embeddings as its memory bank. The
  ranked votes are :class:`~vitq.evaluate.Predictions`, so float and quantized k-NN are compared with the same
  paired statistics as top-1 (McNemar, interval, detectable difference).

:func:`evaluate_features` returns the dict :func:`vitq.evaluate.evaluate` returns (``top1`` is the k-NN top-1,
``nll`` None), with the embeddings, so the run layer reports an encoder in the same record as a classifier.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from .batches import as_embedding, batch_images, batch_labels
from .defaults import KNN_K  # the DINO k-NN protocol (in defaults: the run spec checks --knn-bank against it)
from .devices import model_device
from .errors import DataError, ModelError
from .evaluate import Predictions

KNN_TEMPERATURE = 0.07


@torch.no_grad()
def embed(model: nn.Module, data: Iterable[Any], progress: bool = False, desc: str = "embed") -> tuple[Tensor, Tensor]:
    """Every image's embedding (float32, N x D) and label (N; -1 where a batch has none)."""
    model.eval()
    device = model_device(model)
    feats, labels = [], []
    it: Iterable[Any] = data
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(data, desc=desc, unit="batch", leave=False)
    for b in it:
        x, y = batch_images(b), batch_labels(b)
        f = as_embedding(model(x.to(device)))
        if f.ndim != 2:
            raise ModelError(f"the model's embedding has shape {tuple(f.shape)}, not (images, dims)")
        feats.append(f.float().cpu())
        labels.append(torch.full((len(f),), -1, dtype=torch.long) if y is None else torch.as_tensor(y).reshape(-1).long())
    if not feats:
        raise DataError("no images to embed")
    return torch.cat(feats), torch.cat(labels)


def knn_predict(bank: Tensor, bank_labels: Tensor, query: Tensor, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
                top: int = 5, chunk: int = 1024) -> Tensor:
    """The classes ranked by the weighted vote of each query's ``k`` nearest bank embeddings (cosine):
    ``(queries, top)`` class indices, best first."""
    if (bank_labels < 0).any():
        raise DataError("the k-NN memory bank needs labelled images: use a labelled train split (ImageNet layout "
                        "train/<class>/ or fashion-mnist)")
    n_classes = int(bank_labels.max()) + 1
    b = torch.nn.functional.normalize(bank.float(), dim=1)
    k = min(k, len(b))
    out = []
    for i in range(0, len(query), chunk):
        q = torch.nn.functional.normalize(query[i:i + chunk].float(), dim=1)
        sim, idx = (q @ b.T).topk(k, dim=1)
        votes = torch.zeros(len(q), n_classes, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[idx], (sim.double() / temperature).exp())
        out.append(votes.topk(min(top, n_classes), dim=1).indices)
    return torch.cat(out)


def agreement(ref: Tensor, q: Tensor) -> dict[str, float]:
    """Image-by-image cosine of quantized against float embeddings (mean, 5th percentile) and their SQNR (dB)."""
    cos = torch.nn.functional.cosine_similarity(q.double(), ref.double(), dim=1)
    noise = (q.double() - ref.double()).pow(2).sum()
    sqnr = float("inf") if float(noise) == 0 else float(10 * torch.log10(ref.double().pow(2).sum() / noise))
    return {"emb_cosine_mean": round(float(cos.mean()), 6), "emb_cosine_p5": round(float(cos.quantile(0.05)), 6),
            "emb_sqnr_db": round(sqnr, 2)}


def evaluate_features(model: nn.Module, data: Iterable[Any], bank_data: Iterable[Any], progress: bool = False,
                      desc: str = "eval", reference: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``evaluate``'s dict for an encoder: k-NN top-1 / top-5 of ``data``'s images against the model's own embeddings
    of ``bank_data`` (labelled), the per-image :class:`Predictions`, the embeddings; with ``reference`` (the float
    model's result) also the embedding agreement with it."""
    t0 = time.perf_counter()
    bank, bank_labels = embed(model, bank_data, progress, f"{desc} (k-NN bank)")
    feats, labels = embed(model, data, progress, desc)
    if (labels < 0).any():
        raise DataError("k-NN evaluation needs labelled evaluation images (ImageNet layout val/<class>/, or a "
                        "class-folder split)")
    topk = knn_predict(bank, bank_labels, feats)
    n = len(labels)
    top1 = 100.0 * float((topk[:, 0] == labels).double().mean())
    top5 = 100.0 * float((topk == labels.unsqueeze(1)).any(1).double().mean())
    bad = int((~torch.isfinite(feats)).any(1).sum())  # embeddings holding NaN / inf: their neighbours mean nothing
    res: dict[str, Any] = {"top1": top1, "top5": top5, "nll": None, "n": n, "seconds": time.perf_counter() - t0,
                           "predictions": Predictions(topk, labels, time.perf_counter() - t0, None, bad),
                           "nonfinite": bad, "features": feats,
                           "bank_size": len(bank)}
    if reference is not None:
        res.update(agreement(reference["features"], feats))
    return res


__all__ = ["KNN_K", "KNN_TEMPERATURE", "agreement", "as_embedding", "embed", "evaluate_features", "knn_predict"]
