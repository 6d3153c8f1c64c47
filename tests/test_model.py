"""Tests for model.py: the maths of the diffusion schedule, the gradient decay, KV-cache decoding, shapes and
gradients of every module, that a few steps learn, and that checkpoints round-trip. Tiny configs: < 30 s on
a 2-core CPU.  Run: python -m pytest tests/test_model.py -q"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import model
import train_grounding

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import (  # noqa: E402
    VLA,
    ActionExpert,
    ActionExpertConfig,
    NoiseSchedule,
    Planner,
    PlannerConfig,
    count_params,
    load_checkpoint,
    save_checkpoint,
    scale_grad,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and when another process keeps the CPU busy, two
    OpenMP threads waiting on each other make these tests ~10x slower. Restored after this file."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_planner_config(**kw):
    c = dict(image_size=24, patch_size=8, vocab_size=40, d_model=32, vit_layers=1, lm_layers=2, n_heads=2,
             max_text_len=16)
    c.update(kw)
    return PlannerConfig(**c)


def tiny_action_config(**kw):
    c = dict(chunk_len=4, action_dim=6, d_model=32, n_layers=2, n_heads=2, n_queries=4, use_state=False)
    c.update(kw)
    return ActionExpertConfig(**c)


def tiny_batch(B=3, L=10, pcfg=None, seed=0):
    pcfg = pcfg or tiny_planner_config()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, pcfg.image_size, pcfg.image_size, generator=g)
    tokens = torch.randint(1, pcfg.vocab_size, (B, L), generator=g)
    pad_mask = torch.zeros(B, L, dtype=torch.bool)
    pad_mask[1, L - 3:] = True  # row 1 is 3 tokens shorter, right-padded with token 0
    tokens[pad_mask] = 0
    targets = tokens.roll(-1, dims=1)  # shifted: position i predicts token i+1
    targets[:, : L // 2] = -100  # the first half is "prompt", the rest "answer"
    targets[:, -1] = -100
    targets[pad_mask.roll(-1, dims=1) | pad_mask] = -100
    actions = torch.rand(B, 4, 6, generator=g) * 2 - 1
    state = torch.rand(B, 6, generator=g) * 2 - 1
    return images, tokens, pad_mask, targets, actions, state


# ----------------------------------------------------------------------------- diffusion maths


def test_schedule_reaches_near_pure_noise():
    s = NoiseSchedule(100)
    acp = s.alphas_cumprod
    assert acp.shape == (100,)
    assert acp[0] > 0.999  # the first step barely adds noise
    assert acp[-1] < 1e-3  # the last step is (almost) pure noise: x_T ~ N(0, I)
    assert torch.all(acp[1:] < acp[:-1])  # monotone
    assert s.betas.max() <= 0.999 + 1e-12  # squaredcos_cap_v2 clips beta at 0.999
    assert s.ddim_timesteps(10) == [99, 89, 79, 69, 59, 49, 39, 29, 19, 9]  # DDIM starts from the noisiest step


@pytest.mark.parametrize("steps", [1, 10, 100])
def test_ddim_with_true_noise_recovers_clean_chunk(steps):
    s = NoiseSchedule(100)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(5, 8, 6, generator=g, dtype=torch.float64) * 2 - 1) * 0.95
    noise = torch.randn(5, 8, 6, generator=g, dtype=torch.float64)
    x_T = s.q_sample(x0, torch.full((5,), 99), noise)
    out = s.ddim_sample(lambda x, t: noise, x0.shape, steps=steps, x_T=x_T)  # a perfect noise predictor
    assert (out - x0).abs().max().item() < 1e-4


def test_ddim_is_deterministic_given_a_seeded_generator():
    s = NoiseSchedule(100)
    fn = lambda x, t: 0.5 * x + t[:, None, None].float() / 100  # noqa: E731  any fixed function
    a = s.ddim_sample(fn, (2, 4, 6), generator=torch.Generator().manual_seed(7))
    b = s.ddim_sample(fn, (2, 4, 6), generator=torch.Generator().manual_seed(7))
    c = s.ddim_sample(fn, (2, 4, 6), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.abs().max() <= 1.0  # clipped to the normalised action range


def test_noise_scale_zero_gives_one_chunk_whatever_the_seed_and_one_keeps_the_old_draw():
    torch.manual_seed(0)
    vla = VLA(tiny_planner_config(), tiny_action_config()).eval()
    images, tokens, pad_mask, *_ = tiny_batch(B=2)
    images, tokens, pad_mask = images[:1], tokens[:1], pad_mask[:1]
    run = lambda seed, scale: vla.predict_actions(images, tokens, pad_mask, None, 5,  # noqa: E731
                                                  torch.Generator().manual_seed(seed), scale)
    assert torch.equal(run(1, 0.0), run(2, 0.0))  # x_T = 0: the seed no longer matters
    assert not torch.equal(run(1, 1.0), run(2, 1.0))
    cond = vla.condition(images, tokens, pad_mask)  # scale 1 = the generator's draw as x_T, as before the flag
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(1))
    caches = vla.expert.encode_prefix(cond, None)
    old = vla.expert.schedule.ddim_sample(lambda x, t: vla.expert.denoise(x, t, caches), (1, 4, 6), 5, g, x_T=x_T)
    assert torch.equal(run(1, 1.0), old)


# ----------------------------------------------------------------------------- gradient decay


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    (y * 3).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.75))


def test_gradient_decay_scales_the_planners_gradient_by_its_factor():
    torch.manual_seed(0)
    vla = VLA(tiny_planner_config(), tiny_action_config())
    images, tokens, pad_mask, _, actions, _ = tiny_batch()

    def grads(factor):
        vla.zero_grad(set_to_none=True)
        torch.manual_seed(123)  # same timesteps and noise in both runs
        vla.action_loss(images, tokens, pad_mask, actions, grad_decay=factor).backward()
        return {n: p.grad.clone() for n, p in vla.named_parameters() if p.grad is not None}

    full, half = grads(1.0), grads(0.5)
    n_planner = 0
    for n, g in full.items():
        if n.startswith("planner."):
            n_planner += 1
            torch.testing.assert_close(half[n], 0.5 * g, rtol=1e-6, atol=1e-12)
        else:  # queries and expert are untouched by the decay
            torch.testing.assert_close(half[n], g, rtol=1e-6, atol=1e-12)
    assert n_planner > 10
    assert any(g.abs().sum() > 0 for n, g in full.items() if n.startswith("planner.vit"))  # reaches the ViT


# ----------------------------------------------------------------------------- planner


def test_planner_forward_backward_shapes():
    pcfg = tiny_planner_config()
    planner = Planner(pcfg)
    images, tokens, _, targets, _, _ = tiny_batch(pcfg=pcfg)
    logits, loss, hidden = planner(images, tokens, targets)
    P = pcfg.n_image_tokens
    assert P == 9
    assert logits.shape == (3, 10, pcfg.vocab_size)
    assert hidden.shape == (3, P + 10, pcfg.d_model)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in planner.parameters())
    _, loss_none, _ = planner(images, tokens)
    assert loss_none is None



def test_untied_head_has_its_own_matrix_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    pcfg = tiny_planner_config(tie_head=False)
    planner = Planner(pcfg).eval()
    images, tokens, _, targets, _, _ = tiny_batch(pcfg=pcfg)
    assert count_params(planner) == count_params(Planner(tiny_planner_config())) + pcfg.vocab_size * pcfg.d_model
    with torch.no_grad():  # the head reads out_emb, not tok_emb
        before = planner(images, tokens)[0]
        planner.out_emb.weight.add_(0.1)
        assert not torch.allclose(before, planner(images, tokens)[0])
    _, loss, _ = planner.train()(images, tokens, targets)
    loss.backward()
    assert planner.out_emb.weight.grad is not None and planner.tok_emb.weight.grad is not None
    save_checkpoint(tmp_path / "ck", planner.eval(), {"step": 1})
    again, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(planner(images, tokens)[0], again.eval()(images, tokens)[0])


def test_patch_head_is_optional_and_its_loss_reaches_the_image_path():
    assert not hasattr(Planner(tiny_planner_config()), "patch_head")  # older checkpoints load unchanged
    pcfg = tiny_planner_config(patch_classes=(4, 3))
    planner = Planner(pcfg)
    images, tokens, _, targets, _, _ = tiny_batch(pcfg=pcfg)
    _, loss, hidden = planner(images, tokens, targets)
    labels = torch.stack([torch.randint(0, 4, (3, pcfg.n_image_tokens)), torch.randint(0, 3, (3, pcfg.n_image_tokens))], 1)
    aux = planner.patch_loss(hidden, labels)  # (B, 2, P) labels
    assert aux.shape == () and 0.5 < aux.item() < 3.0  # about log(4) and log(3) at the start
    aux.backward()
    assert planner.patch_head.weight.grad.abs().sum() > 0
    assert planner.patch_embed[0].weight.grad.abs().sum() > 0  # it trains the image encoder too
    assert planner.tok_emb.weight.grad is None or planner.tok_emb.weight.grad.abs().sum() == 0  # not the words


def test_lookup_loss_is_head_zeros_attention_over_the_image_and_it_can_be_learned():
    pcfg = tiny_planner_config()
    planner = Planner(pcfg)
    images, tokens, _, targets, _, _ = tiny_batch(pcfg=pcfg)
    P, L = pcfg.n_image_tokens, tokens.shape[1]
    caught = {}
    planner.lm_blocks[1].register_forward_pre_hook(lambda m, args: caught.update(x=args[0]))
    look = torch.zeros(3, L, P)
    look[0, 6:, 4] = 1.0  # row 0's answer lies in patch 4; rows 1, 2 have no target
    planner(images, tokens, targets)
    x = caught["x"]
    # the same number by hand: head 0 of block 1, queries at the text positions, keys at the image tokens
    blk, d = planner.lm_blocks[1], pcfg.d_model
    hs = d // pcfg.n_heads
    q, k, _ = blk.attn.qkv(blk.ln1(x)).split(d, dim=2)
    att = torch.softmax(q[0, P + 6:, :hs] @ k[0, :P, :hs].T / hs ** 0.5, dim=-1)  # (4, P)
    loss = planner.lookup_loss(x, 1, look)
    assert loss.item() == pytest.approx(-att[:, 4].log().mean().item(), rel=1e-4)
    loss.backward()
    assert planner.tok_emb.weight.grad.abs().sum() > 0  # it trains the words ...
    assert planner.patch_embed[0].weight.grad.abs().sum() > 0  # ... and the image path
    assert blk.attn.qkv.weight.grad[2 * d:].abs().sum() == 0  # not the values: only where head 0 looks
    opt = torch.optim.Adam(planner.parameters(), lr=3e-3)
    for _ in range(30):
        planner(images, tokens, targets)
        loss = planner.lookup_loss(caught["x"], 1, look)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * math.log(P)


def test_word_loss_scores_the_item_words_at_item_patches_only_and_trains_the_words():
    pcfg = tiny_planner_config()
    planner = Planner(pcfg)
    V, P, d = pcfg.vocab_size, pcfg.n_image_tokens, pcfg.d_model
    colours, shapes = torch.zeros(3, V), torch.zeros(2, V)
    colours[1, 7], colours[2, 8] = 1.0, 1.0  # colour class 1 is token 7, class 2 token 8
    shapes[1, 9], shapes[1, 10] = 0.5, 0.5  # shape class 1 has two synonyms
    labels = torch.zeros(2, 2, P, dtype=torch.long)
    labels[0, :, 3] = torch.tensor([1, 1])  # image 0, patch 3 shows (colour 1, shape 1); all else is table
    img = torch.randn(2, P, d, requires_grad=True)
    loss = planner.word_loss(img, labels, (colours, shapes))
    logp = torch.log_softmax(planner.head(img[0, 3]), -1)
    assert loss.item() == pytest.approx(-(0.5 * logp[7] + 0.25 * logp[9] + 0.25 * logp[10]).item(), rel=1e-4)
    loss.backward()
    assert img.grad[0, 3].abs().sum() > 0 and img.grad[0, :3].abs().sum() == 0 and img.grad[1].abs().sum() == 0
    assert planner.tok_emb.weight.grad[7].abs().sum() > 0  # the colour word's own embedding moves too


def test_patch_word_targets_spell_each_class_with_the_questions_tokens():
    import data
    import sim
    tok = data.get_tokenizer()
    colours, shapes = data.patch_word_targets(tok, tok.n_vocab)
    assert colours[0].sum() == 0 and shapes[0].sum() == 0  # class 0 is the bare table
    assert torch.allclose(colours[1:].sum(1), torch.ones(len(sim.PALETTE)))
    red = 1 + list(sim.PALETTE).index("red")
    assert colours[red, tok.encode(" red")[0]] == 1.0
    cube = 1 + list(sim.SHAPES + sim.CONTAINERS).index("cube")
    assert shapes[cube, tok.encode(" cube")[0]] == 0.5 and shapes[cube, tok.encode(" block")[0]] == 0.5


def test_lookup_flags_are_checked_before_any_data_is_made(capsys):
    with pytest.raises(SystemExit):
        train_grounding.parse_config(["--lookup-aux", "1", "--lookup-layer", "4"])
    assert "blocks 0..3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_grounding.parse_config(["--lookup-aux", "1", "--no-packed"])
    assert "packed rows" in capsys.readouterr().err
    assert train_grounding.parse_config(["--lookup-aux", "1", "--lookup-layer", "3"]).lookup_layer == 3
    with pytest.raises(SystemExit):
        train_grounding.parse_config(["--word-aux", "1", "--word-aux-at", "middle"])
    assert "input or output" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the word loss is on by default: --no-packed alone must say how to drop it
        train_grounding.parse_config(["--no-packed"])
    assert "--word-aux 0" in capsys.readouterr().err
    assert not train_grounding.parse_config(["--no-packed", "--word-aux", "0"]).packed


def test_stage2_variants_set_the_written_plan_and_conflicting_flags_are_refused(capsys):
    """m1 writes a plan and reads its numbers; vanilla has no spatial prompt, so no plan; both read the same
    state inputs from the same paired demonstrations. A flag that needs a switched-off one is refused with
    a message that names what else to switch off."""
    import train_action
    m1, van = train_action.parse_config([]), train_action.parse_config(["--variant", "vanilla"])
    assert m1.written_plan and m1.plan_numbers and m1.spatial_prompt
    assert not (van.written_plan or van.plan_numbers or van.spatial_prompt)
    for key in ("paired_demos", "prev_state", "use_state", "demos", "batch_size", "demo_noise"):
        assert getattr(m1, key) == getattr(van, key)
    # m1 keeps stage 1's planner frozen and takes more (cheaper) steps; vanilla trains everything, fewer steps
    assert m1.frozen_planner and not m1.cotrain and not van.frozen_planner and m1.max_steps > van.max_steps
    assert train_action.parse_config(["--preset", "smoke"]).max_steps == 20  # a preset's steps win over the variant's
    with pytest.raises(SystemExit):  # co-training a frozen planner: the message gives the paper's recipe
        train_action.parse_config(["--cotrain"])
    assert "--no-frozen-planner --cotrain" in capsys.readouterr().err
    for argv, fix in ((["--no-spatial-prompt"], "--no-written-plan --no-plan-numbers"),
                      (["--no-use-state"], "--no-prev-state --no-plan-numbers")):
        with pytest.raises(SystemExit):
            train_action.parse_config(argv)
        assert fix in capsys.readouterr().err
        assert train_action.parse_config(argv + fix.split())  # the suggested flags are enough
    import eval as evaluation  # every ablation entry is a valid set of flags
    for name, flags in evaluation.ABLATION.items():
        assert train_action.parse_config(flags), name


def test_coordinate_loss_prefers_near_misses_and_reduces_to_cross_entropy():
    # tokens 0..29 spell the numbers 0..29, tokens 30..39 are words
    pcfg = tiny_planner_config(number_values=tuple(range(30)) + (-1,) * 10, coord_sigma=1.0)
    planner = Planner(pcfg)
    targets = torch.tensor([[12, 35]])  # a number, then a word
    near, far = torch.zeros(1, 2, 40), torch.zeros(1, 2, 40)
    near[0, 0, 13] = far[0, 0, 25] = 10.0  # "13" (1 px off) against "25" (13 px off)
    near[0, 1, 35] = far[0, 1, 35] = 10.0
    assert planner.answer_loss(near, targets) < planner.answer_loss(far, targets)
    exact = torch.zeros(1, 2, 40)
    exact[0, 0] = -0.5 * (torch.arange(40.0) - 12) ** 2  # log of the Gaussian target itself ...
    exact[0, 0, 30:] = -1e4
    exact[0, 1, 35] = 30.0
    assert planner.answer_loss(exact, targets).item() == pytest.approx(0.0, abs=1e-4)  # ... scores zero
    planner.config.coord_sigma = 0.0  # plain cross-entropy, -100 ignored
    logits, t = torch.randn(2, 3, 40), torch.tensor([[3, -100, 31], [-100, 7, 0]])
    torch.testing.assert_close(planner.answer_loss(logits, t),
                               F.cross_entropy(logits.reshape(-1, 40), t.reshape(-1), ignore_index=-100))

def test_planner_attention_is_prefix_lm():
    """Text is causal (later tokens cannot change earlier hidden states), image tokens never see text."""
    pcfg = tiny_planner_config()
    planner = Planner(pcfg).eval()
    images, tokens, _, _, _, _ = tiny_batch(pcfg=pcfg)
    h1 = planner(images, tokens)[2]
    tokens2 = tokens.clone()
    tokens2[:, 6:] = (tokens2[:, 6:] + 1) % pcfg.vocab_size
    h2 = planner(images, tokens2)[2]
    P = pcfg.n_image_tokens
    torch.testing.assert_close(h1[:, : P + 6], h2[:, : P + 6])
    assert not torch.allclose(h1[:, P + 6:], h2[:, P + 6:])


def test_prompt_in_prefix_lets_the_image_read_the_question_and_keeps_the_answer_causal():
    pcfg = tiny_planner_config(prompt_in_prefix=True)
    planner = Planner(pcfg).eval()
    images, tokens, _, _, _, _ = tiny_batch(pcfg=pcfg)
    P, n_q = pcfg.n_image_tokens, 5
    prefix = torch.full((tokens.shape[0],), n_q)
    h1 = planner(images, tokens, prefix_len=prefix)[2]
    changed_answer = tokens.clone()
    changed_answer[:, n_q + 2:] = (changed_answer[:, n_q + 2:] + 1) % pcfg.vocab_size
    h2 = planner(images, changed_answer, prefix_len=prefix)[2]
    torch.testing.assert_close(h1[:, : P + n_q + 2], h2[:, : P + n_q + 2])  # nothing sees the future answer
    changed_question = tokens.clone()
    changed_question[:, n_q - 1] = (changed_question[:, n_q - 1] + 1) % pcfg.vocab_size
    h3 = planner(images, changed_question, prefix_len=prefix)[2]
    assert not torch.allclose(h1[:, :P], h3[:, :P])  # the image tokens read the (whole) question
    # generation with and without the KV cache still agree under the prefix mask
    assert planner.generate(images, tokens[:, :n_q], 6, -1) == planner.generate(images, tokens[:, :n_q], 6, -1,
                                                                                  use_cache=False)


def test_wrong_image_size_raises_a_helpful_error():
    planner = Planner(tiny_planner_config())
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 24, 24\)"):
        planner(torch.randn(2, 3, 32, 32), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="image_size"):
        planner.hidden_states(torch.randn(2, 24, 24, 3), torch.zeros(2, 4, dtype=torch.long))


def test_generate_with_kv_cache_equals_generate_without():
    torch.manual_seed(0)
    pcfg = tiny_planner_config()
    planner = Planner(pcfg)
    # train a few steps on random data so greedy decoding is not a constant token
    images, tokens, pad_mask, targets, _, _ = tiny_batch(B=4, pcfg=pcfg)
    opt = torch.optim.AdamW(planner.parameters(), lr=1e-2)
    for _ in range(10):
        loss = planner(images, tokens, targets)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    planner.eval()
    cached = planner.generate(images, tokens[:, :5], max_new_tokens=8, eos_id=-1)
    plain = planner.generate(images, tokens[:, :5], max_new_tokens=8, eos_id=-1, use_cache=False)
    assert cached == plain
    assert all(len(seq) == 8 for seq in cached)
    assert len({t for seq in cached for t in seq}) > 1
    # max_text_len caps the output; eos stops a row and is not returned
    long = planner.generate(images, tokens[:, :5], max_new_tokens=100, eos_id=-1)
    assert all(len(seq) == pcfg.max_text_len - 5 for seq in long)
    eos = cached[0][3]
    stopped = planner.generate(images[:1], tokens[:1, :5], max_new_tokens=8, eos_id=eos)
    assert stopped[0] == cached[0][: cached[0].index(eos)]
    # prompts of different lengths (right-padded) decode as if each were alone
    mixed = planner.generate(images, tokens, max_new_tokens=4, eos_id=-1, pad_mask=pad_mask)
    for b in range(4):
        n = int((~pad_mask[b]).sum())
        alone = planner.generate(images[b: b + 1], tokens[b: b + 1, :n], max_new_tokens=4, eos_id=-1)
        assert mixed[b] == alone[0]


# ----------------------------------------------------------------------------- queries and action expert


def test_queries_and_action_expert_forward_backward():
    torch.manual_seed(0)
    acfg = tiny_action_config(use_state=True)
    vla = VLA(tiny_planner_config(), acfg)
    images, tokens, pad_mask, _, actions, state = tiny_batch()
    cond = vla.condition(images, tokens, pad_mask)
    assert cond.shape == (3, acfg.n_queries, acfg.d_model)
    eps = vla.expert(torch.randn(3, 4, 6), torch.tensor([0, 50, 99]), cond, state)
    assert eps.shape == (3, 4, 6)
    loss = vla.action_loss(images, tokens, pad_mask, actions, state, n_noise=4)
    assert torch.isfinite(loss)
    loss.backward()
    for mod in (vla.queries, vla.expert):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mod.parameters())
    with pytest.raises(ValueError, match="use_state"):
        vla.expert(torch.randn(3, 4, 6), torch.tensor([0, 50, 99]), cond)


@pytest.mark.parametrize("use_state", [False, True])
def test_cached_prefix_denoising_equals_the_full_forward(use_state):
    """sample() runs the condition prefix once per chunk; each step must give exactly forward()'s noise."""
    torch.manual_seed(0)
    expert = ActionExpert(tiny_action_config(use_state=use_state)).eval()
    cond, noisy, t = torch.randn(3, 4, 32), torch.randn(3, 4, 6), torch.tensor([0, 50, 99])
    state = torch.randn(3, 6) if use_state else None
    caches = expert.encode_prefix(cond, state)
    for _ in range(2):  # twice: the frozen caches must not grow between denoising steps
        torch.testing.assert_close(expert.denoise(noisy, t, caches), expert(noisy, t, cond, state),
                                   rtol=1e-5, atol=1e-5)
    # and denoising never changes the cached prefix, whatever the noisy actions
    k0 = caches[-1]["k"].clone()
    expert.denoise(torch.randn(3, 4, 6), t, caches)
    torch.testing.assert_close(caches[-1]["k"], k0)


