"""train_tst.py: a single-file GPT speedrun trainer with Token Superposition Training (TST).

TST (Peng, Gigant, Quesnelle, arXiv 2605.06546): for the first fraction r of the steps the model reads bags of s
contiguous tokens (the mean of their embeddings) and predicts the next bag with a multi-hot cross-entropy; then it
trains as a plain next-token GPT with the same weights, optimizer and schedule. A step costs the same FLOPs either
way, but a superposition step reads s times the text. --tst_s 1 (the default) is the plain baseline: track-3's
train_gpt_simple.py, result #36.

    python train_tst.py --tst_s 4                                      # CPU preset, bundled sample
    torchrun --standalone --nproc_per_node=8 train_tst.py --tst_s 8    # TST on the GPT-2 baseline, FineWeb

Top to bottom: presets and flags, data, model, TST, optimizer and schedule, the training loop; below a banner, the
harness, which never changes a loss.
"""
import argparse, contextlib, glob, hashlib, importlib, inspect, json, math, os, platform, re, shutil, signal
import subprocess, sys, time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

with open(__file__) as _f:
    CODE = _f.read()  # the record log starts with the exact source that produced it
CODE_SHA = hashlib.sha256(CODE.encode()).hexdigest()[:16]
HERE = os.path.dirname(os.path.abspath(__file__))


# -----------------------------------------------------------------------------------------------------
# Presets and flags

PRESETS = {
    # The modded-nanogpt optimizer benchmark's baseline ("track 3", train_gpt_simple.py at 452cc392, result #36):
    # GPT-2 small with 6 heads of 128, 512 x 1024 = 524,288 tokens a step, Muon and AdamW, 3250 steps to a mean
    # val loss of 3.2787 over 10 runs.
    "gpt2": dict(n_layer=12, n_embd=768, n_head=6, seq_len=1024, batch_size=512, micro_batch_size=64,
                 steps=3250, lr=0.025, embed_lr=0.7, head_lr=0.004, scalar_lr=0.015, weight_decay=0.05,
                 adam_weight_decay=0.001, warmup_steps=0, cooldown_frac=0.7, val_every=125, final_val_every=25,
                 val_tokens=10_485_760, log_every=1, data_order="sequential"),
    # The same architecture and recipe, small enough to train in minutes on two CPU cores; its learning
    # rates are the result #1 recipe's times 4, the best of 0.5x-8x in a sweep (records/cpu/2026-11-23_lr_sweep).
    "cpu": dict(n_layer=4, n_embd=128, n_head=1, seq_len=256, batch_size=8, micro_batch_size=8,
                steps=400, lr=0.08, embed_lr=1.2, head_lr=1 / 80, scalar_lr=0.04, weight_decay=0.01,
                adam_weight_decay=0.0, warmup_steps=0, cooldown_frac=0.7, val_every=50, final_val_every=0,
                val_tokens=32_768, log_every=10,
                data_order="shuffled"),  # a few MB of text: random windows (records/cpu/2026-11-23_crossover)
}
VOCAB_SIZE = 50304  # GPT-2's 50257 tokens, padded to a multiple of 128 for fast matmuls
DTYPES = dict(bf16=torch.bfloat16, fp32=torch.float32)
COMPILE_FROM_STEPS = 20  # the CPU preset's compiled step saves ~2.4 s (2 threads): its ~40 s warmup pays by step 20
IGNORE = -100  # target id that no loss counts (F.cross_entropy's ignore_index)

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Flags without a default take the preset's.")
    g = p.add_argument_group("data")
    g.add_argument("--train_files", help="glob of train shards (default: data/fineweb10B, else the bundled sample)")
    g.add_argument("--val_files", help="glob of val shards (same default)")
    g.add_argument("--val_tokens", type=int, help="size of the fixed validation slice")
    g.add_argument("--data_order", choices=["sequential", "shuffled"],
                   help="sequential: the speedrun's walk through the shards; shuffled: windows at random positions")
    g.add_argument("--allow_repeat", action="store_true",
                   help="let a sequential run read its shards again when they run out (else it stops before any work)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=["auto", "gpt2", "cpu"], default="auto",
                   help="auto: gpt2 with CUDA and FineWeb (or your --train_files), cpu otherwise")
    g.add_argument("--n_layer", type=int)
    g.add_argument("--n_embd", type=int)
    g.add_argument("--n_head", type=int)
    g.add_argument("--seq_len", type=int, help="model positions per sequence, T")
    g.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    g = p.add_argument_group("token superposition (TST)")
    g.add_argument("--tst_s", type=int, default=1, help="bag size s; 1 turns TST off")
    g.add_argument("--tst_r", type=float, help="fraction of the steps in the superposition phase (default 0.3)")
    g.add_argument("--tst_schedule", help='bag sizes piece by piece, "s:fraction,...", e.g. "8:0.1,4:0.1,2:0.1";'
                                          " replaces --tst_s/--tst_r")
    g.add_argument("--tst_mode", choices=["full", "input", "output"], default="full",
                   help="full: bags in, next bag out; input: bags in, next token out; output: tokens in, next s out")
    g.add_argument("--tst_weights", choices=["uniform", "power"], default="uniform",
                   help="weights of the bag slots in the loss (power: 1/i)")
    g.add_argument("--mtp_k", type=int, default=1, help="after TST, also predict the next k tokens from the same"
                                                         " logits, weights annealed to plain next-token (1: off)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, help="optimizer steps, N")
    g.add_argument("--batch_size", type=int, help="sequences per step, over all processes")
    g.add_argument("--micro_batch_size", type=int, help="sequences per forward pass and process")
    g.add_argument("--lr", type=float, help="peak learning rate of Muon (the blocks' matrices)")
    g.add_argument("--embed_lr", type=float, help="peak learning rate of the embedding table (AdamW)")
    g.add_argument("--head_lr", type=float, help="peak learning rate of the head's weight (AdamW)")
    g.add_argument("--scalar_lr", type=float, help="peak learning rate of every bias and norm gain (AdamW)")
    g.add_argument("--weight_decay", type=float, help="Muon's decoupled weight decay")
    g.add_argument("--adam_weight_decay", type=float, help="AdamW's decoupled weight decay")
    g.add_argument("--warmup_steps", type=int)
    g.add_argument("--cooldown_frac", type=float, help="fraction of the steps over which the LR decays linearly to 0")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speedrun, logging and checkpoints")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when a GPU is visible")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help=f"torch.compile (default: on with CUDA, or for {COMPILE_FROM_STEPS}+ steps on CPU)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="activations and embedding table: bf16 as the reference (tensor cores / AMX) or fp32")
    g.add_argument("--val_every", type=int, help="validate every K steps (0: only at the start and the end)")
    g.add_argument("--final_val_every", type=int, help="validate every K steps over the last 10%% too (0: off)")
    g.add_argument("--target_val_loss", type=float, help="stop at the first validation at or under this loss")
    g.add_argument("--log_every", type=int, help="write a train line every K steps")
    g.add_argument("--log_dir", default="logs")
    g.add_argument("--run_id", help="log name (default: time and settings)")
    g.add_argument("--save_every", type=int, default=0, help="checkpoint every K steps too (0: switches and end)")
    g.add_argument("--resume", help="checkpoint to continue from (same flags otherwise)")
    g.add_argument("--peak_tflops", type=float, default=989.0, help="accelerator bf16 peak for MFU (H100 SXM: 989)")
    g = p.add_argument_group("beyond val loss: HellaSwag and samples of the final model")
    g.add_argument("--hellaswag", type=int, default=0, help="score the first N HellaSwag items (10042: all; 0: off)")
    g.add_argument("--sample_tokens", type=int, default=0, help="write a sample of N tokens into the record log")
    g.add_argument("--sample_prompt", default="The meaning of life is")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top_k", type=int, default=50, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--eval_only", metavar="MODEL",
                   help="no training: score and sample a checkpoint or an exported model.pt with the flags above")
    return p

