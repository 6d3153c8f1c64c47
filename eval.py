"""eval.py -- closed-loop evaluation in simulation, the paper's ablation, pictures, and the one-command pipeline.

    python eval.py --ckpt out/m1/ckpt                            # all suites, 200 episodes each
    python eval.py --ckpt out/vanilla/ckpt out/m1/ckpt --episodes 200   # side by side: the ablation
    python eval.py --pipeline                                    # data -> stage 1 -> stage 2 (m1) -> eval
    python eval.py --pipeline --variants m1 vanilla              # ... m1 and the vanilla VLA, the same compute
    python eval.py --pipeline --ablation                         # ... and vanilla + each component off
    python eval.py --pipeline --preset smoke                     # the whole path in about a minute
    python eval.py --ckpt out/m1/ckpt --open-loop out/data/demos_train_96_noise0.08_paired   # chunk error vs expert
    python eval.py --ckpt CKPT --swap-instruction 60     # does the first chunk follow the named object?
    python eval.py --ckpt CKPT --swap-place DEMO_DIR     # does the carry follow the written plan's place point?
    python eval.py --ckpt CKPT --replan-every 8 --samples 5   # control settings: actions per plan, chunks drawn
    python eval.py --ckpt CKPT --ensemble 0.5            # temporal ensembling of the overlapping chunks

Suites (fixed seeds, never used for training data):
    seen         training split (its tasks and phrasings), new tables
    unseen       test split: the reserved object/colour/container combinations and phrasings
    distractors  training split with 5 objects on the table (more clutter than training ever had)

Every success rate comes with its episode count and a 95% Wilson interval. Writes OUT/results.json, a table
on stdout, OUT/success.png (bar chart with interval bars), OUT/curves.png (training curves from the
checkpoints' logs) and OUT/<suite>_<name>.gif (rollouts with the instruction and the planner's predicted box,
placement point and trace drawn on the frames).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import mujoco
import numpy as np
import torch

import data
import sim

SUITES = {
    "seen": dict(split="train", seed=10_000_000),
    "unseen": dict(split="test", seed=20_000_000),
    "distractors": dict(split="train", seed=30_000_000, n_objects=(5, 5)),
    # a diagnostic, not part of the pipeline's table: one object and one container, so there is nothing to
    # confuse the target with -- failures here are control (reach, grasp, carry), not telling objects apart
    "single": dict(split="train", seed=40_000_000, n_objects=(1, 1), n_containers=(1, 1)),
}
MAIN_SUITES = ["seen", "unseen", "distractors"]  # the paper-style table (the pipeline's default)


def wilson(k: int, n: int, z: float = 1.96) -> tuple:
    """95% Wilson score interval for k successes in n trials (metrics.md)."""
    if n == 0:
        return (0.0, 1.0)
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return (max(0.0, centre - half), min(1.0, centre + half))


def machine() -> dict:
    from model import cpu_model
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "mujoco": mujoco.__version__}


# ----------------------------------------------------------------------------------------------------------
# closed-loop rollouts


def planner_overlay(policy, obs, info) -> dict:
    """Ask the policy's planner where things are (box of the object, where it goes, the path)."""
    ins = info["instruction"]
    name = data._names_in_instruction(ins.split(), sim)
    out = {}
    if getattr(policy, "written_plan", False) and policy.plan is not None:
        # what the action expert actually reads: the plan written on the first frame, "[x1,y1,x2,y2](x,y)"
        out["box"], out["point"] = data.parse_plan(policy.last_plan)
    else:
        if name:
            out["box"] = data.parse_box(policy.ask(obs, data.BOX_QUESTIONS[0].format(name=name[0])))
        out["point"] = data.parse_point(policy.ask(obs, data.PLACE_QUESTIONS[0].format(instruction=ins)))
    out["trace"] = data.parse_trace(policy.ask(obs, data.TRACE_QUESTIONS[0].format(instruction=ins)))
    return out


def draw_frame(image: np.ndarray, caption: str, overlay: dict, scale: int = 3) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    d = ImageDraw.Draw(im)
    if overlay.get("trace") is not None:
        d.line([float(v) * scale for v in overlay["trace"].ravel()], fill=(255, 255, 0), width=2)
    if overlay.get("box") is not None:
        d.rectangle([float(v) * scale for v in overlay["box"]], outline=(255, 0, 255), width=2)
    if overlay.get("point") is not None:
        x, y = (float(v) * scale for v in overlay["point"])
        d.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(0, 255, 255), width=2)
    canvas = Image.new("RGB", (im.width, im.height + 18), (20, 20, 20))
    canvas.paste(im, (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), caption[:70], fill=(255, 255, 255))
    return np.asarray(canvas)


OUTCOMES = ("success", "target placed, not released", "target lifted, not placed", "wrong object lifted",
            "nothing lifted")


LIFTED = 0.03  # m above where it started: "lifted", well clear of a push or a bump
JAW_OPENING = 0.2  # rad: a commanded jaw above this is opening (the expert commands -0.15 to hold, 0.6 to let go)


def classify_episode(success: bool, target_lift: float, other_lift: float, target_in_container: bool) -> str:
    """Name what happened in one episode from how high (m, above where it started) the target object and the
    highest other object were ever lifted, and whether the target ended over its container."""
    if success:
        return "success"
    if target_lift > LIFTED:
        return "target placed, not released" if target_in_container else "target lifted, not placed"
    return "wrong object lifted" if other_lift > LIFTED else "nothing lifted"


def _object_heights(env) -> np.ndarray:
    """z (m) of every object on the table, in the scene's order."""
    return np.array([env.data.xpos[env.model.body(f"obj{i}").id][2] for i in range(len(env.scene["objects"]))])


def _grasp_gap(env) -> float:
    """Distance (m) from the jaws' grasp point to the target object's centre: ~0 when the expert grasps."""
    site = env.data.site_xpos[env.model.site("grasp").id]
    obj = env.data.xpos[env.model.body(f"obj{env.scene['target_object']}").id]
    return float(np.linalg.norm(site - obj))


