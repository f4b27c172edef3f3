"""HellaSwag's validation split (10,042 items) from the Hugging Face hub, and its scoring, for train_tst.py --hellaswag.

    python data/hellaswag.py        # into data/hellaswag/; train_tst.py --hellaswag N also fetches it when missing

The hub's Rowan/hellaswag publishes its splits as parquet files on its refs/convert/parquet revision. Reading
parquet takes pyarrow (in requirements.txt), imported here only, so a run without --hellaswag never loads it.
Once the file is here nothing needs the network.
"""
import os
import sys

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download

from prepare import DataError

REPO, REVISION, FILENAME = "Rowan/hellaswag", "refs/convert/parquet", "default/validation/0000.parquet"
VALIDATION_ITEMS = 10_042
DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")


def fetch(local_dir=None):
    """The local path of the validation parquet file, downloaded when it is not there yet."""
    local_dir = local_dir or DIR
    path = os.path.join(local_dir, FILENAME)
    if os.path.exists(path):
        return path
    try:
        return hf_hub_download(repo_id=REPO, filename=FILENAME, repo_type="dataset", revision=REVISION, local_dir=local_dir)
    except Exception as e:  # offline, a moved file, a proxy: one line that says what to do either way
        raise DataError(f"could not download HellaSwag ({REPO}, {FILENAME} at {REVISION}: {type(e).__name__}):"
                         f" run python data/hellaswag.py once online, or put that file at {path}") from None


def load_items(n, local_dir=None):
    """The first n validation items, as (context, [four endings], index of the right one)."""
    import pyarrow.parquet as pq
    rows = pq.read_table(fetch(local_dir), columns=["ctx", "endings", "label"]).slice(0, n).to_pylist()
    if len(rows) < n:
        raise DataError(f"--hellaswag {n}: the validation split has {len(rows)} items")
    return [(row["ctx"], list(row["endings"]), int(row["label"])) for row in rows]


# Scoring, as llm.c scores HellaSwag (train_tst.py --hellaswag calls hellaswag_counts)

@torch.no_grad()
def ending_losses(model, batch, enc, device):
    """Summed loss and token count of each item's four endings, (items, 4) each, scored as llm.c scores HellaSwag:
    each row is the context then one ending (after a space) in GPT-2 tokens, and only the ending's tokens count.
    A row longer than the model's positions loses the start of its context. Rows are right-padded: no position of
    a causal model sees the padding after it."""
    rows, masks = [], []
    for context, endings, _ in batch:
        context = enc.encode(context)
        for ending in endings:
            ending = enc.encode(" " + ending)
            rows.append((context + ending)[-model.max_len - 1:])
            masks.append(([0] * len(context) + [1] * len(ending))[-model.max_len - 1:])
    width = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device, dtype=torch.float32)[:, 1:]
    losses = F.cross_entropy(model.logits(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:], reduction="none") * mask
    return losses.sum(1).view(-1, 4), mask.sum(1).view(-1, 4)


@torch.no_grad()
def hellaswag_counts(model, items, enc, device, items_per_batch=8):
    """Right answers (acc_norm, acc) over items: acc_norm picks the ending of lowest mean loss per token, acc the
    lowest summed loss."""
    model.eval()
    right_norm = right = 0
    for start in range(0, len(items), items_per_batch):
        batch = items[start:start + items_per_batch]
        summed, counts = ending_losses(model, batch, enc, device)
        labels = torch.tensor([label for _, _, label in batch], device=device)
        right += int((summed.argmin(1) == labels).sum())
        right_norm += int(((summed / counts).argmin(1) == labels).sum())
    return right_norm, right


if __name__ == "__main__":
    try:
        print(f"{fetch()}: {len(load_items(VALIDATION_ITEMS))} items")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
