"""Speed of train_tst.py on this machine: matmul rates, step time in each mode, and what a TST step costs.

    python records/benchmark.py                                # this train_tst.py, every mode, TST s = 2, 4, 8
    git show REV:train_tst.py > /tmp/old.py && python records/benchmark.py --old /tmp/old.py   # adds that code's default

Modes: every row is a short real run of the trainer's command line (the CPU preset by default, on the bundled
sample); its log gives the time of each step, and a row's step time is the median over the steps after the
first two. TST's cost: one process, one compiled model in the default mode, baseline and TST steps of each bag
size in turn (the same weights: learning rate 0), so that neither the machine's drift nor a process's luck
(separate runs of one command differ by up to 10% here) falls on one side only. Prints Markdown tables.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TRAINER = os.path.join(HERE, "..", "train_tst.py")
SAMPLE = os.path.join(HERE, "..", "data", "sample")
MODES = {"eager fp32": ["--no-compile", "--dtype", "fp32"], "eager bf16": ["--no-compile", "--dtype", "bf16"],
         "compiled fp32": ["--compile", "--dtype", "fp32"], "compiled bf16 (default)": ["--compile", "--dtype", "bf16"]}
TRAIN_LINE = re.compile(r"step:(\d+)/\d+ train_loss:\S+ phase:\w+ s:(\d+) train_time:(\d+)ms")


def matmul_gflops(dtype, n=2048, repeats=20):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def timed_run(code, flags, steps, threads, extra):
    """(median ms of a step after the first two, FLOPs per step, positions per step) of one short run."""
    with tempfile.TemporaryDirectory() as logs:
        cmd = [sys.executable, code, "--train_files", os.path.join(SAMPLE, "sample_train_*.bin"),
               "--val_files", os.path.join(SAMPLE, "sample_val_*.bin"), "--steps", str(steps), "--val_every", "0",
               "--val_tokens", "2048", "--log_every", "1", "--log_dir", logs, "--run_id", "bench", *extra, *flags]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"error: {' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
        text = open(os.path.join(logs, "bench.txt")).read()
    flops, positions = re.search(r"model: [\d,]+ parameters, (\S+) FLOPs per step, ([\d,]+) positions", text).groups()
    rows = [(int(m[1]), int(m[2]), int(m[3])) for m in map(TRAIN_LINE.match, text.splitlines()) if m]
    s = max(r[1] for r in rows)
    deltas = [b[2] - a[2] for a, b in zip(rows, rows[1:]) if a[0] >= 2 and b[1] == s]  # the bag-size-s steps
    return statistics.median(deltas), float(flops), int(positions.replace(",", ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", help="another train_tst.py (e.g. `git show REV:train_tst.py > old.py`): its default mode is timed too")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads per run (default: this machine's)")
    p.add_argument("--steps", type=int, default=12, help="steps per run")
    p.add_argument("--rounds", type=int, default=10, help="steps of each bag size, in turn, for TST's cost")
    p.add_argument("--bags", default="2,4,8", help="TST bag sizes timed against the baseline in the default mode")
    p.add_argument("--tables", default="modes,tst", help="which tables: modes (step time per mode), tst (TST's cost)")
    p.add_argument("--extra", default="", help="more trainer flags for every run, e.g. '--n_layer 6 --n_embd 256 --n_head 2'")
    args = p.parse_args(argv)
    extra = args.extra.split()
    torch.set_num_threads(args.threads)
    rates = {name: matmul_gflops(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"{args.threads} threads; 2048 x 2048 matmul: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s\n")

    if "modes" in args.tables:
        time_modes(args, extra, rates)
    if "tst" in args.tables:
        time_tst(args, extra)


def time_modes(args, extra, rates):
    runs = [(f"--old: {os.path.basename(args.old)}", args.old, "its default", [])] if args.old else []
    runs += [("train_tst.py", TRAINER, mode, flags) for mode, flags in MODES.items()]
    print("| code | mode | ms / step | positions / s | model GFLOP/s | of the bf16 matmul rate |\n|---|---|---|---|---|---|")
    for name, code, mode, flags in runs:
        ms, flops, positions = timed_run(code, flags, args.steps, args.threads, extra)
        print(f"| {name} | {mode} | {ms:.0f} | {positions / ms * 1000:,.0f} | {flops / ms / 1e6:.0f} |"
              f" {flops / ms / 1e6 / rates['bf16']:.0%} |", flush=True)


def time_tst(args, extra):
    print("\n| bag size s | baseline ms / step | TST ms / step | TST / baseline |\n|---|---|---|---|")
    bags = [int(s) for s in args.bags.split(",")]
    times = tst_step_times(bags, args.rounds, extra)
    for s in bags:
        base, tst = statistics.median(times[1]), statistics.median(times[s])
        print(f"| {s} | {base:.0f} | {tst:.0f} | {tst / base:.3f} |")


def tst_step_times(bags, rounds, extra):
    """ms of each step of each bag size (1: the baseline), in turn, in the default mode, in this process."""
    sys.path.insert(0, os.path.dirname(TRAINER))
    import train_tst as T
    args = T.parse_args(extra)
    model = T.GPT(**T.model_config(args))
    optimizers = T.make_optimizers(model, args)
    compiled = torch.compile(model, dynamic=False)
    batches = {}
    for s in [1] + bags:
        args.phases = [(s, 1)] if s > 1 else []  # step 0 reads bags of s
        windows = torch.randint(args.vocab_size, (args.batch_size, T.window_tokens(s, "full", args.seq_len)))
        batches[s] = T.batch_for(0, windows, args, torch.device("cpu"))
    times = {s: [] for s in batches}
    for round in range(rounds + 2):  # the first two compile and warm up
        for s, batch in batches.items():
            start = time.perf_counter()
            T.train_step(compiled, optimizers, *batch, args.batch_size // args.micro_batch_size, 0.0)
            if round >= 2:
                times[s].append(1000 * (time.perf_counter() - start))
    return times


if __name__ == "__main__":
    main()