def parse_args(argv=None, world_size=None):
    """The flags, the preset's values where a flag is not given; check_args (below the banner) refuses bad ones."""
    args = build_parser().parse_args(argv)
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_sample, auto = args.train_files is None and not glob.glob(fineweb_shards("train")), args.preset == "auto"
    if auto:  # the GPT-2 recipe wants a GPU and FineWeb
        args.preset = "gpt2" if args.device == "cuda" and not on_sample else "cpu"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.notes = []  # for the record log
    if args.micro_batch_size * world_size > args.batch_size:
        fits = max(1, args.batch_size // world_size)
        args.notes.append(f"note: --micro_batch_size {args.micro_batch_size} is more than a step's {args.batch_size}"
                          f" sequences over {world_size} processes hold: {fits} instead")
        args.micro_batch_size = fits
    if args.compile is None:
        args.compile = args.device == "cuda" or args.steps >= COMPILE_FROM_STEPS
    args.train_files = args.train_files or default_shards("train")
    args.val_files = args.val_files or default_shards("val")
    if args.tst_schedule is not None and (args.tst_s > 1 or args.tst_r is not None):
        raise UsageError("give either --tst_schedule or --tst_s/--tst_r, not both")
    args.tst_r = 0.3 if args.tst_r is None else args.tst_r
    if args.tst_schedule is None:
        args.tst_schedule = f"{args.tst_s}:{args.tst_r}" if args.tst_s > 1 else ""
    check_args(args, world_size, on_sample, auto)  # also parses the schedule into args.phases
    return args


# -----------------------------------------------------------------------------------------------------
# Data: shards in the llm.c / modded-nanogpt format, read through np.memmap

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS  # then header[2] uint16 tokens
FINEWEB_DIR = os.path.join(HERE, "data", "fineweb10B")
FINEWEB_SHARD_TOKENS = 100_000_000

def fineweb_shards(split):
    return os.path.join(FINEWEB_DIR, f"fineweb_{split}_*.bin")

def default_shards(split):
    """FineWeb's shards when data/fineweb10B holds train shards (a failed download leaves none), else the sample."""
    if glob.glob(fineweb_shards("train")):
        return fineweb_shards(split)
    return os.path.join(HERE, "data", "sample", f"sample_{split}_*.bin")

def read_shard(path):
    """The tokens of one shard as a read-only uint16 memmap (check_shard says what is wrong with a bad one)."""
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(check_shard(path),))

def next_chunk(shard, offset, need, shard_length):
    """(shard, offset) of the sequential walk's next chunk of `need` tokens, skipping a shard tail too short."""
    while offset + need > shard_length(shard):
        shard, offset = shard + 1, 0
    return shard, offset

def sequential_chunk(batch_size, window):
    """Tokens of a sequential step's chunk: batch_size windows, each overlapping the next by one token."""
    return batch_size * (window - 1) + 1

class ShardLoader:
    """A step's train windows. sequential (the speedrun's walk): one contiguous chunk a step, batch_size windows each
    overlapping the next by a token, a shard's tail too short skipped, starting over after the last shard. shuffled:
    windows at random positions drawn from (seed, step). Rank r takes the r-th share, so the result does not depend on
    the number of processes; every rank checks the ids of the whole step, so a bad id stops all ranks at one step."""
    def __init__(self, pattern, batch_size, rank, world_size, vocab_size, order="sequential", seed=0):
        self.files = find_shards(pattern)
        self.shards = [read_shard(f) for f in self.files]
        self.batch_size, self.rank, self.world_size, self.vocab_size = batch_size, rank, world_size, vocab_size
        self.order, self.seed = order, seed
        self.shard = self.offset = self.epoch = self.draws = 0

    def chunk_tokens(self, window):
        return sequential_chunk(self.batch_size, window) if self.order == "sequential" else window

    def next_batch(self, window):
        """This rank's windows of the next step, an int64 tensor (batch_size / world_size, window)."""
        if self.order == "shuffled":
            return self.random_windows(window)
        need, n = self.chunk_tokens(window), len(self.shards)
        walked, self.offset = next_chunk(self.epoch * n + self.shard, self.offset, need,
                                         lambda i: len(self.shards[i % n]))
        self.epoch, self.shard = divmod(walked, n)
        chunk = self.shards[self.shard][self.offset:self.offset + need]
        check_token_ids(chunk, self.vocab_size, self.files[self.shard], self.offset)
        self.offset += need - 1
        share = self.batch_size // self.world_size * (window - 1)
        mine = torch.from_numpy(chunk[self.rank * share:(self.rank + 1) * share + 1].astype(np.int64))
        return mine.unfold(0, window, window - 1).contiguous()

    def random_windows(self, window):
        starts = np.cumsum([0] + [max(0, len(s) - window + 1) for s in self.shards])  # window starts, shard by shard
        picks = np.random.default_rng([self.seed, self.draws]).integers(starts[-1], size=self.batch_size)
        self.draws += 1
        share = self.batch_size // self.world_size
        rows = []
        for i, pick in enumerate(picks):
            shard = int(np.searchsorted(starts, pick, side="right")) - 1
            offset = int(pick - starts[shard])
            tokens = self.shards[shard][offset:offset + window]
            check_token_ids(tokens, self.vocab_size, self.files[shard], offset)
            if i // share == self.rank:
                rows.append(tokens)
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self):
        return dict(shard=self.shard, offset=self.offset, epoch=self.epoch, draws=self.draws)

    def load_state_dict(self, state):
        self.shard, self.offset, self.epoch, self.draws = (state[k] for k in ("shard", "offset", "epoch", "draws"))

def load_val_windows(pattern, n_tokens, seq_len, rank, world_size, vocab_size):
    """The fixed validation slice: the first n_tokens (+1) of the val shards, this rank's share of windows."""
    files, parts, have = find_shards(pattern), [], 0
    for path in files:
        tokens = read_shard(path)[:n_tokens + 1 - have]
        check_token_ids(tokens, vocab_size, path, 0)
        parts.append(np.asarray(tokens))
        have += len(tokens)
        if have == n_tokens + 1:
            break
    else:
        raise UsageError(f"--val_tokens {n_tokens} needs {n_tokens + 1} tokens but the val shards {pattern}"
                         f" hold {have}")
    windows = torch.from_numpy(np.concatenate(parts).astype(np.int64)).unfold(0, seq_len + 1, seq_len)
    share = len(windows) // world_size
    return windows[rank * share:(rank + 1) * share].contiguous()


# -----------------------------------------------------------------------------------------------------
# Model: the track-3 GPT (biased linears, RMSNorm with gains, QK-norm, half-truncated RoPE, ReLU^2,
# untied head with soft-capped logits, output projections and head initialised to zero)

ATTENTION_SCALE = 0.12  # the reference's, in place of 1/sqrt(head_dim)
LOGIT_CAP = 15.0

def norm(x):
    return F.rms_norm(x, (x.size(-1),))

class Linear(nn.Linear):
    """A linear layer with bias, float32 weights, computed in its input's dtype (bf16 activations: fast matmuls)."""
    def forward(self, x):
        return F.linear(x, self.weight.type_as(x), self.bias.type_as(x))

class RMSNorm(nn.Module):
    """RMS norm with a learnable gain, computed in the activations' dtype (the gain cast to it), as the reference."""
    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.gain.type_as(x))

