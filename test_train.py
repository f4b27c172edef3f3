"""Tests of train_tst.py and data/: CPU, eager (one compile smoke test), tiny models.

    python -m pytest -q test_train.py
"""
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_tst as T

HERE = os.path.dirname(os.path.abspath(__file__))


sys.path[:0] = [os.path.join(HERE, "data"), os.path.join(HERE, "records")]
import compare  # noqa: E402
import prepare  # noqa: E402

VOCAB = 256


def markov_tokens(n, seed=0):
    """A learnable stream over a quarter of the vocabulary: each token is 3x the last plus small noise."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 4, n)
    t = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        t[i] = (3 * t[i - 1] + noise[i]) % (VOCAB // 4)
    return t


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    tokens = markov_tokens(60_000)
    prepare.write_shard(d / "t_val_000000.bin", tokens[:4_000])
    prepare.write_shard(d / "t_train_000001.bin", tokens[4_000:30_000])
    prepare.write_shard(d / "t_train_000002.bin", tokens[30_000:])
    return d


def tiny(shards, tmp_path, *extra, steps=12):
    """A tiny CPU-preset run on CPU whatever GPUs exist: bitwise determinism and gloo hold there (test_cuda_* cover the GPU)."""
    return ["--preset", "cpu", "--device", "cpu", "--train_files", str(shards / "t_train_*.bin"), "--val_files", str(shards / "t_val_*.bin"),
            "--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--seq_len", "16", "--batch_size", "4",
            "--vocab_size", str(VOCAB), "--val_tokens", "512", "--steps", str(steps), "--val_every", "4",
            "--log_every", "1", "--head_lr", "0.03", "--no-compile",
            "--log_dir", str(tmp_path / "logs"), "--run_id", "run", *extra]


def log_lines(tmp_path, run_id="run"):
    text = open(tmp_path / "logs" / f"{run_id}.txt").read()
    return text.split("\n" + "=" * 100 + "\n", 1)[1].splitlines()


def val_losses(lines):
    return {int(m.group(1)): float(m.group(2)) for m in (re.match(r"step:(\d+)/\d+ val_loss:(\S+)", l) for l in lines) if m}


def train_rows(lines):
    pattern = r"step:(\d+)/\d+ train_loss:(\S+) phase:(\w+) s:(\d+) .*tokens:(\d+)"
    return [(int(m[1]), float(m[2]), m[3], int(m[4]), int(m[5])) for m in (re.match(pattern, l) for l in lines) if m]



# ---------------------------------------------------------------------------------------------------
# TST math

def reference_mce(logits, targets, weights):
    """Float64, slot by slot, row by row: sum_k w_k * mean over valid rows of -log softmax(z)[y_k]."""
    z = logits.double()
    logp = z - torch.logsumexp(z, dim=1, keepdim=True)
    s = targets.size(1)
    w = torch.ones(s, dtype=torch.float64) if weights is None else weights.double()
    w = w / w.sum()
    total = 0.0
    for k in range(s):
        rows = [n for n in range(len(z)) if targets[n, k] != T.IGNORE]
        if rows:
            total = total + w[k] * sum(-logp[n, targets[n, k]] for n in rows) / len(rows)
    return total


@pytest.mark.parametrize("s,weights", [(1, None), (3, None), (4, "power"), (8, None)])
def test_mce_matches_float64_reference_value_and_gradient(s, weights):
    g = torch.Generator().manual_seed(s)
    logits = torch.randn(12, 50, generator=g) * 3
    targets = torch.randint(50, (12, s), generator=g)
    targets[torch.rand(12, s, generator=g) < 0.25] = T.IGNORE
    w = T.slot_weights(s, weights or "uniform", "cpu")
    z = logits.clone().requires_grad_()
    loss = T.multi_hot_cross_entropy(z, targets, w)
    loss.backward()
    z64 = logits.double().requires_grad_()
    ref = reference_mce(z64, targets, w)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-7)


def test_mce_is_mean_of_stock_cross_entropies_and_ce_when_s_is_1():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(64, 100, generator=g), torch.randint(100, (64, 4), generator=g)
    targets[-1, 1:] = T.IGNORE
    stock = sum(F.cross_entropy(logits, targets[:, k]) for k in range(4)) / 4
    assert T.multi_hot_cross_entropy(logits, targets).item() == pytest.approx(stock.item(), rel=1e-6)
    one = targets[:, :1]
    assert T.multi_hot_cross_entropy(logits, one).item() == pytest.approx(F.cross_entropy(logits, one[:, 0]).item(), rel=1e-6)


def test_mce_at_init_is_ln_V_not_ln_V_over_s():
    V = 50304
    loss = T.multi_hot_cross_entropy(torch.zeros(4, V), torch.randint(V, (4, 8)))
    assert loss.item() == pytest.approx(math.log(V), rel=1e-6)


def test_make_bags_aligns_bag_j_with_the_tokens_of_bag_j_plus_1():
    s, T_ = 3, 4
    tokens = torch.arange(2 * (s * T_ + 1)).view(2, s * T_ + 1)
    inputs, targets = T.make_bags(tokens, s)
    assert inputs.shape == targets.shape == (2, T_, s)
    assert inputs[0, 1].tolist() == [3, 4, 5]
    assert targets[0, 1].tolist() == [6, 7, 8]  # the next bag
    assert targets[0, -1].tolist() == [12, T.IGNORE, T.IGNORE]  # only one token is left in the window
    assert targets[1, 0].tolist() == [16, 17, 18]
    labels = tokens[:, 1:]  # ordinary next-token labels, shifted left by s-1
    assert torch.equal(targets.flatten(1)[:, :-(s - 1)], labels[:, s - 1:])


def test_multi_token_weights_stay_at_their_start_before_a_late_superposition_piece():
    args = T.parse_args(["--tst_schedule", "1:0.2,8:0.2", "--mtp_k", "3", "--steps", "40", "--device", "cpu"])
    _, _, weights = T.batch_for(0, torch.zeros(2, 17, dtype=torch.long), args, torch.device("cpu"))
    assert weights.tolist() == [1.0, 0.5, 0.25]  # not past 1/2, 1/4: progress through the next-token phase is 0


def test_next_tokens_gives_each_position_its_next_k_tokens():
    tokens = torch.arange(6).view(1, 6)
    assert T.next_tokens(tokens, 3)[0].tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, -100], [5, -100, -100]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embed_bags_is_the_float32_mean_and_s1_bags_are_the_baseline(dtype):
    torch.manual_seed(0)
    model = T.GPT(VOCAB, 2, 32, 2, 16, dtype)
    zero_initialised = [p for n, p in model.named_parameters() if "proj" in n or "lm_head" in n]
    for p in zero_initialised:  # give the zero-initialised layers weights so the loss depends on everything
        torch.nn.init.normal_(p, std=0.02)
    bags = torch.randint(VOCAB, (2, 16, 4))
    expected = model.wte.weight[bags].double().mean(2).to(dtype)
    got = T.embed_bags(model.wte, bags)
    assert got.dtype == dtype
    if dtype == torch.bfloat16:  # four bf16 values add exactly in float32: rounded once, at the end
        assert torch.equal(got, expected)
    torch.testing.assert_close(got, expected)
    tokens = torch.randint(VOCAB, (2, 17))
    plain = model(tokens[:, :-1], tokens[:, 1:])
    as_bags = model(*T.make_bags(tokens, 1))
    assert plain.item() == pytest.approx(as_bags.item(), rel=1e-6)


def test_tst_schedule_parsing_and_switch_steps():
    assert T.parse_tst_schedule("", 100) == []
    assert T.parse_tst_schedule("8:0.3", 10) == [(8, 3)]
    assert T.parse_tst_schedule("8:0.1,4:0.1,2:0.1", 400) == [(8, 40), (4, 80), (2, 120)]
    phases = T.parse_tst_schedule("6:0.35", 7)  # floor(0.35 * 7) = 2
    assert [T.bag_size_at(k, phases) for k in range(7)] == [6, 6, 1, 1, 1, 1, 1]
    for bad in ["8", "8:x", "0:0.2", "4:1.2", "8:0.6,4:0.5", "a:b", "4:0.001", "4:0.1,2:0.001"]:
        with pytest.raises(T.UsageError):
            T.parse_tst_schedule(bad, 100)


@pytest.mark.parametrize("text,phase_of_steps", [
    ("1:0.1,4:0.1", [1] * 4 + [4] * 4 + [1] * 32),  # the bag-size-1 piece trains next-token where it stands
    ("4:0.1,1:0.1,2:0.1", [4] * 4 + [1] * 4 + [2] * 4 + [1] * 28),
    ("4:0.25", [4] * 10 + [1] * 30),
])
def test_a_schedule_runs_each_piece_at_its_place_bag_size_1_included(text, phase_of_steps):
    phases = T.parse_tst_schedule(text, 40)
    assert [T.bag_size_at(k, phases) for k in range(40)] == phase_of_steps
    assert T.superposition_end(phases) == max(k + 1 for k, s in enumerate(phase_of_steps) if s > 1)


def test_a_tst_setting_whose_superposition_phase_has_no_step_is_refused(capsys):
    assert T.main(["--tst_s", "4", "--steps", "3"]) == 2  # floor(0.3 x 3) = 0: TST would be off in silence
    assert "covers no step of 3" in capsys.readouterr().err


def test_lr_schedule_is_warmup_stable_decay():
    args = T.parse_args(["--steps", "100", "--warmup_steps", "10", "--cooldown_frac", "0.2"])
    got = [T.lr_multiplier(k, args) for k in (0, 9, 10, 79, 80, 90, 99)]
    assert got == pytest.approx([0.1, 1.0, 1.0, 1.0, 1.0, 0.5, 0.05])


# ---------------------------------------------------------------------------------------------------
# The gpt2 preset: the modded-nanogpt track-3 recipe (records/track_3_optimization/train_gpt_simple.py)

GPT2 = ["--preset", "gpt2", "--train_files", "fineweb_train_*.bin", "--val_files", "fineweb_val_*.bin"]  # named: not read


def gpt2_model(device="meta"):
    args = T.parse_args(GPT2)
    with torch.device(device):
        return T.GPT(args.vocab_size, args.n_layer, args.n_embd, args.n_head, args.seq_len), args


def test_gpt2_preset_is_the_recipe_with_162354816_parameters():
    model, args = gpt2_model()
    V, d, L = 50304, 768, 12
    linear = lambda n_in, n_out: n_in * n_out + n_out  # every linear layer has a bias
    block = 4 * linear(d, d) + linear(d, 4 * d) + linear(4 * d, d) + 2 * d  # q, k, v, proj; MLP; two gains
    assert V * d + L * block + 2 * d + linear(d, V) == 162_354_816
    assert sum(p.numel() for p in model.parameters()) == 162_354_816
    assert (args.n_layer, args.n_embd, args.n_embd // args.n_head, args.seq_len, args.vocab_size) == (12, 768, 128, 1024, 50304)
    assert (args.batch_size, args.micro_batch_size, args.steps, args.val_tokens) == (512, 64, 3250, 10_485_760)
    assert (args.lr, args.weight_decay) == (0.025, 0.05)  # Muon: track-3 result #36 (452cc392)
    assert (args.embed_lr, args.head_lr, args.scalar_lr, args.adam_weight_decay) == (0.7, 0.004, 0.015, 0.001)  # AdamW
    assert (args.warmup_steps, args.cooldown_frac, args.dtype, args.tst_s) == (0, 0.7, "bf16", 1)
    mult = [T.lr_multiplier(k, args) for k in (0, 974, 975, 2112, 3249)]  # flat for 30%, then linear to 0
    assert mult == pytest.approx([1, 1, 1, 1138 / 2275, 1 / 2275])
    val_steps = [k for k in range(args.steps + 1) if T.val_due(k, args)]  # every 125, every 25 over the last 10%
    assert val_steps == list(range(0, 2925, 125)) + list(range(2925, 3251, 25)) and len(val_steps) == 38
    other = T.parse_args(GPT2 + ["--steps", "2000", "--val_every", "100", "--final_val_every", "30"])
    late = [k for k in range(1790, 2001) if T.val_due(k, other)]  # every 100 goes on beside every 30
    assert late == [1800, 1830, 1860, 1890, 1900, 1920, 1950, 1980, 2000]


def test_recipe_initialisation():
    torch.manual_seed(0)
    model = T.GPT(1000, 2, 256, 2, 64)
    assert model.wte.weight.dtype == torch.bfloat16 and abs(model.wte.weight.float().std().item() - 1) < 0.01
    outputs = {"lm_head", *(f"blocks.{i}.{m}.proj" for i in range(2) for m in ("attn", "mlp"))}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is not None and not module.bias.any(), name  # every bias starts at zero
            zero = name in outputs
            assert (module.weight.abs().max() == 0) == zero, name
            if not zero:  # N(0, 0.33 / fan_in), as result #36 draws them, not PyTorch's uniform default
                std = (0.33 / module.in_features) ** 0.5
                assert module.weight.std().item() == pytest.approx(std, rel=0.05), name
                assert module.weight.abs().max() > 3 * std, name  # normal tails: a uniform in +-sqrt(3) std has none
        if isinstance(module, T.RMSNorm):
            assert torch.equal(module.gain, torch.ones_like(module.gain))
    assert sum(isinstance(m, T.RMSNorm) for m in model.modules()) == 2 * 2 + 2  # per block 2, embedding, head


def test_rotary_turns_half_of_the_pairs_with_frequencies_down_to_1_over_1024():
    rotary = T.Rotary(128, 1024)
    angle = torch.atan2(rotary.sin[:, 0], rotary.cos[:, 0])  # (positions, 64 pairs)
    torch.testing.assert_close(angle[1, :32], (1 / 1024) ** torch.linspace(0, 1, 32))
    assert torch.all(angle[:, 32:] == 0)
    x = torch.randn(1, 1024, 2, 128)
    y = rotary(x)
    assert torch.equal(y[..., 32:64], x[..., 32:64]) and torch.equal(y[..., 96:], x[..., 96:])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation
    assert not torch.allclose(y[:, 1:, :, :32], x[:, 1:, :, :32])


def test_optimizers_follow_the_recipe():
    model, args = gpt2_model()
    adam, muon = T.make_optimizers(model, args)
    groups = {round(g["lr"], 6): g["params"] for g in adam.param_groups}
    assert groups[0.7] == [model.wte.weight] and groups[0.004] == [model.lm_head.weight]
    assert len(groups[0.015]) == 12 * 8 + 2 + 1 and all(p.ndim == 1 for p in groups[0.015])  # biases and gains
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["weight_decay"] == 0.001
    assert adam.defaults["fused"] is True  # on CPU too
    assert adam.defaults["eps"] == pytest.approx(1e-10 / 524_288)  # the reference's eps on its summed loss
    m = muon.param_groups[0]
    assert (m["lr"], m["weight_decay"], m["momentum"], m["nesterov"]) == (0.025, 0.05, 0.95, True)
    assert (m["ns_coefficients"], m["ns_steps"], m["adjust_lr_fn"]) == ((2.0, -1.5, 0.5), 12, "original")
    q = [b.attn.q.weight for b in model.blocks]
    assert len(m["params"]) == 12 * 6 and all(any(p is w for p in m["params"]) for w in q)  # q, k, v apart
    owned = [p for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))


def test_adam_eps_on_the_mean_loss_gives_the_reference_update_on_the_summed_loss():
    tokens = 4096
    grad = torch.randn(1000) * 1e-9  # small gradients are where eps matters
    grad[:10] = 0
    updates = []
    for g, eps in ((grad * tokens, 1e-10), (grad, 1e-10 / tokens)):
        p = torch.zeros(1000, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=1.0, betas=(0.8, 0.95), eps=eps, weight_decay=0)
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        updates.append(p.detach().clone())
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-5, atol=0)


def newton_schulz_float64(g, steps=12, a=2.0, b=-1.5, c=0.5):
    x = g.double()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("name", ["attn.q", "attn.v", "mlp.fc"])
def test_muon_update_of_one_matrix_is_float64_newton_schulz(name):
    model, args = T.GPT(VOCAB, 1, 64, 1, 16), T.parse_args(GPT2 + ["--weight_decay", "0"])
    _, muon = T.make_optimizers(model, args)
    weight = model.get_submodule(f"blocks.0.{name}").weight
    before = weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    muon.step()
    rows, cols = weight.shape
    # first step: momentum 0.05 g, Nesterov 0.0975 g; Newton-Schulz does not see the scale
    expected = -args.lr * max(1, rows / cols) ** 0.5 * newton_schulz_float64(weight.grad)
    error = (weight.detach() - before).double() - expected
    # torch runs Newton-Schulz in bf16: 0.5-3% of the update's norm over 12 iterations (a wrong scale is 40% or more)
    assert error.norm() < 0.05 * expected.norm() and error.abs().max() < 0.1 * expected.abs().max()


def test_logits_are_capped_and_the_loss_at_init_is_ln_V():
    torch.manual_seed(0)
    model, args = gpt2_model("cpu")
    tokens = torch.randint(50257, (1, 33))
    with torch.no_grad():
        assert model(tokens[:, :-1], tokens[:, 1:]).item() == pytest.approx(math.log(50304), abs=1e-4)
        model.lm_head.weight.normal_(std=10.0)  # huge raw logits
        logits = model.logits(tokens[:, :-1])
    assert logits.dtype == torch.float32 and logits.abs().max() < 15 and logits.abs().max() > 14.9


# ---------------------------------------------------------------------------------------------------
# Data loading

def test_rank_windows_are_disjoint_deterministic_and_independent_of_world_size(shards):
    pattern = str(shards / "t_train_*.bin")
    one = T.ShardLoader(pattern, 4, 0, 1, VOCAB)
    two = [T.ShardLoader(pattern, 4, r, 2, VOCAB) for r in range(2)]
    for window in (17, 65, 17):
        whole = one.next_batch(window)
        parts = [loader.next_batch(window) for loader in two]
        assert torch.equal(torch.cat(parts), whole)
        assert whole.shape == (4, window)
        assert torch.equal(whole[1:, 0], whole[:-1, -1])  # windows overlap by exactly one token
    again = T.ShardLoader(pattern, 4, 0, 1, VOCAB)
    for window in (17, 65, 17):
        again.next_batch(window)
    assert again.state_dict() == one.state_dict()


def test_loader_walks_shards_in_order_and_wraps_to_a_new_epoch(shards):
    loader = T.ShardLoader(str(shards / "t_train_*.bin"), 4, 0, 1, VOCAB)
    seen = []
    for _ in range(40):
        loader.next_batch(1001)
        seen.append((loader.shard, loader.epoch))
    assert seen[0] == (0, 0) and (1, 0) in seen and seen[-1][1] >= 1


def test_shuffled_windows_are_real_slices_the_same_for_any_processes_resumable_and_seeded(shards):
    pattern = str(shards / "t_train_*.bin")
    loader = lambda rank=0, world=1, seed=0: T.ShardLoader(pattern, 4, rank, world, VOCAB, "shuffled", seed)
    one, two = loader(), [loader(r, 2) for r in range(2)]
    batches = []
    for window in (17, 65, 17, 17):
        whole = one.next_batch(window)
        assert torch.equal(torch.cat([l.next_batch(window) for l in two]), whole) and whole.shape == (4, window)
        batches.append(whole)
    for batch in batches:
        for row in batch.numpy():
            assert any((np.lib.stride_tricks.sliding_window_view(s, len(row)) == row).all(1).any() for s in one.shards)
    assert not torch.equal(batches[0], batches[2])  # each step draws anew
    resumed = loader()
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(resumed.next_batch(17), one.next_batch(17))
    assert not torch.equal(loader(seed=1).next_batch(17), batches[0])
    starts = [loader(seed=k).next_batch(17)[:, 0] for k in range(50)]
    assert len({int(x) for s in starts for x in s}) > 20  # positions spread over the data, not one stretch


def test_val_slice_is_fixed_and_split_over_ranks(shards):
    pattern = str(shards / "t_val_*.bin")
    whole = T.load_val_windows(pattern, 512, 16, 0, 1, VOCAB)
    halves = [T.load_val_windows(pattern, 512, 16, r, 2, VOCAB) for r in range(2)]
    assert whole.shape == (32, 17) and torch.equal(torch.cat(halves), whole)
    assert whole[0, 0] == 0 and torch.equal(whole[1:, 0], whole[:-1, -1])


# ---------------------------------------------------------------------------------------------------
# The trainer end to end

def test_cli_trains_both_phases_and_writes_the_record_log(shards, tmp_path):
    args = tiny(shards, tmp_path, "--tst_s", "2", "--tst_r", "0.5", steps=16)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train_tst.py"), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = open(tmp_path / "logs" / "run.txt").read()
    source, rest = text.split("\n" + "=" * 100 + "\n", 1)
    assert source == open(os.path.join(HERE, "train_tst.py")).read()
    lines = rest.splitlines()
    settings = json.loads(next(l for l in lines if l.startswith("{")))
    assert settings["tst_s"] == 2 and settings["steps"] == 16
    rows = train_rows(lines)
    assert {r[2] for r in rows} == {"tst", "ntp"}
    vals = val_losses(lines)
    assert vals[0] == pytest.approx(math.log(VOCAB), abs=0.01)  # zero-initialised head: uniform prediction
    assert vals[16] < vals[0] - 1.0
    assert any(l.startswith("checkpoint: step:8 phase switch s:2->1") for l in lines)
    assert lines[-1].startswith("done: step:16/16 val_loss:") and lines[-1].endswith("target:none")
    assert "step:16/16 val_loss:" in proc.stdout


def test_phase_switch_at_floor_r_n_and_token_accounting(shards, tmp_path):
    assert T.main(tiny(shards, tmp_path, "--tst_s", "4", "--tst_r", "0.35", steps=10)) == 0
    rows = train_rows(log_lines(tmp_path))
    assert [(step, phase, s) for step, _, phase, s, _ in rows] == [(k, "tst" if k <= 3 else "ntp", 4 if k <= 3 else 1) for k in range(1, 11)]
    B, T_ = 4, 16
    assert [r[4] for r in rows] == [B * T_ * (4 * min(k, 3) + max(0, k - 3)) for k in range(1, 11)]


def test_output_only_mode_reads_no_extra_data_and_input_only_predicts_one_token(shards, tmp_path):
    assert T.main(tiny(shards, tmp_path, "--tst_s", "4", "--tst_mode", "output", "--run_id", "out", steps=6)) == 0
    assert [r[4] for r in train_rows(log_lines(tmp_path, "out"))] == [4 * 16 * k for k in range(1, 7)]
    assert T.main(tiny(shards, tmp_path, "--tst_s", "4", "--tst_mode", "input", "--tst_weights", "power", "--run_id", "in", steps=6)) == 0
    assert train_rows(log_lines(tmp_path, "in"))[0][4] == 4 * 16 * 4


def test_tst_s1_is_exactly_the_baseline_and_same_seed_is_deterministic(shards, tmp_path):
    assert T.main(tiny(shards, tmp_path, "--run_id", "a")) == 0
    assert T.main(tiny(shards, tmp_path, "--run_id", "b", "--tst_s", "1", "--tst_r", "0.5", "--tst_mode", "output")) == 0
    a, b = log_lines(tmp_path, "a"), log_lines(tmp_path, "b")
    assert val_losses(a) == val_losses(b) and [r[:2] for r in train_rows(a)] == [r[:2] for r in train_rows(b)]


def test_target_val_loss_stops_at_the_first_validation_under_it(shards, tmp_path):
    assert T.main(tiny(shards, tmp_path, "--target_val_loss", "5.0", steps=40)) == 0
    lines = log_lines(tmp_path)
    vals = val_losses(lines)
    first = min(k for k, v in vals.items() if v <= 5.0)
    assert max(vals) == first < 40
    assert re.search(rf"target:reached 5.0 at step:{first} train_time:\d+ms$", lines[-1])


def test_fp32_mode_trains_in_float32_and_the_default_in_bf16(shards, tmp_path):
    assert T.main(tiny(shards, tmp_path, "--dtype", "fp32", "--tst_s", "2")) == 0
    assert T.main(tiny(shards, tmp_path, "--tst_s", "2", "--run_id", "bf16")) == 0
    lines = log_lines(tmp_path)
    assert json.loads(next(l for l in lines if l.startswith("{")))["dtype"] == "fp32"
    vals = val_losses(lines)
    assert vals[12] < vals[0] - 1.0
    for run, dtype in (("run", torch.float32), ("bf16", torch.bfloat16)):  # the embedding table sets the activations'
        weights = torch.load(tmp_path / "logs" / run / "model.pt", weights_only=True)["model"]
        assert weights["wte.weight"].dtype == dtype and weights["blocks.0.attn.q.weight"].dtype == torch.float32
    assert val_losses(log_lines(tmp_path, "bf16"))[12] != vals[12]  # the dtype changed the arithmetic


def test_multi_token_prediction_weights_anneal_to_next_token(shards, tmp_path):
    assert T.mtp_weights(3, 0.0, "cpu").tolist() == [1.0, 0.5, 0.25]
    assert T.mtp_weights(3, 0.5, "cpu").tolist() == [1.0, 0.25, 0.125]
    assert T.mtp_weights(3, 1.0, "cpu").tolist() == [1.0, 0.0, 0.0]
    assert T.main(tiny(shards, tmp_path, "--tst_s", "2", "--mtp_k", "3")) == 0
    assert T.main(tiny(shards, tmp_path, "--tst_s", "2", "--run_id", "ntp")) == 0
    mtp, ntp = train_rows(log_lines(tmp_path)), train_rows(log_lines(tmp_path, "ntp"))
    assert val_losses(log_lines(tmp_path))[12] < math.log(VOCAB) - 1.0
    assert [r[1] for r in mtp[:3]] == [r[1] for r in ntp[:3]]  # the superposition steps (switch at step 3): the same
    assert mtp[3][1] != ntp[3][1]  # after it, the loss takes the next 3 tokens' terms


@pytest.mark.parametrize("schedule,sizes,switch_steps", [
    ("4:0.25,2:0.25", [4] * 3 + [2] * 3 + [1] * 6, ["step:3", "step:6"]),
    ("1:0.25,4:0.25", [1] * 3 + [4] * 3 + [1] * 6, ["step:3", "step:6"]),  # a bag-size-1 piece is not dropped
])
def test_a_schedule_trains_and_logs_each_piece_at_its_place(shards, tmp_path, schedule, sizes, switch_steps):
    assert T.main(tiny(shards, tmp_path, "--tst_schedule", schedule, steps=12)) == 0
    lines = log_lines(tmp_path)
    rows = train_rows(lines)
    assert [r[3] for r in rows] == sizes
    assert [r[2] for r in rows] == ["tst" if s > 1 else "ntp" for s in sizes]
    switches = [l for l in lines if "phase switch" in l]
    assert [s.split()[1] for s in switches] == switch_steps


@pytest.mark.parametrize("order", ["sequential", "shuffled"])
def test_a_resumed_run_goes_on_as_the_uninterrupted_one_from_any_checkpoint(shards, tmp_path, order):
    """Checkpoints at a bag-size switch, inside a phase and at the end: each resumes to the same train and val lines
    with the right bag sizes; the end checkpoint as a new run validates and ends done, and into its own finished log
    adds a note only."""
    flags = ["--tst_schedule", "4:0.25,2:0.25", "--data_order", order, "--save_every", "5"]
    assert T.main(tiny(shards, tmp_path, *flags, "--run_id", "full", steps=12)) == 0
    full = log_lines(tmp_path, "full")
    assert [r[3] for r in train_rows(full)] == [4] * 3 + [2] * 3 + [1] * 6
    for step in (3, 5, 10):  # the 4 -> 2 switch; periodic ones inside s = 2 and in the next-token phase
        ckpt = tmp_path / "logs" / "full" / f"step_{step:06d}.pt"
        assert T.main(tiny(shards, tmp_path, *flags, "--run_id", f"from{step}", "--resume", str(ckpt), steps=12)) == 0
        resumed = log_lines(tmp_path, f"from{step}")
        assert f"resumed from {ckpt} at step {step}" in resumed
        assert train_rows(resumed) == [r for r in train_rows(full) if r[0] > step]
        assert val_losses(resumed) == {k: v for k, v in val_losses(full).items() if k > step}
    end = str(tmp_path / "logs" / "full" / "step_000012.pt")
    assert T.main(tiny(shards, tmp_path, *flags, "--run_id", "again", "--resume", end, steps=12)) == 0
    assert log_lines(tmp_path, "again")[-1].startswith(f"done: step:12/12 val_loss:{val_losses(full)[12]:.4f}")
    assert T.main(tiny(shards, tmp_path, *flags, "--run_id", "full", "--resume", end, steps=12)) == 0
    lines = log_lines(tmp_path, "full")
    assert lines[:len(full)] == full and len(lines) == len(full) + 1 and lines[-1].startswith("note: resumed from")
    assert compare.parse_log(str(tmp_path / "logs" / "full.txt"))["ending"].startswith("done:")


def test_compiled_smoke_step(shards, tmp_path):
    args = tiny(shards, tmp_path, "--tst_s", "2", "--tst_r", "0.5", steps=2)
    args[args.index("--no-compile")] = "--compile"
    assert T.main(args) == 0
    rows = train_rows(log_lines(tmp_path))
    assert [r[3] for r in rows] == [2, 1] and all(math.isfinite(r[1]) for r in rows)
    # a recompile past the graphs the run needs (2 bag sizes and validation) fails loudly instead of running eager
    assert torch._dynamo.config.fail_on_recompile_limit_hit and torch._dynamo.config.recompile_limit == 2 * (2 + 2)


@pytest.mark.slow
def test_compiled_gpt2_shape_runs_both_phases_and_writes_a_record_log(tmp_path, request):
    """The real gpt2 preset's model (12 x 768, vocab 50304) compiled on CPU, 2 steps in each TST phase."""
    if "slow" not in request.config.getoption("markexpr"):
        pytest.skip("4-7 minutes on 2 cores: python -m pytest -m slow test_train.py runs it")
    sample = os.path.join(HERE, "data", "sample")
    args = ["--preset", "gpt2", "--compile", "--seq_len", "32", "--batch_size", "2", "--micro_batch_size", "2",
            "--steps", "4", "--tst_s", "2", "--tst_r", "0.5", "--val_tokens", "64", "--val_every", "0",
            "--train_files", os.path.join(sample, "sample_train_*.bin"), "--val_files", os.path.join(sample, "sample_val_*.bin"),
            "--log_dir", str(tmp_path / "logs"), "--run_id", "run"]
    assert T.main(args) == 0
    lines = log_lines(tmp_path)
    assert lines[lines.index(next(l for l in lines if l.startswith("model:")))].startswith("model: 162,354,816 parameters")
    rows = train_rows(lines)
    assert [r[3] for r in rows] == [2, 2, 1, 1] and all(math.isfinite(r[1]) for r in rows)
    assert json.loads(next(l for l in lines if l.startswith("{")))["compile"] is True
    assert lines[-1].startswith("done: step:4/4")


