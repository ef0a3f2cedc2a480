"""
The embedding space, a language model's first picture: each token is a vector (a row of the embedding wte, which
the model reads, and of the un-embedding lm_head, which scores the next token; one matrix when they are tied), and
tokens used alike end up near each other. Nearness is the cosine of the angle between rows; the 2-D map is the
rows' projection on their first two principal components (PCA: the directions of largest variance).
"""

import torch
from torch.nn import functional as F

from nanoforge.errors import UserError
from nanoforge.inspect_model import token_label

MAP_TOKENS = 2000  # the page's map shows at most this many tokens (the first ids: bytes, characters, merges)


def matrices(model):
    """{'embedding': wte (V, n_embd), 'unembedding': lm_head (V, n_embd)}; just 'embedding' when tied."""
    wte = model.transformer.wte.weight.detach().float()
    if model.config.tie_embeddings:
        return {"embedding": wte}
    return {"embedding": wte, "unembedding": model.lm_head.weight.detach().float()}


def neighbours(matrix, token, n):
    """The n tokens whose rows have the largest cosine with token's row (itself left out): [(id, cosine)]."""
    cosines = F.normalize(matrix, dim=1) @ F.normalize(matrix[token], dim=0)  # (V,)
    cosines[token] = -2  # below any cosine
    top = cosines.topk(min(n, matrix.size(0) - 1))
    return list(zip(top.indices.tolist(), top.values.tolist()))


def pca_2d(matrix):
    """The rows centred and projected on their first two principal components: (V, 2)."""
    centred = matrix - matrix.mean(dim=0)
    _, _, Vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ Vh[:2].T


def one_token(tokenizer, text):
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise UserError(f"--token '{text}' is {len(ids)} tokens for this tokenizer: give text that is one token")
    return ids[0]


def label(tokenizer, i):
    return "'" + token_label(tokenizer, i) + "'"


def terminal_map(model, tokenizer, width=72, height=22, shown=120):
    """The embedding's PCA map as text: the first `shown` tokens placed on a width x height grid."""
    points = pca_2d(matrices(model)["embedding"])[:shown]
    low, high = points.min(dim=0).values, points.max(dim=0).values
    cells = ((points - low) / (high - low).clamp_min(1e-9) * torch.tensor([width - 1, height - 1])).round().long()
    grid = [[" "] * width for _ in range(height)]
    for i, (x, y) in enumerate(cells.tolist()):
        text = token_label(tokenizer, i)
        if len(text) == 1 and text.isprintable() and text != " ":
            grid[height - 1 - y][x] = text  # the first principal component across, the second up
    border = "+" + "-" * width + "+"
    return "\n".join(["embedding map (PCA of the first tokens; PC1 across, PC2 up):", border,
                      *("|" + "".join(row) + "|" for row in grid), border])


def page_data(model, tokenizer, n_neighbours=10):
    """The page's JSON: each map token's label, 2-D position and nearest neighbours in each matrix."""
    count = min(MAP_TOKENS, tokenizer.vocab_size)
    out = {"labels": [token_label(tokenizer, i) for i in range(count)], "maps": {}, "neighbours": {}}
    for name, matrix in matrices(model).items():
        points = pca_2d(matrix[:count])
        out["maps"][name] = [[round(x, 4), round(y, 4)] for x, y in points.tolist()]
        normed = F.normalize(matrix[:count], dim=1)
        cosines = normed @ normed.T
        cosines.fill_diagonal_(-2)
        top = cosines.topk(min(n_neighbours, count - 1), dim=1)
        out["neighbours"][name] = [[[i, round(c, 3)] for i, c in zip(ids, cs)]
                                   for ids, cs in zip(top.indices.tolist(), top.values.tolist())]
    return out