class Rotary(nn.Module):
    """Half-truncated RoPE: head_dim/4 frequencies from 1 down to 1/1024 turn half of the dimension pairs;
    the other half have frequency 0 and are not turned."""
    def __init__(self, head_dim, max_len):
        super().__init__()
        freq = (1 / 1024) ** torch.linspace(0, 1, head_dim // 4)
        freq = torch.cat([freq, freq.new_zeros(head_dim // 4)])
        angle = torch.outer(torch.arange(max_len, dtype=torch.float32), freq)
        self.register_buffer("cos", angle.cos()[:, None, :], persistent=False)
        self.register_buffer("sin", angle.sin()[:, None, :], persistent=False)

    def forward(self, x):  # (B, T, H, D); position t is the t-th input vector (a bag index under TST)
        cos, sin = self.cos[:x.size(1)], self.sin[:x.size(1)]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)

class CausalSelfAttention(nn.Module):
    def __init__(self, dim, n_head, max_len):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        # Separate q, k and v matrices: Muon orthogonalises each on its own, as the reference does.
        self.q, self.k, self.v = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.proj = Linear(dim, dim)
        self.rotary = Rotary(self.head_dim, max_len)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (layer(x).view(B, T, self.n_head, self.head_dim) for layer in (self.q, self.k, self.v))
        q, k = self.rotary(norm(q)), self.rotary(norm(k))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=ATTENTION_SCALE, is_causal=True)  # flash attention on GPU
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = Linear(dim, 4 * dim)
        self.proj = Linear(4 * dim, dim)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())

class Block(nn.Module):
    def __init__(self, dim, n_head, max_len):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(dim), CausalSelfAttention(dim, n_head, max_len)
        self.mlp_norm, self.mlp = RMSNorm(dim), MLP(dim)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

class GPT(nn.Module):
    def __init__(self, vocab_size, n_layer, n_embd, n_head, max_len, dtype=torch.bfloat16):
        super().__init__()
        self.max_len = max_len
        self.wte = nn.Embedding(vocab_size, n_embd).to(dtype)  # its dtype is the activations' dtype
        self.embed_norm = RMSNorm(n_embd)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, max_len) for _ in range(n_layer)])
        self.head_norm = RMSNorm(n_embd)
        self.lm_head = Linear(n_embd, vocab_size)
        for name, p in self.named_parameters():  # the reference's explicit initialisation
            if name == "wte.weight":
                nn.init.normal_(p)
            elif name.endswith(".gain"):
                nn.init.ones_(p)
            elif name.endswith(".bias") or name == "lm_head.weight" or name.endswith("proj.weight"):
                nn.init.zeros_(p)  # every residual branch and the head start as no-ops
            else:
                nn.init.normal_(p, std=(0.33 / p.size(-1)) ** 0.5)  # N(0, 0.33 / fan_in)

    def logits(self, inputs):
        """inputs (B, T) token ids, or (B, T, s) bags -> float32 logits (B, T, V), smoothly capped to (-15, 15)."""
        x = embed_bags(self.wte, inputs) if inputs.dim() == 3 else self.wte(inputs)
        x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x)
        z = self.lm_head(self.head_norm(x)).float()
        return LOGIT_CAP * z * torch.rsqrt(z.square() + LOGIT_CAP ** 2)

    def forward(self, inputs, targets, slot_weights=None):
        """Mean loss; targets (B, T), or (B, T, s) for several per position."""
        logits = self.logits(inputs)
        V = logits.size(-1)
        if targets.dim() == 2:
            return F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=IGNORE)
        return multi_hot_cross_entropy(logits.view(-1, V), targets.reshape(-1, targets.size(-1)), slot_weights)

    @torch.no_grad()
    def generate(self, prompt, n_new, temperature, top_k, seed, n_vocab=None):
        """n_new token ids after `prompt`, sampled one at a time through the training forward pass over the last
        max_len tokens (no KV cache: short and plain), never from the padding ids at or past n_vocab."""
        self.eval()
        generator = torch.Generator(device=self.wte.weight.device).manual_seed(seed)
        tokens = torch.tensor([prompt], device=self.wte.weight.device)
        for _ in range(n_new):
            logits = self.logits(tokens[:, -self.max_len:])[0, -1] / temperature
            if n_vocab:
                logits[n_vocab:] = -math.inf
            if top_k:
                logits[logits < logits.topk(min(top_k, logits.numel())).values[-1]] = -math.inf
            tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1, generator=generator)[None]], dim=1)
        return tokens[0, len(prompt):].tolist()

def model_config(args):
    return dict(vocab_size=args.vocab_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                max_len=args.seq_len)


# -----------------------------------------------------------------------------------------------------
# Token Superposition Training: the whole method is these functions

def parse_tst_schedule(text, steps):
    """'8:0.1,1:0.1,4:0.1' -> [(8, 40), (1, 80), (4, 120)] for 400 steps: each piece's bag size and the step it ends
    at, in order; next-token training (s = 1) follows. A piece that covers no step is refused. '' (TST off) -> []."""
    phases, fraction, end = [], 0.0, 0
    for piece in filter(None, text.replace(" ", "").split(",")):
        try:
            size, frac = piece.split(":")
            size, frac = int(size), float(frac)
        except ValueError:
            raise UsageError(f"--tst_schedule piece {piece!r} is not 'bag_size:fraction'") from None
        if size < 1 or not 0 <= frac < 1:
            raise UsageError(f"--tst_schedule piece {piece!r}: bag size must be >= 1 and fraction in [0, 1)")
        fraction += frac
        if fraction >= 1:
            raise UsageError(f"--tst_schedule {text!r}: fractions sum to {fraction:g}, leaving no next-token phase")
        start, end = end, math.floor(fraction * steps + 1e-9)
        if end == start:
            raise UsageError(f"TST piece {piece!r} covers no step of {steps} (its fraction x steps rounds down to"
                             " no new step): raise its fraction or --steps")
        phases.append((size, end))
    return phases

def superposition_end(phases):
    """The first step of plain next-token training after the last superposition piece (0 without TST)."""
    return max((end for size, end in phases if size > 1), default=0)

def bag_size_at(step, phases):
    """The bag size s of a step; 1 once the pieces are over."""
    return next((size for size, end in phases if step < end), 1)

def window_tokens(s, mode, seq_len):
    """Tokens per sequence window: s*T+1 when bags are read (full, input); T+1 otherwise."""
    return seq_len * (s if mode != "output" else 1) + 1

def make_bags(tokens, s):
    """(B, s*T+1) tokens -> inputs (B, T, s), contiguous bags, and targets (B, T, s), the tokens of the next bag
    (IGNORE past the window's end)."""
    B, T = tokens.size(0), (tokens.size(1) - 1) // s
    inputs = tokens[:, :s * T].view(B, T, s)
    targets = F.pad(tokens[:, s:s * T + 1], (0, s - 1), value=IGNORE).view(B, T, s)
    return inputs, targets

def next_tokens(tokens, k):
    """(B, T+1) tokens -> targets (B, T, k): position t's next k tokens, IGNORE past the window."""
    return F.pad(tokens[:, 1:], (0, k - 1), value=IGNORE).unfold(1, k, 1)

def embed_bags(wte, bags):
    """(B, T, s) ids -> (B, T, d): the plain mean of each bag's embeddings, summed in float32."""
    return wte(bags).float().mean(dim=2).to(wte.weight.dtype)

def multi_hot_cross_entropy(logits, targets, weights=None):
    """MCE = logsumexp(z) - sum_k w_k z[y_k]: the weighted mean over bag slots k of the cross-entropy of logits (N, V)
    against targets (N, s), each slot averaged over its rows that are not IGNORE (a slot with none adds 0); with s = 1
    it is F.cross_entropy. Not a log-softmax: that keeps another (N, V) float32 tensor (13 GiB at the gpt2 micro-batch,
    10% of an H200 step)."""
    z = logits.float()
    valid = targets != IGNORE
    per_target = torch.logsumexp(z, dim=-1, keepdim=True) - z.gather(1, targets.clamp(min=0))
    per_slot = (per_target * valid).sum(0) / valid.sum(0).clamp(min=1)
    if weights is None:
        return per_slot.mean()
    return (per_slot * weights).sum() / weights.sum()

def slot_weights(s, kind, device):
    """Within-bag loss weights: None for uniform, 1/i for 'power' (the paper's better choice for s >= 8)."""
    if kind == "uniform" or s == 1:
        return None
    return 1.0 / torch.arange(1, s + 1, device=device, dtype=torch.float32)

def mtp_weights(k, progress, device):
    """Weights of the next k tokens, 1, 1/2, 1/4, ..., annealed to (1, 0, 0, ...) as progress goes from 0 to 1."""
    w = 0.5 ** torch.arange(k, device=device, dtype=torch.float32) * (1.0 - progress)
    w[0] = 1.0
    return w

def batch_for(step, windows, args, device):
    """A step's inputs, targets and slot weights on the device; with s = 1 and mtp_k = 1, the baseline's batch."""
    tokens, s = windows.to(device, non_blocking=True), bag_size_at(step, args.phases)
    if s == 1 and args.mtp_k == 1:
        return tokens[:, :-1], tokens[:, 1:], None
    if s == 1:
        phase_end = superposition_end(args.phases)
        progress = max(0.0, (step - phase_end) / max(1, args.steps - phase_end))  # 0 before the superposition
        return tokens[:, :-1], next_tokens(tokens, args.mtp_k), mtp_weights(args.mtp_k, progress, device)
    weights = slot_weights(s, args.tst_weights, device)
    if args.tst_mode == "output":
        return tokens[:, :-1], next_tokens(tokens, s), weights
    inputs, targets = make_bags(tokens, s)
    return inputs, (targets[..., 0] if args.tst_mode == "input" else targets), weights