def test_padded_text_does_not_change_the_condition():
    torch.manual_seed(0)
    vla = VLA(tiny_planner_config(), tiny_action_config()).eval()
    images, tokens, pad_mask, _, _, _ = tiny_batch()
    cond = vla.condition(images, tokens, pad_mask)
    tokens2 = tokens.clone()
    tokens2[pad_mask] = 7  # different pad id: the queries must not notice
    torch.testing.assert_close(vla.condition(images, tokens2, pad_mask), cond)
    # and a padded row conditions exactly like the same prompt without padding
    n = int((~pad_mask[1]).sum())
    alone = vla.condition(images[1:2], tokens[1:2, :n])
    torch.testing.assert_close(cond[1:2], alone, rtol=1e-5, atol=1e-5)


def test_stored_planner_states_give_the_loss_and_gradients_of_a_frozen_planner():
    """--frozen-planner trains on hidden states computed once: the same action loss, and the same gradients
    for the queries and the DiT, as running the planner with its gradient blocked (grad_decay 0)."""
    torch.manual_seed(0)
    vla = VLA(tiny_planner_config(), tiny_action_config(use_state=True))
    images, tokens, pad_mask, _, actions, state = tiny_batch()
    losses, grads = [], []
    for states in (None, vla.planner.hidden_states(images, tokens, pad_mask)):
        vla.zero_grad()
        torch.manual_seed(1)  # the same noise and timesteps in both passes
        if states is None:
            loss = vla(images, tokens, pad_mask, actions, state, 0.0, 2)[0]
        else:  # blank pictures: only the stored states may say what the planner saw
            loss = vla(images * 0, tokens, pad_mask, actions, state, 0.0, 2,
                       planner_states=tuple(x.detach() for x in states))[0]
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in vla.queries.parameters()] + [p.grad.clone() for p in vla.expert.parameters()])
        assert all(p.grad is None for p in vla.planner.parameters())  # the planner learns nothing either way
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_param_groups_cover_every_parameter_once():
    vla = VLA(tiny_planner_config(), tiny_action_config())
    groups = vla.param_groups(1e-5, 1e-4, 5e-5, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(vla.parameters()))
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["planner"] == 1e-5 and lr["action"] == 1e-4 and lr["other"] == 5e-5
    assert count_params(vla) == count_params(vla.planner) + count_params(vla.queries) + count_params(vla.expert)


