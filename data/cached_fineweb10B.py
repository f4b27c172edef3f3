"""Download prepared GPT-2 token shards of FineWeb from the Hugging Face hub (the speedrun's data).

    python data/cached_fineweb10B.py 9                           # val + first 9 train shards (900M tokens)
    python data/cached_fineweb10B.py 9 --dataset finewebedu10B   # a sister set, into data/finewebedu10B/

Each shard is about 100M tokens (about 200 MB). Shards already present and whole are skipped without any
network access; a truncated or corrupt one (bad header or size) is reported and fetched again. A shard is
downloaded into a staging folder beside the target (data/fineweb10B.partial/) and moved into place only once
it is whole, so a failed or interrupted download never leaves a shard, or an empty data/fineweb10B/, that
train_tst.py would pick up.
"""
import argparse
import os
import shutil
import sys

from huggingface_hub import hf_hub_download

from prepare import shard_problem

DATASETS = {  # name: (hub dataset, file prefix, train shards)
    "fineweb10B": ("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": ("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "finewebedu10B": ("kjj0/finewebedu10B-gpt2", "finewebedu", 103),
}


def staging_dir(local_dir):
    """Where shards download before they are whole: beside local_dir, so the trainer never picks up a partial one."""
    return local_dir.rstrip(os.sep) + ".partial"


def fetch(repo_id, filename, local_dir):
    """Make local_dir/filename a whole shard; returns 'present' or 'downloaded'. Raises RuntimeError."""
    path = os.path.join(local_dir, filename)
    if os.path.exists(path):
        problem = shard_problem(path)
        if problem is None:
            return "present"
        print(f"{problem}; fetching it again", file=sys.stderr)
        os.remove(path)
    staging = staging_dir(local_dir)
    for attempt in range(2):
        try:
            staged = hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=staging,
                                     force_download=attempt > 0)
        except Exception as e:  # offline, DNS, HTTP errors, missing file: all end the same way
            raise RuntimeError(f"could not download {filename} from the Hugging Face dataset {repo_id}"
                               f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        problem = shard_problem(staged)
        if problem is None:
            os.makedirs(local_dir, exist_ok=True)
            os.replace(staged, path)
            return "downloaded"
        print(f"{problem}; fetching it again", file=sys.stderr)
        os.remove(staged)
    raise RuntimeError(f"{filename}: still corrupt after downloading twice ({problem})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train_shards", type=int, nargs="?", default=None, help="how many train shards (default: all)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="fineweb10B")
    p.add_argument("--dir", default=None, help="where to put them (default: data/<dataset>/)")
    args = p.parse_args(argv)
    repo_id, prefix, available = DATASETS[args.dataset]
    count = available if args.train_shards is None else args.train_shards
    if not 0 <= count <= available:
        print(f"error: {args.dataset} has {available} train shards; asked for {count}", file=sys.stderr)
        return 2
    local_dir = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), args.dataset)
    names = [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, count + 1)]
    try:
        results = [fetch(repo_id, name, local_dir) for name in names]
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    shutil.rmtree(staging_dir(local_dir), ignore_errors=True)  # the hub's metadata of finished downloads
    print(f"{local_dir}: {results.count('downloaded')} shards downloaded, {results.count('present')} already present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
