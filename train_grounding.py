"""train_grounding.py -- stage 1 of InternVLA-M1: spatial grounding pre-training of the planner.

The paper's first idea: before a model learns *how* to act, it learns *where* to act. The planner (a small
ViT + language transformer, model.py) reads a sim scene and a question and writes the answer as text in
pixel coordinates of its input image, trained with plain next-token cross-entropy on the answer tokens:

    "where is the red block?"                              -> [31,45,38,52]
    "point to the blue bowl."                              -> (40,61)
    "put the red block in the blue bowl. point to where it should go." -> (40,63)
    "show the path the gripper takes to put ..."           -> [(49,33),(31,45),(33,50),(40,55),(40,60)]

    python train_grounding.py --preset smoke        # < 1 minute, for tests
    python train_grounding.py                       # the README's laptop run (preset default)
    python train_grounding.py --preset full         # the best numbers
    python train_grounding.py --max-steps 500 --lr 5e-4   # any setting overrides its preset
    python train_grounding.py --resume              # continue from out/stage1/ckpt

The first 500 steps train on tables with one object and one container, the rest on sim.py's full tables (the
CURRICULUM comment below says why); number tokens are scored against a Gaussian over neighbouring values
(model.Planner.answer_loss). The weight matrices of the transformer blocks train with Muon (model.Muon, which
orthogonalizes each update), everything else with AdamW. One auxiliary loss rides along (--word-aux): at the
language model's last layer, each image token that shows an item must name it in the vocabulary's own words
("red", "cube"), through the same output head the answers come from. It is what binds the question's words to
the right object within the default's 2000 steps (model.Planner.word_loss). And on tables with two containers
the data also asks about the same object going into the *other* container (--counterfactual-containers), so
the container's words, not a guess, decide where a trace ends. When the binding comes varies with the machine
and the thread count (the float32 sums are added in another order): at lr 6e-4 one of three 2600-step float32
runs on an AMD EPYC was still at box 46.9% (EXPERIMENTS.md, closed-loop item 29). Since session 30 the default
is lr 1e-3 for 2000 steps; on that AMD EPYC (2 cores, float32, inside `python eval.py --pipeline`) it reached
box Acc@0.5 92.4%, point 94.5%, trace DFD 4.6 px on the test split in 17.6 minutes of training (item 31), and on
an Intel Xeon lr 1e-3 had bound by step 1500-2000 (item 30). Check
metrics.json's box_acc50 before stage 2.

The script reads straight down: settings -> data -> model -> optimizer -> loop (log line + progress bar,
periodic held-out evaluation, checkpoint) -> final evaluation, plots and metrics.json.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
from model import (Muon, Planner, PlannerConfig, autocast, count_params, cpu_model, load_checkpoint, load_optimizers, pick_device, save_checkpoint,
                   save_optimizers)

# ----------------------------------------------------------------------------------------------------------
# settings: a dataclass whose fields are the command-line flags; presets fill them in


@dataclass
class Config:
    preset: str = "default"      # smoke | default | full
    out: str = "out/stage1"      # checkpoints, plots and metrics go here
    data_dir: str = "out/data"   # grounding_train/ and grounding_test/ are made here if missing
    train_scenes: int = 8000     # scenes rendered for training (each gives ~7 questions; ~12 ms each)
    test_scenes: int = 300       # held-out scenes of the test split (reserved tasks and phrasings)
    eval_scenes: int = 60        # test scenes used for the periodic evaluation (the final one uses all)
    image_size: int = 96
    patch_size: int = 12
    d_model: int = 128
    vit_layers: int = 2
    lm_layers: int = 4
    n_heads: int = 4
    tie_head: bool = True        # the output head is the token embedding (model.PlannerConfig.tie_head)
    coord_sigma: float = 1.0     # std (px) of the Gaussian target over number tokens; 0 = plain cross-entropy
    batch_size: int = 16         # scenes per step (with --no-packed: questions per step)
    curriculum_scenes: int = 2000  # extra training tables with 1 object and 1 container ...
    curriculum_steps: int = 500  # ... that the first steps train on (0 = no curriculum); see CURRICULUM below
    curriculum_batch_size: int = 32  # those tables are small (~5 questions), so twice as many per step
    pair_steps: int = 0          # then this many steps on tables with TWO objects and one container, where the
                                 # answer turns on the object's colour and shape (CURRICULUM below); 0 = skip
    pair_scenes: int = 2000      # training tables made for that phase
    counterfactual_prompts: int = 0  # per training table, this many more spatial prompts naming another object
                                     # (data.scene_questions; its own data folder); 2: no clear gain (EXPERIMENTS.md)
    counterfactual_containers: bool = True  # on two-container tables, also ask where the object goes and its path
                                 # into the OTHER container (data.generate_grounding; its own data folder): the
                                 # container's words then decide the answer (EXPERIMENTS.md, "Wrong container")
    patch_aux: float = 0.0       # weight of an auxiliary loss naming each patch's colour and shape
                                 # (model.Planner.patch_loss; needs --packed); 0 = off: no gain (EXPERIMENTS.md)
    word_aux: float = 2.0        # weight of an auxiliary loss that makes each image token name what it shows IN
                                 # WORDS, through the output head ("red", "cube": the same embeddings the
                                 # questions are made of; model.Planner.word_loss; needs --packed); 0 = off.
                                 # 2600 steps: box 92-95% against 59.8-62.6% without; weight 2 rather
                                 # than 1 for the traces (DFD 5.8 against 6.5-7.7 px; EXPERIMENTS.md, "Word aux")
    word_aux_at: str = "output"  # output: the image tokens at the language model's last layer (box 93.5% at 3200
                                 # steps); input: as they enter it (82.5%)
    lookup_aux: float = 0.0      # weight of an auxiliary loss that points one attention head of the language
                                 # model at the patches each answer lies in (model.Planner.lookup_loss; --packed)
    lookup_layer: int = 1        # which language block's head 0 it supervises (0 = the first)
    packed: bool = True          # pack all questions of a scene in one row (~3x cheaper per question); with
                                 # --no-packed the question joins the image in the bidirectional prefix
    max_steps: int = 2000        # 500 curriculum steps + 1500 on full tables: ~15-20 min with the data on 2 cores
    lr: float = 1e-3             # from scratch; the paper's 1e-5 is for fine-tuning a pre-trained VLM. With the
                                 # curriculum, 6e-4 and 1e-3 bind words to objects faster than 3e-4 (EXPERIMENTS.md);
                                 # 1e-3 bound by step 2000 on both CPUs tried (items 30-31), 6e-4 once not by 2600
    min_lr: float = 3e-5
    warmup: int = 50
    schedule: str = "cosine"     # cosine: decay from the warm-up on; wsd: warm-up, stable at lr, then decay over
                                 # the last decay_fraction of the steps (the high rate kept through the binding;
                                 # measured over 4 seeds at 2600 steps: no gain, EXPERIMENTS.md "Seeds")
    decay_fraction: float = 0.2  # (wsd only)
    weight_decay: float = 0.05
    muon_lr: float = 0.02        # the transformer blocks' weight matrices train with Muon (model.Muon) at this rate
                                 # (on the same schedule as --lr); embeddings, stem, norms, biases stay AdamW. 0 =
                                 # AdamW only, as before session 15: 2600 steps, seed 0, box 59.8% against 46-50%
                                 # (EXPERIMENTS.md, "Muon"); 0.04 stalled on the one-object tables
    grad_clip: float = 1.0
    log_interval: int = 50
    eval_interval: int = 1000
    seed: int = 0                # data seed: scenes, questions (and the rest, unless --init-seed)
    init_seed: int = -1          # weights' initialisation and batch order; -1: the same as --seed. A new seed
                                 # regenerates the data; this one measures run-to-run luck on the same data
    device: str = "auto"         # auto picks cuda, then mps, then cpu
    bf16: bool = False           # bfloat16 autocast (model.autocast); off: on an AMD CPU without AMX it kept stage 1 from
                                 # learning (EXPERIMENTS.md, item 27); on an Intel CPU with AMX it was ~1.1x faster
    resume: bool = False         # continue from OUT/ckpt (weights, optimizer, step)
    progress: bool = True        # tqdm progress bars


PRESETS = {
    "smoke": dict(train_scenes=24, test_scenes=8, eval_scenes=8, image_size=48, d_model=64, vit_layers=1,
                  lm_layers=1, batch_size=4, max_steps=30, warmup=5, log_interval=10, eval_interval=30,
                  curriculum_scenes=8, curriculum_steps=10, curriculum_batch_size=4, pair_scenes=8),
    "default": dict(),
    # full: the default's data and model, 12000 steps. Measured on an H100 (EXPERIMENTS.md, "Stage 1 on a GPU"): box
    # Acc@0.5 99.0%, point 99.3%, trace DFD 0.95 px on the 300 test scenes, in 6.2 min of training. Between
    # steps ~3000 and ~6000 the boxes jump from ~54% to ~98%: the words bind to the objects. On 2 CPU cores the
    # same run would take ~70-130 min (estimated from the step time). It was measured with AdamW alone and no
    # --word-aux (before Muon and the word loss became the default), so it keeps that recipe. With Muon the jump
    # comes sooner (the default of session 15 resumed to 5200 steps: box 97.7%, ~1 hour on 2 CPU cores), and with
    # the word loss sooner still: between steps ~1000 and ~2000 (EXPERIMENTS.md, "Word aux").
    "full": dict(max_steps=12000, muon_lr=0.0, word_aux=0.0),
}


# CURRICULUM. Trained from scratch on the full tables (2-4 objects, 1-2 containers), the planner learns the
# answer format and where things *usually* are, then sits on that plateau: its answers barely depend on the
# image (3000 steps at lr 1e-3: box Acc@0.5 2%, near the same box for every scene). To answer it must learn
# two things at once -- attend to the right patch, and read a coordinate from it -- and neither pays off
# without the other. On tables with ONE object and ONE container there is nothing to tell apart, so the first
# ("look at the thing and read its place") is learned alone, within a few hundred steps; the colour/shape
# binding of the full tables is then learned on top. Only the training tables change: the
# evaluation always uses the full test-split tables of sim.py.


def parse_config(argv=None) -> Config:
    """--preset picks the defaults; any other flag overrides one setting."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default", choices=list(PRESETS))
    preset = pre.parse_known_args(argv)[0].preset
    base = Config(preset=preset, **PRESETS[preset])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=getattr(base, f.name))
        else:
            p.add_argument(flag, dest=f.name, type=type(getattr(base, f.name)), default=getattr(base, f.name))
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.schedule not in ("cosine", "wsd"):
        p.error(f"--schedule must be cosine or wsd, not {cfg.schedule!r}")
    if cfg.word_aux_at not in ("input", "output"):
        p.error(f"--word-aux-at must be input or output, not {cfg.word_aux_at!r}")
    if cfg.lookup_aux and not cfg.packed:
        p.error("--lookup-aux needs packed rows (drop --no-packed)")
    if cfg.word_aux and not cfg.packed:  # on by default, so say how to turn it off
        p.error("--word-aux needs packed rows: drop --no-packed, or add --word-aux 0 to train without it")
    if cfg.lookup_aux and not 0 <= cfg.lookup_layer < cfg.lm_layers:
        p.error(f"--lookup-layer {cfg.lookup_layer}: the language model has blocks 0..{cfg.lm_layers - 1}")
    return cfg


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to min_lr (schedule "cosine"), or: hold lr, and decay (cosine) to
    min_lr over the last decay_fraction of the steps only (schedule "wsd": warm-up, stable, decay)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = cfg.warmup if cfg.schedule == "cosine" else max(cfg.warmup, int(cfg.max_steps * (1 - cfg.decay_fraction)))
    t = min(1.0, max(0.0, step - start) / max(1, cfg.max_steps - start))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def curriculum_phase(step: int, cfg: Config) -> str:
    """Which tables step `step` trains on: "one" (1 object, 1 container) for the first curriculum_steps, then
    "two" (2 objects, 1 container) for pair_steps, then "full" (sim.py's tables) to the end."""
    if step < cfg.curriculum_steps:
        return "one"
    if step < cfg.curriculum_steps + cfg.pair_steps:
        return "two"
    return "full"


