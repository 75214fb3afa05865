"""HydraLoRA `--heads auto`: choose the number of heads K by k-means over the training prompts.

The paper picks K once by clustering the training corpus; the reference repo ships no clustering code.
Features here: which of the prompts' frequent words (whitespace-split, in at least 1% of the prompts and at
least 2) each prompt holds, L2-normalised: cheap, tokenizer-independent, and what a task is made of in
instruction data, its shared wording. Rare words (the inputs themselves) are left out: weighted in (as an
earlier TF-IDF of character 3-grams did), they drowned the tasks, and one-, three- and five-task prompt sets
got 8, 2 and 7 heads. K is the candidate in [2, max_k] with the best silhouette score of a seeded k-means
(k-means++ init); ties go to the smaller K."""
from __future__ import annotations

import math
from collections import Counter

import torch

MIN_AUTO_HEADS, MAX_AUTO_HEADS = 2, 8  # what --heads auto chooses from


def word_features(texts: list[str], min_share: float = 0.01, max_features: int = 2048) -> torch.Tensor:
    docs = [set(t.split()) for t in texts]
    df = Counter(w for d in docs for w in d)
    floor = max(2, math.ceil(min_share * len(texts)))
    vocab = {w: i for i, (w, n) in enumerate(df.most_common(max_features)) if n >= floor}
    x = torch.zeros(len(texts), max(1, len(vocab)))  # a prompt with none of them: a zero row, its own "task"
    for row, words in enumerate(docs):
        for w in words & vocab.keys():
            x[row, vocab[w]] = 1.0
    return torch.nn.functional.normalize(x, dim=1)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(k - 1):  # k-means++: next center drawn proportionally to squared distance
        d = torch.cdist(x, torch.stack(centers)).min(dim=1).values.pow(2)
        centers.append(x[torch.multinomial(d + 1e-12, 1, generator=g)].squeeze(0))
    c = torch.stack(centers)
    for _ in range(iters):
        labels = torch.cdist(x, c).argmin(dim=1)
        new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return torch.cdist(x, c).argmin(dim=1)


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette; -1 (the worst) when k-means found a single cluster (identical prompts): undefined there."""
    if len(labels.unique()) < 2:
        return -1.0
    d = torch.cdist(x, x)
    scores = []
    for i in range(len(x)):
        same = labels == labels[i]
        if same.sum() <= 1:
            scores.append(0.0)
            continue
        a = d[i][same].sum() / (same.sum() - 1)
        b = min(d[i][labels == j].mean() for j in labels.unique() if j != labels[i])
        scores.append(float((b - a) / max(a, b)))
    return sum(scores) / len(scores)


def choose_heads(prompts: list[str], max_k: int = MAX_AUTO_HEADS, sample: int = 512, seed: int = 0) -> int:
    if len(prompts) < 4:
        return MIN_AUTO_HEADS
    idx = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:sample]
    x = word_features([prompts[i] for i in idx.tolist()])
    candidates = range(MIN_AUTO_HEADS, min(max_k, len(x) - 1) + 1)
    return max(candidates, key=lambda k: silhouette(x, kmeans(x, k, seed)))
