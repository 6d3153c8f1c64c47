"""
model.py -- every network of tiny-m1 in one file: the planner (a small vision-language model, "System 2"),
the latent planning queries, the diffusion action expert ("System 1"), the noise schedule with DDIM sampling,
the gradient decay between them, the Muon optimizer stage 1 trains with, and safetensors checkpoints.

This is a teaching-scale copy of InternVLA-M1 (see the paper notes in reference/paper.md):

  image (B,3,96,96)
     |  ViT: 12x12 patches -> 64 patch tokens, learned positions, pre-LN blocks
     v
  patch tokens (B,64,d) --projector--+
                                     |                                 stage 1: next-token loss on
  prompt tokens (B,L) --embed------->+--> language transformer ---+--> the answer tokens (grounding)
                                         (prefix-LM attention)    |
                                                                  v
                                               hidden (B,64+L,d), last layer (k = 1)
                                                                  |  x 0.5 on the way back (gradient decay)
                                                                  v
                          K learnable queries --cross-attend--> querying transformer --> cond (B,K,d_act)
                                                                                            |
  [ cond (K) ; state (1, optional) | timestep (1) ; noisy actions (Hc) ] --DiT self-attn---+
                                                                     read at the Hc action positions
                                                                                            v
                                                                       predicted noise eps (B,Hc,6)

Attention patterns
- ViT: all patches see all patches.
- Language transformer: prefix-LM. Image tokens attend bidirectionally among themselves (they never see text);
  text tokens are causal among themselves and see every image token. Text is RIGHT-padded, so a real token
  never attends to a pad (pads come after it); pads only produce garbage hidden states that nobody reads: the
  loss ignores them (targets -100) and the querying transformer masks them out with a key padding mask.
- Querying transformer: queries cross-attend to the planner's hidden states (pads masked), then self-attend.
- Action expert: self-attention over the prefix-concatenated sequence [cond; (state) | timestep; actions] (no
  adaLN: the condition enters only as tokens in front of the action tokens, as in the paper). The step
  tokens see everything; the prefix sees only itself, so its keys/values are computed once per chunk and
  reused by all 10 DDIM steps (see ActionExpert).

Conventions the other files rely on
- `images`: float (B,3,H,W) already normalised by data.py; H = W = PlannerConfig.image_size or ValueError.
- `tokens`: int64 (B,L), right-padded. `pad_mask`: bool (B,L), True where a token is PADDING (None = no pads).
- `targets`: int64 (B,L), already shifted nanoGPT-style: logits at text position i are scored against
  targets[:, i] (the token that follows tokens[:, i]); -100 everywhere that is not an answer token.
- actions and states are normalised to [-1, 1] by data.py; the model only ever sees normalised values.

Glossary (paper name -> code name)
  planner / VLM / System 2                 -> Planner (vit_* + lm_* modules)
  vision encoder (ViT)                     -> Planner.patch_embed, Planner.vit_blocks
  projector / merger                       -> Planner.projector
  last-layer hidden states (k = 1)         -> `hidden` returned by Planner.forward / hidden_states
  latent planning queries                  -> QueryTransformer.queries (K = ActionExpertConfig.n_queries)
  querying transformer                     -> QueryTransformer
  condition tokens                         -> `cond` (B,K,d_act)
  action expert / DiT / System 1           -> ActionExpert
  action chunk, chunk length               -> actions (B,Hc,6), ActionExpertConfig.chunk_len = Hc
  squaredcos_cap_v2, T = 100               -> NoiseSchedule(num_train_timesteps=100)
  epsilon prediction                       -> ActionExpert returns predicted noise
  DDIM, 10 steps                           -> NoiseSchedule.ddim_sample(steps=10)
  repeated diffusion samples (x4)          -> n_noise_samples / n_noise
  gradient decay (0.5)                     -> scale_grad(hidden, grad_decay)
  co-training grounding loss               -> VLA.grounding_loss (the caller weights it 0.1)

Run `python model.py` to build the default model on dummy input, print every stage's shape, the parameter
counts and the time for one action chunk; `python model.py --bench-train` also measures planner training
throughput at batch 64.
"""

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# -----------------------------------------------------------------------------
# configs


@dataclass
class PlannerConfig:
    image_size: int = 96  # the planner's input image is image_size x image_size pixels
    patch_size: int = 12  # 96/12 = 8 -> 8x8 = 64 image tokens; token count dominates CPU training time
    vocab_size: int = 512  # set from the tokenizer (data.py); 512 fits a ~400-token BPE plus specials
    d_model: int = 128  # one width for ViT and language transformer keeps the projector a square Linear
    vit_layers: int = 2
    lm_layers: int = 4
    n_heads: int = 4
    max_text_len: int = 64  # prompt + answer tokens; learned text positions exist up to this length
    dropout: float = 0.0
    conv_stem: bool = True  # a 3-layer conv stem instead of one linear patch cut (see Planner)
    # attention over [image; text]: False = only the image is a bidirectional prefix, all text is causal
    # (several questions can then be packed into one training row); True = image AND question/prompt form
    # the prefix (PaliGemma's prefix-LM: the image can read the question), the answer is causal
    prompt_in_prefix: bool = False
    # number_values[i] = the integer that token i spells (e.g. "47" -> 47), -1 for other tokens; data.py
    # fills it from the tokenizer. Empty: no value embedding.
    number_values: tuple = ()
    # coordinates are ordered: a number token is scored against a Gaussian over its neighbours (std in pixels),
    # so "46" for a true "47" costs little and "10" a lot (see Planner.answer_loss). 0 = plain cross-entropy.
    coord_sigma: float = 1.0
    # class counts of an auxiliary head on the image tokens that names what each patch shows (colour, shape;
    # data.patch_classes). Empty: no head. Only stage 1 trains it (train_grounding.py --patch-aux).
    patch_classes: tuple = ()
    # True: the output head is the token embedding itself (GPT-2's weight tying). False: a separate output
    # matrix, so the words' embeddings serve only as inputs (answers never contain words, and a tied head keeps
    # pushing every word's embedding away from the final hidden states)
    tie_head: bool = True

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ActionExpertConfig:
    chunk_len: int = 8  # Hc: actions predicted per plan (paper: 8 on LIBERO, 16 on SimplerEnv)
    action_dim: int = 6  # 5 joints + gripper of the SO-100 arm
    state_dim: int = 6
    use_state: bool = True  # the joint angles as one more condition token. The paper's released models drop it
                            # (it hurt their out-of-distribution generalisation); here, without it, the wrist
                            # roll and the gripper (a few pixels at 96x96) are off by 40 and 22 deg (EXPERIMENTS.md)
    d_model: int = 128  # d_act: width of queries, condition tokens and DiT
    n_layers: int = 4
    n_heads: int = 4
    n_queries: int = 16  # K latent planning queries (64 in the released code, fewer tokens here)
    query_layers: int = 1
    # a linear "where" readout on the mean condition token, trained to say where the key object and the
    # container are (see VLA.where_loss). Off in the paper; here the condition tokens otherwise carry almost
    # no position (a linear probe finds R^2 ~0.15 for the object's x, EXPERIMENTS.md)
    where_head: bool = False
    num_train_timesteps: int = 100
    dropout: float = 0.0


# -----------------------------------------------------------------------------
# building blocks shared by every transformer in the file


class Attention(nn.Module):
    """Multi-head attention. Self-attention when `context` is None, cross-attention otherwise.
    `mask` is boolean, broadcastable to (B, nh, T, S), True = may attend (the F.sdpa convention).
    `cache` is a dict owned by the caller; when given, this call's keys/values are appended to it and the
    queries attend to everything cached so far (used for greedy decoding). With `cache={"frozen": True, ...}`
    the cached keys/values are read but never grown (the action expert's fixed condition prefix)."""

    def __init__(self, d, n_heads, dropout=0.0):
        super().__init__()
        assert d % n_heads == 0
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)  # one matmul for q, k, v: on a 2-core CPU every call counts
        self.proj = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x, context=None, mask=None, cache=None):
        B, T, d = x.shape
        nh, hs = self.n_heads, d // self.n_heads
        if context is None:
            q, k, v = self.qkv(x).split(d, dim=2)  # 3 x (B, T, d)
        else:  # cross-attention: queries from x, keys/values from context, same weights split in two
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:d], b[:d])  # (B, T, d)
            k, v = F.linear(context, w[d:], b[d:]).split(d, dim=2)  # 2 x (B, S, d)
        S = k.shape[1]
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, S, nh, hs).transpose(1, 2)  # (B, nh, S, hs)
        v = v.view(B, S, nh, hs).transpose(1, 2)  # (B, nh, S, hs)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, nh, S_past + S, hs)
                v = torch.cat([cache["v"], v], dim=2)
            if not cache.get("frozen"):
                cache["k"], cache["v"] = k, v
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d, dropout=0.0):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.dropout = dropout

    def forward(self, x):
        x = self.proj(F.gelu(self.fc(x)))  # exact GELU: on a CPU in bfloat16 ~2.5x faster than the tanh form
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x)). Used by the ViT, the language model and
    the DiT (the DiT needs nothing more: its condition arrives as prefix tokens)."""

    def __init__(self, d, n_heads, dropout=0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, dropout)
        self.dropout = dropout

    def forward(self, x, mask=None, cache=None):
        a = self.attn(self.ln1(x), mask=mask, cache=cache)
        x = x + (F.dropout(a, self.dropout, self.training) if self.dropout > 0 else a)
        x = x + self.mlp(self.ln2(x))
        return x


def init_weights(module):
    """GPT-2 style init: small normal weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------