# -----------------------------------------------------------------------------------------------------
# Optimizer and schedule

# The reference's Adam epsilon, for its loss summed over a step's tokens. Averaging the loss makes gradients (tokens
# a step) times smaller; Adam's update is the same when eps shrinks by that factor too.
ADAM_EPS_FOR_SUMMED_LOSS = 1e-10

all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # its name from torch 2.13

class Muon(torch.optim.Muon):
    """torch's Muon, its work split over ranks as the reference splits it: of the matrices sorted largest first, rank
    r updates (and keeps the momentum of) every world_size-th from the r-th, then all ranks all-gather them."""
    def __init__(self, matrices, rank=0, world_size=1, **settings):
        self.matrices = sorted(matrices, key=lambda p: p.size(), reverse=True)
        self.rank, self.world_size = rank, world_size
        super().__init__([dict(params=self.matrices[rank::world_size])], **settings)
        if world_size > 1:
            self.register_step_post_hook(lambda opt, args, kwargs: opt.share(opt.matrices))

    @torch.no_grad()
    def share(self, tensors):
        """Each block of world_size tensors from the ranks that own them: one flat all-gather a block."""
        for start in range(0, len(tensors), self.world_size):
            block = tensors[start:start + self.world_size]
            width = max(t.numel() for t in block)
            mine = block[0].new_zeros(width)
            if self.rank < len(block):
                mine[:block[self.rank].numel()] = block[self.rank].flatten()
            gathered = mine.new_empty(self.world_size * width)
            all_gather_single(gathered, mine)
            for i, t in enumerate(block):
                t.copy_(gathered[i * width:i * width + t.numel()].view_as(t))

    def zero_grad(self, set_to_none=True):
        for p in self.matrices:  # every matrix has a gradient, not only this rank's
            p.grad = None

    def state_dict(self):
        """Every matrix's momentum (every rank takes part): a checkpoint resumes on any number of processes."""
        momentum = [self.state[p]["momentum_buffer"] if p in self.state else torch.zeros_like(p) for p in self.matrices]
        if self.world_size > 1:
            self.share(momentum)
        return dict(momentum=momentum, param_groups=[{k: v for k, v in g.items() if k != "params"}
                                                     for g in self.param_groups])

    def load_state_dict(self, state):
        self.param_groups[0].update(state["param_groups"][0])
        mine = state["momentum"][self.rank::self.world_size]
        for p, buffer in zip(self.param_groups[0]["params"], mine):
            self.state[p]["momentum_buffer"] = buffer.to(p.device, copy=True)

def make_optimizers(model, args, rank=0, world_size=1):
    """The track-3 recipe: Muon (Nesterov 0.95, 12 Newton-Schulz steps (2, -1.5, 0.5), update x sqrt(max(1, rows /
    cols))) for the blocks' matrices; AdamW (0.8, 0.95) for the embedding, the head's weight, biases and gains."""
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    adam = torch.optim.AdamW([dict(params=[model.wte.weight], lr=args.embed_lr),
                              dict(params=[model.lm_head.weight], lr=args.head_lr),
                              dict(params=vectors, lr=args.scalar_lr)],
                             betas=(0.8, 0.95), eps=ADAM_EPS_FOR_SUMMED_LOSS / (args.batch_size * args.seq_len),
                             weight_decay=args.adam_weight_decay, fused=True)
    muon = Muon(matrices, rank, world_size, lr=args.lr, weight_decay=args.weight_decay, momentum=0.95, nesterov=True,
                ns_coefficients=(2.0, -1.5, 0.5), ns_steps=12, adjust_lr_fn="original")
    optimizers = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]  # the reference's initial_lr
    return optimizers

def lr_multiplier(step, args):
    """Warmup-stable-decay: linear warmup, flat, then linear decay to 0 over the last cooldown_frac of steps."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    cooldown = args.cooldown_frac * args.steps
    return min(1.0, (args.steps - step) / cooldown) if cooldown > 0 else 1.0

def val_due(step, args):
    """Validate at the start, at the end, every val_every steps, and every final_val_every over the last 10%."""
    late = args.final_val_every and 10 * step >= 9 * args.steps and step % args.final_val_every == 0
    return step in (0, args.steps) or bool(late) or (args.val_every > 0 and step % args.val_every == 0)


# -----------------------------------------------------------------------------------------------------
# Training

def train_step(model, optimizers, inputs, targets, weights, accum, lr_mult):
    """One optimizer step over `accum` micro-batches; DDP all-reduces only on the last one."""
    total = 0.0
    for i, (x, y) in enumerate(zip(inputs.chunk(accum), targets.chunk(accum))):
        sync = i == accum - 1 or not isinstance(model, DDP)
        with contextlib.nullcontext() if sync else model.no_sync():
            loss = model(x, y, weights) / accum
            loss.backward()
        total = total + loss.detach()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * lr_mult
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total

@torch.no_grad()
def val_loss_sum(model, val_windows, micro_batch_size, device):
    """This rank's summed next-token loss over its val windows, left on the device (no sync per micro-batch)."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for windows in val_windows.split(micro_batch_size):
        windows = windows.to(device, non_blocking=True)
        total += model(windows[:, :-1], windows[:, 1:]).double() * len(windows)
    model.train()
    return total

def evaluate(model, val_windows, micro_batch_size, device):
    """Plain next-token loss on the fixed val slice, averaged over all ranks' windows, whatever the phase."""
    loss_sum, count = all_reduce_sum([val_loss_sum(model, val_windows, micro_batch_size, device), len(val_windows)],
                                     device)
    return loss_sum / count

def train(args, stop, run):
    """Set-up before the clock (the input checked on every rank, the warmup), then track-3's loop. `run` closes the
    log and the process group however the run ends; `stop` holds the stop signals caught."""
    rank, world_size, device = run.enter_context(process_group(args.device))
    torch.manual_seed(args.seed)
    loader, val_windows, resume_state, data_line, eval_inputs = load_inputs(args, rank, world_size, device)
    log = run.enter_context(open_log(args, rank, world_size, device, resume_state, data_line))
    if log.finished:
        return 0
    raw_model = GPT(**model_config(args), dtype=DTYPES[args.dtype]).to(device)
    model, train_model, warmup_notes = fit_micro_batch(raw_model, args, val_windows, world_size, device)
    optimizers = make_optimizers(raw_model, args, rank, world_size)
    flops_per_step = model_flops_per_token(raw_model, args.seq_len) * args.batch_size * args.seq_len
    flops_per_gpu = flops_per_step / world_size
    accum = args.batch_size // (world_size * args.micro_batch_size)
    log_model(log, raw_model, flops_per_step, accum, args, world_size, resume_state, warmup_notes)
    start, train_ms, tokens_seen = resume(resume_state, raw_model, optimizers, loader, args)
    val_loss = reached = stop_votes = None
    stop.training = True  # from here a stop signal ends the step in progress, then a checkpoint
    for step in range(start, args.steps + 1):
        last_step = step == args.steps

        # --------------- VALIDATION SECTION -----------------
        if val_due(step, args) and (step > start or resume_state is None or last_step):  # not twice at a resume
            val_loss = evaluate(model, val_windows, args.micro_batch_size, device)
            if not math.isfinite(val_loss):
                raise Diverged(f"non-finite val loss at step {step}")
            log.line(f"step:{step}/{args.steps} val_loss:{val_loss:.4f} {clock(step, train_ms, tokens_seen)}")
            if args.target_val_loss is not None and val_loss <= args.target_val_loss and reached is None:
                reached = (step, train_ms)

        # --------------- CHECKPOINT SECTION -----------------
        reason = checkpoint_reason(step, start, args, reached, stop_votes)
        if reason:
            checkpoint(args, step, reason, raw_model, optimizers, loader, train_ms, tokens_seen, log, rank)
        if last_step or reached or stop_votes:
            break

        # --------------- TRAINING SECTION -----------------
        s = bag_size_at(step, args.phases)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        windows = loader.next_batch(window_tokens(s, args.tst_mode, args.seq_len))
        inputs, targets, weights = batch_for(step, windows, args, device)
        loss = train_step(train_model, optimizers, inputs, targets, weights, accum, lr_multiplier(step, args))
        loss_sum, stop_votes, failed = all_reduce_sum([loss, len(stop.caught), log.error is not None], device)
        if failed:  # rank 0 could not write the log: every rank stops here
            raise log.error or WriteFailed("the record log could not be written (its error is above)")
        train_ms += 1000 * (time.perf_counter() - t0)
        log.step = step + 1
        tokens_seen += args.batch_size * (windows.size(1) - 1)
        train_loss, phase = loss_sum / world_size, "tst" if s > 1 else "ntp"
        if not math.isfinite(train_loss):
            raise Diverged(f"non-finite train loss {train_loss} at step {step + 1} (phase {phase}, s={s});"
                           f" last good checkpoint: {log.last_checkpoint}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            log.line(f"step:{step + 1}/{args.steps} train_loss:{train_loss:.4f} phase:{phase} s:{s}"
                     f" {clock(step + 1, train_ms, tokens_seen)}{mfu(flops_per_gpu, step + 1, train_ms, args)}",
                     console_extra=eta(step + 1, train_ms, args.steps))
    stop.training = False  # what follows is not a training step: a stop signal stops it at once
    if not (last_step or reached):
        return interrupted(stop.caught, args, log, step, train_ms, tokens_seen, device)
    finish(args, raw_model, log, step, val_loss, reached, train_ms, tokens_seen, eval_inputs, rank, world_size, device)
    return 0