def test_a_few_steps_lower_both_losses():
    torch.manual_seed(0)
    vla = VLA(tiny_planner_config(), tiny_action_config())
    images, tokens, pad_mask, targets, actions, _ = tiny_batch()
    opt = torch.optim.AdamW(vla.param_groups(3e-3, 3e-3, 3e-3, 0.0), betas=(0.9, 0.95))

    def action_eval():
        torch.manual_seed(99)  # the same noise and timesteps each time we measure
        with torch.no_grad():
            return vla.action_loss(images, tokens, pad_mask, actions, n_noise=16).item()

    g0, a0 = vla.grounding_loss(images, tokens, targets).item(), action_eval()
    for _ in range(40):
        loss = vla.action_loss(images, tokens, pad_mask, actions) + vla.grounding_loss(images, tokens, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    g1, a1 = vla.grounding_loss(images, tokens, targets).item(), action_eval()
    assert g1 < 0.5 * g0, (g0, g1)
    assert a1 < 0.7 * a0, (a0, a1)


def test_where_head_learns_positions_and_reaches_the_planner():
    """The optional where head reads the condition tokens; its loss trains queries AND planner (x grad_decay),
    and a few steps fit a tiny batch's object/container centres."""
    torch.manual_seed(0)
    vla = VLA(tiny_planner_config(), tiny_action_config(where_head=True))
    images, tokens, pad_mask, _, actions, _ = tiny_batch()
    where = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    a_loss, g_loss, w_loss = vla(images, tokens, pad_mask, actions, None, 0.5, 2, None, where)
    assert g_loss is None and torch.isfinite(a_loss) and torch.isfinite(w_loss)
    w_loss.backward()
    assert vla.planner.lm_blocks[-1].attn.qkv.weight.grad.abs().sum() > 0  # the where loss shapes the planner too
    assert vla.expert.out.weight.grad is None  # ... but never touches the action expert
    opt = torch.optim.AdamW(vla.param_groups(3e-3, 3e-3, 3e-3, 0.0), betas=(0.9, 0.95))
    w0 = w_loss.item()
    for _ in range(60):
        loss = vla(images, tokens, pad_mask, actions, None, 0.5, 2, None, where)[2]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * w0, (w0, loss.item())
    with pytest.raises(ValueError, match="where_head"):
        VLA(tiny_planner_config(), tiny_action_config()).where_loss(torch.zeros(3, 4, 32), where)
    # a missing label (NaN: the object is in the jaws) is skipped, whatever the head says there
    cond = torch.randn(3, 4, vla.expert.config.d_model)
    holey = where.clone()
    holey[1, :2] = float("nan")
    known = ~torch.isnan(holey)
    expected = torch.nn.functional.mse_loss(vla.where(cond.mean(1))[known], where[known])
    assert torch.allclose(vla.where_loss(cond, holey), expected)


# ----------------------------------------------------------------------------- checkpoints


def test_save_then_load_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    vla = VLA(tiny_planner_config(), tiny_action_config(use_state=True)).eval()
    images, tokens, pad_mask, targets, _, state = tiny_batch()
    save_checkpoint(tmp_path / "ck", vla, {"step": 5, "norm": {"mean": [0.0] * 6}})
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    vla2, cfg = load_checkpoint(tmp_path / "ck")
    vla2.eval()
    assert cfg["step"] == 5 and cfg["model"]["kind"] == "vla"
    assert torch.equal(vla.planner(images, tokens)[0], vla2.planner(images, tokens)[0])
    a = vla.predict_actions(images, tokens, pad_mask, state, generator=torch.Generator().manual_seed(3))
    b = vla2.predict_actions(images, tokens, pad_mask, state, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (3, 4, 6)


def test_orthogonalize_keeps_the_directions_and_evens_out_the_singular_values():
    torch.manual_seed(0)
    for shape in ((128, 512), (512, 128), (64, 64)):
        u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
        v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
        s = torch.logspace(0, -2, min(shape))  # singular values spread over two orders of magnitude
        g = (u * s) @ v.T
        o = model.orthogonalize(g)
        assert o.shape == g.shape
        sv = torch.linalg.svdvals(o)
        assert sv.min() > 0.3 and sv.max() < 1.3  # every direction now moves by a similar amount ...
        cos = (o * (u @ v.T)).sum() / (o.norm() * (u @ v.T).norm())
        assert cos > 0.95  # ... and they are still the gradient's own directions (U V^T)


def test_muon_learns_and_its_state_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    target = torch.randn(32, 16)
    x = torch.randn(256, 16)

    def run(w, opt, steps):
        for _ in range(steps):
            loss = ((x @ w.T - x @ target.T) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    w = torch.nn.Parameter(torch.zeros(32, 16))
    opt = model.Muon([w], lr=0.1)
    first = run(w, opt, 1)
    assert run(w, opt, 60) < 0.2 * first  # it learns
    model.save_optimizer(tmp_path / "opt.safetensors", opt)
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = model.Muon([w2], lr=0.1)
    model.load_optimizer(tmp_path / "opt.safetensors", opt2)
    run(w, opt, 5)
    run(w2, opt2, 5)
    assert torch.equal(w, w2)  # the momentum came back: resuming continues exactly


def test_stage2_starts_from_a_planner_checkpoint(tmp_path):
    torch.manual_seed(0)
    planner = Planner(tiny_planner_config())
    save_checkpoint(tmp_path / "s1", planner, {"step": 100})
    p2, _ = load_checkpoint(tmp_path / "s1")
    assert isinstance(p2, Planner)
    vla, cfg, fresh = VLA.from_planner_checkpoint(tmp_path / "s1", tiny_action_config())
    assert cfg["step"] == 100
    assert fresh and all(k.startswith(("queries.", "expert.")) for k in fresh)
    for k, v in planner.state_dict().items():
        assert torch.equal(vla.planner.state_dict()[k], v)
    assert isinstance(vla.expert, ActionExpert)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_grounding.py"):
        load_checkpoint(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match="model"):
        save_checkpoint(tmp_path / "x", Planner(tiny_planner_config()), {"model": "mine"})


def test_policy_adds_a_relative_chunk_to_the_current_state():
    import numpy as np

    import data
    from model import Policy

    tok = data.get_tokenizer()
    vla = VLA(tiny_planner_config(vocab_size=tok.n_vocab, max_text_len=64), tiny_action_config(use_state=True))
    stats = {"action": {"low": [-1.0] * 6, "high": [1.0] * 6}, "state": {"low": [-2.0] * 6, "high": [2.0] * 6},
             "delta": {"low": [[-0.1] * 6] * 4, "high": [[0.3] * 6] * 4}}
    config = {"tokenizer": data.ranks_to_json(data.load_ranks()), "image_size": 24, "spatial_prompt": False,
              "use_state": True, "norm_stats": stats, "chunk_len": 4}
    obs = {"image": np.zeros((24, 24, 3), np.uint8), "state": np.linspace(-1, 1, 6).astype(np.float32)}
    absolute = Policy(vla, config, threads=0).predict_chunk(obs, "put the red cube in the blue bowl")
    relative = Policy(vla, {**config, "relative_actions": True}, threads=0).predict_chunk(obs, "put the red cube in the blue bowl")
    # the same network output (same seed), read once as absolute targets and once as deltas from the state
    raw = data.normalize(absolute, stats["action"])
    assert np.allclose(relative, data.unnormalize(raw, stats["delta"]) + obs["state"], atol=1e-5)


def test_model_py_runs_on_its_own():
    """`python model.py` (the README's "run it alone") builds the default model on dummy input and prints shapes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "model.py"], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sampled chunk   (2, 8, 6)" in r.stdout


def test_written_plan_is_what_the_planner_wrote_in_the_training_layout(monkeypatch):
    """With a written plan the policy first lets the planner answer the spatial prompt (a box) and the place
    question (a point), then conditions on prompt + both answers: the layout of training's teacher-forced plan
    (data.plan_tokens). The plan is written once per episode and per instruction."""
    import numpy as np

    import data
    from model import Policy

    tok = data.get_tokenizer()
    eot = tok.encode_single_token(data.EOT)
    vla = VLA(tiny_planner_config(vocab_size=tok.n_vocab, max_text_len=64), tiny_action_config())
    stats = {"action": {"low": [-1.0] * 6, "high": [1.0] * 6}, "state": {"low": [-2.0] * 6, "high": [2.0] * 6}}
    config = {"tokenizer": data.ranks_to_json(data.load_ranks()), "image_size": 24, "spatial_prompt": True,
              "written_plan": True, "use_state": False, "norm_stats": stats, "chunk_len": 4}
    policy = Policy(vla, config, threads=0)
    said = {"box": "[3,4,9,10]", "point": "(12,20)", "calls": 0}

    def fake_generate(images, tokens, n, eos):  # answers like a planner would: a box, or a point
        said["calls"] += 1
        text = tok.decode(tokens[0].tolist())
        return [tok.encode(said["box"] if "key object" in text else said["point"]) + [eot]]

    monkeypatch.setattr(vla.planner, "generate", fake_generate)
    obs = {"image": np.zeros((24, 24, 3), np.uint8), "state": np.zeros(6, np.float32)}
    instruction = "put the red cube in the blue bowl"
    _, tokens, _ = policy.condition_inputs(obs, instruction)
    assert policy.last_plan == "[3,4,9,10](12,20)"
    expected = data.encode_prompt(tok, instruction, True) + data.plan_tokens(tok, [3, 4, 9, 10], [12, 20], 24)
    assert tokens[0].tolist() == expected  # the end-of-text token is not part of the plan
    first = policy.predict_chunk(obs, instruction)
    assert said["calls"] == 2  # written once: the second call reused it
    policy.reset()
    said["box"] = "[15,16,20,21]"  # a new episode, and the planner says the object is elsewhere
    assert not np.allclose(first, policy.predict_chunk(obs, instruction))
    assert said["calls"] == 4


def test_wsd_schedule_holds_the_rate_until_its_decay_and_both_schedules_end_at_min_lr(capsys):
    cos = train_grounding.Config(max_steps=1000, warmup=10, lr=1e-3, min_lr=1e-5)
    wsd = train_grounding.Config(max_steps=1000, warmup=10, lr=1e-3, min_lr=1e-5, schedule="wsd", decay_fraction=0.2)
    assert train_grounding.lr_at(0, wsd) == train_grounding.lr_at(0, cos) == pytest.approx(1e-4)  # warm-up
    assert train_grounding.lr_at(500, wsd) == pytest.approx(1e-3) and train_grounding.lr_at(500, cos) < 6e-4
    assert train_grounding.lr_at(799, wsd) == pytest.approx(1e-3) and train_grounding.lr_at(900, wsd) < 1e-3
    assert train_grounding.lr_at(1000, wsd) == train_grounding.lr_at(1000, cos) == pytest.approx(1e-5)
    with pytest.raises(SystemExit):  # an unknown schedule is refused at the command line, with the choices
        train_grounding.parse_config(["--schedule", "linear"])
    assert "cosine or wsd" in capsys.readouterr().err


def test_curriculum_goes_from_one_object_to_two_to_full_tables():
    cfg = train_grounding.Config(curriculum_steps=500, pair_steps=300)
    phases = [train_grounding.curriculum_phase(s, cfg) for s in (0, 499, 500, 799, 800, 5000)]
    assert phases == ["one", "one", "two", "two", "full", "full"]
    assert train_grounding.curriculum_phase(0, train_grounding.Config(curriculum_steps=0, pair_steps=0)) == "full"
    assert train_grounding.curriculum_phase(0, train_grounding.Config(curriculum_steps=0, pair_steps=10)) == "two"


def test_several_samples_keep_the_medoid_so_one_odd_draw_is_outvoted(monkeypatch):
    """predict_actions(n_samples=S) draws S chunks from one condition and returns the draw nearest the others
    (a real draw, not an average): four chunks that agree and one that opens the jaws -> one of the four."""
    torch.manual_seed(0)
    vla = VLA(tiny_planner_config(), tiny_action_config()).eval()
    images, tokens, pad_mask, *_ = tiny_batch(B=2)
    draws = torch.zeros(2 * 5, 4, 6)
    draws[:5] += torch.arange(5.0).view(5, 1, 1) * 0.01  # row 0: five close draws ...
    draws[4, :, 5] = 1.0                                # ... but draw 4 opens the jaws
    draws[5:] = torch.randn(5, 4, 6)
    seen = {}

    def fake_sample(cond, state=None, steps=10, generator=None, noise_scale=1.0):
        seen["rows"] = cond.shape[0]
        return draws

    monkeypatch.setattr(vla.expert, "sample", fake_sample)
    out = vla.predict_actions(images, tokens, pad_mask, None, 5, None, 1.0, n_samples=5)
    assert seen["rows"] == 10 and out.shape == (2, 4, 6)
    assert torch.equal(out[0], draws[2])  # the middle of the four that agree
    d = torch.cdist(draws[5:].view(5, -1), draws[5:].view(5, -1)).sum(1)
    assert torch.equal(out[1], draws[5 + int(d.argmin())])


def test_a_policy_executes_the_medoid_of_several_draws_by_default(monkeypatch):
    """Policy draws model.SAMPLES (> 1) chunks per plan unless told otherwise (samples=1: a single draw)."""
    import numpy as np

    import data
    import model as model_module
    from model import Policy

    tok = data.get_tokenizer()
    vla = VLA(tiny_planner_config(vocab_size=tok.n_vocab, max_text_len=64), tiny_action_config())
    stats = {"action": {"low": [-1.0] * 6, "high": [1.0] * 6}, "state": {"low": [-2.0] * 6, "high": [2.0] * 6}}
    config = {"tokenizer": data.ranks_to_json(data.load_ranks()), "image_size": 24, "spatial_prompt": False,
              "use_state": False, "norm_stats": stats, "chunk_len": 4}
    asked = []
    real = vla.predict_actions
    monkeypatch.setattr(vla, "predict_actions", lambda *a: asked.append(a[7]) or real(*a))
    obs = {"image": np.zeros((24, 24, 3), np.uint8), "state": np.zeros(6, np.float32)}
    for kwargs in ({}, {"samples": 1}):
        Policy(vla, config, threads=0, **kwargs).act(obs, "pick up the cube")
    assert model_module.SAMPLES > 1 and asked == [model_module.SAMPLES, 1]


def test_plan_numbers_reach_the_action_expert_beside_the_state(monkeypatch):
    """A checkpoint trained with --plan-numbers: the state the DiT reads is the normalised joint state and then
    the numbers of the plan the planner wrote (data.plan_vector), as in training (DemoDataset)."""
    import numpy as np

    import data
    from model import Policy

    tok = data.get_tokenizer()
    eot = tok.encode_single_token(data.EOT)
    vla = VLA(tiny_planner_config(vocab_size=tok.n_vocab, max_text_len=64),
              tiny_action_config(use_state=True, state_dim=6 + data.PLAN_DIM))
    stats = {"action": {"low": [-1.0] * 6, "high": [1.0] * 6}, "state": {"low": [-2.0] * 6, "high": [2.0] * 6}}
    config = {"tokenizer": data.ranks_to_json(data.load_ranks()), "image_size": 24, "spatial_prompt": True,
              "written_plan": True, "plan_numbers": True, "use_state": True, "norm_stats": stats, "chunk_len": 4}
    policy = Policy(vla, config, threads=0)

    def fake_generate(images, tokens, n, eos):
        return [tok.encode("[3,4,9,10]" if "key object" in tok.decode(tokens[0].tolist()) else "(12,18)") + [eot]]

    monkeypatch.setattr(vla.planner, "generate", fake_generate)
    seen = {}
    real = vla.predict_actions

    def spy(images, tokens, pad_mask, state_norm, *args):
        seen["state"] = state_norm
        return real(images, tokens, pad_mask, state_norm, *args)

    monkeypatch.setattr(vla, "predict_actions", spy)
    state = np.array([1.0, -1.0, 0.5, 0, 0, 2.0], np.float32)
    chunk = policy.predict_chunk({"image": np.zeros((24, 24, 3), np.uint8), "state": state}, "put the red cube in the blue bowl")
    assert chunk.shape == (4, 6)
    want = np.r_[state / 2, np.array([3, 4, 9, 10, 12, 18]) / 24 * 2 - 1]
    assert np.allclose(seen["state"][0].numpy(), want, atol=1e-6)


def test_gripper_point_policies_read_the_jaws_place_from_the_joint_state(monkeypatch):
    """A --gripper-point checkpoint: after the state the DiT reads data.gripper_vector of that state (the layout
    of DemoDataset(gripper_point=True)); train_action.py refuses the flag without the state."""
    import numpy as np

    import data
    import sim
    import train_action
    from model import Policy

    tok = data.get_tokenizer()
    vla = VLA(tiny_planner_config(vocab_size=tok.n_vocab, max_text_len=64),
              tiny_action_config(use_state=True, state_dim=6 + data.GRIPPER_DIM))
    stats = {"action": {"low": [-1.0] * 6, "high": [1.0] * 6}, "state": {"low": [-2.0] * 6, "high": [2.0] * 6}}
    config = {"tokenizer": data.ranks_to_json(data.load_ranks()), "image_size": 24, "spatial_prompt": False,
              "gripper_point": True, "use_state": True, "norm_stats": stats, "chunk_len": 4}
    policy = Policy(vla, config, threads=0)
    seen = []
    real = vla.predict_actions
    monkeypatch.setattr(vla, "predict_actions", lambda im, tk, pm, st, *a: seen.append(st[0].numpy()) or real(im, tk, pm, st, *a))
    state = sim.HOME.astype(np.float32)
    policy.act({"image": np.zeros((24, 24, 3), np.uint8), "state": state}, "pick up the cube")
    assert np.allclose(seen[0], np.r_[state / 2, sim.gripper_pixel(state, 24, sim.PLACE_POINT_Z) / 24 * 2 - 1], atol=1e-6)
    with pytest.raises(SystemExit):
        train_action.parse_config(["--gripper-point", "--no-use-state", "--no-prev-state", "--no-plan-numbers"])


def test_prev_state_policies_read_the_state_of_the_previous_step(monkeypatch):
    """A --prev-state checkpoint: the DiT reads [state now, state one act() earlier]; on an episode's first
    step (after reset) the current state stands in for the missing earlier one, as in training's frame 0."""
    import numpy as np

    import data
    from model import Policy

    tok = data.get_tokenizer()
    vla = VLA(tiny_planner_config(vocab_size=tok.n_vocab, max_text_len=64), tiny_action_config(use_state=True, state_dim=12))
    stats = {"action": {"low": [-1.0] * 6, "high": [1.0] * 6}, "state": {"low": [-2.0] * 6, "high": [2.0] * 6}}
    config = {"tokenizer": data.ranks_to_json(data.load_ranks()), "image_size": 24, "spatial_prompt": False,
              "prev_state": True, "use_state": True, "norm_stats": stats, "chunk_len": 4}
    policy = Policy(vla, config, threads=0, replan_every=1)  # a new chunk at every step
    seen = []
    real = vla.predict_actions
    monkeypatch.setattr(vla, "predict_actions", lambda im, tk, pm, st, *a: seen.append(st[0].numpy()) or real(im, tk, pm, st, *a))
    image = np.zeros((24, 24, 3), np.uint8)
    s0, s1 = np.full(6, 0.4, np.float32), np.full(6, -0.8, np.float32)
    policy.act({"image": image, "state": s0}, "pick up the cube")
    policy.act({"image": image, "state": s1}, "pick up the cube")
    assert np.allclose(seen[0], np.r_[s0, s0] / 2) and np.allclose(seen[1], np.r_[s1, s0] / 2)
    policy.reset()  # a new episode forgets the old state
    policy.act({"image": image, "state": s1}, "pick up the cube")
    assert np.allclose(seen[2], np.r_[s1, s1] / 2)


def test_weights_average_follows_the_warmed_up_decay():
    """train_action.update_average: avg <- decay * avg + (1 - decay) * weights, decay = min(ema, (1+step)/(10+step))."""
    import train_action
    avg, w = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    a0 = avg.weight.detach().clone()
    assert train_action.update_average(avg, w, 0, 0.999) == pytest.approx(0.1)  # warm-up: mostly the new weights
    assert torch.allclose(avg.weight, 0.1 * a0 + 0.9 * w.weight)
    a1 = avg.weight.detach().clone()
    assert train_action.update_average(avg, w, 10**6, 0.99) == pytest.approx(0.99)  # later: the ema setting
    assert torch.allclose(avg.weight, 0.99 * a1 + 0.01 * w.weight)


def test_temporal_ensembling_averages_the_overlapping_chunks_newest_weighted_most(monkeypatch):
    """Policy(ensemble=w): chunks planned every 2 steps, 4 long, overlap by 2 steps. The action at a step is the
    weighted mean of the chunks covering it (newest weight 1, the one before w); w = 0 keeps the old behaviour
    (execute the newest chunk's first replan_every actions)."""
    import numpy as np

    import data
    from model import Policy

    tok = data.get_tokenizer()
    vla = VLA(tiny_planner_config(vocab_size=tok.n_vocab, max_text_len=64), tiny_action_config())
    config = {"tokenizer": data.ranks_to_json(data.load_ranks()), "image_size": 24, "spatial_prompt": False,
              "use_state": False, "norm_stats": {"action": {"low": [0.0] * 6, "high": [2.0] * 6}}, "chunk_len": 4}
    obs = {"image": np.zeros((24, 24, 3), np.uint8), "state": np.zeros(6, np.float32)}
    for w in (0.0, 0.5):
        policy = Policy(vla, config, threads=0, replan_every=2, ensemble=w)
        chunks = iter([np.tile(np.arange(4.0)[:, None], (1, 6)), np.tile(5 + np.arange(4.0)[:, None], (1, 6))])
        monkeypatch.setattr(policy, "predict_chunk", lambda o, i: next(chunks))  # (4, 6): 0 1 2 3, then 5 6 7 8
        got = [policy.act(obs, "pick up the cube")[0] for _ in range(4)]
        if w == 0:
            assert got == [0.0, 1.0, 5.0, 6.0]  # chunk 0's first two, then chunk 1's first two
        else:  # steps 2, 3: chunk 0 says 2, 3 (weight 0.5), chunk 1 says 5, 6 (weight 1)
            assert np.allclose(got, [0.0, 1.0, (0.5 * 2 + 5) / 1.5, (0.5 * 3 + 6) / 1.5])
    with pytest.raises(ValueError, match="ensemble"):
        Policy(vla, config, threads=0, ensemble=1.5)
