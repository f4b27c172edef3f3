"""A ten-minute check of train_tst.py on one GPU: does it work on CUDA, and how fast is it?

    python records/gpu_check.py records/gpu/2026-11-30_h200_check      # logs and summary.md in that folder

No FineWeb needed: the gpt2 preset's real shape (12 x 768, 512 x 1024 tokens a step, micro-batch 64) trains
on the bundled sample (shuffled windows, a 262,144-token validation slice) for a few dozen steps, first the
baseline, then TST s = 8 with the switch late enough that every timed step but the last few is a superposition
step; then, if the budget allows, the same at micro-batch 32, and the CUDA test group of test_train.py (the gpt2
shape compiled in bf16 through both phases and a resume, a real out-of-memory halving, DDP when there are two
GPUs). Each part runs only while the budget (--budget seconds) lasts: on an H200 each took 95-145 s (a cold
compile of 50-90 s included), all four about 470 s. summary.md gives each run's median step time
by phase (the first steps of each phase left out), the TST / baseline ratio, MFU against --peak_tflops, peak
memory, the untimed warmup (compile) time, and whatever failed.
"""
import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAMPLE = os.path.join(ROOT, "data", "sample")
TRAIN_LINE = re.compile(r"step:(\d+)/\d+ train_loss:(\S+) phase:(\w+) s:(\d+) train_time:(\d+)ms")
SKIP_FIRST = 3  # steps of a phase left out of its median: the first ones carry allocator and cache warm-up


CPU_TRIAL = ["--device", "cpu", "--n_layer", "2", "--n_embd", "128", "--n_head", "1", "--batch_size", "8",
             "--micro_batch_size", "4", "--seq_len", "128", "--val_tokens", "16384"]  # --cpu: tiny, to try the script


def gpt2_on_sample(run_id, args, log_dir, extra=()):
    """The trainer's command for one run (with --cpu, CPU_TRIAL's tiny model; `extra` after it, so it may override)."""
    return [sys.executable, os.path.join(ROOT, "train_tst.py"), "--preset", "gpt2", "--device", "cuda",
            "--train_files", os.path.join(SAMPLE, "sample_train_*.bin"),
            "--val_files", os.path.join(SAMPLE, "sample_val_*.bin"),
            "--data_order", "shuffled", "--val_tokens", "262144", "--steps", str(args.steps), "--val_every", "0",
            "--final_val_every", "0", "--log_every", "1", "--peak_tflops", str(args.peak_tflops), "--run_id", run_id,
            "--log_dir", log_dir, *(CPU_TRIAL if args.cpu else []), *extra]


def run(command, out, name, timeout):
    """Run a command with its output in out/name.out; returns (exit code or 'timeout', seconds)."""
    start = time.time()
    with open(os.path.join(out, f"{name}.out"), "w") as f:
        try:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return code, time.time() - start


def phase_times(log_text):
    """Median ms a step of each bag size, from the cumulative train_time of consecutive train lines."""
    rows = [(int(m[1]), int(m[4]), int(m[5])) for m in TRAIN_LINE.finditer(log_text)]
    by_size, seen = {}, {}
    for (step, s, ms), (_, _, before) in zip(rows[1:], rows):
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > SKIP_FIRST:
            by_size.setdefault(s, []).append(ms - before)
    return {s: statistics.median(v) for s, v in by_size.items()}


def summarize(log_path):
    if not os.path.exists(log_path):
        return None
    text = open(log_path).read().split("\n" + "=" * 100 + "\n", 1)[-1]  # the lines after the source
    flops = re.search(r"([\d.e+]+) FLOPs per step", text)
    flops = float(flops[1]) if flops else float("nan")
    warmup = re.search(r"warmup: (\d+) s", text)
    peak = re.search(r"peak_mem:([\d.]+)GiB", text)
    return dict(times=phase_times(text), flops=flops, warmup=warmup and int(warmup[1]), peak=peak and float(peak[1]),
                end=text.strip().splitlines()[-1] if text.strip() else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for the record logs, each command's output and summary.md")
    p.add_argument("--steps", type=int, default=30, help="steps of each run")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--parts", default="baseline,tst,tests,mb32", help="which parts, in order")
    p.add_argument("--cpu", action="store_true", help="try the script on CPU: a tiny model, the CUDA tests skip")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + args.budget
    runs = tempfile.mkdtemp(prefix="gpu_check_")  # checkpoints and exports (GBs at this shape) stay out of `out`
    tst = ["--tst_s", "8", "--tst_r", "0.9"]  # timed steps but the last few: s = 8
    parts = {
        "baseline": (gpt2_on_sample("baseline", args, runs), 110),
        "tst": (gpt2_on_sample("tst_s8", args, runs, tst), 130),
        "mb32": (gpt2_on_sample("tst_s8_mb32", args, runs, tst + ["--micro_batch_size", "32"]), 160),
        "tests": ([sys.executable, "-m", "pytest", "-q", "-s", os.path.join(ROOT, "test_train.py"), "-k", "cuda"], 120),
    }
    results = []
    for name in args.parts.split(","):
        command, needs = parts[name]
        left = deadline - time.time()
        if left < needs:
            results.append((name, f"skipped: {left:.0f} s of the budget left, it needs about {needs}", None))
            continue
        code, seconds = run(command, args.out, name, timeout=left)
        results.append((name, f"exit {code} after {seconds:.0f} s", seconds))
        print(f"{name}: exit {code} after {seconds:.0f} s", flush=True)
    for log in glob.glob(os.path.join(runs, "*.txt")):
        shutil.copy(log, args.out)
    shutil.rmtree(runs, ignore_errors=True)
    write_summary(args, results)
    return 0


def write_summary(args, results):
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    lines = [f"# train_tst.py on {gpu}: {args.steps} steps a run, gpt2 shape on the bundled sample",
             f"torch {torch.__version__}; MFU against {args.peak_tflops:g} TFLOP/s dense bf16; medians leave out"
             " the first"
             f" {SKIP_FIRST} steps of each phase", "", "| part | result |", "|---|---|"]
    lines += [f"| {name} | {result} |" for name, result, _ in results]
    lines += ["", "| run | phase | median ms / step | MFU | warmup (untimed) | peak memory | last line |",
              "|---|---|---|---|---|---|---|"]
    steps = {}
    for run_id in ("baseline", "tst_s8", "tst_s8_mb32"):
        s = summarize(os.path.join(args.out, f"{run_id}.txt"))
        if not s:
            continue
        for size, ms in sorted(s["times"].items(), reverse=True):
            steps[(run_id, size)] = ms
            mfu = 100 * s["flops"] / (ms / 1000) / (args.peak_tflops * 1e12)
            lines.append(f"| {run_id} | s = {size} | {ms:.0f} | {mfu:.1f}% | {s['warmup']} s | {s['peak']} GiB"
                         f" | `{s['end'][:60]}` |")
    base = steps.get(("baseline", 1))
    for run_id in ("tst_s8", "tst_s8_mb32"):
        if base and (run_id, 8) in steps:
            lines.append(f"\n{run_id}: superposition step / baseline step = {steps[(run_id, 8)] / base:.3f}")
    tests = os.path.join(args.out, "tests.out")
    if os.path.exists(tests):
        tail = [l for l in open(tests).read().splitlines() if l.strip()][-12:]
        lines += ["", "CUDA tests (last lines):", "```", *tail, "```"]
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