def _over_other_container(env) -> bool:
    """The target is within the rim of a container that is not its own (carried to the wrong one)."""
    return any(env.target_over_container(j) for j in range(len(env.scene["containers"]))
               if j != env.scene["target_container"])


def _suite_env(suite: str, image_size: int, seed_offset: int = 0):
    """The simulator a suite runs in, and the seed of its episode 0 (episode i has seed + i)."""
    spec = dict(SUITES[suite])
    base_seed = spec.pop("seed") + seed_offset
    return sim.SO100Env(image_size=image_size, **spec), base_seed


def run_episodes(policy, suite: str, first: int, last: int, seed_offset: int = 0, gif_path: str | None = None,
                 gif_episodes: int = 3, progress: bool = True) -> dict:
    """Run episodes first..last-1 of a suite closed-loop (episode i always has the seed suite_seed + i).
    Returns the raw outcomes: success per episode, steps of the successful ones, ms of every chunk prediction."""
    from tqdm import tqdm

    env, base_seed = _suite_env(suite, policy.image_size, seed_offset)
    success, steps_ok, chunk_ms, frames, final_states, outcomes, closest_cm = [], [], [], [], [], [], []
    held_steps, carried_cm, falls = [], [], []
    for i in tqdm(range(first, last), desc=f"{suite}", disable=not progress, unit="ep", leave=False):
        obs, info = env.reset(seed=base_seed + i)
        policy.reset()
        record = gif_path is not None and i < gif_episodes
        z0 = _object_heights(env)
        max_lift = np.zeros_like(z0)
        closest = _grasp_gap(env)  # how near the jaws ever came to the target: a miss measured in cm
        held, carried = 0, np.inf  # steps with the target up (> 3 cm), and how near its container it got then
        up, jaw = False, []  # is the target up now; the jaw commands of the last steps
        ep_falls = []  # each time the target came back down: did the policy open its jaws, was it over its container
        overlay = planner_overlay(policy, obs, info) if record else {}
        for t in range(env.cfg.max_steps):
            replans = policy.n_plans
            t0 = time.perf_counter()
            action = policy.act(obs, info["instruction"])
            if policy.n_plans > replans:
                chunk_ms.append(1000 * (time.perf_counter() - t0))
                if record and (t > 0 or getattr(policy, "written_plan", False)):  # where the planner looks now
                    overlay = {**planner_overlay(policy, obs, info), "trace": overlay.get("trace")}
            if record:
                frames.append(draw_frame(obs["image"], info["instruction"], overlay))
            obs, _, terminated, truncated, info = env.step(action)
            lift = _object_heights(env) - z0
            max_lift = np.maximum(max_lift, lift)
            closest = min(closest, _grasp_gap(env))
            jaw = (jaw + [float(action[5])])[-3:]  # a falling object needs a step or two to come down
            if lift[env.scene["target_object"]] > LIFTED:
                held += 1
                carried = min(carried, env.target_to_container())
                up = True
            elif up:  # it was up and is down again: let go on purpose, or slipped from closed jaws?
                up = False
                ep_falls.append({"opened": max(jaw) > JAW_OPENING, "over_container": env.target_over_container(),
                                 "over_other": _over_other_container(env)})
            if terminated or truncated:
                break
        if record:
            frames.append(draw_frame(obs["image"], ("SUCCESS: " if info["success"] else "failure: ") + info["instruction"], {}))
            frames += frames[-1:] * 5  # hold the last frame
        success.append(bool(info["success"]))
        target = env.scene["target_object"]
        outcomes.append(classify_episode(bool(info["success"]), float(max_lift[target]),
                                         float(np.delete(max_lift, target).max(initial=0.0)),
                                         env.target_over_container()))
        closest_cm.append(100 * closest)
        held_steps.append(held)
        carried_cm.append(round(100 * carried, 2) if held else None)
        falls.append(ep_falls)
        final_states.append([round(float(v), 6) for v in obs["state"]])
        if info["success"]:
            steps_ok.append(env.steps)
    env.close()
    if gif_path and frames:
        from PIL import Image
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(gif_path, save_all=True, append_images=ims[1:], duration=100, loop=0)
    return {"success": success, "steps_ok": steps_ok, "chunk_ms": chunk_ms, "final_states": final_states,
            "outcomes": outcomes, "closest_cm": closest_cm, "held_steps": held_steps, "carried_cm": carried_cm,
            "falls": falls}


def _worker(job: tuple) -> dict:
    """One worker process of run_suite: its own policy (1 thread) and its own simulator and renderer."""
    from model import Policy

    ckpt, policy_kwargs, suite, first, last, seed_offset, gif_path, gif_episodes = job
    return run_episodes(Policy.load(ckpt, **policy_kwargs), suite, first, last, seed_offset, gif_path, gif_episodes,
                        progress=False)


