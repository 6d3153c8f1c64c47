"""train_action.py -- stage 2 of InternVLA-M1: spatially guided action training.

The paper's second idea: the planner from stage 1, prompted to locate what matters, guides a diffusion action
expert, while grounding keeps being trained:

    image + "Your task is to {instruction}. Figure out how to execute it, then locate the key object needed."
        -> planner hidden states --(x grad_decay on the way back)--> latent planning queries -> DiT
        -> a chunk of `chunk_len` future joint targets (epsilon-prediction DDPM, squared-cosine schedule)
    loss = action loss + grounding_weight * grounding loss   (co-training: one batch of each every step)

That is the paper's recipe (--no-frozen-planner --cotrain). By default m1 here keeps stage 1's planner frozen:
no gradient reaches it, so its hidden states are computed once and each step trains only the queries and
the DiT, about three times cheaper; in the same wall time that won, 57.8% against 42.3% (EXPERIMENTS.md, 30).

    python train_action.py --preset smoke                     # < 1 minute, for tests
    python train_action.py                                    # m1, the README's laptop run (preset default): the
                                                              # planner frozen, 5500 steps (EXPERIMENTS.md, 30-34)
    python train_action.py --no-frozen-planner --cotrain      # the paper's co-trained recipe (2500 steps)
    python train_action.py --variant vanilla --out out/vanilla  # the paper's "vanilla VLA" ablation
    python train_action.py --no-written-plan --no-plan-numbers  # m1 without the written plan: the paper's latent
                                                              # path alone (EXPERIMENTS.md, item 11)
    python train_action.py --demos 400 --no-paired-demos --no-written-plan --no-plan-numbers --no-prev-state
                                                              # the paper's plain recipe (the default before
                                                              # session 18; eval.py's m1_plain)
    python train_action.py ... --init-from out/m1/ckpt --extra-demos out/takeover --max-steps 600
                                                              # fine-tune on DAgger-style takeover episodes
                                                              # (data.py --takeover; EXPERIMENTS.md, items 16-17)
    python train_action.py ... --extra-demos out/round1,out/round2 --extra-repeat 3
                                                              # several folders, each episode drawn 3x as often
    python train_action.py --no-cotrain --out out/no_cotrain  # any single component off (also --no-from-stage1,
                                                              # --grad-decay 1.0; eval.py's ABLATION lists them,
                                                              # with what each needs off too)
    python train_action.py --no-cotrain --frozen-planner      # stage 1's planner kept as it is: its hidden states are
                                                              # computed once, each step trains only the queries
                                                              # and the DiT (6000 steps on one thread: 40.7%, against
                                                              # 36.2% for 2500 default steps on two, EXPERIMENTS.md 28;
                                                              # --max-steps 8000 on two threads: 46.7%, item 29)
    torchrun --nproc_per_node 4 train_action.py --preset full # several GPUs (PyTorch DDP)

Variants (the paper's ablation): `m1` = stage-1 planner + spatial prompt + co-training + gradient decay
(+ ours: a "where" readout of the condition tokens, model.VLA.where_loss, and a written plan: the planner writes
its answer to the spatial prompt once per episode, and the queries and the DiT read it); `vanilla` = the same
networks trained on actions only, planner from scratch, bare instruction, no plan. Both learn from the same
DART-style demonstrations (data.generate_demos, --demo-noise), recorded in counterfactual pairs (the same table
twice, two objects asked for), with the same batches (--early-fraction) and the same state inputs.
Both get the same number of steps and batch sizes: the same compute for the action loss.
Optimizers: AdamW with the paper's per-module rates, except the weight matrices inside the DiT and query blocks,
which train with Muon (model.Muon, --muon-lr 0.02; 0 gives AdamW alone). At 2000 steps Muon took closed-loop
success from 0/600 to 82/600 (EXPERIMENTS.md, closed-loop item 20). The checkpoint holds a moving average of
the weights (--ema; the trained ones beside it, for --resume), and stage 2 runs in float32 (--bf16 was slower here).
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
from model import (VLA, Muon, ActionExpertConfig, PlannerConfig, autocast, count_params, load_checkpoint, load_optimizers, pick_device,
                   save_checkpoint, save_optimizers)

# ----------------------------------------------------------------------------------------------------------
# settings


@dataclass
class Config:
    preset: str = "default"      # smoke | default | full
    variant: str = "m1"          # m1 | vanilla (sets the switches in VARIANTS below; flags after it override)
    out: str = "out/m1"
    data_dir: str = "out/data"   # demos_train_<size>_noise<x>_paired/ is made here if missing; grounding data
                                 # from stage 1
    stage1: str = "out/stage1/ckpt"  # the stage-1 planner checkpoint
    from_stage1: bool = True     # start the planner from stage 1 (else from scratch)
    spatial_prompt: bool = True  # wrap the instruction in the paper's spatial prompt
    # (the variant, VARIANTS below, sets cotrain / frozen_planner; m1's planner is frozen)
    cotrain: bool = True         # a grounding batch every step, weighted by grounding_weight (the paper's recipe)
    grad_decay: float = 0.5      # scale of the action loss's gradient into the planner (when it is trained)
    frozen_planner: bool = False  # the planner is not trained at all in stage 2 (needs --no-cotrain): its hidden
                                 # states for every training frame are computed once (planner_cache) and each
                                 # step runs only the queries and the DiT (~185-220 ms a step on two threads,
                                 # against ~600-700 ms co-trained; EXPERIMENTS.md, items 28-30). m1's default
    grounding_weight: float = 0.1
    relative_actions: bool = False  # predict each chunk relative to the joint state; no gain (EXPERIMENTS.md)
    use_state: bool = True       # give the DiT the robot's joint state (the paper's released models leave it
                                 # out; at 96x96 px the wrist roll and jaw are too small to read, see EXPERIMENTS.md)
    where_weight: float = 10.0   # > 0: a where head on the condition tokens must say where the object and
                                 # container are (model.VLA.where_loss); spatial guidance, so m1 only
    held_labels: bool = True     # label the key object's position also while it is in the jaws (where head and
                                 # co-training questions); --no-held-labels was tried against the planner's
                                 # "the object is at the gripper" habit and did not help (EXPERIMENTS.md, item 8)
    written_plan: bool = True    # (m1; vanilla has no spatial prompt to answer) the planner writes its answer to
                                 # the spatial prompt (the key object's box) and the queries read it too
                                 # (data.plan_tokens, model.Policy.condition_inputs): the latent path alone
                                 # never carried WHICH object is named (EXPERIMENTS.md, item 11)
    plan_numbers: bool = True    # (m1) with written_plan: the plan's numbers (box, place point; data.plan_vector) also
                                 # reach the DiT directly, beside the joint state, not only through the planner's
                                 # hidden states. The grasp got much better; the carry still ignores the place
                                 # point (EXPERIMENTS.md, item 15)
    prev_state: bool = True      # the DiT also reads the joint state one control step earlier (the arm's motion;
                                 # Diffusion Policy reads 2 observation steps), against the end of the lift looking
                                 # like the start of the lowering in one frame. No clear gain alone (EXPERIMENTS.md,
                                 # item 15); part of the measured recipe (item 20), so both variants get it
    gripper_point: bool = False  # the DiT also reads where the jaws are in the picture (data.gripper_vector: forward
                                 # kinematics of the joint state, then the camera), in the units of the plan's
                                 # place point. Tried against the carry set down short of its container: success
                                 # fell from 39.5% to 25.8% (EXPERIMENTS.md, item 24), so it is off
    early_fraction: float = 0.3  # share of each batch from the first data.EARLY_STEPS frames of an episode
    demo_noise: float = 0.08     # DART: std (rad) of held offsets on the expert's executed actions
                                 # (data.generate_demos); both variants learn from the same demonstrations
    demos: int = 1200            # expert episodes to record (failed ones are dropped). This default recipe (1200
                                 # paired demonstrations, written plan with its numbers, previous state) from the
                                 # default stage 1: 13.7% closed-loop success; the paper's plain m1 from the same
                                 # planner with 400 demonstrations (eval.py's m1_plain): 1.7% (EXPERIMENTS.md, 20-21)
    paired_demos: bool = True    # record them in counterfactual pairs: the same table twice, two different objects
                                 # asked for (data.generate_demos(paired=True)), so the words decide the action
    demo_miss: float = 0.0       # share of demonstrations that start with a deliberate miss and then recover
                                 # (data.generate_demos(miss=...)); the missed try itself is not a label
    extra_demos: str = ""        # more folders of demonstrations (comma-separated) added to the training episodes
                                 # (not to the held-out ones), e.g. takeover episodes from data.py --takeover
    extra_repeat: int = 1        # list each extra episode this many times: takeover episodes are short (the
                                 # expert labels only the end), so at 1 they are a small share of the frames
    init_from: str = ""          # start every weight from this stage-2 checkpoint (fine-tuning, e.g. after
                                 # adding --extra-demos); it must have the same networks and state inputs
    demo_workers: int = 2        # processes recording demonstrations (the same episodes whatever the number;
                                 # on 2 cores, 2 record ~150 episodes a minute against ~90 with 1)
    image_size: int = 96
    chunk_len: int = 8           # Hc: future actions per prediction
    d_action: int = 128          # width of queries and DiT
    action_layers: int = 4
    n_queries: int = 16
    n_noise: int = 4             # diffusion noise samples per planner pass (cheap extra targets)
    batch_size: int = 32         # robot samples per step
    grounding_batch: int = 32    # grounding questions per step (co-training)
    max_steps: int = 0           # 0 = the default's wall time (~22-25 min on 2 cores) for this recipe's step cost
                                 # (default_steps): 5500 with a frozen planner, 3600 when the action loss alone trains
                                 # it (vanilla), 2500 co-trained. Co-trained, 2000 -> 2500 steps took success from
                                 # 34.5% to 46.8%, 5000 to 63.2% (EXPERIMENTS.md, items 25-26)
    lr_planner: float = 1e-4     # per-module learning rates, in the paper's proportions (1 : 10 : 5); the low
                                 # planner rate keeps stage 1's grounding while the action loss pulls on it
    lr_action: float = 1e-3
    lr_other: float = 5e-4
    muon_lr: float = 0.02        # the weight matrices inside the DiT and query blocks train with Muon
                                 # (model.Muon) at this peak rate instead of AdamW; 0 = AdamW only. Measured:
                                 # success 0/600 -> 82/600 at 2000 steps (EXPERIMENTS.md, closed-loop item 20)
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_interval: int = 50
    eval_interval: int = 500     # validation loss on held-out episodes
    seed: int = 0
    device: str = "auto"
    bf16: bool = False           # bfloat16 autocast (model.autocast). Off: on the Intel Xeon (AVX512-BF16, AMX) a
                                 # stage-2 step took 750 ms with it and 590 ms without (the backward of these small
                                 # matrices is slower in bfloat16); stage 1 trains in float32 too (train_grounding.py)
    ema: float = 0.998           # > 0: also keep an exponential moving average of the weights (decay warmed up as
                                 # min(ema, (1 + step) / (10 + step))), as diffusion policies do; the checkpoint's
                                 # model.safetensors holds the average (what eval.py and robot.py run), and
                                 # train_weights.safetensors the raw weights that --resume continues from.
                                 # At the end of a 2500-step run it succeeded as often as the raw weights
                                 # (281 against 282 of 600, EXPERIMENTS.md item 26); its held-out loss is lower mid-run
    resume: bool = False
    progress: bool = True
    # planner size when it starts from scratch (from stage 1 it is read from the checkpoint)
    d_model: int = 128
    vit_layers: int = 2
    lm_layers: int = 4


PRESETS = {
    "smoke": dict(demos=4, demo_workers=1, image_size=48, d_action=32, action_layers=1, n_queries=4, batch_size=8,
                  grounding_batch=8, max_steps=20, warmup=2, log_interval=5, eval_interval=20, d_model=64,
                  vit_layers=1, lm_layers=1),
    "default": dict(),
    "full": dict(demos=1500, max_steps=10000, eval_interval=1000),
}
VARIANTS = {
    # m1 keeps stage 1's planner frozen since session 29: from the same planner and in the same wall time
    # (~25 min on 2 cores), 6900 frozen steps succeeded in 59-62% of the episodes, the paper's co-trained
    # recipe (--no-frozen-planner --cotrain --max-steps 2500) in 38-47% (EXPERIMENTS.md, item 30). 6000 since
    # session 30, so that the whole pipeline fits the hour on the slower AMD EPYC too (item 31); 5500 since session
    # 33, to leave room in the hour for control's three chunks per plan (model.SAMPLES; item 34)
    "m1": dict(from_stage1=True, spatial_prompt=True, frozen_planner=True, cotrain=False, grad_decay=0.5,
               where_weight=10.0, written_plan=True, plan_numbers=True),
    "vanilla": dict(from_stage1=False, spatial_prompt=False, frozen_planner=False, cotrain=False, grad_decay=1.0,
                    where_weight=0.0, written_plan=False, plan_numbers=False),
}


def default_steps(cfg) -> int:
    """Steps that take about the default's wall time (~22-25 min on 2 cores) at this recipe's cost per step, so
    recipes compared side by side get the same compute: a frozen planner ~185-220 ms a step, the whole network
    trained by the action loss (vanilla) ~350-420 ms, co-trained ~600-700 ms (EXPERIMENTS.md, items 29-30)."""
    return 5500 if cfg.frozen_planner else 2500 if cfg.cotrain else 3600


def parse_config(argv=None) -> Config:
    """--preset, then --variant, fill in defaults; every other flag overrides one setting."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default", choices=list(PRESETS))
    pre.add_argument("--variant", default="m1", choices=list(VARIANTS))
    known = pre.parse_known_args(argv)[0]
    base = Config(preset=known.preset, variant=known.variant, **PRESETS[known.preset], **VARIANTS[known.variant])
    if known.variant != "m1":
        base.out = f"out/{known.variant}"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        if f.name in ("preset", "variant"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=getattr(base, f.name))
        else:
            p.add_argument(flag, dest=f.name, type=type(getattr(base, f.name)), default=getattr(base, f.name))
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.max_steps == 0:
        cfg.max_steps = default_steps(cfg)
    if cfg.prev_state and not cfg.use_state:
        p.error("--prev-state adds the previous joint state to the state the DiT reads: it needs --use-state "
                "(to train without the state, add --no-prev-state --no-plan-numbers)")
    if cfg.gripper_point and not cfg.use_state:
        p.error("--gripper-point adds the jaws' place in the picture to the state the DiT reads: it needs --use-state")
    if cfg.written_plan and not cfg.spatial_prompt:
        p.error("--written-plan is the planner's answer to the spatial prompt: it needs --spatial-prompt "
                "(to train without the prompt, add --no-written-plan --no-plan-numbers)")
    if cfg.frozen_planner and not (cfg.from_stage1 or cfg.init_from):
        p.error("--frozen-planner keeps the planner as it starts, and without --from-stage1 or --init-from that is "
                "an untrained one: give a trained planner")
    if cfg.frozen_planner and cfg.cotrain:
        p.error("--frozen-planner (m1's default) keeps the planner as stage 1 left it, but co-training trains it: "
                "for the paper's co-trained recipe give --no-frozen-planner --cotrain")
    if cfg.plan_numbers and not (cfg.written_plan and cfg.use_state):
        p.error("--plan-numbers gives the action expert the written plan's numbers beside the joint state: "
                "it needs --written-plan and --use-state")
    return cfg