#######################################################################################################
# THE HARNESS. Nothing below changes a loss: checks of the flags and the data, the distributed set-up, the
# compile warmup and the out-of-memory fit, stop signals, checkpoints, the record log, and what is done with
# the final model (export, HellaSwag, a sample). It stays in this file so that the record log holds it too.
#######################################################################################################

class UsageError(Exception):
    """Bad input (a flag, a shard, a checkpoint): reported on one line, exit code 2."""

class Diverged(Exception):
    """A non-finite loss: the run stops at once, exit code 1."""

class WriteFailed(Exception):
    """A file the run writes (its log, a checkpoint, the export) could not be written: exit code 1."""

def check_shard(path):
    """The token count of a whole shard, or a UsageError naming what is wrong with its header or size."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise UsageError(f"{path}: cannot read shard ({e.strerror or e})") from None
    if len(header) < HEADER_INTS:
        raise UsageError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    if header[0] != SHARD_MAGIC:
        raise UsageError(f"{path}: magic number {header[0]} is not {SHARD_MAGIC}: not a token shard")
    if header[1] != SHARD_VERSION:
        raise UsageError(f"{path}: shard version {header[1]} is not {SHARD_VERSION}")
    n_tokens = int(header[2])
    if n_tokens <= 0:
        raise UsageError(f"{path}: header says {n_tokens} tokens: an empty or corrupt shard")
    if size != HEADER_BYTES + 2 * n_tokens:
        raise UsageError(f"{path}: header says {n_tokens} tokens ({HEADER_BYTES + 2 * n_tokens} bytes)"
                         f" but the file has {size} bytes: truncated or corrupt")
    return n_tokens

def find_shards(pattern):
    files = sorted(glob.glob(pattern))
    if not files:
        raise UsageError(f"no shard matches {pattern} (see data/README.md to download or prepare shards)")
    return files

def check_token_ids(tokens, vocab_size, path, offset):
    """Ids at or past the vocabulary would index past the embedding table: refuse them by name."""
    top = int(tokens.max())
    if top >= vocab_size:
        where = offset + int(np.argmax(tokens >= vocab_size))
        raise UsageError(f"{path}: token id {top} at position {where} is not below --vocab_size {vocab_size}")

def model_flops_per_token(model, seq_len):
    """6 FLOPs per matmul weight per token (forward and backward) plus attention's 12 * layers * width * T."""
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and n != "wte.weight")
    return 6 * matmul_params + 12 * len(model.blocks) * model.wte.embedding_dim * seq_len

def check_args(args, world_size, on_sample, auto):
    """Reject impossible values before any work, each with one line."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    if not 0 <= args.tst_r < 1:
        raise UsageError(f"--tst_r must be in [0, 1), got {args.tst_r}")
    if args.tst_s < 1:
        raise UsageError(f"--tst_s must be at least 1, got {args.tst_s}")
    for key in ["n_layer", "n_embd", "n_head", "steps", "batch_size", "micro_batch_size", "val_tokens", "log_every",
                "mtp_k", "lr", "embed_lr", "head_lr", "scalar_lr", "peak_tflops", "temperature"]:
        if getattr(args, key) <= 0:
            raise UsageError(f"--{key} must be positive, got {getattr(args, key)}")
    for key in ["warmup_steps", "val_every", "final_val_every", "save_every", "weight_decay", "adam_weight_decay",
                "hellaswag", "sample_tokens", "top_k"]:
        if getattr(args, key) < 0:
            raise UsageError(f"--{key} must not be negative, got {getattr(args, key)}")
    if not 0 <= args.cooldown_frac <= 1:
        raise UsageError(f"--cooldown_frac must be in [0, 1], got {args.cooldown_frac}")
    if args.seq_len < 2:
        raise UsageError(f"--seq_len must be at least 2, got {args.seq_len}")
    if not 2 <= args.vocab_size <= 65536:
        raise UsageError(f"--vocab_size must be in [2, 65536] (shards hold uint16 ids), got {args.vocab_size}")
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 4:
        raise UsageError(f"--n_embd {args.n_embd} must split into --n_head {args.n_head} heads of a size divisible"
                         " by 4")
    if args.batch_size % (world_size * args.micro_batch_size):
        raise UsageError(f"--batch_size {args.batch_size} must be a multiple of {world_size} processes"
                         f" x --micro_batch_size {args.micro_batch_size}")
    if args.val_tokens % (world_size * args.seq_len):
        raise UsageError(f"--val_tokens {args.val_tokens} must be a multiple of {world_size} processes"
                         f" x --seq_len {args.seq_len}")
    if args.target_val_loss is not None and args.target_val_loss <= 0:
        raise UsageError(f"--target_val_loss must be positive, got {args.target_val_loss}")
    if args.sample_tokens and not args.sample_prompt:
        raise UsageError("--sample_prompt must not be empty")
    if args.eval_only and not (args.hellaswag or args.sample_tokens):
        raise UsageError("--eval_only needs --hellaswag N or --sample_tokens N: nothing else is done with the model")
    args.phases = parse_tst_schedule(args.tst_schedule, args.steps)
    windows = args.batch_size // world_size * max(window_tokens(s, args.tst_mode, args.seq_len)
                                                  for s in bag_sizes(args))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 8 * windows > host:  # found now, not after minutes of warmup
        raise UsageError(f"a step's token windows alone take {8 * windows / 2 ** 30:,.1f} GiB of host memory, more than"
                         f" this machine's {host / 2 ** 30:,.1f} GiB: lower --batch_size or --seq_len")
    if args.run_id is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*", args.run_id):
        raise UsageError(f"--run_id {args.run_id!r} must be a plain name (letters, digits, '.', '_', '-', '=', '+';"
                         " no path, no spaces): the log and the checkpoints go under --log_dir")
    if args.resume == "":
        raise UsageError("--resume needs a checkpoint's path: an empty one would start a fresh run in silence")
    if args.preset == "gpt2" and on_sample and not args.eval_only:
        raise UsageError(f"the gpt2 preset trains on FineWeb, which is not in data/fineweb10B: python"
                         f" data/cached_fineweb10B.py {fineweb_shards_needed(args)} (what this run reads), or give"
                         " --train_files and --val_files")
    if auto and on_sample and args.device == "cuda" and int(os.environ.get("RANK", 0)) == 0:
        baseline = argparse.Namespace(**PRESETS["gpt2"], phases=[], tst_mode="full")
        print("note: no FineWeb shards in data/fineweb10B, so this trains the cpu preset on the bundled sample;"
              f" for GPT-2: python data/cached_fineweb10B.py {fineweb_shards_needed(baseline)}, then the same command",
              file=sys.stderr)

def bag_sizes(args):
    return sorted({size for size, _ in args.phases} | {1})

def step_windows(args):
    """The window length each step reads, in order (s*T+1 tokens in a superposition step that reads bags)."""
    return [window_tokens(bag_size_at(step, args.phases), args.tst_mode, args.seq_len) for step in range(args.steps)]

def sequential_shards(windows, batch_size, shard_lengths, further_shard):
    """How many shards the sequential walk enters to read a step of `batch_size` windows of each length in
    `windows`: the given shards in order, then shards of `further_shard` tokens. More than the given shards
    means a run on them would start over at the first (read some text twice)."""
    length = lambda i: shard_lengths[i] if i < len(shard_lengths) else further_shard
    shard = offset = 0
    for window in windows:
        need = sequential_chunk(batch_size, window)
        shard, offset = next_chunk(shard, offset, need, length)
        offset += need - 1
    return shard + 1

def fineweb_shards_needed(args):
    """FineWeb shards this run would read in order (each holds FINEWEB_SHARD_TOKENS)."""
    return sequential_shards(step_windows(args), args.batch_size, [], FINEWEB_SHARD_TOKENS)

def check_fits(loader, window):
    need, longest = loader.chunk_tokens(window), max(len(s) for s in loader.shards)
    if need > longest:
        what = f"{loader.batch_size} windows of {window}" if loader.order == "sequential" else f"windows of {window}"
        raise UsageError(f"a step needs {need} consecutive tokens ({what}) but the longest train shard holds"
                         f" {longest}: lower --batch_size, --seq_len or the bag size")

def data_summary(loader, args):
    """The log's `data:` line: the train tokens the run reads against what its shards hold. A sequential run that
    would run out of shards and start over stops here, before any work, unless --allow_repeat says so."""
    windows, lengths = step_windows(args), [len(s) for s in loader.shards]
    reads, holds = args.batch_size * sum(w - 1 for w in windows), sum(lengths)
    line = (f"data: {reads:,} train tokens read of {holds:,} in {len(lengths)} shards, {args.data_order}:"
            f" {reads / holds:.2f} epochs")
    if args.data_order == "shuffled":
        return line
    needed = sequential_shards(windows, args.batch_size, lengths, max(lengths))
    if needed <= len(lengths):
        return line + f", shards 1-{needed} once each"
    if not args.allow_repeat:
        raise UsageError(f"this sequential run reads {reads:,} tokens, more than its {len(lengths)} train shards give"
                         f" (tails shorter than a step skipped): it needs {needed} shards (FineWeb: python"
                         f" data/cached_fineweb10B.py {needed}), or --allow_repeat to read them again")
    return line + f", starting over at shard 1 after shard {len(lengths)} (--allow_repeat)"


# --- processes

@contextlib.contextmanager
def process_group(device_type):
    """torchrun sets RANK/WORLD_SIZE: NCCL on GPUs, gloo on CPU; without it, one process. A run that ends well waits
    for every rank before the group goes (gloo aborts a process whose peer tore down first)."""
    if "RANK" not in os.environ:
        yield 0, 1, torch.device(device_type)
        return
    cuda = device_type == "cuda"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield dist.get_rank(), dist.get_world_size(), device
        dist.barrier()
    finally:
        dist.destroy_process_group()

def all_reduce_sum(values, device):
    """Sum floats or 0-d tensors over ranks; one collective and one host sync."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()

