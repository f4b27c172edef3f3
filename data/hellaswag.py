"""Download HellaSwag's validation split (10,042 items) from the Hugging Face hub, for train_tst.py --hellaswag.

    python data/hellaswag.py        # into data/hellaswag/; train_tst.py --hellaswag N also fetches it when missing

The hub's Rowan/hellaswag publishes its splits as parquet files on its refs/convert/parquet revision. Reading
parquet takes pyarrow (in requirements.txt), imported here only, so a run without --hellaswag never loads it.
Once the file is here nothing needs the network.
"""
import os
import sys

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


if __name__ == "__main__":
    try:
        print(f"{fetch()}: {len(load_items(VALIDATION_ITEMS))} items")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