def test_out_of_memory_in_the_warmup_halves_the_micro_batch(shards, tmp_path, monkeypatch):
    real = T.train_step

    def small_memory(model, optimizers, inputs, targets, weights, accum, lr_mult):
        if len(inputs) // accum > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, optimizers, inputs, targets, weights, accum, lr_mult)

    assert T.main(tiny(shards, tmp_path, "--tst_s", "2", "--micro_batch_size", "1", "--run_id", "fits", steps=6)) == 0
    monkeypatch.setattr(T, "train_step", small_memory)
    assert T.main(tiny(shards, tmp_path, "--tst_s", "2", "--run_id", "halved", steps=6)) == 0
    lines = log_lines(tmp_path, "halved")
    assert "out of memory at micro-batch 4: halved to 2 (2 micro-batches a step, the same global batch)" in lines
    assert "out of memory at micro-batch 2: halved to 1 (4 micro-batches a step, the same global batch)" in lines
    assert val_losses(lines) == val_losses(log_lines(tmp_path, "fits"))
    monkeypatch.setattr(T, "train_step", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")))
    assert T.main(tiny(shards, tmp_path, "--run_id", "never")) == 2


def test_ddp_two_gloo_processes_match_one_process_and_their_checkpoint_resumes_on_one(shards, tmp_path):
    common = tiny(shards, tmp_path, "--tst_s", "2", "--micro_batch_size", "2", steps=8)
    assert T.main(common + ["--run_id", "one"]) == 0
    proc = torchrun(os.path.join(HERE, "train_tst.py"), common + ["--run_id", "two", "--save_every", "4"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = val_losses(log_lines(tmp_path, "one")), val_losses(log_lines(tmp_path, "two"))
    assert one.keys() == two.keys()
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=2e-4)
    assert "x2" in open(tmp_path / "logs" / "two.txt").read().split("=" * 100)[1]
    # Muon's momentum lives on its owner's rank: the checkpoint gathers it, so one process goes on from it
    checkpoint = str(tmp_path / "logs" / "two" / "step_000004.pt")
    assert T.main(common + ["--run_id", "two_then_one", "--resume", checkpoint]) == 0
    resumed = val_losses(log_lines(tmp_path, "two_then_one"))
    assert resumed[8] == pytest.approx(one[8], abs=2e-4) and resumed[8] == pytest.approx(two[8], abs=2e-4)


# ---------------------------------------------------------------------------------------------------
# A GPU user's first run: preset choice, data accounting, out of memory under DDP and compile

def test_auto_preset_on_a_gpu_machine_trains_the_sample_or_says_what_to_download(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(T, "FINEWEB_DIR", str(tmp_path / "fineweb10B"))  # absent
    args = T.parse_args([])
    assert (args.device, args.preset, args.compile) == ("cuda", "cpu", True)
    assert args.train_files.endswith(os.path.join("data", "sample", "sample_train_*.bin"))
    assert "python data/cached_fineweb10B.py 18" in capsys.readouterr().err
    with pytest.raises(T.UsageError, match=r"gpt2 preset trains on FineWeb.*python data/cached_fineweb10B.py 55 "):
        T.parse_args(["--preset", "gpt2", "--tst_s", "8"])
    assert T.parse_args(["--train_files", "mine_*.bin", "--val_files", "v_*.bin"]).preset == "gpt2"  # your data: the recipe
    os.makedirs(tmp_path / "fineweb10B")
    assert T.parse_args([]).preset == "cpu"  # an empty folder (a failed download) is not FineWeb
    prepare.write_shard(str(tmp_path / "fineweb10B" / "fineweb_train_000001.bin"), [1, 2, 3])
    args = T.parse_args([])
    assert args.preset == "gpt2" and args.train_files == str(tmp_path / "fineweb10B" / "fineweb_train_*.bin")
    assert T.parse_args(["--device", "cpu"]).preset == "cpu"


def test_readme_shard_counts_are_what_the_sequential_walk_reads():
    """The README's table of FineWeb shards per TST setting comes from the same walk the loader takes."""
    readme = open(os.path.join(HERE, "README.md")).read()
    rows = dict(re.findall(r"^\| `--tst_s (\d+)`[^|]*\| (\d+) \|", readme, re.M))
    assert set(rows) == {"1", "2", "4", "6", "8"}
    for s, shards in rows.items():
        args = T.parse_args(GPT2 + ["--tst_s", s, "--device", "cpu"])
        assert T.sequential_shards(T.step_windows(args), args.batch_size, [], T.FINEWEB_SHARD_TOKENS) == int(shards)


def test_sequential_walk_counts_shards_with_tails_skipped(shards):
    lengths = [len(T.read_shard(f)) for f in sorted(glob_train(shards))]  # 26,000 and 30,000 tokens
    chunk = 4 * 64  # batch 4, windows of 65 overlapping by one: 256 new tokens a step
    per_shard = [(n - 1) // chunk for n in lengths]  # whole chunks before a tail too short
    assert T.sequential_shards([65] * per_shard[0], 4, lengths, 10**9) == 1
    assert T.sequential_shards([65] * (per_shard[0] + 1), 4, lengths, 10**9) == 2
    assert T.sequential_shards([65] * sum(per_shard), 4, lengths, 10**9) == 2
    assert T.sequential_shards([65] * (sum(per_shard) + 1), 4, lengths, max(lengths)) == 3
    loader = T.ShardLoader(str(shards / "t_train_*.bin"), 4, 0, 1, VOCAB)
    for _ in range(sum(per_shard)):
        loader.next_batch(65)
    assert (loader.shard, loader.epoch) == (1, 0)
    loader.next_batch(65)
    assert (loader.shard, loader.epoch, loader.offset) == (0, 1, 256)  # the walk and the loader agree on the wrap


def glob_train(shards):
    return T.find_shards(str(shards / "t_train_*.bin"))


def test_a_sequential_run_that_would_repeat_stops_before_any_work(shards, tmp_path, capsys):
    flags = ["--data_order", "sequential", "--seq_len", "64", "--val_tokens", "512"]
    run_expecting_error(tiny(shards, tmp_path, *flags, steps=300), capsys,
                        "this sequential run reads 76,800 tokens, more than its 2 train shards give",
                        "it needs 3 shards (FineWeb: python data/cached_fineweb10B.py 3), or --allow_repeat")
    assert not os.path.exists(tmp_path / "logs" / "run.txt")
    args = T.parse_args(tiny(shards, tmp_path, *flags, "--allow_repeat", steps=300))
    loader = T.ShardLoader(args.train_files, args.batch_size, 0, 1, VOCAB, "sequential")
    assert T.data_summary(loader, args).endswith("1.37 epochs, starting over at shard 1 after shard 2 (--allow_repeat)")
    assert T.main(tiny(shards, tmp_path, *flags, "--tst_s", "2", "--tst_r", "0.5", steps=8)) == 0
    data = next(l for l in log_lines(tmp_path) if l.startswith("data:"))
    assert data == "data: 3,072 train tokens read of 56,000 in 2 shards, sequential: 0.05 epochs, shards 1-1 once each"


LAUNCHER = """
import os, sys, torch
sys.path.insert(0, {here!r})
import train_tst as T
real = T.train_step

def flaky(model, optimizers, inputs, targets, weights, accum, lr_mult):
    micro, rank = len(inputs) // accum, int(os.environ["RANK"])
    if (micro >= 4 and rank == 1) or micro == 2:  # rank 1 alone runs out of memory at 4, both ranks at 2
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return real(model, optimizers, inputs, targets, weights, accum, lr_mult)

def broken(model, optimizers, inputs, targets, weights, accum, lr_mult):
    if int(os.environ["RANK"]) == 1:
        raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED (simulated)")
    return real(model, optimizers, inputs, targets, weights, accum, lr_mult)

T.train_step = {patch}
sys.exit(T.main(sys.argv[1:]))
"""


def torchrun(script, args, nproc=2, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def two_ranks(script, args, timeout=300):
    """`script` as ranks 0 and 1 of a gloo group on loopback, started with the environment torchrun gives, without
    torchrun's own process (one torch import less on the way). Returns the first non-zero exit code (else 0) and
    both ranks' output; a rank that never exits fails the test by its timeout."""
    with socket.socket() as s:  # a free port (another process could take it before rank 0 does: unlikely here)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2")
    deadline, procs, codes = time.monotonic() + timeout, [], []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            for r in range(2):
                procs.append(subprocess.Popen([sys.executable, script, *args], stdout=out, stderr=err, text=True,
                                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r))))
            codes = [p.wait(timeout=max(0, deadline - time.monotonic())) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
            if len(codes) < 2:
                print(f"two_ranks: stopped after {timeout} s; their output:\n{stdout}\n{stderr}", file=sys.stderr)
    return subprocess.CompletedProcess(script, next((c for c in codes if c), 0), stdout, stderr)


MUON_SPLIT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import train_tst as T, test_train as TT
dist.init_process_group("gloo")
rank = dist.get_rank()
calls = []
real = torch.optim._muon._zeropower_via_newtonschulz
torch.optim._muon._zeropower_via_newtonschulz = lambda g, *a: calls.append(tuple(g.shape)) or real(g, *a)
model, muon, momentum = TT.muon_steps(rank, 2, {out!r} + ".start")
torch.save(dict(weights=[p.detach() for p in muon.matrices], momentum=momentum, calls=calls), {out!r} + f".{{rank}}")
dist.destroy_process_group()
"""


def muon_steps(rank, world_size, start=None, steps=3):
    """A 3-layer model's Muon (uneven shapes: 18 matrices, square and not) over `steps` steps of the same gradients
    on every rank; resumed from `start` (a state_dict) where that file exists. Returns the model, the optimizer and
    its state_dict (every rank takes part)."""
    torch.manual_seed(0)
    model = T.GPT(VOCAB, 3, 32, 2, 16)
    _, muon = T.make_optimizers(model, T.parse_args(GPT2 + ["--weight_decay", "0.1"]), rank, world_size)
    if start and os.path.exists(start):
        muon.load_state_dict(torch.load(start))
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)
        for p in muon.matrices:
            p.grad = torch.randn(p.shape, generator=generator)
        muon.step()
        muon.zero_grad()
    return model, muon, muon.state_dict()["momentum"]


def test_muon_work_is_split_over_ranks_and_gives_the_one_process_weights_and_checkpoint(tmp_path):
    one_model, one, one_momentum = muon_steps(0, 1)
    assert [tuple(p.shape) for p in one.matrices][:6] == [(128, 32)] * 3 + [(32, 128)] * 3  # largest first
    torch.save(one.state_dict(), str(tmp_path / "out.start"))  # a one-process checkpoint, resumed on two below
    script = tmp_path / "split.py"
    script.write_text(MUON_SPLIT.format(here=HERE, out=str(tmp_path / "out")))
    proc = two_ranks(str(script), [], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out.{r}") for r in (0, 1)]
    resumed_model, resumed, resumed_momentum = muon_steps(0, 1, str(tmp_path / "out.start"))  # the same, one process
    for r, result in enumerate(ranks):
        owned = [tuple(p.shape) for p in one.matrices[r::2]]
        assert result["calls"] == owned * 3  # each rank orthogonalises its own 9 matrices a step, no other
        for mine, theirs in zip(result["weights"], resumed.matrices, strict=True):
            assert torch.equal(mine, theirs.detach())
        for mine, theirs in zip(result["momentum"], resumed_momentum, strict=True):
            assert torch.equal(mine, theirs)  # gathered from both owners: the checkpoint of any process count
    assert not torch.equal(one.matrices[0], resumed.matrices[0])  # the resume went on from step 3


def test_out_of_memory_on_one_rank_then_both_under_ddp_compiled_halves_and_matches(shards, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(here=HERE, patch="flaky"))
    common = tiny(shards, tmp_path, "--tst_s", "2", "--tst_r", "0.5", "--batch_size", "8", "--compile", "--val_every", "3", steps=6)
    common.remove("--no-compile")
    halved = two_ranks(str(launcher), common + ["--micro_batch_size", "4", "--run_id", "halved"])
    assert halved.returncode == 0, halved.stderr[-3000:]
    fits = two_ranks(os.path.join(HERE, "train_tst.py"), common + ["--micro_batch_size", "1", "--run_id", "fits"])
    assert fits.returncode == 0, fits.stderr[-3000:]
    lines = log_lines(tmp_path, "halved")
    assert "out of memory at micro-batch 4: halved to 2 (2 micro-batches a step, the same global batch)" in lines
    assert "out of memory at micro-batch 2: halved to 1 (4 micro-batches a step, the same global batch)" in lines
    assert "2 processes x 4 micro-batches of 1" in next(l for l in lines if l.startswith("model:"))
    assert val_losses(lines) == val_losses(log_lines(tmp_path, "fits")) and len(val_losses(lines)) == 3
    assert lines[-1].startswith("done: step:6/6")


def test_an_error_on_one_rank_in_the_warmup_stops_every_rank(shards, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(here=HERE, patch="broken"))
    proc = two_ranks(str(launcher), tiny(shards, tmp_path, steps=4), timeout=180)
    assert proc.returncode != 0
    assert "RuntimeError: CUBLAS_STATUS_ALLOC_FAILED (simulated)" in proc.stderr
    assert "error: another process stopped on an error (its message is above)" in proc.stderr


def test_a_bad_token_id_in_one_ranks_shuffled_windows_stops_every_rank(tmp_path):
    d, window, batch = tmp_path / "data", 17, 4
    tokens = markov_tokens(6000)
    picks = np.random.default_rng([0, 0]).integers(5000 - window + 1, size=batch)
    bad = int(picks[2]) + 8  # inside rank 1's first window
    assert not any(p <= bad < p + window for p in picks[:2]), "rank 0 must not see it: pick another position"
    train = tokens[1000:].copy()
    train[bad] = VOCAB + 5
    prepare.write_shard(d / "t_val_000000.bin", tokens[:1000])
    prepare.write_shard(d / "t_train_000001.bin", train)
    proc = two_ranks(os.path.join(HERE, "train_tst.py"), tiny(d, tmp_path, "--data_order", "shuffled", steps=4), timeout=180)
    assert proc.returncode != 0
    # both ranks say it (their lines may interleave on the shared stderr)
    assert proc.stderr.count(f"token id {VOCAB + 5} at position {bad} is not below --vocab_size {VOCAB}") == 2


def test_evaluate_syncs_the_host_once_not_per_micro_batch(monkeypatch):
    model = T.GPT(VOCAB, 1, 32, 2, 16, torch.float32)
    windows = torch.randint(VOCAB, (8, 17))
    syncs = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, real=real, name=name: syncs.append(name) or real(self))
    loss = T.evaluate(model, windows, 2, torch.device("cpu"))
    assert syncs == ["tolist"] and loss == pytest.approx(math.log(VOCAB), abs=1e-4)


def test_the_rotary_tables_are_the_only_buffers_so_ddp_need_not_broadcast_them():
    model = T.GPT(VOCAB, 2, 32, 2, 16)
    assert {n.rsplit(".", 1)[1] for n, _ in model.named_buffers()} == {"cos", "sin"} and not model.state_dict().keys() & {
        n for n, _ in model.named_buffers()}
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    try:
        assert not DDP(model, **T.NO_BUFFER_SYNC).will_sync_module_buffers()  # no collective in a forward pass
        assert DDP(T.GPT(VOCAB, 2, 32, 2, 16)).will_sync_module_buffers()
    finally:
        dist.destroy_process_group()


def test_the_log_header_survives_a_gpu_machine_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")

    def missing(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "nvidia-smi")

    monkeypatch.setattr(T.subprocess, "run", missing)
    lines = T.device_lines(torch.device("cuda", 0), 8)
    assert lines[0] == "device cuda x8: NVIDIA H100 80GB HBM3" and lines[1].startswith("nvidia-smi: not available (FileNotFoundError")


def test_a_stop_signal_on_the_last_step_ends_as_done(shards, tmp_path, monkeypatch):
    real, steps = T.train_step, []

    def last_step_signalled(model, optimizers, inputs, targets, weights, accum, lr_mult):
        if lr_mult > 0:  # a real step, not the warmup's
            steps.append(lr_mult)
            if len(steps) == 6:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(model, optimizers, inputs, targets, weights, accum, lr_mult)

    monkeypatch.setattr(T, "train_step", last_step_signalled)
    assert T.main(tiny(shards, tmp_path, steps=6)) == 0
    lines = log_lines(tmp_path)
    assert lines[-2] == f"checkpoint: step:6 end {tmp_path / 'logs' / 'run' / 'step_000006.pt'}"
    assert lines[-1].startswith("done: step:6/6")


# ---------------------------------------------------------------------------------------------------
# CUDA, skipped without a GPU; on a GPU machine: python -m pytest -q test_train.py -k cuda

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_shards(directory, train_tokens, val_tokens=140_000):
    tokens = np.random.default_rng(0).integers(50257, size=val_tokens + train_tokens)
    prepare.write_shard(directory / "r_val_000000.bin", tokens[:val_tokens])
    prepare.write_shard(directory / "r_train_000001.bin", tokens[val_tokens:])
    return ["--train_files", str(directory / "r_train_*.bin"), "--val_files", str(directory / "r_val_*.bin")]


def gpt2_on_device(tmp_path, *extra):
    return ["--preset", "gpt2", "--device", "cuda", *random_shards(tmp_path, 3_000_000), "--log_dir", str(tmp_path / "logs"), *extra]


def peak_gib(line):
    return float(re.search(r"peak_mem:([\d.]+)GiB", line).group(1))


@needs_cuda
def test_cuda_gpt2_shape_compiled_bf16_both_phases_resume_and_peak_memory(tmp_path):
    """The gpt2 preset's model compiled in bf16: 2 steps of TST s = 8, 2 of next-token, then a resume from the switch."""
    run = gpt2_on_device(tmp_path, "--batch_size", "16", "--micro_batch_size", "8", "--steps", "4", "--tst_s", "8", "--tst_r", "0.5",
                         "--val_tokens", "65536", "--val_every", "2", "--compile")
    assert T.main(run + ["--run_id", "full"]) == 0
    lines = log_lines(tmp_path, "full")
    assert next(l for l in lines if l.startswith("model:")).startswith("model: 162,354,816 parameters")
    rows = train_rows(lines)
    assert [r[3] for r in rows] == [8, 8, 1, 1] and all(math.isfinite(r[1]) for r in rows)
    assert lines[-1].startswith("done: step:4/4") and peak_gib(lines[-1]) > 1
    print(f"peak memory, gpt2 shape, micro-batch 8, s = 8: {peak_gib(lines[-1])} GiB")
    ckpt = tmp_path / "logs" / "full" / "step_000002.pt"  # written at the switch
    assert T.main(run + ["--run_id", "resumed", "--resume", str(ckpt)]) == 0
    assert val_losses(log_lines(tmp_path, "resumed"))[4] == pytest.approx(val_losses(lines)[4], abs=1e-2)


@needs_cuda
def test_cuda_a_real_out_of_memory_halves_the_micro_batch(tmp_path):
    """64 sequences of 8192 positions: the float32 logits alone are 105 GB, more than any single GPU here holds."""
    run = gpt2_on_device(tmp_path, "--seq_len", "8192", "--batch_size", "64", "--micro_batch_size", "64", "--steps", "1",
                         "--val_tokens", "16384", "--no-compile", "--run_id", "oom")
    assert T.main(run) == 0
    lines = log_lines(tmp_path, "oom")
    halvings = [l for l in lines if l.startswith("out of memory at micro-batch")]
    assert halvings[0].startswith("out of memory at micro-batch 64: halved to 32") and lines[-1].startswith("done: step:1/1")
    print("\n".join(halvings + [lines[-1]]))


@needs_cuda
def test_cuda_ddp_over_the_visible_gpus(tmp_path):
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip("one GPU: no DDP to test")
    run = gpt2_on_device(tmp_path, "--batch_size", str(8 * n), "--micro_batch_size", "4", "--steps", "4", "--tst_s", "8", "--tst_r", "0.5",
                         "--val_tokens", str(8192 * n), "--compile", "--run_id", "ddp")
    proc = torchrun(os.path.join(HERE, "train_tst.py"), run, nproc=n, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = log_lines(tmp_path, "ddp")
    assert f"{n} processes x 2 micro-batches of 4" in next(l for l in lines if l.startswith("model:"))
    assert lines[-1].startswith("done: step:4/4")


# ---------------------------------------------------------------------------------------------------
# Reliability: interruption, divergence, atomic checkpoints

def test_sigterm_checkpoints_closes_the_log_and_resume_gives_the_same_losses(shards, tmp_path):
    args = tiny(shards, tmp_path, "--tst_s", "2", "--run_id", "cut", "--val_every", "20", steps=100)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train_tst.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step:3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = log_lines(tmp_path, "cut")
    assert lines[-1].startswith("interrupted: SIGTERM at step:")
    ckpt = lines[-1].split("--resume ")[1]
    cut_step = int(re.search(r"step_(\d+)\.pt", ckpt).group(1))
    assert 3 <= cut_step < 100 and os.path.exists(ckpt)
    assert not [f for f in os.listdir(os.path.dirname(ckpt)) if ".tmp" in f]
    assert T.main(tiny(shards, tmp_path, "--tst_s", "2", "--run_id", "cut", "--val_every", "20", "--resume", ckpt, steps=100)) == 0
    assert T.main(tiny(shards, tmp_path, "--tst_s", "2", "--run_id", "whole", "--val_every", "20", steps=100)) == 0
    cut, whole = log_lines(tmp_path, "cut"), log_lines(tmp_path, "whole")
    assert any(l.startswith(f"resumed from {ckpt} at step {cut_step}") for l in cut)
    assert val_losses(cut) == val_losses(whole)
    assert cut[-1].startswith("done: step:100/100")


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch, capsys):
    real_forward = T.GPT.forward
    calls = []

    def poisoned(self, inputs, targets, slot_weights=None):
        calls.append(self.training)
        loss = real_forward(self, inputs, targets, slot_weights)
        return loss * float("nan") if sum(calls) == 10 and self.training else loss  # the 9th step after the warmup's

    monkeypatch.setattr(T.GPT, "forward", poisoned)
    code = T.main(tiny(shards, tmp_path, "--save_every", "4", "--val_every", "0", steps=12))
    assert code == 1
    assert "non-finite train loss nan at step 9 (phase ntp, s=1)" in capsys.readouterr().err
    ckpts = sorted(os.listdir(tmp_path / "logs" / "run"))
    assert ckpts == ["step_000004.pt", "step_000008.pt"]
    state = torch.load(tmp_path / "logs" / "run" / "step_000008.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert log_lines(tmp_path)[-1].startswith("failed: step:9/12 Diverged: non-finite train loss")


def test_poisoned_weights_are_never_checkpointed(shards, tmp_path, monkeypatch, capsys):
    real = T.lr_multiplier
    monkeypatch.setattr(T, "lr_multiplier", lambda step, args: float("nan") if step == 3 else real(step, args))
    assert T.main(tiny(shards, tmp_path, "--save_every", "2", "--val_every", "0", steps=12)) == 1
    assert "non-finite weights after step 4; last good checkpoint:" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "logs" / "run")) == ["step_000002.pt"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c" / "step.pt")
    T.save_checkpoint(path, {"step": 1})

    def dies_midway(obj, f):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(T.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 1}


# ---------------------------------------------------------------------------------------------------
# Bad input, everywhere: one clear line naming the culprit, exit code 2

def shard_bytes(tokens, header=None):
    h = np.zeros(256, dtype="<i4")
    h[:3] = header if header is not None else (T.SHARD_MAGIC, T.SHARD_VERSION, len(tokens))
    return h.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def bad_shard(directory, name, header=None, tokens=(1, 2, 3), raw=None):
    """A shard file broken as asked: its header, its tokens or its raw bytes."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(shard_bytes(tokens, header) if raw is None else raw)
    return path


def run_expecting_error(argv, capsys, *needles, code=2):
    returned = T.main(argv)
    err = capsys.readouterr().err.strip()
    assert returned == code
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    for needle in needles:
        assert needle in err, err
    return err


def with_train(args, pattern):
    args = list(args)
    args[args.index("--train_files") + 1] = pattern
    return args


GOOD = list(range(1000))


@pytest.mark.parametrize("case,make,needle", [
    ("wrong magic", lambda d: bad_shard(d, "x.bin", header=(1234, 1, 1000), tokens=GOOD), "magic number 1234 is not 20240520"),
    ("wrong version", lambda d: bad_shard(d, "x.bin", header=(T.SHARD_MAGIC, 7, 1000), tokens=GOOD), "shard version 7 is not 1"),
    ("count disagrees with size", lambda d: bad_shard(d, "x.bin", header=(T.SHARD_MAGIC, 1, 2000), tokens=GOOD), "header says 2000 tokens"),
    ("truncated file", lambda d: bad_shard(d, "x.bin", raw=shard_bytes(GOOD)[:1500]), "truncated or corrupt"),
    ("zero-length file", lambda d: bad_shard(d, "x.bin", raw=b""), "0 bytes, shorter than the 1024-byte shard header"),
    ("header with no tokens", lambda d: bad_shard(d, "x.bin", tokens=()), "header says 0 tokens"),
])
def test_broken_train_shard_is_named_and_exits_2(shards, tmp_path, capsys, case, make, needle):
    path = make(str(tmp_path / "bad"))
    run_expecting_error(with_train(tiny(shards, tmp_path), path), capsys, path, needle)
    assert not (tmp_path / "logs").exists()  # refused before any output


def test_missing_data_dir_and_empty_glob_exit_2(shards, tmp_path, capsys):
    run_expecting_error(with_train(tiny(shards, tmp_path), "/no/such/dir/*.bin"), capsys, "no shard matches /no/such/dir/*.bin")
    os.makedirs(tmp_path / "empty")
    args = tiny(shards, tmp_path)
    args[args.index("--val_files") + 1] = str(tmp_path / "empty" / "*.bin")
    run_expecting_error(args, capsys, "no shard matches", "empty")


def test_token_id_past_the_vocabulary_fails_the_run_by_name(shards, tmp_path, capsys):
    tokens = markov_tokens(5000)
    tokens[3000] = VOCAB + 7
    path = bad_shard(str(tmp_path / "bad"), "x.bin", tokens=tokens)
    run_expecting_error(with_train(tiny(shards, tmp_path, steps=100), path), capsys, path,
                        f"token id {VOCAB + 7} at position 3000 is not below --vocab_size {VOCAB}")
    assert log_lines(tmp_path)[-1].startswith("failed: step:")  # the log does not look complete
    tokens[100] = VOCAB  # inside the val slice
    val = bad_shard(str(tmp_path / "badval"), "v.bin", tokens=tokens)
    args = tiny(shards, tmp_path)
    args[args.index("--val_files") + 1] = val
    run_expecting_error(args, capsys, val, f"token id {VOCAB} at position 100 is not below")


def test_val_slice_longer_than_val_data_and_windows_longer_than_shards(shards, tmp_path, capsys):
    args = tiny(shards, tmp_path)
    args[args.index("--val_tokens") + 1] = "8000"
    run_expecting_error(args, capsys, "--val_tokens 8000 needs 8001 tokens", "hold 4000")
    run_expecting_error(tiny(shards, tmp_path, "--seq_len", "4096", "--val_tokens", "4096", "--tst_s", "4", "--data_order", "sequential"),
                        capsys, "a step needs 65537 consecutive tokens (4 windows of 16385)", "longest train shard holds 30000")
    run_expecting_error(tiny(shards, tmp_path, "--seq_len", "8192", "--val_tokens", "8192", "--tst_s", "4", "--data_order", "shuffled"),
                        capsys, "a step needs 32769 consecutive tokens (windows of 32769)", "longest train shard holds 30000")


@pytest.mark.parametrize("flags,needle", [
    (["--tst_s", "0"], "--tst_s must be at least 1"),
    (["--tst_s", "4", "--tst_r", "1.0"], "--tst_r must be in [0, 1)"),
    (["--tst_r", "-0.1"], "--tst_r must be in [0, 1)"),
    (["--steps", "0"], "--steps must be positive"),
    (["--batch_size", "-4"], "--batch_size must be positive"),
    (["--micro_batch_size", "3"], "--batch_size 4 must be a multiple of 1 processes x --micro_batch_size 3"),
    (["--lr", "0"], "--lr must be positive"),
    (["--embed_lr", "-1"], "--embed_lr must be positive"),
    (["--n_layer", "0"], "--n_layer must be positive"),
    (["--n_head", "3"], "--n_embd 32 must split into --n_head 3 heads"),
    (["--seq_len", "1"], "--seq_len must be at least 2"),
    (["--vocab_size", "70000"], "--vocab_size must be in [2, 65536]"),
    (["--val_tokens", "100"], "--val_tokens 100 must be a multiple of 1 processes x --seq_len 16"),
    (["--warmup_steps", "-1"], "--warmup_steps must not be negative"),
    (["--cooldown_frac", "1.5"], "--cooldown_frac must be in [0, 1]"),
    (["--weight_decay", "-0.1"], "--weight_decay must not be negative"),
    (["--save_every", "-2"], "--save_every must not be negative"),
    (["--val_every", "-2"], "--val_every must not be negative"),
    (["--log_every", "0"], "--log_every must be positive"),
    (["--target_val_loss", "0"], "--target_val_loss must be positive"),
    (["--mtp_k", "0"], "--mtp_k must be positive"),
    (["--tst_schedule", "8:0.7,4:0.4"], "fractions sum to 1.1"),
    (["--tst_schedule", "0:0.2"], "bag size must be >= 1"),
    (["--tst_schedule", "eight"], "is not 'bag_size:fraction'"),
    (["--tst_schedule", "4:0.2", "--tst_s", "4"], "either --tst_schedule or --tst_s"),
])
def test_out_of_range_flags_exit_2_before_any_work(shards, tmp_path, capsys, flags, needle):
    run_expecting_error(tiny(shards, tmp_path, *flags), capsys, needle)
    assert not (tmp_path / "logs").exists()


def test_batch_that_does_not_divide_across_processes_exits_2():
    with pytest.raises(T.UsageError, match="--batch_size 8 must be a multiple of 3 processes"):
        T.parse_args(["--preset", "cpu", "--micro_batch_size", "2"], world_size=3)


def test_unknown_flag_and_bad_type_exit_2(capsys):
    for argv, needle in ((["--tst_z", "3"], "unrecognized arguments: --tst_z"), (["--tst_s", "four"], "invalid int"),
                         (["--tst_mode", "both"], "invalid choice: 'both'")):
        with pytest.raises(SystemExit) as stop:
            T.main(argv)
        assert stop.value.code == 2 and needle in capsys.readouterr().err


def test_bad_checkpoints_exit_2(shards, tmp_path, capsys):
    assert T.main(tiny(shards, tmp_path, steps=2)) == 0
    ckpt = str(tmp_path / "logs" / "run" / "step_000002.pt")
    run_expecting_error(tiny(shards, tmp_path, "--n_embd", "64", "--resume", ckpt), capsys,
                        ckpt, "the checkpoint has --n_embd 32, this run has 64")
    state = torch.load(ckpt, weights_only=True)
    state["code_sha"] = "0123456789abcdef"
    other = str(tmp_path / "other.pt")
    torch.save(state, other)
    run_expecting_error(tiny(shards, tmp_path, "--resume", other), capsys, other, "written by another train_tst.py")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(ckpt, "rb").read()[:5000])
    run_expecting_error(tiny(shards, tmp_path, "--resume", str(corrupt)), capsys, str(corrupt), "not a readable train_tst.py checkpoint")
    run_expecting_error(tiny(shards, tmp_path, "--resume", str(tmp_path / "nope.pt")), capsys, "no such file")


def test_shard_reader_survives_random_mutations_with_only_the_clear_error(tmp_path):
    rng = random.Random(0)
    good = bad_shard(str(tmp_path), "good.bin", tokens=list(range(300)))
    original = open(good, "rb").read()
    outcomes = {"ok": 0, "refused": 0}
    for i in range(300):
        data = bytearray(original)
        kind = rng.choice(["header", "truncate", "extend", "header+truncate"])
        if "header" in kind:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(12)] = rng.randrange(256)
        if "truncate" in kind:
            data = data[:rng.randrange(len(data))]
        if kind == "extend":
            data += bytes(rng.randrange(1, 9))
        path = tmp_path / f"m{i}.bin"
        path.write_bytes(bytes(data))
        try:
            tokens = T.read_shard(str(path))
        except T.UsageError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            outcomes["refused"] += 1
        else:
            assert len(tokens) * 2 + 1024 == len(data)
            outcomes["ok"] += 1
    assert outcomes["refused"] > 200


# ---------------------------------------------------------------------------------------------------
# Beyond val loss: HellaSwag, samples, exported models

import hellaswag  # noqa: E402

HELLASWAG_ITEMS = [  # the hub's schema; made-up text
    dict(ind=24, activity_label="Roof shingle removal", ctx_a="A man is sitting on a roof.", ctx_b="he",
         ctx="A man is sitting on a roof. he", endings=["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
         source_id="activitynet~v_-JhWjGDPHMY", split="val", split_type="indomain", label="3"),
    dict(ind=92, activity_label="Clean and jerk", ctx_a="A lady walks to a barbell.", ctx_b="she",
         ctx="A lady walks to a barbell. she", endings=["swings and lands in her arms.", "pulls the barbell forward.",
                                                      "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
         source_id="activitynet~v_-lJS58hyo1c", split="val", split_type="zeroshot", label="3"),
    dict(ind=106, activity_label="Canoeing", ctx_a="Two women in a child are shown in a canoe while a man pulls the canoe.",
         ctx_b="they", ctx="Two women in a child are shown in a canoe while a man pulls the canoe. they",
         endings=["sit in a canoe while the man paddles.", "walking the dog.", "are then shown paddling down a river.",
                  "all the while smiling."], source_id="activitynet~v_-xQvJmC2jhk", split="val", split_type="indomain", label="2"),
]


class FakeHellaSwagHub:
    """Stands in for hf_hub_download: writes the validation parquet file with the items above."""

    def __init__(self, offline=False):
        self.calls, self.offline = [], offline

    def __call__(self, repo_id, filename, repo_type, revision, local_dir):
        self.calls.append((repo_id, filename, repo_type, revision))
        if self.offline:
            from huggingface_hub.errors import LocalEntryNotFoundError
            raise LocalEntryNotFoundError("Cannot reach huggingface.co: offline")
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(HELLASWAG_ITEMS), path)
        return path


def test_hellaswag_is_fetched_once_from_the_hub_and_read_in_its_schema(tmp_path, monkeypatch, capsys):
    hub = FakeHellaSwagHub()
    monkeypatch.setattr(hellaswag, "hf_hub_download", hub)
    items = hellaswag.load_items(2, str(tmp_path))
    assert items == [(d["ctx"], d["endings"], int(d["label"])) for d in HELLASWAG_ITEMS[:2]]
    assert hub.calls == [("Rowan/hellaswag", "default/validation/0000.parquet", "dataset", "refs/convert/parquet")]
    assert len(hellaswag.load_items(3, str(tmp_path))) == 3 and len(hub.calls) == 1  # cached: no second download
    with pytest.raises(prepare.DataError, match="--hellaswag 4: the validation split has 3 items"):
        hellaswag.load_items(4, str(tmp_path))
    monkeypatch.setattr(hellaswag, "hf_hub_download", FakeHellaSwagHub(offline=True))
    with pytest.raises(prepare.DataError, match=r"could not download HellaSwag .*LocalEntryNotFoundError.*python data/hellaswag.py once online"):
        hellaswag.load_items(1, str(tmp_path / "elsewhere"))


class Rigged(torch.nn.Module):
    """A 'model' whose next-token logits favour a fixed set of tokens everywhere."""

    def __init__(self, favoured):
        super().__init__()
        self.max_len, self.favoured = 1024, sorted(favoured)

    def logits(self, tokens):
        z = torch.full((*tokens.shape, 50304), -10.0)
        z[..., self.favoured] = 10.0
        return z


def test_hellaswag_scores_a_model_rigged_for_the_right_endings_1_and_against_them_0():
    enc = prepare.gpt2_encoding()
    items = [(d["ctx"], d["endings"], int(d["label"])) for d in HELLASWAG_ITEMS]
    tokens = lambda keep: {t for c, e, label in items for i, x in enumerate(e) if keep(i, label) for t in enc.encode(" " + x)}
    right, wrong = tokens(lambda i, label: i == label), tokens(lambda i, label: i != label)
    assert hellaswag.hellaswag_counts(Rigged(right - wrong), items, enc, torch.device("cpu")) == (3, 3)
    assert hellaswag.hellaswag_counts(Rigged(wrong - right), items, enc, torch.device("cpu")) == (0, 0)


def test_hellaswag_padding_and_masking_match_a_row_by_row_loop():
    torch.manual_seed(0)
    model, enc = T.GPT(50304, 2, 64, 1, 128, torch.float32), prepare.gpt2_encoding()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)  # not the zero-initialised head: endings must score differently
    items = [(d["ctx"], d["endings"], int(d["label"])) for d in HELLASWAG_ITEMS]
    summed, counts = hellaswag.ending_losses(model, items, enc, torch.device("cpu"))
    for i, (context, endings, _) in enumerate(items):
        for j, ending in enumerate(endings):
            c, e = enc.encode(context), enc.encode(" " + ending)
            row = torch.tensor([c + e])
            losses = F.cross_entropy(model.logits(row[:, :-1])[0], row[0, 1:], reduction="none")[len(c) - 1:]
            assert counts[i, j] == len(e) and summed[i, j].item() == pytest.approx(losses.sum().item(), rel=1e-5)


def test_generation_follows_the_training_forward_pass():
    torch.manual_seed(0)
    model = T.GPT(VOCAB, 2, 32, 2, 16, torch.float32)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randint(VOCAB, (1, 12))
    full = model.logits(tokens)
    for k in range(1, 13):  # causal: a prefix's last logits are the full window's at that position
        assert torch.allclose(model.logits(tokens[:, :k])[:, -1], full[:, k - 1], atol=1e-5)
    loss = model(tokens[:, :-1], tokens[:, 1:])  # the training loss is the cross-entropy of these distributions
    assert loss.item() == pytest.approx(F.cross_entropy(full[0, :-1], tokens[0, 1:]).item(), rel=1e-5)
    for prompt in ([1, 2, 3], list(range(20))):  # past max_len (16) each token sees the last 16 only
        greedy = model.generate(prompt, 5, 1e-4, 1, seed=0)  # top-1 is argmax
        seq = list(prompt)
        for _ in range(5):
            seq.append(int(model.logits(torch.tensor([seq[-16:]]))[0, -1].argmax()))
        assert greedy == seq[len(prompt):]


def test_a_run_samples_exports_and_the_export_samples_the_same_without_training_state(shards, tmp_path, capsys):
    flags = ["--sample_tokens", "12", "--sample_prompt", "A", "--temperature", "1.0"]
    assert T.main(tiny(shards, tmp_path, *flags, steps=4)) == 0
    sample = next(l for l in log_lines(tmp_path) if l.startswith("sample: "))
    text = json.loads(sample[len("sample: "):])
    assert isinstance(text, str) and text.startswith("A") and len(text) > 1
    assert T.main(tiny(shards, tmp_path, *flags, "--run_id", "again", steps=4)) == 0
    assert sample in log_lines(tmp_path, "again")  # deterministic under the seed
    exported = torch.load(tmp_path / "logs" / "run" / "model.pt", weights_only=True)
    assert set(exported) == {"config", "dtype", "model"}  # weights and shape, no optimizer or loader state
    capsys.readouterr()
    for model in (tmp_path / "logs" / "run" / "model.pt", tmp_path / "logs" / "run" / "step_000004.pt"):
        assert T.main(["--eval_only", str(model), "--device", "cpu", *flags]) == 0
        assert capsys.readouterr().out.strip() == sample
    assert T.main(["--eval_only", str(tmp_path / "none.pt"), *flags]) == 2
    assert "--eval_only none.pt: no such file" in capsys.readouterr().err.replace(str(tmp_path) + os.sep, "")
    run_expecting_error(["--eval_only", str(tmp_path / "none.pt")], capsys, "--eval_only needs --hellaswag N or --sample_tokens N")
    run_expecting_error(tiny(shards, tmp_path, "--sample_tokens", "5", "--sample_prompt", ""), capsys, "--sample_prompt must not be empty")


def test_sampling_never_picks_the_padding_ids_past_the_tokenizer():
    torch.manual_seed(0)
    model = T.GPT(VOCAB, 1, 32, 2, 16, torch.float32)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=1.0)
    ids = model.generate([1], 40, 2.0, 0, seed=0, n_vocab=5)
    assert len(ids) == 40 and max(ids) < 5


def test_a_run_scores_hellaswag_into_its_record_log_and_compare_shows_it(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hellaswag, "hf_hub_download", FakeHellaSwagHub())
    monkeypatch.setattr(hellaswag, "DIR", str(tmp_path / "hellaswag"))
    assert T.main(tiny(shards, tmp_path, "--hellaswag", "3", "--vocab_size", "50304", steps=2)) == 0
    line = next(l for l in log_lines(tmp_path) if l.startswith("hellaswag: "))
    assert re.fullmatch(r"hellaswag: acc_norm (0|0\.3333|0\.6667|1)\.?\d* acc \S+ \(3 items\)", line)
    capsys.readouterr()
    assert compare.main([str(tmp_path / "logs" / "run.txt")]) == 0
    assert f"| {line.split()[2]} (3 items) |" in capsys.readouterr().out
    monkeypatch.setattr(hellaswag, "DIR", str(tmp_path / "offline"))
    monkeypatch.setattr(hellaswag, "hf_hub_download", FakeHellaSwagHub(offline=True))
    run_expecting_error(tiny(shards, tmp_path, "--hellaswag", "3", "--run_id", "off"), capsys, "could not download HellaSwag")
    assert not os.path.exists(tmp_path / "logs" / "off.txt")  # found before any work


# ---------------------------------------------------------------------------------------------------
# Nothing wrong in silence, nothing lost: what a newcomer and an adversarial user tried

def test_a_run_never_writes_into_another_runs_log_or_checkpoints(shards, tmp_path, capsys, monkeypatch):
    assert T.main(tiny(shards, tmp_path, steps=2)) == 0
    before = open(tmp_path / "logs" / "run.txt").read()
    run_expecting_error(tiny(shards, tmp_path, steps=2), capsys, "--run_id run:", "run.txt exists: another run's")
    assert open(tmp_path / "logs" / "run.txt").read() == before  # refused before any work: nothing appended
    os.remove(tmp_path / "logs" / "run.txt")  # a log gone, its checkpoints still there: still another run's
    run_expecting_error(tiny(shards, tmp_path, steps=2), capsys, "exists: another run's")
    assert T.main(tiny(shards, tmp_path, "--resume", str(tmp_path / "logs" / "run" / "step_000002.pt"), steps=2)) == 0
    default = [a for a in tiny(shards, tmp_path, "--tst_schedule", "4: 0.5", steps=2) if a not in ("--run_id", "run")]
    monkeypatch.setattr(T.time, "strftime", lambda fmt: "20261130-120000")  # two launches in the same second
    assert T.main(default) == 0 and T.main(default) == 0
    logs = sorted(f for f in os.listdir(tmp_path / "logs") if f.endswith(".txt") and "cpu" in f)
    assert len(logs) == 2 and logs[1] == logs[0][:-4] + "_2.txt" and " " not in logs[0]  # no spaces to break a paste
    for bad in ["../../escaped", "a/b", "..", "has space", ""]:
        run_expecting_error(tiny(shards, tmp_path, "--run_id", bad), capsys, "must be a plain name")
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_a_log_dir_that_cannot_be_written_stops_before_the_warmup(shards, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    warmups = []
    monkeypatch.setattr(T, "warm_up", lambda *a: warmups.append(1))
    for log_dir in [tmp_path / "afile", tmp_path / "afile" / "sub"]:
        flags = tiny(shards, tmp_path)
        flags[flags.index("--log_dir") + 1] = str(log_dir)
        run_expecting_error(flags, capsys, f"--log_dir {log_dir}: cannot write the record log there (")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: (_ for _ in ()).throw(
        OSError(30, "Read-only file system")) if "x" in mode else real_open(path, mode, *a, **k))
    run_expecting_error(tiny(shards, tmp_path), capsys, "cannot write the record log there (Read-only file system)")
    assert warmups == []


def full_disk_at(tmp_path, monkeypatch, nth):
    """torch.save fails as its zip writer does on a full disk, from its nth call on, after writing part of the file."""
    real, calls = torch.save, []

    def save(state, path, *a, **k):
        calls.append(path)
        if len(calls) >= nth:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 87012928 vs 87012816")
        return real(state, path, *a, **k)
    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_names_what_could_not_be_written_and_the_last_good_checkpoint(shards, tmp_path, monkeypatch, capsys):
    full_disk_at(tmp_path, monkeypatch, nth=2)  # the step-4 checkpoint is written, the step-8 one is not
    run_expecting_error(tiny(shards, tmp_path, "--save_every", "4", steps=12), capsys, "could not write ",
                        "step_000008.pt (", "bytes free on its disk); last good checkpoint: ", "step_000004.pt", code=1)
    folder = tmp_path / "logs" / "run"
    assert sorted(os.listdir(folder)) == ["step_000004.pt"]  # no partial file; the previous checkpoint whole
    assert T.load_checkpoint(str(folder / "step_000004.pt"), T.parse_args(tiny(shards, tmp_path, steps=12)))["step"] == 4
    assert log_lines(tmp_path)[-1].startswith("failed: step:8/12 WriteFailed: could not write")
    monkeypatch.undo()
    full_disk_at(tmp_path, monkeypatch, nth=2)  # the end checkpoint is written, the export is not
    run_expecting_error(tiny(shards, tmp_path, "--run_id", "export", steps=2), capsys, "could not write",
                        "model.pt", "last good checkpoint: ", "step_000002.pt", code=1)


def test_a_log_line_that_cannot_be_written_is_one_line_naming_the_last_checkpoint(shards, tmp_path, monkeypatch, capsys):
    real_line = T.RunLog.line

    def line(self, text, console_extra=""):
        if text.startswith("step:6/8 val_loss"):
            self.file.write = lambda _: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return real_line(self, text, console_extra)
    monkeypatch.setattr(T.RunLog, "line", line)
    run_expecting_error(tiny(shards, tmp_path, "--save_every", "3", "--val_every", "6", steps=8), capsys,
                        "could not write the record log", "(No space left on device); last good checkpoint: ",
                        "step_000003.pt", code=1)  # validation comes before the step-6 checkpoint


def test_flags_that_would_do_nothing_or_the_wrong_thing_are_refused_or_noted(shards, tmp_path, capsys):
    run_expecting_error(tiny(shards, tmp_path, "--resume", ""), capsys, "--resume needs a checkpoint's path")
    for flag in (["--tst_r", "0.5"], ["--tst_s", "4"]):  # either would be ignored beside a schedule
        run_expecting_error(tiny(shards, tmp_path, "--tst_schedule", "4:0.25", *flag), capsys,
                            "give either --tst_schedule or --tst_s/--tst_r, not both")
    assert T.parse_args(tiny(shards, tmp_path, "--tst_s", "4")).tst_schedule == "4:0.3"
    assert T.parse_args(tiny(shards, tmp_path, "--tst_schedule", "4:0.25")).phases == [(4, 3)]
    same = tiny(shards, tmp_path)
    same[same.index("--val_files") + 1] = str(shards / "t_*.bin")  # every shard, the train ones too
    run_expecting_error(same, capsys, "names train shards", "t_train_000001.bin", "validation would score text")
    args = T.parse_args(tiny(shards, tmp_path, "--batch_size", "8", "--micro_batch_size", "8"), world_size=2)
    assert args.micro_batch_size == 4 and args.notes == [
        "note: --micro_batch_size 8 is more than a step's 8 sequences over 2 processes hold: 4 instead"]
    assert T.main(tiny(shards, tmp_path, "--batch_size", "4", "--micro_batch_size", "8", steps=1)) == 0
    assert "note: --micro_batch_size 8 is more than a step's 4 sequences over 1 processes hold: 4 instead" in log_lines(
        tmp_path)


def test_host_memory_a_step_cannot_have_is_refused_at_once_and_an_allocation_failure_is_one_line(
        shards, tmp_path, monkeypatch, capsys):
    run_expecting_error(tiny(shards, tmp_path, "--batch_size", "4000000", "--seq_len", "65536", "--val_tokens", "65536"), capsys,
                        "a step's token windows alone take", "GiB of host memory, more than this machine's")

    def no_memory(*a):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory:"
                           " you tried to allocate 2056000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(T, "warm_up", no_memory)
    assert T.main(tiny(shards, tmp_path, "--run_id", "oom")) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: out of host memory (the process could not allocate more): lower --batch_size,"
                   " --micro_batch_size or --seq_len")


def test_a_stop_signal_before_the_first_step_exits_at_once_with_one_line(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "warm_up", lambda *a: os.kill(os.getpid(), signal.SIGINT))
    assert T.main(tiny(shards, tmp_path)) == 128 + signal.SIGINT
    out, err = capsys.readouterr()
    assert err.strip() == "stopped: SIGINT while no training step was running" and "Traceback" not in out + err
    assert "warmup: a step of each bag size [1] and a validation batch, untimed ..." in out  # what it was doing
    assert log_lines(tmp_path)[-1] == "failed: step:0/12 Stopped: SIGINT while no training step was running"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back


def test_an_exported_model_given_to_resume_is_named_as_one(shards, tmp_path, capsys):
    assert T.main(tiny(shards, tmp_path, steps=2)) == 0
    run_expecting_error(tiny(shards, tmp_path, "--run_id", "b", "--resume", str(tmp_path / "logs" / "run" / "model.pt")),
                        capsys, "an exported model (weights only", "which --eval_only reads")