def raise_if_any_rank_failed(error, device):
    """Every rank raises when one has: a rank that stopped alone would leave the others waiting in a collective."""
    if all_reduce_sum([float(error is not None)], device)[0]:
        raise error or UsageError("another process stopped on an error (its message is above)")

def load_inputs(args, rank, world_size, device):
    """Everything that can be wrong with the input, found before the first step, on every rank: the shards and the
    data accounting, the val slice, the checkpoint to resume, HellaSwag and the tokenizer."""
    problem = None
    try:
        loader = ShardLoader(args.train_files, args.batch_size, rank, world_size, args.vocab_size, args.data_order,
                             args.seed)
        for s in bag_sizes(args):
            check_fits(loader, window_tokens(s, args.tst_mode, args.seq_len))
        data_line = data_summary(loader, args)
        shared = set(map(os.path.realpath, loader.files)) & set(map(os.path.realpath, find_shards(args.val_files)))
        if shared:
            raise UsageError(f"--val_files {args.val_files} names train shards ({sorted(shared)[0]}): validation would"
                             " score text the model trains on")
        val_windows = load_val_windows(args.val_files, args.val_tokens, args.seq_len, rank, world_size, args.vocab_size)
        resume_state = load_checkpoint(args.resume, args) if args.resume else None
        eval_inputs = downstream_inputs(args)
    except UsageError as e:
        problem = e
    raise_if_any_rank_failed(problem, device)
    return loader, val_windows, resume_state, data_line, eval_inputs


# --- compile warmup and the out-of-memory fit

def warm_up(train_model, model, optimizers, args, val_windows, world_size, device):
    """A step of every bag size at lr 0 and a validation batch on random tokens: compiles their graphs and
    allocates what training will. DDP's gradient sync is off and the rotary buffers are not broadcast, so there
    is no collective here: a rank that runs out of memory cannot leave the others waiting in one."""
    fake = torch.Generator().manual_seed(0)
    accum = args.batch_size // (world_size * args.micro_batch_size)
    with train_model.no_sync() if isinstance(train_model, DDP) else contextlib.nullcontext():
        for s in bag_sizes(args):
            step = next((end - 1 for size, end in args.phases if size == s), superposition_end(args.phases))
            shape = (args.batch_size // world_size, window_tokens(s, args.tst_mode, args.seq_len))
            windows = torch.randint(args.vocab_size, shape, generator=fake)
            train_step(train_model, optimizers, *batch_for(step, windows, args, device), accum, 0.0)
    val_loss_sum(model, val_windows[:args.micro_batch_size], args.micro_batch_size, device)

NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})  # the name torch 2.13 gives it