# the planner: ViT + language transformer (System 2)


def sincos_2d(grid: int, d: int) -> torch.Tensor:
    """Fixed 2D position code (1, grid*grid, d): half the channels encode the row, half the column."""
    pos = torch.arange(grid, dtype=torch.float32)
    freqs = 1.0 / (100.0 ** (torch.arange(d // 4, dtype=torch.float32) / max(1, d // 4)))  # (d/4,)
    ang = pos[:, None] * freqs[None]  # (grid, d/4)
    code = torch.cat([ang.sin(), ang.cos()], dim=1)  # (grid, d/2)
    rows = code[:, None, :].expand(grid, grid, -1)
    cols = code[None, :, :].expand(grid, grid, -1)
    out = torch.cat([rows, cols], dim=2).reshape(1, grid * grid, -1)  # (1, P, 2 * (d/2))
    return F.pad(out, (0, d - out.shape[2])) * 0.5  # comparable in size to the learned embeddings


def number_embedding(values, vocab_size: int, d: int) -> torch.Tensor:
    """(vocab_size, d): sines/cosines of each number token's value (periods 4 .. 512 px), zero for other tokens."""
    emb = torch.zeros(vocab_size, d)
    if not values:
        return emb
    v = torch.tensor(list(values), dtype=torch.float32)  # (V,)
    periods = 4.0 * (128.0 ** (torch.arange(d // 2, dtype=torch.float32) / max(1, d // 2 - 1)))  # (d/2,)
    ang = 2 * math.pi * v[:, None] / periods[None]  # (V, d/2)
    code = torch.cat([ang.sin(), ang.cos()], dim=1) / math.sqrt(d / 2)  # unit norm per token
    emb[: len(values), : code.shape[1]] = torch.where(v[:, None] >= 0, code, torch.zeros_like(code))
    return emb


class Planner(nn.Module):
    def __init__(self, config: PlannerConfig):
        super().__init__()
        c = self.config = config
        if c.image_size % c.patch_size != 0:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        d, P = c.d_model, c.n_image_tokens
        # vision encoder. The plain ViT cut: a strided conv is exactly "cut into patches, flatten, Linear".
        # Our objects are ~6 px, half a patch, and the answers need ~1 px precision, so by default a small conv
        # stem (3x3 convs at 1/2 and 1/4 resolution, then a patch_size/4 cut) builds local colour/edge features
        # before the cut -- "early convolutions help transformers see better" (Xiao et al., 2021). Same token count.
        if c.conv_stem:
            if c.patch_size % 4:
                raise ValueError(f"conv_stem needs patch_size divisible by 4, got {c.patch_size}")
            self.patch_embed = nn.Sequential(
                nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GELU(),      # (B, 32, H/2, W/2)
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),     # (B, 64, H/4, W/4)
                nn.Conv2d(64, d, c.patch_size // 4, stride=c.patch_size // 4))  # (B, d, H/ps, W/ps)
        else:
            self.patch_embed = nn.Conv2d(3, d, kernel_size=c.patch_size, stride=c.patch_size)
        # positions: a fixed 2D sine/cosine map (each token knows its row and column from step 0, which is
        # what answers in pixel coordinates need) plus a learned correction
        g = c.image_size // c.patch_size
        self.register_buffer("vit_pos_fixed", sincos_2d(g, d), persistent=False)  # (1, P, d)
        self.vit_pos = nn.Parameter(torch.zeros(1, P, d))
        self.vit_blocks = nn.ModuleList([Block(d, c.n_heads, c.dropout) for _ in range(c.vit_layers)])
        self.vit_ln = nn.LayerNorm(d)
        self.projector = nn.Linear(d, d)  # maps vision features into the language model's embedding space
        # language transformer
        self.tok_emb = nn.Embedding(c.vocab_size, d)
        # number tokens also carry a fixed embedding of their value (sines/cosines of the number), so "47" starts
        # out close to "46" and "48": with the tied output head, writing a coordinate becomes pointing at a place
        # on a smooth number line instead of picking one of ~100 unrelated classes
        self.register_buffer("value_emb", number_embedding(c.number_values, c.vocab_size, d), persistent=False)
        vals = torch.full((c.vocab_size,), -1.0)
        vals[: len(c.number_values)] = torch.tensor(list(c.number_values), dtype=torch.float32)
        self.register_buffer("number_vals", vals, persistent=False)  # (V,) the value of each number token, else -1
        self.txt_pos = nn.Embedding(c.max_text_len, d)  # text positions restart at 0 after the image
        self.drop = nn.Dropout(c.dropout)
        self.lm_blocks = nn.ModuleList([Block(d, c.n_heads, c.dropout) for _ in range(c.lm_layers)])
        self.ln_f = nn.LayerNorm(d)
        if c.patch_classes:  # see patch_loss
            self.patch_head = nn.Linear(d, sum(c.patch_classes))
        if not c.tie_head:
            self.out_emb = nn.Embedding(c.vocab_size, d)  # the output head's own matrix (see tie_head)
        # by default the output head reuses tok_emb.weight (weight tying, as in GPT-2); no separate parameter, so the
        # safetensors file never holds two names for one tensor
        # prefix-LM mask over [image; text], True = may attend
        N = P + c.max_text_len
        mask = torch.tril(torch.ones(N, N, dtype=torch.bool))
        mask[:P, :P] = True  # image tokens see each other both ways (and never see text)
        self.register_buffer("attn_mask", mask, persistent=False)
        init_weights(self)
        nn.init.normal_(self.vit_pos, std=0.02)
        if c.conv_stem:
            # GPT-2's std 0.02 would shrink the image ~10x per conv layer: three of them leave the picture
            # ~1000x smaller than the position embeddings, and the planner learns to ignore it. Convolutions
            # get He initialisation (the standard for conv nets), which keeps the signal's size through the stem.
            for m in self.patch_embed:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    # -- pieces -------------------------------------------------------------
    def check_images(self, images):
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(
                f"the planner expects images of shape (B, 3, {s}, {s}) (config.image_size = {s}), got "
                f"{tuple(images.shape)}; resize/normalise them with the preprocessing function in data.py, the "
                f"same one used for training"
            )

    def encode_images(self, images):
        self.check_images(images)
        x = self.patch_embed(images)  # (B, d, H/ps, W/ps)
        x = x.flatten(2).transpose(1, 2) + self.vit_pos_fixed + self.vit_pos  # (B, P, d)
        for blk in self.vit_blocks:
            x = blk(x)  # full attention among patches
        return self.projector(self.vit_ln(x))  # (B, P, d) image tokens for the language model

    def embed_text(self, tokens, start=0, positions=None):
        L = tokens.shape[1]
        if positions is None:
            if start + L > self.config.max_text_len:
                raise ValueError(f"text of {start + L} tokens is longer than max_text_len={self.config.max_text_len}")
            pos = torch.arange(start, start + L, device=tokens.device)
        else:  # packed rows: positions restart at 0 for every question
            pos = positions.clamp(max=self.config.max_text_len - 1)
        return self.tok_emb(tokens) + self.value_emb[tokens] + self.txt_pos(pos)  # (B, L, d)

    def head(self, h):
        w = self.tok_emb.weight if self.config.tie_head else self.out_emb.weight
        return F.linear(h, w + self.value_emb)  # (..., vocab_size)

    def packed_mask(self, segments):
        """Attention mask (B, 1, P+L, P+L) for rows that pack several questions about one image.

        segments (B, L): which question each text token belongs to (0, 1, 2, ...; -1 for padding). Each text
        token sees every image token and the earlier tokens of its own question only, so a packed row trains
        exactly like separate rows, but the image is encoded once for all its questions (~3x less compute)."""
        B, L = segments.shape
        P = self.config.n_image_tokens
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)  # (B, L, L)
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=segments.device))
        mask = torch.zeros(B, P + L, P + L, dtype=torch.bool, device=segments.device)
        mask[:, :, :P] = True                  # everyone sees the image ...
        mask[:, :P, P:] = False                # ... and the image never sees text
        mask[:, P:, P:] = same & causal        # text: causal within its own question
        return mask[:, None]

    def prefix_mask(self, T, prefix_len):
        """(B, 1, T, T) mask where the image AND the first prefix_len[b] text tokens (the question or prompt)
        attend to each other both ways; the rest (the answer) is causal. PaliGemma's prefix-LM: image tokens
        can read the question, so "am I the red cube?" is computed where the red cube is, and the answer only
        has to look for the token that lit up."""
        P = self.config.n_image_tokens
        idx = torch.arange(T, device=prefix_len.device)
        causal = idx[None, :] <= idx[:, None]                       # (T, T)
        in_prefix = idx[None, :] < (P + prefix_len)[:, None]        # (B, T)
        return (causal[None] | (in_prefix[:, :, None] & in_prefix[:, None, :]))[:, None]

    def _hidden(self, images, tokens, caches=None, segments=None, positions=None, prefix_len=None):
        img = self.encode_images(images)  # (B, P, d)
        x = self.drop(torch.cat([img, self.embed_text(tokens, positions=positions)], dim=1))  # (B, P+L, d)
        T = x.shape[1]
        # prefix-LM over [image; question] when prefix_len is given; per-question masks for packed rows;
        # otherwise the image-only prefix (image bidirectional, all text causal)
        if not self.config.prompt_in_prefix:
            prefix_len = None  # this planner was trained with the image-only prefix: keep it so
        if segments is not None:
            if self.config.prompt_in_prefix:
                raise ValueError("packed rows need prompt_in_prefix=False (the image must not read the questions)")
            mask = self.packed_mask(segments)
        elif prefix_len is not None:
            mask = self.prefix_mask(T, prefix_len)
        else:
            mask = self.attn_mask[:T, :T]
        for i, blk in enumerate(self.lm_blocks):
            x = blk(x, mask=mask, cache=None if caches is None else caches[i])
        return self.ln_f(x)  # (B, P+L, d)

    # -- public -------------------------------------------------------------
    def forward(self, images, tokens, targets=None, segments=None, positions=None, prefix_len=None):
        """images (B,3,H,W) float, tokens (B,L) int64 right-padded, targets (B,L) int64 shifted, -100 = ignore.
        segments/positions (B,L): only for packed rows (several questions per image, see packed_mask).
        prefix_len (B,): text tokens of the bidirectional prefix (question up to <|answer|>), see prefix_mask.
        Returns logits (B,L,V) at the text positions, the mean next-token loss (or None), hidden (B,P+L,d)."""
        hidden = self._hidden(images, tokens, segments=segments, positions=positions, prefix_len=prefix_len)
        logits = self.head(hidden[:, self.config.n_image_tokens :])  # (B, L, V)
        loss = self.answer_loss(logits, targets) if targets is not None else None
        return logits, loss, hidden

    def answer_loss(self, logits, targets):
        """Mean loss over the answer tokens (targets != -100). Words and brackets: cross-entropy. Number tokens:
        the KL divergence from a Gaussian over neighbouring numbers (std coord_sigma) to the prediction -- the
        same gradient as cross-entropy against that soft target, shifted so a perfect answer scores 0. With
        one-hot targets a prediction 1 px off is as wrong as one 50 px off; this tells the model which way to go."""
        V = logits.shape[-1]
        logits, targets = logits.reshape(-1, V), targets.reshape(-1)
        keep = targets != -100
        logp = F.log_softmax(logits[keep].float(), dim=-1)  # (N, V)
        targets = targets[keep]  # (N,)
        hard = -logp.gather(1, targets[:, None])[:, 0]  # (N,) plain cross-entropy
        if self.config.coord_sigma <= 0 or not self.config.number_values:
            return hard.mean()
        vals = self.number_vals  # (V,)
        tv = vals[targets]  # (N,) the true value, -1 where the target is not a number
        w = torch.exp(-0.5 * ((vals[None] - tv[:, None]) / self.config.coord_sigma) ** 2) * (vals >= 0)[None]  # (N, V)
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        kl = (w * (w.clamp_min(1e-12).log() - logp)).sum(1)  # (N,)
        return torch.where(tv >= 0, kl, hard).mean()

    def patch_loss(self, hidden, labels):
        """Auxiliary loss: name what each image patch shows. hidden (B,P+L,d) from forward, labels (B,K,P) int64
        (data.patch_labels: K = 2, colour and shape, 0 = table). Cross-entropy of a linear head on the last
        layer's image tokens, averaged over patches and the K label kinds.
        Why: the paper starts from a VLM that already knows what "red" and "cube" look like; this planner starts
        from scratch and must discover it from the answers alone. Measured: the head learns at once, the answers
        do not improve (EXPERIMENTS.md, "Is it the eyes or the words?")."""
        logits = self.patch_head(hidden[:, : self.config.n_image_tokens]).float()  # (B, P, sum(classes))
        losses = [F.cross_entropy(part.flatten(0, 1), labels[:, k].flatten())
                  for k, part in enumerate(logits.split(list(self.config.patch_classes), dim=-1))]
        return sum(losses) / len(losses)

    def word_loss(self, img, labels, word_targets):
        """Auxiliary loss: each image token names what its patch shows in the planner's own words. img (B,P,d)
        image tokens (as they enter the language model, or its last layer), labels (B,2,P) int64
        (data.patch_labels: colour, shape; 0 = table), word_targets (colours (C+1,V), shapes (S+1,V)) from
        data.patch_word_targets. The output head (the token embedding when tied) scores the vocabulary at each
        patch that shows an item; the target puts half its mass on the colour word, half on the shape's words.
        Why: --patch-aux taught the image tokens colour and shape in a code of their own, and the answers did
        not improve; here the code is the words' embeddings themselves, so "red" in the question and a red
        patch start out as the same direction and the look-up only has to match like with like."""
        colours, shapes = (t.to(img.device) for t in word_targets)
        logp = F.log_softmax(self.head(img).float(), dim=-1)  # (B, P, V)
        target = 0.5 * colours[labels[:, 0]] + 0.5 * shapes[labels[:, 1]]  # (B, P, V)
        keep = labels[:, 0] > 0  # (B, P) patches that show an item
        return -(target[keep] * logp[keep]).sum(-1).mean()

    def lookup_loss(self, x_in, layer: int, targets):
        """Auxiliary loss: make one attention head look where the answer lies. x_in (B,P+L,d) is the input of
        language block `layer` (caught by a forward pre-hook, see train_grounding.py), targets (B,L,P) a
        distribution over the image patches for each text position (data.lookup_target; all-zero rows: none).
        Head 0's attention logits from each text position to the P image tokens, softmaxed over the image
        alone, are pulled towards the target (cross-entropy).
        Why: the patch-aux experiment showed the image tokens know "red cube here" early; what takes thousands
        of steps is the words learning to fetch that patch. This supervises the fetch itself."""
        blk, P = self.lm_blocks[layer], self.config.n_image_tokens
        d = x_in.shape[-1]
        hs = d // self.config.n_heads
        h = blk.ln1(x_in)
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias  # rows: q (d), k (d), v (d); head 0 = the first hs of each
        q = F.linear(h[:, P:], w[:hs], b[:hs])  # (B, L, hs) head 0's queries at the text positions
        k = F.linear(h[:, :P], w[d:d + hs], b[d:d + hs])  # (B, P, hs) head 0's keys at the image tokens
        logits = (q @ k.transpose(1, 2)).float() / math.sqrt(hs)  # (B, L, P)
        keep = targets.sum(-1) > 0  # (B, L) answer positions of box / point / place questions
        logp = F.log_softmax(logits[keep], dim=-1)  # (N, P)
        return -(targets[keep] * logp).sum(-1).mean()

    def hidden_states(self, images, tokens, pad_mask=None):
        """For stage 2 and control: no decoding, just the last layer. Returns hidden (B,P+L,d) and a key padding
        mask (B,P+L) (True = pad, image positions never pads) or None when pad_mask is None."""
        n_real = tokens.shape[1] - (pad_mask.long().sum(1) if pad_mask is not None else 0)
        prefix_len = torch.as_tensor(n_real, device=tokens.device).expand(tokens.shape[0])
        hidden = self._hidden(images, tokens, prefix_len=prefix_len)  # the whole prompt is the prefix
        key_pad = None
        if pad_mask is not None:
            img_pad = torch.zeros(tokens.shape[0], self.config.n_image_tokens, dtype=torch.bool, device=tokens.device)
            key_pad = torch.cat([img_pad, pad_mask.bool()], dim=1)  # (B, P+L)
        return hidden, key_pad

    @torch.no_grad()
    def generate(self, images, tokens, max_new_tokens, eos_id, pad_mask=None, use_cache=True):
        """Greedy decoding. Returns one list of new token ids per row, cut before the first eos (eos itself is
        not included). Prompts must be right-padded; rows of different lengths (given by pad_mask) are decoded
        in groups of equal length, so no row ever attends to a pad. The caller sets eval mode."""
        if pad_mask is None:
            return self._generate_same_len(images, tokens, max_new_tokens, eos_id, use_cache)
        lengths = (~pad_mask.bool()).sum(1)  # (B,)
        expected = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= lengths[:, None]
        if not torch.equal(expected, pad_mask.bool()):
            raise ValueError("generate needs right-padded prompts (pads only after the last real token)")
        out = [None] * tokens.shape[0]
        for n in lengths.unique().tolist():
            rows = (lengths == n).nonzero().squeeze(1)
            res = self._generate_same_len(images[rows], tokens[rows, :n], max_new_tokens, eos_id, use_cache)
            for r, seq in zip(rows.tolist(), res):
                out[r] = seq
        return out

    def _generate_same_len(self, images, tokens, max_new_tokens, eos_id, use_cache):
        B, L = tokens.shape
        n_new = min(max_new_tokens, self.config.max_text_len - L)  # text positions end at max_text_len
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        prefix = torch.full((B,), L, device=tokens.device)  # the whole prompt is the prefix
        if use_cache:
            caches = [dict() for _ in self.lm_blocks]
            # prefill: image + question as one bidirectional prefix; answer tokens then attend to all of it
            logits = self.head(self._hidden(images, tokens, caches, prefix_len=prefix)[:, -1])  # (B, V)
        else:
            seq = tokens
            logits = self.forward(images, seq, prefix_len=prefix)[0][:, -1]
        for i in range(n_new):
            nxt = logits.argmax(-1)  # (B,)
            for b, token in enumerate(nxt.tolist()):
                if not done[b]:
                    if token == eos_id:
                        done[b] = True
                    else:
                        out[b].append(token)
            if bool(done.all()) or i == n_new - 1:
                break
            if use_cache:
                x = self.embed_text(nxt[:, None], start=L + i)  # (B, 1, d)
                for blk, cache in zip(self.lm_blocks, caches):
                    x = blk(x, cache=cache)  # one new query attends to all cached keys: no mask needed
                logits = self.head(self.ln_f(x[:, -1]))  # (B, V)
            else:
                seq = torch.cat([seq, nxt[:, None]], dim=1)  # recompute everything: the reference path
                logits = self.forward(images, seq, prefix_len=prefix)[0][:, -1]
        return out


# -----------------------------------------------------------------------------
# gradient decay: identity forward, scaled gradient backward


class GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x, factor: float):
    """The action loss reaches the planner times `factor` (0.5 in the paper) so action training does not wash
    out the spatial knowledge of stage 1. factor 0 blocks it completely (a frozen planner for this loss)."""
    if factor == 1.0:
        return x
    if factor == 0.0:
        return x.detach()
    return GradScale.apply(x, factor)


# -----------------------------------------------------------------------------
# latent planning queries


class QueryBlock(nn.Module):
    """queries <- cross-attention to the planner, then self-attention among queries, then MLP (all pre-LN)."""

    def __init__(self, d, n_heads, dropout=0.0):
        super().__init__()
        self.ln_q = nn.LayerNorm(d)
        self.cross = Attention(d, n_heads, dropout)
        self.ln_s = nn.LayerNorm(d)
        self.self_attn = Attention(d, n_heads, dropout)
        self.ln_m = nn.LayerNorm(d)
        self.mlp = MLP(d, dropout)

    def forward(self, x, ctx, ctx_mask=None):
        x = x + self.cross(self.ln_q(x), context=ctx, mask=ctx_mask)
        x = x + self.self_attn(self.ln_s(x))
        x = x + self.mlp(self.ln_m(x))
        return x


class QueryTransformer(nn.Module):
    def __init__(self, d_in, d, n_queries, n_layers, n_heads, dropout=0.0):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(1, n_queries, d))
        self.ctx_proj = nn.Linear(d_in, d)  # planner width -> action width
        self.blocks = nn.ModuleList([QueryBlock(d, n_heads, dropout) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d)
        init_weights(self)
        nn.init.normal_(self.queries, std=0.02)

    def forward(self, hidden, key_pad=None):
        """hidden (B,S,d_in) planner states, key_pad (B,S) True = pad -> condition tokens (B,K,d)."""
        B = hidden.shape[0]
        ctx = self.ctx_proj(hidden)  # (B, S, d)
        mask = None if key_pad is None else (~key_pad)[:, None, None, :]  # (B, 1, 1, S) True = attend
        x = self.queries.expand(B, -1, -1)  # (B, K, d)
        for blk in self.blocks:
            x = blk(x, ctx, mask)
        return self.ln_f(x)  # (B, K, d)


# -----------------------------------------------------------------------------
# diffusion: squaredcos_cap_v2 schedule, forward noising, DDIM sampling


class NoiseSchedule:
    """DDPM noise schedule with the squared-cosine alpha-bar of Nichol & Dhariwal (diffusers' squaredcos_cap_v2).
    Kept in float64: near t = T-1 alpha_bar is ~1e-7 and float32 would lose the clean signal."""

    def __init__(self, num_train_timesteps=100, s=0.008, max_beta=0.999):
        T = self.num_train_timesteps = num_train_timesteps

        def alpha_bar(u):  # u in [0, 1]
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
        self.betas = torch.tensor(betas, dtype=torch.float64)  # (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) alpha_bar_t, ends near 0

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise; x0, noise (B,...), t (B,) int64."""
        ab = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)
        ab = ab.view(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1) broadcast over the chunk
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def ddim_timesteps(self, steps):
        """'trailing' spacing: starts at T-1 (near-pure noise), e.g. 99, 89, ..., 9 for 10 steps of 100."""
        T = self.num_train_timesteps
        return [int(round(T - i * T / steps)) - 1 for i in range(steps)]

    @torch.inference_mode()  # like no_grad, minus autograd's version tracking: faster at batch 1
    def ddim_sample(self, model_fn, shape, steps=10, generator=None, eta=0.0, x_T=None, clip_sample=True):
        """DDIM from x_T to x_0. model_fn(x_t (B,...) float32, t (B,) int64) -> predicted noise.
        Deterministic given a seeded torch.Generator (it draws x_T and, when eta > 0, the extra noise).
        The update runs in float64 (the model still sees float32): if model_fn returns the exact noise used to
        make x_T, the result equals x_0 to ~1e-12. clip_sample clamps the x_0 estimate to [-1, 1], the range of
        normalised actions; it changes nothing when the estimate is already inside."""
        if x_T is None:
            x_T = torch.randn(shape, generator=generator)
        out_dtype = x_T.dtype
        x = x_T.double()
        B = x.shape[0]
        acp = self.alphas_cumprod.to(x.device)
        ts = self.ddim_timesteps(steps)
        for i, t in enumerate(ts):
            ab = acp[t]
            ab_prev = acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            t_batch = torch.full((B,), t, dtype=torch.long, device=x.device)
            eps = model_fn(x.float(), t_batch).double()
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()  # the clean chunk this noise estimate implies
            if clip_sample:
                x0 = x0.clamp(-1.0, 1.0)
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0:
                x = x + sigma * torch.randn(shape, generator=generator).to(x)
        return x.to(out_dtype)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim), as in DDPM / transformers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


# -----------------------------------------------------------------------------
# the action expert: a plain DiT with prefix conditioning (System 1)


class ActionExpert(nn.Module):
    def __init__(self, config: ActionExpertConfig):
        super().__init__()
        c = self.config = config
        d = c.d_model
        self.action_in = nn.Linear(c.action_dim, d)
        self.action_pos = nn.Parameter(torch.zeros(1, c.chunk_len, d))  # which step of the chunk
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.state_mlp = (
            nn.Sequential(nn.Linear(c.state_dim, d), nn.SiLU(), nn.Linear(d, d)) if c.use_state else None
        )
        self.blocks = nn.ModuleList([Block(d, c.n_heads, c.dropout) for _ in range(c.n_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.out = nn.Linear(d, c.action_dim)
        self.schedule = NoiseSchedule(c.num_train_timesteps)
        init_weights(self)
        nn.init.normal_(self.action_pos, std=0.02)

    # The sequence is [ prefix: cond (K) ; state (1, optional) | step: timestep (1) ; noisy actions (Hc) ].
    # Step tokens attend to everything (the condition enters as prefix tokens, as in the paper); prefix tokens
    # attend only to the prefix. So the prefix is the same at every DDIM step: sample() runs it through the
    # blocks ONCE per chunk and keeps its keys/values, and each of the 10 denoising steps only processes the
    # 1 + Hc step tokens (9 instead of 25 tokens with K = 16: most of the chunk latency on a CPU).

    def prefix_tokens(self, cond, state=None):
        """cond (B,K,d), state (B,S) or None -> prefix (B, K(+1), d)."""
        if not self.config.use_state:
            return cond
        if state is None:
            raise ValueError("this action expert was built with use_state=True: pass the normalised state")
        return torch.cat([cond, self.state_mlp(state)[:, None]], dim=1)  # (B, K+1, d)

    def step_tokens(self, noisy, t):
        """noisy (B,Hc,A), t (B,) -> (B, 1+Hc, d): the timestep token, then one token per action of the chunk."""
        t_tok = self.time_mlp(timestep_embedding(t, self.config.d_model))[:, None]  # (B, 1, d)
        return torch.cat([t_tok, self.action_in(noisy) + self.action_pos], dim=1)

    def forward(self, noisy, t, cond, state=None):
        """noisy (B,Hc,A), t (B,) int64, cond (B,K,d), state (B,S) or None -> predicted noise (B,Hc,A)."""
        prefix = self.prefix_tokens(cond, state)
        x = torch.cat([prefix, self.step_tokens(noisy, t)], dim=1)  # (B, N, d): prefix concatenation
        n_p, N = prefix.shape[1], x.shape[1]
        mask = torch.ones(N, N, dtype=torch.bool, device=x.device)
        mask[:n_p, n_p:] = False  # the prefix never reads the step tokens (True = may attend)
        for blk in self.blocks:
            x = blk(x, mask=mask)
        return self.out(self.ln_f(x[:, -self.config.chunk_len :]))  # (B, Hc, A) read at the action positions

    def encode_prefix(self, cond, state=None):
        """Run the prefix through every block once; returns one frozen key/value cache per block."""
        x, caches = self.prefix_tokens(cond, state), []
        for blk in self.blocks:
            cache = {}
            x = blk(x, cache=cache)  # the prefix attends to itself only, as in forward
            cache["frozen"] = True  # later calls read these keys/values but never append to them
            caches.append(cache)
        return caches

    def denoise(self, noisy, t, caches):
        """Same result as forward(noisy, t, cond, state) given caches = encode_prefix(cond, state)."""
        x = self.step_tokens(noisy, t)  # (B, 1+Hc, d)
        for blk, cache in zip(self.blocks, caches):
            x = blk(x, cache=cache)  # step tokens attend to [cached prefix; step tokens]
        return self.out(self.ln_f(x[:, -self.config.chunk_len :]))

    def loss(self, cond, actions, state=None, n_noise_samples=4):
        """Epsilon-prediction MSE. Each sample is repeated n times with fresh noise and timesteps: extra diffusion
        targets for the price of one planner pass. cond (B,K,d), actions (B,Hc,A) in [-1, 1]."""
        n = n_noise_samples
        cond = cond.repeat_interleave(n, dim=0)  # (B*n, K, d)
        actions = actions.repeat_interleave(n, dim=0)  # (B*n, Hc, A)
        if state is not None:
            state = state.repeat_interleave(n, dim=0)
        t = torch.randint(0, self.schedule.num_train_timesteps, (actions.shape[0],), device=actions.device)
        noise = torch.randn_like(actions)
        noisy = self.schedule.q_sample(actions, t, noise)
        return F.mse_loss(self(noisy, t, cond, state), noise)

    @torch.inference_mode()
    def sample(self, cond, state=None, steps=10, generator=None, noise_scale=1.0):
        """DDIM from pure noise -> normalised action chunk (B,Hc,A). noise_scale < 1 starts from a narrower
        draw (a "temperature"; 0 = always the same start, x_T = 0), which trades variety for the most typical chunk."""
        c = self.config
        shape = (cond.shape[0], c.chunk_len, c.action_dim)
        caches = self.encode_prefix(cond, state)  # once per chunk, not once per denoising step
        x_T = noise_scale * torch.randn(shape, generator=generator)
        return self.schedule.ddim_sample(lambda x, t: self.denoise(x, t, caches), shape, steps, generator, x_T=x_T)


# -----------------------------------------------------------------------------
# the whole policy network: planner + queries + action expert


class VLA(nn.Module):
    def __init__(self, planner_config: PlannerConfig, action_config: ActionExpertConfig):
        super().__init__()
        self.planner_config, self.action_config = planner_config, action_config
        a = action_config
        self.planner = Planner(planner_config)
        self.queries = QueryTransformer(planner_config.d_model, a.d_model, a.n_queries, a.query_layers, a.n_heads,
                                        a.dropout)
        self.expert = ActionExpert(action_config)
        self.where = nn.Linear(a.d_model, 4) if a.where_head else None

    def forward(self, images, tokens, pad_mask, actions_norm, state_norm=None, grad_decay=0.5, n_noise=4,
                grounding=None, where=None, planner_states=None):
        """One co-training step's losses: (action loss, grounding loss or None, where loss or None).
        `grounding` is an optional (images, tokens, targets, prefix_len) batch; `where` (B, 4) the key object's
        and the container's centres in [0, 1] image coordinates (needs where_head). `planner_states` = (hidden
        (B,P+L,d), key_pad (B,P+L)) computed earlier by planner.hidden_states: a frozen planner's output, so
        the planner is not run at all (images/tokens/pad_mask are then unused). Training goes through forward
        so DistributedDataParallel sees it."""
        if planner_states is not None:
            cond = self.queries(*planner_states)  # (B, K, d_act): the same as condition() with a frozen planner
        else:
            cond = self.condition(images, tokens, pad_mask, grad_decay)  # (B, K, d_act), shared by both losses
        a_loss = self.expert.loss(cond, actions_norm, state_norm, n_noise)
        g_loss = self.grounding_loss(*grounding) if grounding is not None else None
        w_loss = self.where_loss(cond, where) if where is not None else None
        return a_loss, g_loss, w_loss

    def locate(self, cond):
        """The where head's reading of the condition: cond (B, K, d) -> (B, 4) object and container centres
        in [0, 1] image units."""
        if self.where is None:
            raise ValueError("this VLA was built without where_head=True")
        return self.where(cond.mean(1))

    def where_loss(self, cond, where):
        """Spatial guidance on the condition itself: the mean condition token must say, linearly, where the
        key object and the container are. cond (B, K, d), where (B, 4) -> MSE in [0, 1] image units over the
        entries that are not NaN."""
        pred = self.locate(cond)
        known = ~torch.isnan(where)  # the object's centre is NaN while it is in the jaws (data.object_resting)
        return F.mse_loss(pred[known], where[known])

    def grounding_loss(self, images, tokens, targets, prefix_len=None):
        """Stage 1 / co-training: next-token loss on the answer tokens; touches only the planner."""
        return self.planner(images, tokens, targets, prefix_len=prefix_len)[1]

    def condition(self, images, tokens, pad_mask=None, grad_decay=1.0):
        """Planner reads image + (spatial) prompt, never decodes; queries turn its hidden states into cond."""
        hidden, key_pad = self.planner.hidden_states(images, tokens, pad_mask)  # (B, P+L, d), (B, P+L)
        hidden = scale_grad(hidden, grad_decay)  # gradient decay between System 1 and System 2
        return self.queries(hidden, key_pad)  # (B, K, d_act)

    def action_loss(self, images, tokens, pad_mask, actions_norm, state_norm=None, grad_decay=0.5, n_noise=4):
        cond = self.condition(images, tokens, pad_mask, grad_decay)
        return self.expert.loss(cond, actions_norm, state_norm, n_noise)

    @torch.inference_mode()
    def predict_actions(self, images, tokens, pad_mask=None, state_norm=None, n_ddim=10, generator=None,
                        noise_scale=1.0, n_samples=1):
        """One planner pass + n_ddim DiT passes -> normalised action chunk (B,Hc,A). Caller sets eval mode.
        n_samples > 1 draws that many chunks from the same condition (one batched DDIM run) and returns, per
        row, the medoid: the drawn chunk with the smallest summed distance to the others. It is a real sample,
        so joints stay consistent with each other, but a rare mode drawn by one sample in K is outvoted by the
        rest. Policy executes the medoid of SAMPLES = 3 draws (EXPERIMENTS.md item 34)."""
        cond = self.condition(images, tokens, pad_mask)  # (B, K_q, d)
        if n_samples <= 1:
            return self.expert.sample(cond, state_norm, n_ddim, generator, noise_scale)
        B = cond.shape[0]
        cond = cond.repeat_interleave(n_samples, 0)  # (B*S, K_q, d): sample s of row b sits at b*S + s
        state_norm = None if state_norm is None else state_norm.repeat_interleave(n_samples, 0)
        chunks = self.expert.sample(cond, state_norm, n_ddim, generator, noise_scale)  # (B*S, Hc, A)
        chunks = chunks.view(B, n_samples, -1)  # (B, S, Hc*A)
        spread = torch.cdist(chunks, chunks).sum(-1)  # (B, S): summed distance of each sample to the others
        best = spread.argmin(1)  # (B,)
        return chunks[torch.arange(B), best].view(B, -1, self.action_config.action_dim)

    def param_groups(self, lr_planner=1e-5, lr_action=1e-4, lr_other=5e-5, weight_decay=0.01):
        """AdamW groups with the paper's per-module learning rates (use betas=(0.9, 0.95)). Weight decay only
        on matrices; biases, LayerNorms, position tables and queries are not decayed (nanoGPT's rule).
        Each group carries 'name' and 'base_lr' so a schedule can scale every lr by the same factor."""
        groups = []
        other = nn.ModuleList([self.queries] + ([self.where] if self.where is not None else []))
        for name, module, lr in [("planner", self.planner, lr_planner), ("action", self.expert, lr_action),
                                 ("other", other, lr_other)]:
            decay = [p for n, p in module.named_parameters()
                     if p.dim() >= 2 and "pos" not in n and not n.endswith("queries")]
            ids = {id(p) for p in decay}
            no_decay = [p for p in module.parameters() if id(p) not in ids]
            groups.append(dict(name=name, params=decay, lr=lr, base_lr=lr, weight_decay=weight_decay))
            groups.append(dict(name=name + "_no_decay", params=no_decay, lr=lr, base_lr=lr, weight_decay=0.0))
        covered = sum(len(g["params"]) for g in groups)
        assert covered == len(list(self.parameters())), "a parameter is missing from the optimizer groups"
        return groups

    @classmethod
    def from_planner_checkpoint(cls, ckpt_dir, action_config: ActionExpertConfig = None):
        """Start stage 2 from a stage-1 checkpoint: planner weights loaded, queries and expert fresh.
        Returns (vla, config, fresh_keys): fresh_keys lists every parameter that was NOT loaded.
        A VLA checkpoint is accepted too (then everything loads and fresh_keys is empty)."""
        config, state = _read_checkpoint(ckpt_dir)
        m = config["model"]
        pcfg = PlannerConfig(**m["planner"])
        if action_config is None:
            action_config = ActionExpertConfig(**m["action"]) if m.get("action") else ActionExpertConfig()
        vla = cls(pcfg, action_config)
        if m["kind"] == "planner":
            vla.planner.load_state_dict(state, strict=True)
            fresh = [k for k in vla.state_dict() if not k.startswith("planner.")]
        else:
            missing, unexpected = vla.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"checkpoint {ckpt_dir} has weights this model does not: {unexpected[:5]}")
            fresh = list(missing)
        return vla, config, fresh


# -----------------------------------------------------------------------------
# Policy: what eval.py and robot.py drive. load checkpoint -> preprocess (data.py, the same functions as
# training) -> plan a chunk with DDIM -> hand out one action per control step -> re-plan every few steps.
#
#   time  t: obs -> [a_t ... a_{t+Hc-1}] predicted; the first `replan_every` are executed
#   time  t + replan_every: a new observation, a new chunk (the rest of the old one is dropped)
#
# With ensemble = w > 0 the rest of the old chunks is not dropped but averaged in ("temporal ensembling", as in
# ACT, Zhao et al. 2023): the action for step t is the weighted mean of every chunk's prediction for t, the
# newest chunk with weight 1, the one before with w, the one before that w**2 ... It costs nothing (the same
# chunks are predicted) and smooths the switch from one DDIM draw to the next. Measured with w = 0.5: no gain
# in the closed loop (EXPERIMENTS.md, item 32), so it is off by default.


# Chunks drawn per plan, of which the medoid is executed (VLA.predict_actions), so that an odd draw is outvoted
# (fewer carries ended short and fewer grasps missed). Measured on session 32's pipeline m1 (EXPERIMENTS.md item
# 34): 281 -> 302 of 400 `seen` + `unseen` episodes with 3 (298 with 5), and 253 -> 286 on 400 other tables, for
# ~30 ms a chunk instead of ~20 on one thread.
SAMPLES = 3


class Policy:
    """policy = Policy.load("out/m1/ckpt"); policy.reset(); action = policy.act(obs, instruction)

    obs = {"image": uint8 (S, S, 3) with S = policy.image_size, "state": float (6,) joint radians}
    action: float32 (6,) absolute joint targets in radians (un-normalised with the training statistics).
    """

    def __init__(self, vla, config: dict, device: str = "cpu", n_ddim: int = 10, replan_every: int = 0,
                 seed: int = 0, threads: int = 1, noise_scale: float = 1.0, samples: int = SAMPLES,
                 ensemble: float = 0.0):
        import data  # the tokenizer and the preprocessing shared with training

        self.data = data
        self.vla, self.config, self.device = vla.to(device).eval(), config, device
        self.tok = data.make_tokenizer(data.ranks_from_json(config["tokenizer"]))
        self.image_size = int(config["image_size"])
        self.spatial_prompt = bool(config["spatial_prompt"])
        self.written_plan = bool(config.get("written_plan", False))  # the planner writes its answer first
        self.plan_numbers = bool(config.get("plan_numbers", False))  # ... and the DiT reads its numbers too
        self.prev_state = bool(config.get("prev_state", False))  # the DiT also reads the previous step's state
        self.gripper_point = bool(config.get("gripper_point", False))  # ... and where the jaws are in the picture
        self.last_plan = None  # the text of the last written plan (eval.py draws it on GIFs)
        self.use_state = bool(config["use_state"])
        self.relative = bool(config.get("relative_actions", False))  # chunks are (action - state at planning)
        self.stats = config["norm_stats"]
        self.chunk_len = int(config["chunk_len"])
        # a chunk holds chunk_len actions, so at most that many can be executed from it before the next plan
        self.replan_every = min(replan_every or max(1, self.chunk_len // 2), self.chunk_len)
        self.n_ddim, self.seed = n_ddim, seed
        self.noise_scale = noise_scale  # DDIM's starting noise (1 = as trained; see ActionExpert.sample)
        self.samples = samples  # chunks drawn per plan; > 1 keeps their medoid (VLA.predict_actions)
        if not 0.0 <= ensemble <= 1.0:
            raise ValueError(f"ensemble is the weight of a chunk one plan older, in [0, 1] (0 = off), got {ensemble}")
        self.ensemble = ensemble  # temporal ensembling of overlapping chunks (see the comment above the class)
        # batch-1 inference is a string of tiny ops: one thread avoids two threads waiting on each other,
        # which costs seconds per chunk whenever another process keeps a core busy
        if threads:
            torch.set_num_threads(threads)
        self.n_plans = 0
        self.reset()

    @classmethod
    def load(cls, ckpt_dir: str, device: str = "cpu", **kwargs) -> "Policy":
        model, config = load_checkpoint(ckpt_dir)
        if config["model"]["kind"] != "vla":
            raise ValueError(f"{ckpt_dir} is a stage-1 planner checkpoint; a policy needs a stage-2 checkpoint "
                             "from train_action.py (e.g. out/m1/ckpt)")
        return cls(model, config, device, **kwargs)

    def reset(self, keep_plan: bool = False):
        """Call at the start of every episode: forget queued actions and the written plan, restart the sampling
        noise. keep_plan=True keeps the plan (still the same episode)."""
        self.chunks = []  # (step it was planned at, chunk (Hc, 6)) for the chunks still covering the coming steps
        self.t = 0  # control steps since reset()
        self.last_state = None  # the state seen at the previous act() (for prev_state checkpoints)
        self.generator = torch.Generator().manual_seed(self.seed)
        if not keep_plan:
            self.plan = None  # (instruction, plan token ids), written on the next call

    def _inputs(self, obs: dict, text_tokens: list):
        state = np.asarray(obs["state"], dtype=np.float32)
        if state.shape != (6,) or not np.all(np.isfinite(state)):
            raise ValueError(f"obs['state'] must be 6 finite joint angles in radians, got {state!r}")
        image = self.data.preprocess_image(obs["image"], self.image_size)[None].to(self.device)  # (1, 3, S, S)
        tokens = torch.tensor([text_tokens], device=self.device)                              # (1, L)
        return image, tokens, state

    @torch.inference_mode()
    def condition_inputs(self, obs: dict, instruction: str):
        """What the planner reads for this observation: image (1,3,S,S), tokens (1,L), state (6,).
        With a written plan, on the episode's first call the planner answers two questions itself (greedy):

            [image] Your task is to put the red cube in the blue bowl. ... <|answer|>   ->  [40,59,47,67]
            [image] put the red cube in the blue bowl. point to where it should go. <|answer|>  ->  (60,71)

        and from then on the tokens are prompt + "[40,59,47,67](60,71)", the layout of training
        (data.plan_tokens). The plan is kept until reset() or another instruction."""
        prompt = self.data.encode_prompt(self.tok, instruction, self.spatial_prompt)
        image, tokens, state = self._inputs(obs, prompt)
        if self.written_plan:
            if self.plan is None or self.plan[0] != instruction:
                question = self.data.encode_question(self.tok, self.data.PLAN_QUESTION.format(instruction=instruction))
                plan = self._write(image, tokens) + self._write(image, torch.tensor([question], device=self.device))
                self.plan = (instruction, plan)
                self.last_plan = self.tok.decode(plan)
            tokens = torch.tensor([prompt + self.plan[1]], device=self.device)
        return image, tokens, state

    def _write(self, image, tokens) -> list:
        """The planner's greedy answer as token ids, without special tokens (a box is 9 tokens at most)."""
        eot = self.tok.encode_single_token(self.data.EOT)
        return [t for t in self.vla.planner.generate(image, tokens, 12, eot)[0] if t < eot]

    @torch.inference_mode()
    def predict_chunk(self, obs: dict, instruction: str) -> np.ndarray:
        """A chunk of future joint targets (chunk_len, 6) in radians. obs may carry "prev_state", the state one
        control step earlier (act() keeps it itself; without one the current state stands in, as at t = 0)."""
        image, tokens, state = self.condition_inputs(obs, instruction)
        state_norm = None
        if self.use_state:
            state_norm = self.data.normalize(state, self.stats["state"])  # (6,)
            if self.prev_state:  # (12,): the layout of data.DemoDataset(prev_state=True)
                prev = obs.get("prev_state", self.last_state)
                prev = state if prev is None else np.asarray(prev, np.float32)
                state_norm = np.concatenate([state_norm, self.data.normalize(prev, self.stats["state"])])
            if self.plan_numbers:  # the plan written on the first frame, as numbers (data.plan_vector)
                plan = self.data.plan_vector(self.tok.decode(self.plan[1]), self.image_size)
                state_norm = np.concatenate([state_norm, plan])  # (... + PLAN_DIM,), the layout of training
            if self.gripper_point:  # the jaws in the picture, from the joint state (data.gripper_vector)
                state_norm = np.concatenate([state_norm, self.data.gripper_vector(state, self.image_size)])
            state_norm = torch.from_numpy(state_norm)[None].to(self.device)
        chunk = self.vla.predict_actions(image, tokens, None, state_norm, self.n_ddim, self.generator,
                                         self.noise_scale, self.samples)  # (1, Hc, 6)
        self.n_plans += 1
        if self.relative:
            return self.data.unnormalize(chunk[0].cpu().numpy(), self.stats["delta"]) + state
        return self.data.unnormalize(chunk[0].cpu().numpy(), self.stats["action"])

    def act(self, obs: dict, instruction: str) -> np.ndarray:
        if self.t % self.replan_every == 0:  # a new observation, a new chunk
            self.chunks.append((self.t, self.predict_chunk(obs, instruction)))
        self.chunks = [(t0, c) for t0, c in self.chunks if self.t - t0 < self.chunk_len]  # those still covering t
        preds = np.stack([c[self.t - t0] for t0, c in self.chunks])            # (n, 6), oldest first
        # ..., w**2, w, 1 (newest). With w = 0 (the default) only the newest chunk counts (0**0 = 1): its actions
        # are executed in turn and the rest of the older ones is dropped
        weights = self.ensemble ** np.arange(len(preds) - 1, -1, -1.0)         # (n,)
        self.last_state = np.asarray(obs["state"], np.float32).copy()
        self.t += 1
        return ((weights[:, None] * preds).sum(0) / weights.sum()).astype(np.float32)

    @torch.no_grad()
    def ask(self, obs: dict, question: str, max_new_tokens: int = 40) -> str:
        """The planner answers a grounding question in text (used to draw its box/point/trace on GIFs)."""
        image, tokens, _ = self._inputs(obs, self.data.encode_question(self.tok, question))
        eot = self.tok.encode_single_token(self.data.EOT)
        out = self.vla.planner.generate(image, tokens, max_new_tokens, eot)[0]
        return self.tok.decode([t for t in out if t < eot])


# -----------------------------------------------------------------------------
# checkpoints: model.safetensors + config.json, never pickle


def save_checkpoint(out_dir, model, config: dict):
    """Writes out_dir/model.safetensors and out_dir/config.json. `config` is any JSON-able dict from the caller
    (tokenizer, normalisation stats, step, metrics ...); the model configs are added under the key "model"."""
    if "model" in config:
        raise ValueError('save_checkpoint stores the model configs under "model": rename that key in your config')
    if isinstance(model, VLA):
        m = dict(kind="vla", planner=asdict(model.planner_config), action=asdict(model.action_config))
    elif isinstance(model, Planner):
        m = dict(kind="planner", planner=asdict(model.config), action=None)
    else:
        raise TypeError(f"save_checkpoint takes a Planner or a VLA, got {type(model).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config, "model": m}, f, indent=2)


def _read_checkpoint(ckpt_dir):
    wpath, cpath = os.path.join(ckpt_dir, "model.safetensors"), os.path.join(ckpt_dir, "config.json")
    for p in (wpath, cpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"no checkpoint at {ckpt_dir} (missing {os.path.basename(p)}): train one with "
                f"python train_grounding.py (stage 1) or python train_action.py (stage 2)"
            )
    with open(cpath) as f:
        config = json.load(f)
    return config, load_file(wpath)


def load_checkpoint(ckpt_dir):
    """Rebuilds the model (Planner or VLA) from config.json and loads the weights strictly. -> (model, config)."""
    config, state = _read_checkpoint(ckpt_dir)
    m = config["model"]
    if m["kind"] == "vla":
        model = VLA(PlannerConfig(**m["planner"]), ActionExpertConfig(**m["action"]))
    else:
        model = Planner(PlannerConfig(**m["planner"]))
    model.load_state_dict(state, strict=True)
    return model, config


# training helpers shared by train_grounding.py and train_action.py


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_model() -> str:
    """The CPU's name (Linux: /proc/cpuinfo), else what platform knows. Kept with every result because the same
    stage 1 learned on one CPU and not on another (EXPERIMENTS.md, item 27)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def autocast(device: str, enabled: bool = True):
    """bfloat16 autocast for training where the hardware has it, else a no-op context.

    Matrix products run in bfloat16 (8 bits of mantissa) while weights, optimizer state and the loss stay
    float32. On an Intel CPU with AMX a stage-1 step took ~360 instead of ~405 ms, but on an AMD CPU with
    AVX512-BF16 and no AMX the same stage 1 did not learn in bfloat16 (two seeds) and did in float32 (two seeds,
    EXPERIMENTS.md, items 27-28), so both training scripts' --bf16 is off by default. CPUs without bfloat16 would
    emulate it and get slower, so there it is a no-op. Evaluation and control stay in float32.
    """
    if enabled and device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and device == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for the SVD g = U S V^T: the same directions with every singular value set to ~1.

    A quintic Newton-Schulz iteration (coefficients 3.4445, -4.7750, 2.0315 from the Muon write-up): each step
    maps every singular value s of x to a*s + b*s^3 + c*s^5, which pushes all of them from (0, 1] towards ~1
    (the coefficients trade exactness, values end in ~0.7-1.2, for speed). Five steps, five small matrix
    products each; no SVD, so it is cheap enough to run on every weight at every step.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)  # singular values now <= 1
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide side: x @ x.T is then the smaller square
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon ("momentum orthogonalized"): SGD with Nesterov momentum whose update for each weight MATRIX is
    orthogonalized (orthogonalize above) before it is applied.

    Why it can help: a raw or Adam update of a matrix is dominated by a few directions (the ones the current
    loss pulls hardest on); orthogonalizing gives every direction of the update the same size, so rarely used
    directions move as fast as the common ones. (Our guess is that the colour/shape look-ups of stage 1 are such
    directions; what is measured is only that stage 1 learns faster, EXPERIMENTS.md "Muon".) Only for the
    2-D weights inside the transformer blocks (and the projector); embeddings, the conv stem, norms and biases
    stay with AdamW (train_grounding.py --muon-lr; in stage 2, train_action.py --muon-lr gives it the DiT's and
    the queries' block matrices, EXPERIMENTS.md item 20). The update is scaled by sqrt(max(1, rows/cols)) so that
    tall matrices (the MLP's first layer, 512x128) get an RMS step like square ones.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov: look one momentum step ahead
                update = orthogonalize(g) * max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


def save_optimizer(path: str, opt: torch.optim.Optimizer):
    """The optimizer's state (AdamW's moment estimates, Muon's momentum) as safetensors (no pickle), so
    --resume continues exactly."""
    tensors = {}
    params = [p for group in opt.param_groups for p in group["params"]]  # numbered in the optimizer's own order
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"{i}.{k}"] = v.detach().cpu().reshape(-1) if torch.is_tensor(v) else torch.tensor([float(v)])
    save_file(tensors, path)


def load_optimizer(path: str, opt: torch.optim.Optimizer):
    """The inverse of save_optimizer, numbered by the same order (AdamW's moments, or Muon's momentum buffer;
    each state tensor is reshaped to its parameter's shape, the step count to a scalar)."""
    tensors = load_file(path)
    for i, p in enumerate(p for group in opt.param_groups for p in group["params"]):
        keys = [k for k in tensors if k.startswith(f"{i}.")]
        if keys:
            opt.state[p] = {k.split(".", 1)[1]: tensors[k].reshape(() if k.endswith(".step") else p.shape).clone()
                            for k in keys}


def save_optimizers(ckpt_dir: str, opt: torch.optim.Optimizer, muon: "Muon | None"):
    """Both training scripts' optimizer state beside the weights: AdamW's in optimizer.safetensors, Muon's (when
    --muon-lr > 0) in optimizer_muon.safetensors."""
    save_optimizer(os.path.join(ckpt_dir, "optimizer.safetensors"), opt)
    if muon is not None:
        save_optimizer(os.path.join(ckpt_dir, "optimizer_muon.safetensors"), muon)


def load_optimizers(ckpt_dir: str, train_config: dict, muon_lr: float, opt: torch.optim.Optimizer,
                    muon: "Muon | None"):
    """The inverse of save_optimizers for --resume. A run resumes only with the optimizers it was trained with
    (train_config is the checkpoint's; checkpoints from before Muon have no muon_lr): otherwise a ValueError
    names the flag to pass."""
    was = train_config.get("muon_lr", 0.0)
    if (was > 0) != (muon is not None):
        raise ValueError(f"--resume: {ckpt_dir} was trained with --muon-lr {was}, this run has --muon-lr {muon_lr}; "
                         f"the optimizers differ. Resume with --muon-lr {was}, or start a fresh run in another --out")
    load_optimizer(os.path.join(ckpt_dir, "optimizer.safetensors"), opt)
    if muon is not None:
        load_optimizer(os.path.join(ckpt_dir, "optimizer_muon.safetensors"), muon)


# -----------------------------------------------------------------------------
# python model.py: every stage on dummy input


def bench_train(pcfg, batch=64, text_len=48, steps=5):
    """Planner forward+backward+AdamW step at batch 64 -> samples/s (the number that sizes stage 1)."""
    torch.manual_seed(0)
    planner = Planner(pcfg)
    opt = torch.optim.AdamW(planner.parameters(), lr=1e-4, betas=(0.9, 0.95))
    imgs = torch.randn(batch, 3, pcfg.image_size, pcfg.image_size)
    toks = torch.randint(0, pcfg.vocab_size, (batch, text_len))
    tgts = toks.roll(-1, 1)
    tgts[:, : text_len // 2] = -100
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = planner(imgs, toks, tgts)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i > 0:  # step 0 warms up allocators
            times.append(time.perf_counter() - t0)
    return batch / (sum(times) / len(times))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build the default tiny-m1 model on dummy input")
    ap.add_argument("--bench-train", action="store_true", help="also time planner training at batch 64")
    ap.add_argument("--text-len", type=int, default=28, help="prompt tokens in the dummy input (a spatial prompt is ~28)")
    args = ap.parse_args()

    torch.manual_seed(0)
    pcfg, acfg = PlannerConfig(), ActionExpertConfig()
    vla = VLA(pcfg, acfg).eval()
    B, L = 2, args.text_len
    images = torch.randn(B, 3, pcfg.image_size, pcfg.image_size)
    tokens = torch.randint(0, pcfg.vocab_size, (B, L))
    pad_mask = torch.zeros(B, L, dtype=torch.bool)
    pad_mask[1, L - 5 :] = True  # the second prompt is 5 tokens shorter
    state = torch.rand(B, acfg.state_dim) * 2 - 1 if acfg.use_state else None  # joint angles, normalised
    with torch.no_grad():
        img_tok = vla.planner.encode_images(images)
        logits, _, hidden = vla.planner(images, tokens)
        cond = vla.condition(images, tokens, pad_mask)
        noisy = torch.randn(B, acfg.chunk_len, acfg.action_dim)
        eps = vla.expert(noisy, torch.full((B,), 50), cond, state)
        chunk = vla.predict_actions(images, tokens, pad_mask, state, generator=torch.Generator().manual_seed(0))
    print(f"images          {tuple(images.shape)}")
    print(f"image tokens    {tuple(img_tok.shape)}")
    print(f"text logits     {tuple(logits.shape)}")
    print(f"hidden          {tuple(hidden.shape)}")
    print(f"cond (queries)  {tuple(cond.shape)}")
    print(f"noise pred      {tuple(eps.shape)}")
    print(f"sampled chunk   {tuple(chunk.shape)}  range [{chunk.min():.2f}, {chunk.max():.2f}]")
    vit = sum(count_params(m) for m in [vla.planner.patch_embed, vla.planner.vit_blocks, vla.planner.vit_ln])
    print(f"params: planner {count_params(vla.planner) / 1e6:.2f}M (ViT {vit / 1e6:.2f}M), "
          f"queries {count_params(vla.queries) / 1e6:.2f}M, action expert {count_params(vla.expert) / 1e6:.2f}M, "
          f"total {count_params(vla) / 1e6:.2f}M")

    # latency of one action chunk at batch 1: planner pass + 10 DDIM steps of the DiT. Printed for the default
    # thread count and for one thread: at batch 1 the ops are tiny, and when another process keeps a core busy
    # two OpenMP threads spend their time waiting on each other (the 1-thread number is then far steadier).
    img1, tok1, state1 = images[:1], tokens[:1], None if state is None else state[:1]
    for n_threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        default_threads = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        for _ in range(3):
            vla.predict_actions(img1, tok1, state_norm=state1)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            vla.predict_actions(img1, tok1, state_norm=state1, n_ddim=10)
            times.append(time.perf_counter() - t0)
        times.sort()
        torch.set_num_threads(default_threads)
        print(f"one action chunk (batch 1, {L} prompt tokens, 10 DDIM steps, {n_threads} CPU thread(s)): "
              f"{1000 * times[len(times) // 2]:.1f} ms median, {1000 * times[0]:.1f} ms fastest")
    if args.bench_train:
        sps = bench_train(pcfg, text_len=L)
        print(f"planner training, batch 64, {pcfg.n_image_tokens}+{L} tokens: {sps:.1f} samples/s")