def run_suite(policy, suite: str, episodes: int, seed_offset: int = 0, gif_path: str | None = None,
              gif_episodes: int = 3, progress: bool = True, workers: int = 1, ckpt: str | None = None) -> dict:
    """Run `episodes` seeded episodes of a suite closed-loop. Returns the suite's numbers.
    workers > 1 splits the episodes between that many processes (each loads `ckpt` and uses one thread), so
    on a 2-core laptop 200 episodes take half the time; the episodes and their seeds are the same either way."""
    if workers <= 1:
        raw = run_episodes(policy, suite, 0, episodes, seed_offset, gif_path, gif_episodes, progress)
    else:
        import multiprocessing as mp

        cuts = np.linspace(0, episodes, workers + 1).astype(int)
        # the workers load the checkpoint themselves, with the same control settings as `policy` (if given)
        policy_kwargs = {} if policy is None else dict(replan_every=policy.replan_every, noise_scale=policy.noise_scale,
                                                       samples=policy.samples, ensemble=policy.ensemble)
        jobs = [(ckpt, policy_kwargs, suite, int(a), int(b), seed_offset, gif_path if k == 0 else None, gif_episodes)
                for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        # spawn, not fork: a forked child would inherit the parent's OpenGL context and torch threads
        pool = mp.get_context("spawn").Pool(workers)
        try:
            parts = pool.map(_worker, jobs)
        finally:
            pool.close()  # close + join lets the workers exit on their own (terminate() can leak semaphores)
            pool.join()
        raw = {k: sum((p[k] for p in parts), []) for k in parts[0]}
    wins = int(sum(raw["success"]))
    lo, hi = wilson(wins, episodes)
    return {"success_rate": wins / episodes, "successes": wins, "episodes": episodes, "ci95": [lo, hi],
            "mean_steps_to_success": float(np.mean(raw["steps_ok"])) if raw["steps_ok"] else None,
            "ms_per_chunk": float(np.median(raw["chunk_ms"])) if raw["chunk_ms"] else None,
            "outcomes": {o: raw["outcomes"].count(o) for o in OUTCOMES},  # what happened (classify_episode)
            # nearest approach of the jaws to the target, per episode: a near miss and a wild one both fail,
            # this tells them apart (the expert grasps with the target ~1 cm from its grasp point)
            "median_closest_cm": float(np.median(raw["closest_cm"])), "closest_cm": [round(c, 2) for c in raw["closest_cm"]],
            "final_states": raw["final_states"],  # the arm's last joint angles per episode (a fingerprint)
            # after a lift: for how many steps the target stayed up, and how near its container it came (the
            # expert's carry keeps it up ~25-40 steps and ends over the container)
            **lift_summary(raw["outcomes"], raw["held_steps"], raw["carried_cm"]), **fall_summary(raw["falls"])}


def lift_summary(outcomes: list, held_steps: list, carried_cm: list) -> dict:
    """For the episodes that lifted the target but did not place it: the median number of steps it stayed
    up, and the median of its nearest horizontal approach to its container's centre while up (cm)."""
    idx = [i for i, o in enumerate(outcomes) if o == "target lifted, not placed"]
    return {"held_steps": held_steps, "carried_cm": carried_cm,
            "lifted_not_placed_median_held_steps": float(np.median([held_steps[i] for i in idx])) if idx else None,
            "lifted_not_placed_median_carried_cm": float(np.median([carried_cm[i] for i in idx])) if idx else None}


def fall_summary(falls: list) -> dict:
    """Every time a lifted target came back down (per episode, from run_episodes): how many times, how many
    right after the policy commanded its jaws open (JAW_OPENING), and how many of those away from its container;
    and how many came down with the jaws closed away from its container. With closed jaws over the container it
    is the placing itself (the jaws open after the object is down, as the expert does), so most of the closed-jaw
    comings-down are not slips: "closed, away" counts the slips and the objects set down short of the container,
    and "other container" those that came down over a container that is not the one asked for."""
    flat = [f for ep in falls for f in ep]
    opened = [f for f in flat if f["opened"]]
    return {"falls": len(flat), "falls_opened": len(opened),
            "falls_opened_outside": sum(not f["over_container"] for f in opened),
            "falls_closed_outside": sum(not f["opened"] and not f["over_container"] for f in flat),
            "falls_other_container": sum(bool(f.get("over_other")) for f in flat)}


def open_loop_error(policy, episodes: list, every: int = 4) -> dict:
    """How far the policy's chunks are from the expert's, frame by frame, with no feedback from its own actions:
    mean |predicted - expert| per joint in degrees over the executed part of each chunk (replan_every actions),
    at every `every`-th frame of the given demonstration episodes. Large errors on *training* episodes mean the
    action expert underfits; small errors there but large on held-out ones mean it overfits."""
    errors, n = [], policy.replan_every
    for ep in episodes:
        policy.reset()  # a written plan (if any) comes from the episode's first frame, as in control
        for t in range(0, len(ep["actions"]) - n, every):
            policy.reset(keep_plan=True)
            chunk = policy.predict_chunk({"image": ep["images"][t], "state": ep["states"][t],
                                          "prev_state": ep["states"][max(t - 1, 0)]}, ep["instruction"])
            errors.append(np.abs(chunk[:n] - ep["actions"][t:t + n]).mean(0))  # (6,) radians
    deg = np.degrees(np.mean(errors, 0))
    return {"chunks": len(errors), **{name: float(e) for name, e in zip(sim.JOINT_NAMES, deg)}}


@torch.no_grad()
def condition_probe(policy, episodes: list, t: int = 0, alpha: float = 100.0, folds: int = 5) -> dict:
    """Does the action expert's condition know where the object is? At frame t of each episode (t=0: the arm
    has not moved, so only the image can say where to go), fit a ridge regression from the K condition tokens
    (flattened) to the target object's box centre in pixels, and score it on held-out folds.
    -> {"r2_x", "r2_y" (1 = known exactly, 0 = no better than the average position), "mae_px", "episodes"}."""
    X, Y = [], []
    for ep in episodes:
        if "target_box" not in ep or len(ep["actions"]) <= t:
            continue
        policy.reset()
        image, tokens, _ = policy.condition_inputs({"image": ep["images"][t], "state": ep["states"][t]}, ep["instruction"])
        X.append(policy.vla.condition(image, tokens).flatten().cpu().numpy())  # (K * d,)
        Y.append(data.box_centre(ep["target_box"][t]))
    X, Y = np.array(X, np.float64), np.array(Y, np.float64)
    pred, fold = np.zeros_like(Y), np.arange(len(X)) % folds
    for k in range(folds):
        tr, te = fold != k, fold == k
        mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
        A, B = (X[tr] - mu) / sd, (X[te] - mu) / sd
        # ridge in its dual form: (A A^T + alpha I)^-1 y, cheap when there are fewer episodes than features
        w = A.T @ np.linalg.solve(A @ A.T + alpha * np.eye(len(A)), Y[tr] - Y[tr].mean(0))
        pred[te] = B @ w + Y[tr].mean(0)
    r2 = 1 - ((pred - Y) ** 2).sum(0) / ((Y - Y.mean(0)) ** 2).sum(0)
    return {"r2_x": float(r2[0]), "r2_y": float(r2[1]), "mae_px": float(np.abs(pred - Y).mean()), "episodes": len(X)}


def swap_instruction(policy, suite: str, episodes: int) -> dict:
    """Does the policy go where the instruction says? At the first frame of each scene with 2+ objects, predict
    the first chunk twice: for the real instruction, and for the same sentence naming another object of the
    table instead. Compare how much the chunk's mean shoulder_pan changes with how far apart (in pan angle,
    seen from the arm's base) the two objects are. A policy that follows the words turns by about that angle
    (slope ~1); one that ignores them predicts the same chunk for both (slope ~0).
    -> {"scenes", "median_pan_change_deg", "median_angle_apart_deg", "slope", "median_first_chunk_pan_move_deg"}"""
    env, base_seed = _suite_env(suite, policy.image_size)
    vla = getattr(policy, "vla", None)
    locate = vla is not None and vla.where is not None  # also ask the where readout (m1)
    changes, apart, moves, where_change, pixels_apart, plan_right = [], [], [], [], [], []
    written = getattr(policy, "written_plan", False)
    for i in range(episodes):
        obs, info = env.reset(seed=base_seed + i)
        sc = env.scene
        ti = sc["target_object"]
        if len(sc["objects"]) < 2:
            continue
        j = next(k for k in range(len(sc["objects"])) if k != ti)
        words = info["instruction"].split()
        k = words.index(sc["objects"][ti]["colour"])  # "<colour> <noun>" of the object to pick up
        other = sc["objects"][j]
        swapped = " ".join(words[:k] + [other["colour"], sim.SYNONYMS[other["shape"]][0]] + words[k + 2:])
        pans, wheres, plans = [], [], []
        for instruction in (info["instruction"], swapped):
            policy.reset()
            torch.manual_seed(0)  # the same diffusion noise for both: only the words differ
            pans.append(float(np.mean(policy.predict_chunk(obs, instruction)[:, 0])))
            if written:  # the box the planner wrote for this instruction (None if it wrote no box)
                plans.append(data.parse_plan(policy.last_plan)[0])
            if locate:  # where the condition says the named object is (px)
                image, tokens, _ = policy.condition_inputs(obs, instruction)
                with torch.no_grad():
                    wheres.append(vla.locate(vla.condition(image, tokens))[0, :2].cpu().numpy() * policy.image_size)
        pos = np.stack([env.data.xpos[env.model.body(f"obj{n}").id] for n in (ti, j)])  # (2, 3) world
        pix = sim.project(env.model, env.data, pos, policy.image_size, policy.image_size)  # (2, 2) px
        for named, box in enumerate(plans):  # named 0: the real instruction (object ti), 1: the swapped one (j)
            near = box is not None and np.argmin(np.linalg.norm(pix - data.box_centre(box), axis=1)) == named
            plan_right.append(bool(near))
        if locate:
            where_change.append(np.linalg.norm(wheres[0] - wheres[1]))
            pixels_apart.append(np.linalg.norm(pix[0] - pix[1]))
        angle = np.arctan2(pos[:, 1], pos[:, 0])  # pan angle of each object seen from the base
        changes.append(pans[0] - pans[1])
        apart.append(angle[0] - angle[1])
        moves.append(abs(pans[0] - obs["state"][0]))
    env.close()
    changes, apart = np.array(changes), np.array(apart)
    return {"scenes": len(changes), "median_pan_change_deg": float(np.degrees(np.median(np.abs(changes)))),
            "median_angle_apart_deg": float(np.degrees(np.median(np.abs(apart)))),
            "slope": float(apart @ changes / (apart @ apart)),
            "median_first_chunk_pan_move_deg": float(np.degrees(np.median(moves))),
            # with a where head: how far its answer moves when the other object is named, against how far apart
            # the two objects are in the image (a condition that knows the named object moves by about that)
            "median_where_change_px": float(np.median(where_change)) if where_change else None,
            "median_objects_apart_px": float(np.median(pixels_apart)) if pixels_apart else None,
            # with a written plan: how often the box the planner wrote is nearer the named object than the other
            "plan_names_right_object": float(np.mean(plan_right)) if plan_right else None, "plans": len(plan_right)}


TRACK_BINS = ((0, 4), (4, 8), (8, 16), (16, 1000))  # distance (px) from the jaws to the target in the image


def carry_frame(episode: dict, moved_px: float = 6.0, after: int = 2):
    """A frame early in the carry: `after` steps after the key object's box centre first moved more than
    moved_px from where it started (it is up in the jaws), leaving room for a whole chunk; None if it never moved."""
    c = data.box_centre(episode["target_box"])  # (T, 2)
    moved = np.where(np.linalg.norm(c - c[0], axis=1) > moved_px)[0]
    if len(moved) == 0:
        return None
    return int(min(moved[0] + after, len(episode["actions"]) - 8))


def swap_place(policy, episodes: list, chunk_step: int = 7, after: int = 2) -> dict:
    """Does the carry follow the written plan's place point? On an early-carry frame of each demonstration
    (carry_frame, `after` steps into the move) the chunk is predicted twice from the same noise: with the episode's own plan, and with the
    place point of the episode whose place point lies farthest from it. Returns the medians of: how much the
    pan at the chunk's step `chunk_step` changes (deg), how far the place point moved (px), the pan's error
    against the expert's action at that step with the true plan, and how far the expert turns meanwhile.
    A policy that reads the place point changes its pan by a good part of the expert's turn; one that
    ignores it, by ~0."""
    import torch

    if not getattr(policy, "written_plan", False):
        raise ValueError("--swap-place needs a checkpoint trained with --written-plan (it swaps the plan's place point)")
    points = np.array([ep["target_point"][0] for ep in episodes])
    change, moved, error, turn, same_way, share = [], [], [], [], [], []
    for k, ep in enumerate(episodes):
        t = carry_frame(ep, after=after)
        if t is None or t + chunk_step >= len(ep["actions"]):
            continue
        far = int(np.argmax(np.linalg.norm(points - points[k], axis=1)))
        obs = {"image": ep["images"][t], "state": ep["states"][t], "prev_state": ep["states"][max(t - 1, 0)]}
        pans = []
        for point in (points[k], points[far]):
            policy.reset()
            policy.generator = torch.Generator().manual_seed(0)  # the same noise for both plans
            policy.plan = (ep["instruction"], data.plan_tokens(policy.tok, ep["target_box"][0], point, policy.image_size))
            pans.append(float(policy.predict_chunk(obs, ep["instruction"])[chunk_step, 0]))
        expert = float(ep["actions"][t + chunk_step, 0])
        change.append(abs(pans[0] - pans[1]))
        moved.append(float(np.linalg.norm(points[far] - points[k])))
        error.append(abs(pans[0] - expert))
        turn.append(abs(expert - float(ep["states"][t, 0])))
        own, theirs = pans[0] - float(ep["states"][t, 0]), expert - float(ep["states"][t, 0])
        if abs(theirs) > 0.1:  # the expert turns more than ~6 deg: which way, and how far, does the policy turn?
            same_way.append(np.sign(own) == np.sign(theirs))
            share.append(own / theirs)
    if not change:
        raise ValueError("no demonstration has a carry (the key object never moved in the image)")
    deg = lambda v: float(np.degrees(np.median(v)))  # noqa: E731
    return {"frames": len(change), "median_pan_change_deg": deg(change), "median_place_moved_px": float(np.median(moved)),
            "median_pan_error_deg": deg(error), "median_expert_turn_deg": deg(turn),
            # over the frames where the expert turns > ~6 deg: the policy turns the same way / its turn over the expert's
            "same_direction": float(np.mean(same_way)) if same_way else None,
            "median_turn_share": float(np.median(share)) if share else None}


def planner_tracking(policy, suite: str, episodes: int) -> dict:
    """Where does the planner think the object is while the policy drives the arm? At every new plan of a
    closed-loop episode, ask "where is the <object>?" and compare the answer's centre with the target's true
    box centre and with the jaws' position in the image (info["ee_pixel"]). Binned by how far the jaws are
    from the target: a planner that finds the object answers the same wherever the arm is; one that has
    learned "the object is where the gripper is" (in demonstrations it mostly is: approaching, then holding
    it) answers near the jaws. -> {"lo-hi": {"plans", "median_error_px", "nearer_jaws"}} per bin."""
    env, base_seed = _suite_env(suite, policy.image_size)
    rows = []  # (jaws-target, answer-target, answer-jaws) in px, one per plan
    for i in range(episodes):
        obs, info = env.reset(seed=base_seed + i)
        policy.reset()
        question = data.BOX_QUESTIONS[0].format(name=data._names_in_instruction(info["instruction"].split(), sim)[0])
        for _ in range(env.cfg.max_steps):
            plans = policy.n_plans
            action = policy.act(obs, info["instruction"])
            if policy.n_plans > plans:
                rows.append(_tracking_row(data.parse_box(policy.ask(obs, question)), info["target_box"], info["ee_pixel"]))
            obs, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
    env.close()
    return _tracking_bins(rows)


def _tracking_row(box, target_box, jaws) -> tuple:
    """(jaws-target, answer-target, answer-jaws) distances in px; the answer's are NaN when it did not parse."""
    target, jaws = data.box_centre(target_box), np.asarray(jaws, float)
    answer = np.full(2, np.nan) if box is None else data.box_centre(box)
    return np.linalg.norm(jaws - target), np.linalg.norm(answer - target), np.linalg.norm(answer - jaws)


def _tracking_bins(rows: list) -> dict:
    rows = np.array(rows, float).reshape(-1, 3)
    out = {}
    for lo, hi in TRACK_BINS:
        r = rows[(rows[:, 0] >= lo) & (rows[:, 0] < hi)]
        r = r[~np.isnan(r[:, 1])]  # unparsable answers are left out
        out[f"{lo}-{hi}"] = {"plans": len(r), "median_error_px": float(np.median(r[:, 1])) if len(r) else None,
                             "nearer_jaws": float(np.mean(r[:, 2] < r[:, 1])) if len(r) else None}
    return out


def grounding_of(policy, test_dir: str, max_scenes: int = 200) -> dict:
    """Stage-1 metrics of a checkpoint's planner on test-split scenes: did it keep (or ever have) grounding?"""
    images, qa = data.load_grounding(test_dir, max_scenes=max_scenes)
    metrics, _ = data.evaluate_grounding(policy.vla.planner, policy.tok, images, qa)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# pictures


def plot_success(results: dict, names: list, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(results["suites"])
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(suites), 3.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = np.arange(len(suites)) + (j - (len(names) - 1) / 2) * width
        rates = [results["suites"][s][name]["success_rate"] * 100 for s in suites]
        lo = [r - results["suites"][s][name]["ci95"][0] * 100 for r, s in zip(rates, suites)]
        hi = [results["suites"][s][name]["ci95"][1] * 100 - r for r, s in zip(rates, suites)]
        ax.bar(xs, rates, width, yerr=[lo, hi], capsize=3, label=name)
    n = results["suites"][suites[0]][names[0]]["episodes"]
    ax.set(xticks=range(len(suites)), xticklabels=suites, ylabel="success (%)", ylim=(0, 100),
           title=f"closed-loop success, {n} episodes per suite, 95% Wilson intervals")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(ckpts: list, names: list, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for ck, name in zip(ckpts, names):
        with open(os.path.join(ck, "config.json")) as f:
            c = json.load(f)
        h = c.get("history", [])
        if h and "action_loss" in h[0]:
            ax[0].plot([r["step"] for r in h], [r["action_loss"] for r in h], label=name)
            v = c.get("val_history", [])
            ax[1].plot([r["step"] for r in v], [r["val_action_loss"] for r in v], marker="o", label=name)
    ax[0].set(xlabel="step", ylabel="action loss (train)", yscale="log")
    ax[1].set(xlabel="step", ylabel="action loss (held-out episodes)", yscale="log")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# evaluation entry point


def evaluate(ckpts: list, names: list, suites: list, episodes: int, seed: int, out: str, grounding_dir: str,
             progress: bool = True, gifs: int = 3, workers: int = 1, replan_every: int = 0,
             noise_scale: float = 1.0, samples: int | None = None, ensemble: float = 0.0) -> dict:
    """samples=None: model.Policy's default (model.SAMPLES)."""
    from model import Policy

    os.makedirs(out, exist_ok=True)
    results = {"machine": machine(), "episodes_per_suite": episodes, "seed": seed, "workers": workers,
               "replan_every": replan_every or "chunk_len // 2", "noise_scale": noise_scale,
               "ensemble": ensemble,
               "suites": {s: {} for s in suites},
               "grounding": {}, "checkpoints": dict(zip(names, ckpts)), "render_difference": {}}
    for ck, name in zip(ckpts, names):
        policy = Policy.load(ck, replan_every=replan_every, noise_scale=noise_scale, ensemble=ensemble,
                             **({} if samples is None else {"samples": samples}))
        results["samples"] = policy.samples  # the number control used (model.SAMPLES when samples is None)
        results["render_difference"][name] = data.render_check(policy.config, name)
        for s in suites:
            t0 = time.time()
            r = run_suite(policy, s, episodes, seed, os.path.join(out, f"{s}_{name}.gif") if gifs else None,
                          gifs, progress, workers, ck)
            r["wall_seconds"] = time.time() - t0
            results["suites"][s][name] = r
            print(f"  {name:>12s} {s:>12s}: {r['successes']}/{episodes} = {100 * r['success_rate']:.1f}% "
                  f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]", flush=True)
        if grounding_dir and os.path.exists(grounding_dir):
            results["grounding"][name] = grounding_of(policy, grounding_dir)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(results, names)
    plot_success(results, names, os.path.join(out, "success.png"))
    plot_curves(ckpts, names, os.path.join(out, "curves.png"))
    print(f"wrote {out}/results.json, success.png, curves.png and GIFs")
    return results


def print_table(results: dict, names: list):
    print(f"\nclosed-loop success ({results['episodes_per_suite']} episodes per suite, 95% Wilson interval)")
    print(f"{'suite':>12s} | " + " | ".join(f"{n:>22s}" for n in names))
    for s, row in results["suites"].items():
        cells = [f"{100 * row[n]['success_rate']:5.1f}% [{100 * row[n]['ci95'][0]:4.1f},{100 * row[n]['ci95'][1]:5.1f}]"
                 for n in names]
        print(f"{s:>12s} | " + " | ".join(f"{c:>22s}" for c in cells))
    print("what happened, per suite (episodes):")
    for s, row in results["suites"].items():
        for n in names:
            print(f"{s:>12s} {n:>10s}: " + ", ".join(f"{o} {c}" for o, c in row[n]["outcomes"].items()))
    print("median closest approach of the jaws to the target (cm): " + "; ".join(
        f"{s} " + ", ".join(f"{n} {row[n]['median_closest_cm']:.1f}" for n in names if "median_closest_cm" in row[n])
        for s, row in results["suites"].items()))
    print("target lifted, not placed: median steps it stayed up / nearest it came to its container (cm): " + "; ".join(
        f"{s} " + ", ".join(f"{n} {row[n]['lifted_not_placed_median_held_steps']:.0f} / "
                            f"{row[n]['lifted_not_placed_median_carried_cm']:.1f}"
                            for n in names if row[n].get("lifted_not_placed_median_held_steps") is not None)
        for s, row in results["suites"].items()))
    print("a lifted target came down: times / after the policy opened its jaws / ... away from its container / "
          "with closed jaws away from its container (slipped or set down short) / over another container: " + "; ".join(
        f"{s} " + ", ".join(f"{n} {row[n]['falls']} / {row[n]['falls_opened']} / {row[n]['falls_opened_outside']}"
                            f" / {row[n].get('falls_closed_outside', '-')} / {row[n].get('falls_other_container', '-')}"
                            for n in names if "falls" in row[n])
        for s, row in results["suites"].items()))
    ms = [next((r[n]["ms_per_chunk"] for r in results["suites"].values() if r[n]["ms_per_chunk"]), None) for n in names]
    print(f"{'ms/chunk':>12s} | " + " | ".join(f"{m:22.1f}" if m else f"{'-':>22s}" for m in ms))
    if results["grounding"]:
        print("planner grounding on test-split scenes (stage-1 metrics)")
        for n, g in results["grounding"].items():
            print(f"{n:>12s}: parse {g['parse_rate']:.3f}, box Acc@0.5 {g['box_acc50']:.3f} "
                  f"(on another object {g.get('box_other_object', float('nan')):.3f}), "
                  f"point {g['point_acc']:.3f}, trace DFD {g['trace_dfd']:.1f} px")


# ----------------------------------------------------------------------------------------------------------
# the one-command pipeline: data -> stage 1 -> stage 2 -> evaluation (each stage is its own script)

ABLATION = {  # name -> extra flags for train_action.py (whose defaults are m1 with the written plan, item 20)
    "vanilla": ["--variant", "vanilla"],
    "m1": ["--variant", "m1"],
    # m1 keeps stage 1's planner frozen (train_action.VARIANTS); each entry's step count gives about the same wall
    # time (train_action.default_steps)
    "cotrained": ["--variant", "m1", "--no-frozen-planner", "--cotrain"],  # the paper's recipe
    "no_stage1": ["--no-from-stage1", "--no-frozen-planner"],
    # the written plan answers the spatial prompt, and the plan's numbers come from the written plan
    "no_prompt": ["--no-spatial-prompt", "--no-written-plan", "--no-plan-numbers"],
    "no_cotrain": ["--no-frozen-planner", "--no-cotrain"],  # trained by the action loss alone
    "no_decay": ["--no-frozen-planner", "--cotrain", "--grad-decay", "1.0"],
    "no_state": ["--no-use-state", "--no-prev-state", "--no-plan-numbers"],  # the DiT reads no numbers at all
    "no_where": ["--where-weight", "0"],
    "no_dart": ["--demo-noise", "0"],
    "no_plan": ["--no-written-plan", "--no-plan-numbers"],  # the paper's latent path alone (EXPERIMENTS.md, item 11)
    # whole recipes, for --variants only. m1_plain / vanilla_plain: the paper's recipe, the default before
    # session 18 (400 unpaired demonstrations, no written plan, one state); the other three are sessions 6 and 10's
    # steps towards today's default (EXPERIMENTS.md, items 11 and 15), with their 400 demonstrations
    "m1_plain": ["--variant", "m1", "--no-frozen-planner", "--cotrain", "--demos", "400", "--no-paired-demos",
                 "--no-written-plan", "--no-plan-numbers", "--no-prev-state"],
    "vanilla_plain": ["--variant", "vanilla", "--demos", "400", "--no-paired-demos", "--no-prev-state"],
    "m1_plan": ["--variant", "m1", "--no-frozen-planner", "--cotrain", "--demos", "400", "--no-plan-numbers",
                "--no-prev-state"],
    "vanilla_paired": ["--variant", "vanilla", "--demos", "400", "--no-prev-state"],
    "m1_plan_num": ["--variant", "m1", "--no-frozen-planner", "--cotrain", "--demos", "400"],
}
RECIPES = ("m1_plain", "vanilla_plain", "m1_plan", "vanilla_paired", "m1_plan_num")  # not in --ablation's set


def run(cmd: list):
    print("$ " + " ".join(cmd), flush=True)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), cmd[0])  # works from any folder
    subprocess.run([sys.executable, script] + cmd[1:], check=True)


def pipeline(args):
    t0 = time.time()
    out = args.out
    p = ["--preset", args.preset, "--data-dir", os.path.join(out, "data")] + (["--no-progress"] if args.no_progress else [])
    timings = {}
    # a stage whose checkpoint exists is resumed (a finished one then only re-evaluates): re-running the same
    # command after an interruption, or to add a variant, continues instead of starting over
    def resume(d):
        return ["--resume"] if os.path.exists(os.path.join(d, "ckpt", "config.json")) else []

    t = time.time()
    r = resume(os.path.join(out, "stage1"))
    run(["train_grounding.py", *p, "--out", os.path.join(out, "stage1"), *r])
    timings["stage1 (data + training + grounding eval)" + (" (resumed)" if r else "")] = time.time() - t
    variants = [v for v in ABLATION if v not in RECIPES] if args.ablation else args.variants
    for v in variants:
        t = time.time()
        r = resume(os.path.join(out, v))
        run(["train_action.py", *p, *ABLATION[v], "--stage1", os.path.join(out, "stage1", "ckpt"),
             "--out", os.path.join(out, v), *r])
        timings[f"stage2 {v}" + (" (resumed)" if r else "")] = time.time() - t  # a resumed time is not a whole run's
    t = time.time()
    episodes = args.episodes or {"smoke": 4, "default": 200, "full": 200}[args.preset]
    results = evaluate([os.path.join(out, v, "ckpt") for v in variants], variants, args.suites, episodes, args.seed,
                       os.path.join(out, "eval"), os.path.join(out, "data", f"grounding_test_{stage1_image_size(out)}"),
                       not args.no_progress, 0 if args.preset == "smoke" else 3, args.workers)
    timings["evaluation"] = time.time() - t
    total = time.time() - t0
    with open(os.path.join(out, "stage1", "metrics.json")) as f:
        s1 = json.load(f)["metrics"]
    print("\n==== summary ====")
    for k, v in timings.items():
        print(f"{k:>45s}: {v / 60:6.1f} min")
    print(f"{'total':>45s}: {total / 60:6.1f} min on {machine()['cores']} cores")
    print(f"stage 1 grounding (test split): box Acc@0.5 {s1['box_acc50']:.3f} (on another object "
          f"{s1.get('box_other_object', float('nan')):.3f}), point {s1['point_acc']:.3f}, "
          f"trace DFD {s1['trace_dfd']:.1f} px, parse {s1['parse_rate']:.3f}")
    results["timings_seconds"] = {**timings, "total": total}
    with open(os.path.join(out, "eval", "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def stage1_image_size(out: str) -> int:
    with open(os.path.join(out, "stage1", "ckpt", "config.json")) as f:
        return json.load(f)["image_size"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", default=[], help="stage-2 checkpoint folder(s); several give a side-by-side table")
    p.add_argument("--names", nargs="+", default=[], help="a short name per checkpoint (default: its parent folder)")
    p.add_argument("--suites", nargs="+", default=MAIN_SUITES, choices=list(SUITES),
                   help="which suites (default: %(default)s; 'single' = one object, one container, a diagnostic)")
    p.add_argument("--episodes", type=int, default=0, help="episodes per suite (default 200; pipeline smoke: 4)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes that share a suite's episodes (default: 2, one per core of a laptop)")
    p.add_argument("--seed", type=int, default=0, help="offset added to every suite's fixed seeds")
    p.add_argument("--replan-every", type=int, default=0,
                   help="actions executed from each predicted chunk before planning again (default chunk_len // 2)")
    p.add_argument("--noise-scale", type=float, default=1.0,
                   help="scale of the DDIM starting noise (1 = as trained, 0 = the same start every time)")
    p.add_argument("--samples", type=int, default=None,
                   help="chunks drawn per plan; > 1 executes their medoid, so a rare mode drawn once is outvoted "
                        "(default: model.SAMPLES, 3)")
    p.add_argument("--ensemble", type=float, default=0.0,
                   help="temporal ensembling: average the overlapping chunks' actions, a chunk one plan older "
                        "weighted this much against the newest (0 = off, execute the newest chunk only)")
    p.add_argument("--out", default="", help="output folder (default out/eval, or out/pipeline with --pipeline)")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "full"], help="pipeline size")
    p.add_argument("--pipeline", action="store_true", help="run data -> stage 1 -> stage 2 -> eval")
    p.add_argument("--ablation", action="store_true", help="with --pipeline: also vanilla and each component off")
    p.add_argument("--variants", nargs="+", default=["m1"], choices=list(ABLATION),
                   help="with --pipeline: which stage-2 variants to train and compare (default m1)")
    p.add_argument("--grounding-dir", default="out/data/grounding_test_96", help="test scenes for planner grounding")
    p.add_argument("--gifs", type=int, default=3, help="episodes per suite drawn into a GIF (0: none)")
    p.add_argument("--open-loop", default="", metavar="DEMO_DIR",
                   help="instead of closed-loop suites: each checkpoint's per-joint error against the expert on "
                        "the demonstrations in DEMO_DIR (its held-out 5%% and 20 training episodes), and how well "
                        "its condition tokens locate the object at the first frame (condition_probe)")
    p.add_argument("--track-planner", type=int, default=0, metavar="EPISODES",
                   help="instead of the suites' success: run this many closed-loop episodes of each suite and say "
                        "where the planner thinks the object is, against where it is and where the jaws are "
                        "(planner_tracking)")
    p.add_argument("--swap-instruction", type=int, default=0, metavar="SCENES",
                   help="instead of the suites' success: does the first chunk turn toward the object the "
                        "instruction names? (swap_instruction, on this many scenes of each suite)")
    p.add_argument("--swap-place", default="", metavar="DEMO_DIR",
                   help="instead of the suites' success: on early-carry frames of the demonstrations in DEMO_DIR (the "
                        "last 60), does the chunk change when the written plan's place point is moved? (swap_place)")
    p.add_argument("--carry-after", type=int, default=2, metavar="STEPS",
                   help="--swap-place's frame: this many steps after the object first moved in the image")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.pipeline:
        args.out = args.out or ("out/pipeline" if args.preset == "default" else f"out/pipeline_{args.preset}")
        return pipeline(args)
    if not args.ckpt:
        p.error("give --ckpt PATH [PATH ...] or --pipeline")
    names = args.names or [os.path.basename(os.path.dirname(os.path.abspath(c))) for c in args.ckpt]
    if args.open_loop:
        from model import Policy

        train_eps, val_eps = data.split_episodes(data.read_demo_episodes(args.open_loop))
        for ck, name in zip(args.ckpt, names):
            policy = Policy.load(ck)
            for part, eps in (("held-out", val_eps), ("training", train_eps[:20])):
                e = open_loop_error(policy, eps)
                print(f"{name:>12s} {part:>9s} episodes, {e.pop('chunks')} chunks, mean |error| (deg): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in e.items()))
            pr = condition_probe(policy, train_eps + val_eps)
            print(f"{name:>12s} condition probe at t=0 ({pr['episodes']} episodes, 5-fold ridge): object centre "
                  f"R^2 x {pr['r2_x']:.2f}, y {pr['r2_y']:.2f}, mean error {pr['mae_px']:.1f} px")
        return None
    if args.swap_instruction:
        from model import Policy

        for ck, name in zip(args.ckpt, names):
            policy = Policy.load(ck)
            for s in args.suites:
                r = swap_instruction(policy, s, args.swap_instruction)
                print(f"{name:>12s} {s:>11s} | {r['scenes']} scenes: naming another object changes the first chunk's "
                      f"pan by {r['median_pan_change_deg']:.1f} deg (median); the objects are "
                      f"{r['median_angle_apart_deg']:.1f} deg apart; slope {r['slope']:.2f} (1 = follows the words); "
                      f"the chunk itself turns {r['median_first_chunk_pan_move_deg']:.1f} deg")
                if r["median_where_change_px"] is not None:
                    print(f"{'':>24s} | the where readout moves {r['median_where_change_px']:.1f} px; the objects are "
                          f"{r['median_objects_apart_px']:.1f} px apart in the image")
                if r["plan_names_right_object"] is not None:
                    print(f"{'':>24s} | the written plan's box is nearer the named object than the other in "
                          f"{r['plan_names_right_object']:.0%} of {r['plans']} plans (both instructions)")
        return None
    if args.swap_place:
        from model import Policy

        eps = data.read_demo_episodes(args.swap_place)[-60:]
        for ck, name in zip(args.ckpt, names):
            r = swap_place(Policy.load(ck), eps, after=args.carry_after)
            print(f"{name:>12s} | {r['frames']} early-carry frames: moving the place point {r['median_place_moved_px']:.1f} px "
                  f"changes the pan 7 steps ahead by {r['median_pan_change_deg']:.2f} deg (median); with the true plan the "
                  f"pan is {r['median_pan_error_deg']:.1f} deg off the expert's, who turns {r['median_expert_turn_deg']:.1f} deg")
            if r["same_direction"] is not None:
                print(f"{'':>12s} | the policy turns the expert's way in {r['same_direction']:.0%} of them, "
                      f"{r['median_turn_share']:.2f} times as far (median)")
        return None
    if args.track_planner:
        from model import Policy

        for ck, name in zip(args.ckpt, names):
            policy = Policy.load(ck, replan_every=args.replan_every)
            for s in args.suites:
                for b, r in planner_tracking(policy, s, args.track_planner).items():
                    err = "-" if r["median_error_px"] is None else f"{r['median_error_px']:.1f} px"
                    near = "-" if r["nearer_jaws"] is None else f"{r['nearer_jaws']:.2f}"
                    print(f"{name:>12s} {s:>11s} | jaws {b:>7s} px from the target: {r['plans']:4d} plans, "
                          f"answer's median error {err}, answer nearer the jaws than the target: {near}")
        return None
    return evaluate(args.ckpt, names, args.suites, args.episodes or 200, args.seed, args.out or "out/eval",
                    args.grounding_dir, not args.no_progress, args.gifs, args.workers, args.replan_every,
                    args.noise_scale, args.samples, args.ensemble)


if __name__ == "__main__":
    main()