def fit_micro_batch(raw_model, args, val_windows, world_size, device):
    """Compile (if asked), wrap in DDP and warm up, halving the micro-batch while any rank runs out of memory:
    gradient accumulation keeps the global batch, so the result does not change. The weights are put back from
    a CPU copy (none stays on the device) and the warmup's optimizers are dropped. Compiled graphs and the DDP
    wrapper of a micro-batch that did not fit are dropped too, and a recompile past the graphs a run needs is an
    error rather than a silent fall back to eager. Returns the model, the module to train (its DDP wrapper with
    several processes) and the log's notes."""
    snapshot = {k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()}
    torch._dynamo.config.recompile_limit = 2 * (len(bag_sizes(args)) + 2)  # train and eval graphs, inside DDP and not
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    notes, started = [], time.perf_counter()
    what = f"{'compile and ' if args.compile else ''}a step of each bag size {bag_sizes(args)} and a validation batch"
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warmup: {what}, untimed ...", flush=True)
    while True:
        model = torch.compile(raw_model, dynamic=False) if args.compile else raw_model
        # The rotary tables are the only buffers, the same on every rank: nothing to broadcast each step.
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          **NO_BUFFER_SYNC) if world_size > 1 else model
        out_of_memory, failure = False, None
        try:
            warm_up(train_model, model, make_optimizers(raw_model, args), args, val_windows, world_size, device)
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as e:
            failure = e
        raw_model.zero_grad(set_to_none=True)
        raw_model.load_state_dict(snapshot)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # before the collectives, which may need memory of their own
        raise_if_any_rank_failed(failure, device)
        if not all_reduce_sum([float(out_of_memory)], device)[0]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # the peak of training, not of a warmup that ran out
            return model, train_model, notes + [f"warmup: {time.perf_counter() - started:.0f} s untimed ({what})"]
        torch._dynamo.reset()
        per_rank, old = args.batch_size // world_size, args.micro_batch_size
        if old == 1:
            raise UsageError("out of memory at micro-batch 1: the model does not fit this device")
        args.micro_batch_size = next(m for m in range(old // 2, 0, -1) if per_rank % m == 0)
        notes.append(f"out of memory at micro-batch {old}: halved to {args.micro_batch_size}"
                     f" ({per_rank // args.micro_batch_size} micro-batches a step, the same global batch)")


# --- stop signals

class Stopped(Exception):
    """A stop signal while no training step runs (set-up, warmup, the final evaluation): exit 128 + the signal."""
    def __init__(self, signum):
        super().__init__(f"{signal.Signals(signum).name} while no training step was running")
        self.signum = signum

class StopSignals:
    """SIGINT and SIGTERM. During training (`training` set) they are only recorded in `caught`: every rank ends its
    step, the ranks vote, and the run checkpoints and exits. Otherwise they raise Stopped at once."""
    def __enter__(self):
        self.caught, self.training = [], False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if not self.training:
            raise Stopped(signum)
        self.caught.append(signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --- checkpoints

CHECKPOINT_FORMAT = 2  # 2: Muon's momentum of every matrix, in size order
RESUMABLE_ANYWAY = {"resume", "run_id", "log_dir", "save_every", "val_every", "final_val_every", "log_every", "compile",
                    "device", "allow_repeat", "hellaswag", "sample_tokens", "sample_prompt", "temperature", "top_k",
                    "eval_only", "target_val_loss", "micro_batch_size", "train_files", "val_files", "peak_tflops",
                    "preset"}

def run_settings(args):
    """The flags that define a run, as logged and checkpointed (the parsed schedule and the notes come from them)."""
    return {k: v for k, v in vars(args).items() if k not in ("phases", "notes")}

def run_dir(args):
    return os.path.join(args.log_dir, args.run_id)

def save_checkpoint(path, state):
    """Atomic: an error, a full disk or a stop signal during the write leaves the previous checkpoint as it was and
    no partial file (a SIGKILL can leave a *.tmp<pid>, never a partial checkpoint under its own name)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError from its zip writer
        raise WriteFailed(f"could not write {path} ({write_error(e, path)})") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)

def save_on_rank_0(path, state, rank, log, device):
    """Rank 0 writes `state`; every rank stops if it could not, or if the record log could not be written."""
    failure = None
    if rank == 0:
        try:
            save_checkpoint(path, state)
        except WriteFailed as e:
            failure = WriteFailed(f"{e}; last good checkpoint: {log.last_checkpoint}")
    raise_if_any_rank_failed(failure or log.error, device)

def write_error(e, path):
    if isinstance(e, OSError):
        return e.strerror or str(e)
    folder = os.path.dirname(path) or "."
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    return f"{str(e).splitlines()[0][:80]}; {free:,} bytes free on its disk"

def checkpoint_reason(step, start, args, reached, stopping):
    """Why the run checkpoints after `step` steps, or None: a phase switch, the end, a stop signal, or --save_every."""
    if step == start:
        return None
    before, after = bag_size_at(step - 1, args.phases), bag_size_at(step, args.phases)
    if step < args.steps and before != after:
        return f"phase switch s:{before}->{after}"
    if step == args.steps or reached:
        return "end"
    if stopping:
        return "interrupted"
    return "periodic" if args.save_every and step % args.save_every == 0 else None

def checkpoint(args, step, reason, model, optimizers, loader, train_ms, tokens_seen, log, rank):
    """Every rank gathers Muon's momentum (a collective); rank 0 writes; every rank stops if it could not."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):  # an update can poison the weights
        raise Diverged(f"non-finite weights after step {step}; last good checkpoint: {log.last_checkpoint}")
    path = os.path.join(run_dir(args), f"step_{step:06d}.pt")
    state = dict(format=CHECKPOINT_FORMAT, code_sha=CODE_SHA, args=run_settings(args), run_id=args.run_id, step=step,
                 train_ms=train_ms, tokens_seen=tokens_seen, model=model.state_dict(),
                 optimizers=[o.state_dict() for o in optimizers], loader=loader.state_dict(),
                 rng_cpu=torch.get_rng_state())
    save_on_rank_0(path, state, rank, log, next(model.parameters()).device)
    log.last_checkpoint = path
    log.line(f"checkpoint: step:{step} {reason} {path}")

def load_checkpoint(path, args):
    """A checkpoint written by this code for this run's settings, or a UsageError saying why not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if set(state) == {"config", "dtype", "model"}:
            raise UsageError(f"--resume {path}: an exported model (weights only: no optimizer, data or clock state),"
                             " which --eval_only reads; resume from a step_*.pt checkpoint of its run instead")
        code_sha, saved_args = state["code_sha"], state["args"]
    except FileNotFoundError:
        raise UsageError(f"--resume {path}: no such file") from None
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--resume {path}: not a readable train_tst.py checkpoint ({type(e).__name__})") from None
    if state.get("format") != CHECKPOINT_FORMAT or code_sha != CODE_SHA:
        raise UsageError(f"--resume {path}: written by another train_tst.py (code {code_sha}, this is {CODE_SHA});"
                         " resume with the code that wrote it (it is at the top of the run's log)")
    for key, value in run_settings(args).items():
        if key not in RESUMABLE_ANYWAY and key in saved_args and saved_args[key] != value:
            raise UsageError(f"--resume {path}: the checkpoint has --{key} {saved_args[key]}, this run has {value}")
    return state

def resume(state, model, optimizers, loader, args):
    """The step, training clock and token count to go on from (a checkpoint's, its model, optimizers, loader and
    random state put back), or a fresh run's zeros."""
    if state is None:
        return 0, 0.0, 0
    model.load_state_dict(state["model"])
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng_cpu"])
    args.run_id = args.run_id or state["run_id"]
    return state["step"], state["train_ms"], state["tokens_seen"]


# --- the record log

def clock(step, train_ms, tokens_seen):
    return f"train_time:{train_ms:.0f}ms step_avg:{train_ms / step if step else 0.0:.2f}ms tokens:{tokens_seen}"

def mfu(flops_per_step, step, train_ms, args):
    """Model FLOPs utilisation of one GPU's share of a step against --peak_tflops (CUDA only)."""
    if args.device != "cuda":
        return ""
    return f" mfu:{100 * flops_per_step / (train_ms / step * 1e-3) / (args.peak_tflops * 1e12):.1f}%"

def eta(step, train_ms, steps):
    left = train_ms / step * (steps - step) / 1000
    return f" eta:{left // 60:.0f}m{left % 60:02.0f}s" if left > 60 else ""

def peak_memory(device):
    """The final line's peak device memory (CUDA only)."""
    return f" peak_mem:{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f}GiB" if device.type == "cuda" else ""

def device_lines(device, world_size):
    """The header's hardware lines: the device, and on CUDA nvidia-smi's output (noted, not fatal, when missing)."""
    if device.type != "cuda":
        cpu = platform.processor() or platform.machine()
        return [f"device cpu x{world_size}: {cpu}, {torch.get_num_threads()} threads"]
    lines = [f"device cuda x{world_size}: {torch.cuda.get_device_name(device)}"]
    try:
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout)
    except (OSError, subprocess.SubprocessError) as e:
        lines.append(f"nvidia-smi: not available ({type(e).__name__}: {e})")
    return lines

class RunLog(contextlib.AbstractContextManager):
    """Rank 0 writes the source, the environment, the hyperparameters (one JSON line), then a line per logged step;
    the console shows the same lines. Its last line says how the run ended: a run that raises ends `failed:`. It
    knows the steps done and the last checkpoint, which a failure names."""
    def __init__(self, path, file, fresh, step, steps, last_checkpoint):
        self.path, self.file, self.fresh, self.step, self.steps = path, file, fresh, step, steps
        self.last_checkpoint, self.finished, self.error = last_checkpoint or "none", False, None

    def line(self, text, console_extra=""):
        if self.file:
            print(text + console_extra, flush=True)
            try:
                self.file.write(text + "\n")
                self.file.flush()
            except OSError as e:  # kept, not raised: every rank stops at the next vote (raise_if_any_rank_failed)
                self.file = None
                self.error = WriteFailed(f"could not write the record log {self.path} ({e.strerror});"
                                         f" last good checkpoint: {self.last_checkpoint}")

    def close(self, text):
        if self.file:
            self.line(text)
            self.file.close()
            self.file = None

    def __exit__(self, kind, error, traceback):
        why = f"{kind.__name__}: {error}" if kind else "no last line"
        self.close(f"failed: step:{self.step}/{self.steps} {why}")

def open_log(args, rank, world_size, device, resume_state, data_line):
    """The record log <log_dir>/<run_id>.txt, opened before the warmup so that a log directory that cannot be written
    stops the run at once: a fresh run's own new file (never another run's: a default id that is taken gets a
    suffix, a given one is refused), or, resuming, its run's own log."""
    default = args.run_id is None and resume_state is None
    args.run_id = args.run_id or (resume_state and resume_state["run_id"]) or (
        time.strftime("%Y%m%d-%H%M%S") + f"_{args.preset}_s{args.tst_schedule.replace(' ', '') or 1}")
    args.run_id = args.run_id.replace(":", "x").replace(",", "_")
    file, fresh, problem = None, False, None
    if rank == 0:
        try:
            file = create_log(args, resume_state, default)
            fresh = file.tell() == 0
            if fresh:  # the header: the source, versions and hardware, the settings
                versions = f"python {platform.python_version()} torch {torch.__version__} numpy {np.__version__}"
                file.write("\n".join([CODE, "=" * 100, versions, *device_lines(device, world_size),
                                      json.dumps(run_settings(args))]) + "\n")
                file.flush()
        except OSError as e:
            if fresh:  # a header cut short by a full disk would block the id
                file.close()
                os.remove(file.name)
            problem = UsageError(f"--log_dir {args.log_dir}: cannot write the record log there ({e.strerror or e})")
        except UsageError as e:
            problem = e
    raise_if_any_rank_failed(problem, device)
    if dist.is_initialized():  # a default id may have taken a suffix on rank 0
        shared = [args.run_id, fresh]
        dist.broadcast_object_list(shared, src=0)
        args.run_id, fresh = shared
    step = resume_state["step"] if resume_state else 0
    log = RunLog(os.path.join(args.log_dir, f"{args.run_id}.txt"), file, fresh, step, args.steps, args.resume)
    if fresh:
        if rank == 0:
            print(f"logging to {log.path}", flush=True)
        for note in args.notes:
            log.line(note)
        log.line(data_line)
    if resume_state and step == args.steps and not log.fresh:  # its own log ends done: already
        log.close(f"note: resumed from {args.resume} at the run's last step: nothing more to do")
        log.finished = True
    return log

def create_log(args, resume_state, default):
    """The open log file: appended to when resuming the run that wrote it, else created new (exclusively: two runs
    started at once cannot both take it) where no run's log or checkpoints are."""
    os.makedirs(args.log_dir, exist_ok=True)
    path = os.path.join(args.log_dir, f"{args.run_id}.txt")
    if resume_state and resume_state["run_id"] == args.run_id:  # its own run: its log goes on (or starts again)
        return open(path, "a")
    for n in range(1, 1000):
        name = args.run_id if n == 1 else f"{args.run_id}_{n}"
        path, folder = os.path.join(args.log_dir, f"{name}.txt"), os.path.join(args.log_dir, name)
        try:
            if os.path.exists(folder):  # a run's checkpoints, even with its log gone
                raise FileExistsError
            file = open(path, "x")
            args.run_id = name
            return file
        except FileExistsError:
            if not default:
                raise UsageError(f"--run_id {args.run_id}: {path if os.path.exists(path) else folder} exists: another"
                                 " run's; give another --run_id, or --resume one of its checkpoints") from None
    raise UsageError(f"--log_dir {args.log_dir}: no free run id for {args.run_id}")

def log_model(log, model, flops_per_step, accum, args, world_size, resume_state, warmup_notes):
    """The warmup's notes, then the `model:` line (after the warmup: the micro-batch is final) in a new log and the
    resume line."""
    for note in warmup_notes:
        log.line(note)
    if log.fresh:
        log.line(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {flops_per_step:.4g} FLOPs per"
                 f" step, {args.batch_size * args.seq_len:,} positions per step, {world_size} processes x {accum}"
                 f" micro-batches of {args.micro_batch_size}")
    if resume_state:
        log.line(f"resumed from {args.resume} at step {resume_state['step']}")


# --- the final model: export, HellaSwag and a sample (untimed, after the clock)

def from_data(module, function, *args):
    """A function of data/ (the offline GPT-2 tokenizer, HellaSwag), imported when a run first needs it; its errors
    are reported as this file's."""
    if os.path.join(HERE, "data") not in sys.path:
        sys.path.insert(0, os.path.join(HERE, "data"))
    try:
        return getattr(importlib.import_module(module), function)(*args)
    except importlib.import_module("prepare").DataError as e:
        raise UsageError(str(e)) from None

def downstream_inputs(args):
    """The HellaSwag items and the tokenizer that --hellaswag and --sample_tokens need, loaded before any work."""
    items = from_data("hellaswag", "load_items", args.hellaswag) if args.hellaswag else []
    return items, from_data("prepare", "gpt2_encoding") if args.hellaswag or args.sample_tokens else None

def downstream(model, args, items, enc, rank, world_size, device):
    """The record log's lines about the final model: HellaSwag over the items (shared over ranks), and a sample."""
    lines = []
    if items:
        counts = from_data("hellaswag", "hellaswag_counts", model, items[rank::world_size], enc, device)
        right_norm, right = all_reduce_sum(list(counts), device)
        lines.append(f"hellaswag: acc_norm {right_norm / len(items):.4f} acc {right / len(items):.4f}"
                     f" ({len(items)} items)")
    if args.sample_tokens:
        prompt = enc.encode(args.sample_prompt)
        new = model.generate(prompt, args.sample_tokens, args.temperature, args.top_k, args.seed, enc.n_vocab)
        lines.append("sample: " + json.dumps(args.sample_prompt + enc.decode(new)))
    return lines

def load_model(path, device):
    """A GPT from an exported model.pt or from any checkpoint a run wrote."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config, dtype = (state["config"], state["dtype"]) if "config" in state else (
            model_config(argparse.Namespace(**state["args"])), state["args"]["dtype"])
    except FileNotFoundError:
        raise UsageError(f"--eval_only {path}: no such file") from None
    except Exception as e:
        raise UsageError(f"--eval_only {path}: not a train_tst.py checkpoint or exported model"
                         f" ({type(e).__name__})") from None
    model = GPT(**config, dtype=DTYPES[dtype]).to(device)
    model.load_state_dict(state["model"])
    return model

def finish(args, model, log, step, val_loss, reached, train_ms, tokens_seen, eval_inputs, rank, world_size, device):
    """A run's untimed end: the export, HellaSwag and a sample into the log, then the `done:` line."""
    peak = peak_memory(device)
    # the weights alone and the shape to rebuild them: what inference needs, without the training state
    save_on_rank_0(os.path.join(run_dir(args), "model.pt"),
                   dict(config=model_config(args), dtype=args.dtype, model=model.state_dict()), rank, log, device)
    for line in downstream(model, args, *eval_inputs, rank, world_size, device):
        log.line(line)
    target = "none" if args.target_val_loss is None else (
        f"reached {args.target_val_loss} at step:{reached[0]} train_time:{reached[1]:.0f}ms" if reached
        else f"{args.target_val_loss} not reached")
    log.close(f"done: step:{step}/{args.steps} val_loss:{val_loss:.4f} {clock(step, train_ms, tokens_seen)}"
              f" target:{target}{peak}")
    raise_if_any_rank_failed(log.error, device)

def interrupted(caught, args, log, step, train_ms, tokens_seen, device):
    """A run stopped by a signal: its last line says how to go on; exit code 128 + the signal."""
    signum = caught[0] if caught else signal.SIGTERM
    log.close(f"interrupted: {signal.Signals(signum).name} at step:{step}/{args.steps}"
              f" {clock(step, train_ms, tokens_seen)}{peak_memory(device)}; continue with the same command and"
              f" --resume {log.last_checkpoint}")
    raise_if_any_rank_failed(log.error, device)
    return 128 + signum

def evaluate_only(args):
    """--eval_only: HellaSwag and a sample of a saved model, printed; no training."""
    device = torch.device(args.device)
    model = load_model(args.eval_only, device)
    for line in downstream(model, args, *downstream_inputs(args), 0, 1, device):
        print(line, flush=True)
    return 0

def main(argv=None):
    """Exit codes: 0 done, 1 diverged or a write or host memory failed, 2 bad input, 128 + the signal when stopped."""
    try:
        with StopSignals() as stop, contextlib.ExitStack() as run:  # `run` closes the log and the process group
            args = parse_args(argv)
            return evaluate_only(args) if args.eval_only else train(args, stop, run)
    except (UsageError, Diverged, WriteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
            raise
        print("error: out of host memory (the process could not allocate more): lower --batch_size,"
              " --micro_batch_size or --seq_len", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum

if __name__ == "__main__":
    sys.exit(main())