def shuffled_batches(dataset, batch_size: int, rng: np.random.Generator):
    """Endless lists of batch_size items, reshuffled at every epoch."""
    while True:
        order = rng.permutation(len(dataset))
        for pos in range(0, max(1, len(order) - batch_size + 1), batch_size):
            yield [dataset[i] for i in order[pos:pos + batch_size]]


def plot_curves(history: list, evals: list, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([h["step"] for h in history], [h["loss"] for h in history])
    ax[0].set(xlabel="step", ylabel="answer-token loss", yscale="log", title="stage 1 training loss")
    for key, label in (("box_acc50", "box Acc@0.5"), ("point_acc", "point acc"), ("parse_rate", "parse rate")):
        ax[1].plot([e["step"] for e in evals], [e[key] for e in evals], marker="o", label=label)
    ax2 = ax[1].twinx()
    ax2.plot([e["step"] for e in evals], [e["trace_dfd"] for e in evals], "k--", marker="x", label="trace DFD (px)")
    ax2.set_ylabel("trace DFD (px)")
    ax[1].set(xlabel="step", ylim=(0, 1.02), title="held-out grounding (test split)")
    ax[1].legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_predictions(images: np.ndarray, qa: list, answers: list, path: str, n_scenes: int = 8, scale: int = 3):
    """Predicted (solid) vs true (thin white) boxes, points and traces over test images."""
    from PIL import Image, ImageDraw

    tiles = []
    for scene in sorted({q["image"] for q in qa})[:n_scenes]:
        im = Image.fromarray(images[scene]).resize((images.shape[2] * scale, images.shape[1] * scale), Image.NEAREST)
        d = ImageDraw.Draw(im)
        for q, a in zip(qa, answers):
            if q["image"] != scene:
                continue
            s = lambda v: [float(x) * scale for x in np.ravel(v)]  # noqa: E731
            if q["kind"] == "box":
                d.rectangle(s(q["label"]), outline=(255, 255, 255))
                b = data.parse_box(a)
                if b is not None:
                    d.rectangle(s(b), outline=(255, 0, 255), width=2)
            elif q["kind"] == "place":
                p = data.parse_point(a)
                if p is not None:
                    x, y = s(p)
                    d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(0, 255, 255))
            elif q["kind"] == "trace":
                d.line(s(q["label"]), fill=(255, 255, 255), width=1)
                t = data.parse_trace(a)
                if t is not None:
                    d.line(s(t), fill=(255, 255, 0), width=2)
        tiles.append(np.asarray(im))
    rows = [np.concatenate(tiles[i:i + 4], 1) for i in range(0, len(tiles) - len(tiles) % 4 or len(tiles), 4)]
    Image.fromarray(np.concatenate(rows, 0) if len(rows) > 1 else rows[0]).save(path)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(argv)
    sys.stdout.reconfigure(line_buffering=True)  # log lines appear at once, even when redirected to a file
    device = pick_device(cfg.device)
    init_seed = cfg.seed if cfg.init_seed < 0 else cfg.init_seed
    torch.manual_seed(init_seed)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_dir = os.path.join(cfg.out, "ckpt")
    print(f"stage 1 (grounding), preset {cfg.preset}, device {device}, {torch.get_num_threads()} threads")

    # -- data: rendered once, resumable; test scenes come from the test split (reserved tasks, phrasings) ---
    tok = data.get_tokenizer()
    cf = (f"_cf{cfg.counterfactual_prompts}" if cfg.counterfactual_prompts else "") + \
        ("_cc" if cfg.counterfactual_containers else "")
    train_dir = os.path.join(cfg.data_dir, f"grounding_train_{cfg.image_size}{cf}")
    test_dir = os.path.join(cfg.data_dir, f"grounding_test_{cfg.image_size}")
    data.generate_grounding(train_dir, cfg.train_scenes, "train", cfg.seed, cfg.image_size, progress=cfg.progress,
                            counterfactual_prompts=cfg.counterfactual_prompts,
                            counterfactual_containers=cfg.counterfactual_containers)
    data.generate_grounding(test_dir, cfg.test_scenes, "test", cfg.seed, cfg.image_size, progress=cfg.progress)
    if cfg.patch_aux and not cfg.packed:
        raise ValueError("--patch-aux needs packed rows (drop --no-packed)")
    # > 0: batches carry patch labels (data.patch_labels)
    aux_patch = cfg.patch_size if (cfg.patch_aux or cfg.word_aux) else 0
    aux_look = cfg.patch_size if cfg.lookup_aux else 0  # > 0: batches carry lookup targets (data.lookup_target)
    train_set = data.GroundingDataset(train_dir, tok, max_scenes=cfg.train_scenes, packed=cfg.packed,
                                      patch_size=aux_patch, lookup_patch=aux_look)
    easy_set = None
    if cfg.curriculum_steps > 0:  # 1 object + 1 container per table, other seeds than the main set
        easy_dir = os.path.join(cfg.data_dir, f"grounding_easy_{cfg.image_size}")
        data.generate_grounding(easy_dir, cfg.curriculum_scenes, "train", cfg.seed + 1, cfg.image_size,
                                progress=cfg.progress, n_objects=(1, 1), n_containers=(1, 1))
        easy_set = data.GroundingDataset(easy_dir, tok, max_scenes=cfg.curriculum_scenes, packed=cfg.packed,
                                         patch_size=aux_patch, lookup_patch=aux_look)
    pair_set = None
    if cfg.pair_steps > 0:  # 2 objects + 1 container per table, their own seeds
        pair_dir = os.path.join(cfg.data_dir, f"grounding_pair_{cfg.image_size}")
        data.generate_grounding(pair_dir, cfg.pair_scenes, "train", cfg.seed + 2, cfg.image_size,
                                progress=cfg.progress, n_objects=(2, 2), n_containers=(1, 1))
        pair_set = data.GroundingDataset(pair_dir, tok, max_scenes=cfg.pair_scenes, packed=cfg.packed,
                                         patch_size=aux_patch, lookup_patch=aux_look)
    test_images, test_qa = data.load_grounding(test_dir, max_scenes=cfg.test_scenes)
    eval_qa = [q for q in test_qa if q["image"] < cfg.eval_scenes]
    print(f"train: {len(train_set.images)} scenes, {len(train_set.qa)} questions | test: {len(test_images)} scenes, "
          f"{len(test_qa)} questions")

    # -- model --------------------------------------------------------------------------------------------
    mcfg = PlannerConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, vocab_size=tok.n_vocab, number_values=data.number_values(tok), prompt_in_prefix=not cfg.packed,
                         d_model=cfg.d_model, vit_layers=cfg.vit_layers, lm_layers=cfg.lm_layers, n_heads=cfg.n_heads,
                         coord_sigma=cfg.coord_sigma, tie_head=cfg.tie_head, patch_classes=data.patch_classes() if cfg.patch_aux else ())
    model = Planner(mcfg).to(device)
    print(f"planner: {count_params(model) / 1e6:.2f}M parameters, {mcfg.n_image_tokens} image tokens")

    # -- optimizer: AdamW, betas (0.9, 0.95) as in the paper; no weight decay on biases/norms/positions ---
    # With --muon-lr the weight matrices inside the ViT and language blocks, and the projector, go to Muon
    # instead (model.Muon); embeddings, the conv stem, the norms and biases stay with AdamW.
    def for_muon(name, p):
        return cfg.muon_lr > 0 and p.dim() == 2 and (name.startswith(("vit_blocks.", "lm_blocks.", "projector.")))
    muon_params = [p for n, p in model.named_parameters() if for_muon(n, p)]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos" not in n and not for_muon(n, p)]
    ids = {id(p) for p in decay + muon_params}
    no_decay = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    # (Muon's decay shrinks its matrices by muon_lr * weight_decay = 1e-3 a step at the peak rate, much more than
    # AdamW's 6e-4 * 0.05; that is the recipe that was measured)
    muon = Muon(muon_params, lr=cfg.muon_lr, weight_decay=cfg.weight_decay) if muon_params else None

    step, history, evals = 0, [], []
    if cfg.resume:
        if not os.path.exists(os.path.join(ckpt_dir, "config.json")):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_dir}; run without --resume to start fresh")
        loaded, ck = load_checkpoint(ckpt_dir)
        model.load_state_dict(loaded.state_dict())
        step, history, evals = ck["step"], ck["history"], ck["evals"]
        print(f"resumed from {ckpt_dir} at step {step}")
        done = os.path.join(cfg.out, "metrics.json")
        if step >= cfg.max_steps and os.path.exists(done):  # finished earlier: keep its measured numbers
            print(f"already trained to {step} steps; nothing to do (results in {done})")
            with open(done) as f:
                return json.load(f)
        load_optimizers(ckpt_dir, ck["train_config"], cfg.muon_lr, opt, muon)

    def checkpoint(metrics=None):
        save_checkpoint(ckpt_dir, model, {
            "stage": 1, "step": step, "train_config": asdict(cfg), "image_size": cfg.image_size,
            "tokenizer": data.ranks_to_json(data.load_ranks()), "history": history, "evals": evals,
            "metrics": metrics or (evals[-1] if evals else None)})
        save_optimizers(ckpt_dir, opt, muon)

    def evaluate(qa):
        metrics, answers = data.evaluate_grounding(model, tok, test_images, qa, device)
        model.train()
        return metrics, answers

    image_tokens = {}  # --word-aux at the input: a hook keeps the projector's output (the image tokens) in training
    word_targets = ([t.to(device) for t in data.patch_word_targets(tok, mcfg.vocab_size)]  # once, not per step
                    if cfg.word_aux else None)
    if cfg.word_aux and cfg.word_aux_at == "input":
        model.projector.register_forward_hook(
            lambda module, args, out: image_tokens.update(x=out) if module.training else None)
    block_input = {}  # --lookup-aux reads the input of one language block: a pre-hook keeps it during training
    if cfg.lookup_aux:
        model.lm_blocks[cfg.lookup_layer].register_forward_pre_hook(
            lambda module, args: block_input.update(x=args[0]) if module.training else None)

    # -- training loop ------------------------------------------------------------------------------------
    rng = np.random.default_rng(init_seed + step)  # batch order
    full_batches = shuffled_batches(train_set, cfg.batch_size, rng)
    easy_batches = shuffled_batches(easy_set, cfg.curriculum_batch_size, rng) if easy_set is not None else None
    pair_batches = shuffled_batches(pair_set, cfg.batch_size, rng) if pair_set is not None else None
    model.train()
    t0, t_last = time.time(), time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="stage 1", disable=not cfg.progress, unit="step")
    while step < cfg.max_steps:
        phase = curriculum_phase(step, cfg)  # "one" -> "two" -> "full" (CURRICULUM above)
        easy, pair = phase == "one", phase == "two"
        dataset, batches = {"one": (easy_set, easy_batches), "two": (pair_set, pair_batches),
                            "full": (train_set, full_batches)}[phase]
        items = next(batches)
        n_questions = sum(len(pairs) for _, pairs in items)
        batch = [x.to(device) for x in dataset.collate(items)]
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        if muon is not None:  # the same schedule, scaled to Muon's own rate
            muon.param_groups[0]["lr"] = cfg.muon_lr * lr / cfg.lr
        with autocast(device, cfg.bf16):
            if cfg.packed:  # images, tokens, targets, segments, positions (+ patch labels with --patch-aux)
                _, loss, hidden = model(*batch[:5])
            else:  # images, tokens, targets, prefix_len
                _, loss, _ = model(*batch[:3], prefix_len=batch[3])  # mean loss over all answer tokens
            total = loss  # the answer loss; logged and plotted alone
            if cfg.patch_aux:
                patch_loss = model.patch_loss(hidden, batch[5])
                total = total + cfg.patch_aux * patch_loss
            if cfg.word_aux:
                img = image_tokens.pop("x") if cfg.word_aux_at == "input" else hidden[:, : mcfg.n_image_tokens]
                word_loss = model.word_loss(img, batch[5], word_targets)
                total = total + cfg.word_aux * word_loss
            if cfg.lookup_aux:
                lookup_loss = model.lookup_loss(block_input.pop("x"), cfg.lookup_layer, batch[-1])
                total = total + cfg.lookup_aux * lookup_loss
        opt.zero_grad(set_to_none=True)
        if muon is not None:
            muon.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if muon is not None:
            muon.step()
        step += 1
        bar.update(1)
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            dt = (time.time() - t_last) / cfg.log_interval
            t_last = time.time()
            history.append({"step": step, "loss": loss.item(), "lr": lr,
                            **({"lookup_loss": lookup_loss.item()} if cfg.lookup_aux else {}),
                            **({"word_loss": word_loss.item()} if cfg.word_aux else {})})
            eta = dt * (cfg.max_steps - step) / 60
            tqdm.write(f"step {step:6d} | loss {loss.item():.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/step | "
                       f"{n_questions / dt:.0f} questions/s | eta {eta:.1f} min" + (" | curriculum: 1-object tables" if easy else "")
                       + (" | curriculum: 2-object tables" if pair else "")
                       + (f" | patch loss {patch_loss.item():.3f}" if cfg.patch_aux else "")
                       + (f" | word loss {word_loss.item():.3f}" if cfg.word_aux else "")
                       + (f" | lookup loss {lookup_loss.item():.3f}" if cfg.lookup_aux else ""))
        if step % cfg.eval_interval == 0 and step < cfg.max_steps:
            metrics, _ = evaluate(eval_qa)
            evals.append({"step": step, **metrics})
            tqdm.write(f"eval @ {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "n"))
            checkpoint()
    bar.close()
    train_time = time.time() - t0

    # -- final evaluation on every test scene, pictures, metrics.json --------------------------------------
    metrics, answers = evaluate(test_qa)
    evals.append({"step": step, **metrics})
    checkpoint(metrics)
    result = {"metrics": metrics, "train_seconds": train_time, "step": step, "preset": cfg.preset,
              "params": count_params(model), "device": device, "threads": torch.get_num_threads(),
              "cpu": cpu_model(), "bf16": cfg.bf16, "test_scenes": len(test_images)}
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_curves(history, evals, os.path.join(cfg.out, "curves.png"))
    draw_predictions(test_images, test_qa, answers, os.path.join(cfg.out, "predictions.png"))
    print(f"test split, {len(test_images)} scenes / {metrics['n']} questions: parse rate {metrics['parse_rate']:.3f}, "
          f"box Acc@0.5 {metrics['box_acc50']:.3f} (mIoU {metrics['box_miou']:.3f}; on another object "
          f"{metrics['box_other_object']:.3f}), point acc {metrics['point_acc']:.3f}, "
          f"trace DFD {metrics['trace_dfd']:.2f} px")
    print(f"wrote {ckpt_dir}, {cfg.out}/metrics.json, curves.png, predictions.png ({train_time / 60:.1f} min training)")
    return result


if __name__ == "__main__":
    main()