def lr_scale(step: int, cfg: Config) -> float:
    """Warm-up then cosine to 5% (applied to every module's own learning rate)."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def update_average(avg: torch.nn.Module, model: torch.nn.Module, step: int, ema: float) -> float:
    """One step of the weights' moving average: avg <- avg + (1 - decay) * (model - avg), parameter by parameter.
    The decay is warmed up, min(ema, (1 + step) / (10 + step)) = 0.1, 0.18, 0.25 ... at steps 0, 1, 2, so the
    average does not keep the untrained start for hundreds of steps. Returns the decay used."""
    decay = min(ema, (1 + step) / (10 + step))
    for a, p in zip(avg.parameters(), model.parameters()):
        a.lerp_(p, 1 - decay)
    return decay


@torch.no_grad()
def planner_cache(model, dataset, device: str, batch_size: int = 64, progress: bool = True):
    """--frozen-planner: the planner's hidden states for every item of `dataset`, computed once. A planner that
    gets no gradient gives the same states for the same frame at every step, so the training steps read them
    from here instead of running the planner forward (and backward) again.
    Returns hidden (N, P+L, d) float16 (half the memory; a relative error ~5e-4) and key_pad (N, P+L) bool,
    True = padding, every row padded to the longest prompt."""
    L = max(len(p) for p in dataset.prompts)
    P, d = model.planner_config.n_image_tokens, model.planner_config.d_model
    hidden = torch.zeros(len(dataset), P + L, d, dtype=torch.float16)
    key_pad = torch.ones(len(dataset), P + L, dtype=torch.bool)
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(dataset), batch_size), desc="planner states", disable=not progress, unit="batch"):
        images, tokens, mask, *_ = dataset.collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        h, pad = model.planner.hidden_states(images.to(device), tokens.to(device), mask.to(device))  # (b, P+l, d)
        hidden[s:s + len(h), :h.shape[1]] = h.cpu().half()
        key_pad[s:s + len(h), :h.shape[1]] = pad.cpu()
    model.train(was_training)
    return hidden, key_pad


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(argv)
    sys.stdout.reconfigure(line_buffering=True)  # log lines appear at once, even when redirected to a file
    # -- device, and DDP when launched by torchrun (RANK is set): one process per GPU, rank 0 logs and saves --
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, pick_device(cfg.device)
    master = rank == 0
    torch.manual_seed(cfg.seed + rank)
    log = print if master else (lambda *a, **k: None)
    ckpt_dir = os.path.join(cfg.out, "ckpt")
    log(f"stage 2 (actions), variant {cfg.variant}, preset {cfg.preset}, device {device} x{world}, "
        f"from_stage1={cfg.from_stage1} spatial_prompt={cfg.spatial_prompt} cotrain={cfg.cotrain} "
        f"grad_decay={cfg.grad_decay} use_state={cfg.use_state} relative_actions={cfg.relative_actions} "
        f"written_plan={cfg.written_plan} paired_demos={cfg.paired_demos} demo_miss={cfg.demo_miss}")

    # -- data: expert demonstrations (made once, resumable) and the stage-1 grounding set for co-training ----
    tok = data.get_tokenizer()
    noise_tag = f"_noise{cfg.demo_noise:g}" if cfg.demo_noise else ""  # DART and clean demonstrations never mix
    noise_tag += "_paired" if cfg.paired_demos else ""
    noise_tag += f"_miss{cfg.demo_miss:g}" if cfg.demo_miss else ""
    demo_dir = os.path.join(cfg.data_dir, f"demos_train_{cfg.image_size}{noise_tag}")
    if master:
        data.generate_demos(demo_dir, cfg.demos, "train", cfg.seed, cfg.image_size, progress=cfg.progress,
                            noise=cfg.demo_noise, paired=cfg.paired_demos, miss=cfg.demo_miss,
                            workers=cfg.demo_workers)
    if ddp:
        dist.barrier()
    episodes = data.read_demo_episodes(demo_dir)[: cfg.demos]
    render_reference = data.read_render_reference(demo_dir)  # which renderer drew them (eval.py compares)
    render_reference = None if render_reference is None else data.frame_to_text(render_reference)  # once, not per save
    with open(os.path.join(demo_dir, "norm_stats.json")) as f:
        stats = json.load(f)
    if cfg.where_weight > 0 and any("target_box" not in ep for ep in episodes):
        raise ValueError(f"the demonstrations in {demo_dir} carry no object boxes (recorded on a real arm?), so the "
                         "where readout has no labels: pass --where-weight 0")
    train_eps, val_eps = data.split_episodes(episodes)  # 5% of episodes held out for a validation loss
    if cfg.extra_repeat < 1:
        raise ValueError(f"--extra-repeat {cfg.extra_repeat}: give 1 or more (to train without extra demos, leave "
                         "out --extra-demos)")
    for extra_dir in filter(None, cfg.extra_demos.split(",")):  # normalised with the main folder's stats
        extra = data.read_demo_episodes(extra_dir)
        train_eps = train_eps + extra * cfg.extra_repeat  # the same dicts again: more draws, no more memory
        log(f"extra demos: {len(extra)} successful episodes from {extra_dir} (x{cfg.extra_repeat})")
    if cfg.relative_actions:  # per-step ranges of (action - state), from the training episodes only
        stats = {**stats, "delta": data.compute_delta_stats(train_eps, cfg.chunk_len)}
    train_set = data.DemoDataset(train_eps, tok, stats, cfg.chunk_len, cfg.spatial_prompt, cfg.relative_actions,
                                 cfg.held_labels, cfg.written_plan, cfg.plan_numbers, cfg.prev_state,
                                 cfg.gripper_point)
    val_set = data.DemoDataset(val_eps, tok, stats, cfg.chunk_len, cfg.spatial_prompt, cfg.relative_actions,
                               cfg.held_labels, cfg.written_plan, cfg.plan_numbers, cfg.prev_state,
                               cfg.gripper_point)
    log(f"demos: {len(episodes)} successful episodes, {len(train_set)} training frames, {len(val_set)} validation")
    ground_set = None
    if cfg.cotrain:
        # co-training data: the stage-1 scenes plus mid-task frames of the demonstrations (the arm anywhere)
        # (train_grounding.py's default folder has the counterfactual-container questions, "_cc"; older runs' not)
        gdirs = [os.path.join(cfg.data_dir, f"grounding_train_{cfg.image_size}{s}") for s in ("_cc", "")]
        gdir = next((d for d in gdirs if os.path.exists(d)), None)
        if gdir is None:
            raise FileNotFoundError(f"co-training needs grounding data in {gdirs[0]}: run train_grounding.py first "
                                    "(or pass --no-cotrain)")
        g_images, g_qa = data.load_grounding(gdir)
        d_images, d_qa = data.demo_grounding_qa(train_eps, np.random.default_rng(cfg.seed), len(g_qa) // 2,
                                                cfg.image_size, cfg.held_labels)
        for q in d_qa:
            q["image"] += len(g_images)
        ground_set = data.GroundingDataset(None, tok, images=np.concatenate([g_images, d_images]), qa=g_qa + d_qa)
        log(f"co-training: {len(ground_set.qa)} grounding questions on {len(ground_set.image_ids)} images ({len(d_qa)} "
            f"from demonstration frames; the rest from {gdir})")

    # -- model -------------------------------------------------------------------------------------------
    acfg = ActionExpertConfig(chunk_len=cfg.chunk_len, use_state=cfg.use_state, d_model=cfg.d_action,
                              state_dim=6 * (1 + cfg.prev_state) + (data.PLAN_DIM if cfg.plan_numbers else 0)
                              + (data.GRIPPER_DIM if cfg.gripper_point else 0),
                              n_layers=cfg.action_layers, n_queries=cfg.n_queries, where_head=cfg.where_weight > 0)
    if cfg.from_stage1:
        model, s1_config, fresh = VLA.from_planner_checkpoint(cfg.stage1, acfg)
        log(f"planner from {cfg.stage1} (stage-1 step {s1_config.get('step')}); {len(fresh)} fresh tensors")
    else:
        pcfg = PlannerConfig(image_size=cfg.image_size, vocab_size=tok.n_vocab, number_values=data.number_values(tok), d_model=cfg.d_model,
                             vit_layers=cfg.vit_layers, lm_layers=cfg.lm_layers)
        model = VLA(pcfg, acfg)
    if cfg.init_from:
        loaded, ck = load_checkpoint(cfg.init_from)
        try:
            model.load_state_dict(loaded.state_dict())
        except RuntimeError as e:
            raise ValueError(f"--init-from {cfg.init_from}: its networks differ from this run's settings (same "
                             f"--written-plan/--plan-numbers/--prev-state/--gripper-point/sizes needed): "
                             f"{str(e)[:300]}") from None
        stats = ck["norm_stats"]  # keep the numbers' meaning: the checkpoint's normalisation, not a recomputed one
        train_set.stats = val_set.stats = stats
        log(f"weights from {cfg.init_from} (its step {ck.get('step')})")
    if model.planner_config.image_size != cfg.image_size:
        raise ValueError(f"the stage-1 planner takes {model.planner_config.image_size} px images, not {cfg.image_size}")
    model.to(device)
    log(f"VLA: planner {count_params(model.planner) / 1e6:.2f}M, queries {count_params(model.queries) / 1e6:.2f}M, "
        f"action expert {count_params(model.expert) / 1e6:.2f}M parameters")
    groups = model.param_groups(cfg.lr_planner, cfg.lr_action, cfg.lr_other, cfg.weight_decay)
    all_params = [p for g in groups for p in g["params"]]
    # With --muon-lr the weight matrices inside the DiT and query blocks (trained from scratch here) move to
    # Muon; the planner, which stage 1 trained, and every embedding, norm and bias stay with AdamW.
    muon_params = [p for n, p in model.named_parameters()
                   if cfg.muon_lr > 0 and p.dim() == 2 and n.startswith(("expert.blocks.", "queries.blocks."))]
    ids = {id(p) for p in muon_params}
    groups = [dict(g, params=[p for p in g["params"] if id(p) not in ids]) for g in groups]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))
    muon = Muon(muon_params, lr=cfg.muon_lr, weight_decay=cfg.weight_decay) if muon_params else None

    # The weights' moving average: a copy that is never trained, only pulled towards the trained weights after
    # each step. It smooths out the last steps' noise, which a diffusion policy's rollouts are sensitive to.
    ema_model = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None
    raw_path = os.path.join(ckpt_dir, "train_weights.safetensors")

    step, history, val_history = 0, [], []
    if cfg.resume:
        if not os.path.exists(os.path.join(ckpt_dir, "config.json")):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_dir}; run without --resume to start fresh")
        loaded, ck = load_checkpoint(ckpt_dir)  # model.safetensors: the average when the run kept one
        if ema_model is not None:
            ema_model.load_state_dict(loaded.state_dict())
        if os.path.exists(raw_path):
            model.load_state_dict(load_file(raw_path), strict=True)
        elif ck["train_config"].get("ema", 0) > 0:
            raise FileNotFoundError(f"--resume: {raw_path} (the raw weights of a run with --ema) is missing; "
                                    "start a fresh run in another --out")
        else:
            model.load_state_dict(loaded.state_dict())
        step, history, val_history = ck["step"], ck["history"], ck["val_history"]
        log(f"resumed from {ckpt_dir} at step {step}")
        if step >= cfg.max_steps and os.path.exists(os.path.join(cfg.out, "train_summary.json")):
            log(f"already trained to {step} steps; nothing to do")  # keeps the finished run's summary
            return
        load_optimizers(ckpt_dir, ck["train_config"], cfg.muon_lr, opt, muon)
    cache = None
    if cfg.frozen_planner:  # before DDP wraps the model: it registers the parameters that need a gradient
        model.planner.requires_grad_(False)  # AdamW skips parameters without a gradient: no update, no decay
        t_cache = time.time()
        cache = planner_cache(model, train_set, device, progress=cfg.progress and master)
        log(f"frozen planner: hidden states of {len(train_set)} frames, {tuple(cache[0].shape)} float16 "
            f"({cache[0].numel() * 2 / 2**30:.2f} GiB), {time.time() - t_cache:.0f} s")
    # under torchrun: DDP averages gradients across processes during backward (some parameters, e.g. the
    # planner's output head without co-training, get no gradient in a step: find_unused_parameters)
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ddp else model

    def checkpoint():
        if not master:
            return
        if ema_model is not None:  # the raw weights, for --resume (the same names as model.safetensors')
            os.makedirs(ckpt_dir, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, raw_path)
        save_checkpoint(ckpt_dir, model if ema_model is None else ema_model, {
            "stage": 2, "step": step, "variant": cfg.variant, "train_config": asdict(cfg),
            "image_size": cfg.image_size, "spatial_prompt": cfg.spatial_prompt, "written_plan": cfg.written_plan,
            "plan_numbers": cfg.plan_numbers, "prev_state": cfg.prev_state, "gripper_point": cfg.gripper_point,
            "chunk_len": cfg.chunk_len,
            "use_state": cfg.use_state, "relative_actions": cfg.relative_actions, "norm_stats": stats,
            "tokenizer": data.ranks_to_json(data.load_ranks()),
            "render_reference": render_reference,
            "history": history, "val_history": val_history, "weights": "ema" if ema_model is not None else "raw"})
        save_optimizers(ckpt_dir, opt, muon)

    @torch.no_grad()
    def validation_loss(model) -> float:
        """Action loss on held-out episodes with fixed noise, so the number is comparable across steps."""
        was_training = model.training
        model.eval()
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(val_set), generator=g)[:256].tolist()
        losses = []
        for s in range(0, len(idx), 64):
            images, tokens, mask, actions, state, _ = val_set.collate([val_set[i] for i in idx[s:s + 64]])
            images, tokens, mask, actions, state = (x.to(device) for x in (images, tokens, mask, actions, state))
            torch.manual_seed(1)
            losses.append(model.action_loss(images, tokens, mask, actions, state if cfg.use_state else None, 1.0, 1).item())
        model.train(was_training)
        return float(np.mean(losses))

    # -- training loop --------------------------------------------------------------------------------------
    rng = np.random.default_rng(cfg.seed + 1000 * rank + step)
    model.train()
    t0 = t_last = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"stage 2 {cfg.variant}", disable=not (cfg.progress and master),
               unit="step")
    while step < cfg.max_steps:
        scale = lr_scale(step, cfg)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        if muon is not None:  # the same schedule, at Muon's own peak rate
            muon.param_groups[0]["lr"] = cfg.muon_lr * scale
        idx = train_set.sample_indices(rng, cfg.batch_size, cfg.early_fraction)
        batch = train_set.collate([train_set[i] for i in idx])
        images, tokens, mask, actions, state, where = batch
        images, tokens, mask, actions, state = (x.to(device) for x in (images, tokens, mask, actions, state))
        states = None if cache is None else (cache[0][idx].to(device).float(), cache[1][idx].to(device))
        where = where.to(device) if cfg.where_weight > 0 else None
        grounding = None
        if cfg.cotrain:  # co-training: a grounding batch every step, next-token loss on the answers
            gb = ground_set.collate([ground_set[i] for i in rng.integers(len(ground_set), size=cfg.grounding_batch)])
            grounding = tuple(x.to(device) for x in gb)
        # the action loss's gradient reaches the planner scaled by grad_decay (model.scale_grad)
        with autocast(device.split(":")[0], cfg.bf16):
            a_loss, g_loss, w_loss = net(images, tokens, mask, actions, state if cfg.use_state else None,
                                         cfg.grad_decay, cfg.n_noise, grounding, where, states)
        loss = a_loss if g_loss is None else a_loss + cfg.grounding_weight * g_loss
        loss = loss if w_loss is None else loss + cfg.where_weight * w_loss
        g_loss = torch.zeros(()) if g_loss is None else g_loss
        w_loss = torch.zeros(()) if w_loss is None else w_loss
        opt.zero_grad(set_to_none=True)
        if muon is not None:
            muon.zero_grad(set_to_none=True)
        loss.backward()  # under DDP, gradients are averaged across processes here
        torch.nn.utils.clip_grad_norm_(all_params, cfg.grad_clip)
        opt.step()
        if muon is not None:
            muon.step()
        if ema_model is not None:
            update_average(ema_model, model, step, cfg.ema)
        step += 1
        bar.update(1)
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            dt = (time.time() - t_last) / cfg.log_interval
            t_last = time.time()
            history.append({"step": step, "action_loss": a_loss.item(), "grounding_loss": g_loss.item(),
                            "where_loss": w_loss.item()})
            if master:
                tqdm.write(f"step {step:6d} | action {a_loss.item():.4f} | grounding {g_loss.item():.4f} | where {w_loss.item():.4f} | "
                           f"lr x{scale:.2f} | {dt * 1000:.0f} ms/step | "
                           f"{cfg.batch_size * world / dt:.0f} samples/s | eta {dt * (cfg.max_steps - step) / 60:.1f} min")
        if (step % cfg.eval_interval == 0 or step == cfg.max_steps) and master:
            v = validation_loss(model)
            val_history.append({"step": step, "val_action_loss": v})
            if ema_model is not None:
                val_history[-1]["val_action_loss_ema"] = v_ema = validation_loss(ema_model)
                tqdm.write(f"validation action loss @ {step}: {v:.4f} (the weights' average: {v_ema:.4f})")
            else:
                tqdm.write(f"validation action loss @ {step}: {v:.4f}")
            checkpoint()
    bar.close()
    if master:
        minutes = (time.time() - t0) / 60
        with open(os.path.join(cfg.out, "train_summary.json"), "w") as f:
            json.dump({"variant": cfg.variant, "steps": step, "train_minutes": minutes, "device": device,
                       "world_size": world, "final_val_action_loss": val_history[-1]["val_action_loss"],
                       "final_val_action_loss_ema": val_history[-1].get("val_action_loss_ema"),
                       "config": asdict(cfg)}, f, indent=2)
        log(f"wrote {ckpt_dir} ({minutes:.1f} min); evaluate it with: python eval.py --ckpt {ckpt_dir}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
