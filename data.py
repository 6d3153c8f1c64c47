"""data.py -- everything between the simulator and the model: tokenizer, text formats, datasets, normalisation.

    python data.py                      # build the tokenizer if needed, show a few grounding Q/A pairs
    python data.py --grounding 200      # write 200 grounding scenes to out/data/grounding_train (resumable)
    python data.py --demos 20           # write 20 expert demonstrations to out/data/demos_train (resumable)
    python data.py --demos 400 --paired --miss 0.5 --workers 2   # pairs, half with a deliberate miss, 2 processes
    python data.py --demos 300 --takeover out/m1/ckpt --workers 2  # DAgger-style: the expert takes over from a policy
    python data.py --demos 1000 --takeover out/m1/ckpt --after-lift-only  # ... only after the policy's own lift

The pieces, in the order the pipeline uses them:

1. **Tokenizer.** A byte-level BPE of a few hundred tokens trained on this project's own text (instructions,
   questions, answers with coordinates), kept in `tokenizer.bpe` beside this file and loaded with tiktoken. Nothing downloads. Special tokens: <|endoftext|> ends an answer, <|pad|> pads a batch,
   <|answer|> separates a question from its answer.
2. **Text formats** of the paper's spatial grounding answers, in absolute pixel coordinates of the model's
   input image (the Qwen2.5-VL convention the paper follows):
       box    "[x1,y1,x2,y2]"          point  "(x,y)"          trace  "[(x,y),(x,y),...]"  (5 points)
   and parsers that turn generated text back into numbers, returning None for malformed text.
3. **Grounding data** (stage 1): question/answer pairs about randomised sim scenes, written to disk in shards
   of uint8 images + JSON labels, deterministic from a seed and resumable.
4. **Demonstrations** (stage 2): expert episodes (images, states, actions, instruction, per-frame grounding
   labels) written one file per episode; robot.py's `record` writes the same format. Options: DART noise,
   counterfactual pairs, recovery episodes (a deliberate miss, then a retry), several recording processes,
   and takeover episodes: a trained policy drives, the expert takes over and finishes (DAgger-style).
5. **Normalisation** of actions and states to [-1, 1] by the 1st/99th percentiles (as the paper does).
6. **Preprocessing** shared by training and control (`preprocess_image`, `encode_prompt`): one path, so what
   the policy sees on the robot is exactly what it saw in training.
7. **Grounding metrics** (metrics.md): box Acc@IoU0.5 and mean IoU, point accuracy, trace discrete Frechet
   distance, parse rate.
"""

from __future__ import annotations

import argparse
import base64
import glob
import io
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FILE = os.path.join(HERE, "tokenizer.bpe")
EOT, PAD, ANSWER = "<|endoftext|>", "<|pad|>", "<|answer|>"
# Pre-tokenisation: words (with their leading space), runs of digits, runs of punctuation, whitespace.
# Digits are kept apart from letters so the BPE learns one token per coordinate value (0..127).
PAT_STR = r""" ?[a-zA-Z]+|\d+|[^\sa-zA-Z\d]+|\s+"""
TOKENIZER_VOCAB = 640  # byte tokens (256) + merges; 3 special tokens come on top

# The paper's spatial prompt (stage 2). The planner never answers it; it only steers the hidden states.
SPATIAL_PROMPT = "Your task is to {instruction}. Figure out how to execute it, then locate the key object needed."
TRACE_POINTS = 5  # points in a trace answer: start, above the object, the grasp, above the container, release

# ----------------------------------------------------------------------------------------------------------
# Questions (several phrasings per kind; {name} is e.g. "red block")

BOX_QUESTIONS = ("where is the {name}?", "give the box of the {name}.", "locate the {name}.", "find the {name}.")
POINT_QUESTIONS = ("point to the {name}.", "where is the center of the {name}?")
PLACE_QUESTIONS = ("{instruction}. point to where it should go.", "to {instruction}, where should it be placed?")
TRACE_QUESTIONS = ("show the path the gripper takes to {instruction}.", "{instruction}. draw the gripper path.")
QUESTIONS_VERSION = 2  # bumped whenever scene_questions changes, so old grounding folders are not mixed in
                       # (2: the spatial prompt answered with the key object's box)


# ----------------------------------------------------------------------------------------------------------
# 1. Tokenizer


def tokenizer_corpus() -> str:
    """The text the BPE is trained on: training-split phrasings, questions, prompts and coordinate answers."""
    import sim  # only needed to build the tokenizer, never to use it

    rng = np.random.default_rng(0)
    lines = []
    for _ in range(1500):
        sc = sim.sample_scene(rng, "train")
        ins = sc["instruction"]
        ob = sc["objects"][sc["target_object"]]
        name = f"{ob['colour']} {sim.SYNONYMS[ob['shape']][int(rng.integers(len(sim.SYNONYMS[ob['shape']])))]}"
        xs = rng.integers(0, 128, size=10)
        lines.append(BOX_QUESTIONS[int(rng.integers(4))].format(name=name) + " " + format_box(xs[:4]))
        lines.append(POINT_QUESTIONS[int(rng.integers(2))].format(name=name) + " " + format_point(xs[4:6]))
        lines.append(PLACE_QUESTIONS[int(rng.integers(2))].format(instruction=ins))
        lines.append(TRACE_QUESTIONS[int(rng.integers(2))].format(instruction=ins) + " "
                     + format_trace(rng.integers(0, 128, size=(TRACE_POINTS, 2))))
        lines.append(SPATIAL_PROMPT.format(instruction=ins))
    # every coordinate value many times, so that each number 0..127 becomes a single token: answers get short
    # and the model picks a coordinate with one choice instead of spelling it digit by digit
    lines += [",".join(str(v) for v in rng.permutation(128)) for _ in range(150)]
    return "\n".join(lines)


def bpe_train(text: str, vocab_size: int) -> dict:
    """Byte-level BPE: start from the 256 byte tokens, repeatedly merge the most frequent adjacent pair.

    The same algorithm as tiktoken's small reference trainer (tiktoken._educational.bpe_train), but counting
    each distinct pre-token once with its frequency, which makes it ~100x faster on our repetitive corpus.
    Returns {token bytes: rank}; tiktoken encodes with these ranks (lower rank = merged first).
    """
    counts = {}
    for w in re.findall(PAT_STR, text):
        counts[w] = counts.get(w, 0) + 1
    words = {tuple(bytes([b]) for b in w.encode()): c for w, c in counts.items()}
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        pairs = {}
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:  # every pre-token is a single token already
            break
        a, b = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the bytes: deterministic
        ranks[a + b] = len(ranks)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return ranks


def train_tokenizer(path: str = TOKENIZER_FILE, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """Train the byte-level BPE on the project's own text and write its ranks (tiktoken's file format)."""
    ranks = bpe_train(tokenizer_corpus(), vocab_size)
    with open(path, "w") as f:  # one line per token: base64(token bytes) rank
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


def load_ranks(path: str = TOKENIZER_FILE) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}: build it with `python data.py --build-tokenizer`")
    ranks = {}
    with open(path) as f:
        for line in f:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def make_tokenizer(ranks: dict) -> tiktoken.Encoding:
    """A tiktoken Encoding from BPE ranks (from the ranks file, or from a checkpoint's copy of them)."""
    n = len(ranks)
    return tiktoken.Encoding(name="tiny-m1", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT: n, PAD: n + 1, ANSWER: n + 2})


def get_tokenizer(path: str = TOKENIZER_FILE) -> tiktoken.Encoding:
    if not os.path.exists(path):
        print(f"building the tokenizer ({path}), once: a few seconds")
        train_tokenizer(path)
    return make_tokenizer(load_ranks(path))


def number_values(tok: tiktoken.Encoding) -> tuple:
    """For each token id, the integer it spells ("47" -> 47), or -1: the planner embeds numbers by value."""
    out = []
    for i in range(tok.n_vocab):
        try:
            b = tok.decode_single_token_bytes(i)
        except KeyError:  # special tokens
            b = b""
        out.append(int(b) if b.isdigit() else -1)
    return tuple(out)


def ranks_to_json(ranks: dict) -> dict:
    """BPE ranks as JSON-safe text, so a checkpoint can carry its tokenizer."""
    return {base64.b64encode(k).decode(): v for k, v in ranks.items()}


def ranks_from_json(obj: dict) -> dict:
    return {base64.b64decode(k): int(v) for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------------------
# 2. Answer formats and parsers (absolute pixel coordinates of the model's input image)


def format_box(box) -> str:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return f"[{x1},{y1},{x2},{y2}]"


def format_point(p) -> str:
    return f"({int(round(float(p[0])))},{int(round(float(p[1])))})"


def format_trace(points) -> str:
    return "[" + ",".join(format_point(p) for p in points) + "]"


_NUM = r"\s*(-?\d+)\s*"
_BOX_RE = re.compile(r"^\s*\[" + ",".join([_NUM] * 4) + r"\]\s*$")
_POINT_RE = re.compile(r"\(" + _NUM + "," + _NUM + r"\)")


def parse_box(text: str):
    """'[x1,y1,x2,y2]' -> float array (4,), or None if the text is not exactly one well-formed box."""
    m = _BOX_RE.match(text or "")
    if not m:
        return None
    b = np.array([float(v) for v in m.groups()])
    return b if b[2] >= b[0] and b[3] >= b[1] else None


def parse_point(text: str):
    """'(x,y)' -> float array (2,), or None."""
    m = re.fullmatch(r"\s*\(" + _NUM + "," + _NUM + r"\)\s*", text or "")
    return None if not m else np.array([float(v) for v in m.groups()])


def parse_trace(text: str):
    """'[(x,y),(x,y),...]' -> float array (N, 2) with N >= 2, or None."""
    text = (text or "").strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    pts = _POINT_RE.findall(inner)
    # the whole inside must be points separated by commas, nothing else
    if len(pts) < 2 or re.sub(r"\s", "", _POINT_RE.sub("P", inner)) != ",".join(["P"] * len(pts)):
        return None
    return np.array([[float(x), float(y)] for x, y in pts])


PARSERS = {"box": parse_box, "point": parse_point, "place": parse_point, "trace": parse_trace}


# ----------------------------------------------------------------------------------------------------------
# 3. Grounding data: Q/A pairs about sim scenes, written in shards


def resample_path(points: np.ndarray, n: int) -> np.ndarray:
    """n points evenly spaced along a polyline's length (metrics.md's trace comparison)."""
    pts = np.asarray(points, float)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0], np.cumsum(seg)])
    if s[-1] < 1e-9:
        return np.repeat(pts[:1], n, axis=0)
    t = np.linspace(0, s[-1], n)
    return np.stack([np.interp(t, s, pts[:, 0]), np.interp(t, s, pts[:, 1])], axis=1)


def trace_label(info: dict) -> np.ndarray:
    """The expert's planned path as TRACE_POINTS pixels: start, above object, grasp, above container, release.
    (sim gives start, approach, descend, lift, carry, lower; lift sits above the grasp, so it is dropped.)"""
    t = np.asarray(info["trace"])
    return t[[0, 1, 2, 4, 5]]


def task_questions(info: dict, rng: np.random.Generator, image_size: int) -> tuple:
    """The two questions about the task itself: where the object should go (a point, scored by landing in the
    container) and the gripper's path (a trace). -> (place question, trace question) dicts."""
    clip = lambda v: np.clip(np.asarray(v, float), 0, image_size - 1)  # noqa: E731 -- answers stay on the image
    ins = info["instruction"]
    q = PLACE_QUESTIONS[int(rng.integers(len(PLACE_QUESTIONS)))].format(instruction=ins)
    place = dict(kind="place", question=q, answer=format_point(clip(info["target_point"])),
                 label=list(info["target_point"]), region=info["container_box"])
    trace = trace_label(info)
    q = TRACE_QUESTIONS[int(rng.integers(len(TRACE_QUESTIONS)))].format(instruction=ins)
    return place, dict(kind="trace", question=q, answer=format_trace(clip(trace)), label=trace.tolist())


def scene_questions(info: dict, rng: np.random.Generator, image_size: int, counterfactual_prompts: int = 0) -> list:
    """Every grounding question we ask about one scene, with its answer text and the label to score it by.
    counterfactual_prompts > 0 adds that many more spatial prompts on the same table for tasks on *other*
    objects (sim.retarget), each answered with its own object's box (off by default; EXPERIMENTS.md, stage 1)."""
    import sim

    sc = info["scene"]
    qa = []
    clip = lambda v: np.clip(np.asarray(v, float), 0, image_size - 1)  # noqa: E731 -- answers stay on the image
    items = [(o, info["boxes"][f"{o['colour']} {o['shape']}"]) for o in sc["objects"] + sc["containers"]]
    for item, box in items:
        word = sim.SYNONYMS[item["shape"]][int(rng.integers(len(sim.SYNONYMS[item["shape"]])))]
        name = f"{item['colour']} {word}"
        q = BOX_QUESTIONS[int(rng.integers(len(BOX_QUESTIONS)))].format(name=name)
        qa.append(dict(kind="box", question=q, answer=format_box(clip(box)), label=list(map(float, box))))
    # one "point to" question about a random item, scored by landing inside its box
    item, box = items[int(rng.integers(len(items)))]
    word = sim.SYNONYMS[item["shape"]][0]
    centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
    q = POINT_QUESTIONS[int(rng.integers(len(POINT_QUESTIONS)))].format(name=f"{item['colour']} {word}")
    qa.append(dict(kind="point", question=q, answer=format_point(clip(centre)), label=centre, region=box))
    ins = info["instruction"]
    place, trace = task_questions(info, rng, image_size)
    qa.append(place)
    # the stage-2 spatial prompt itself, answered with the box of the object to pick: this is what ties the
    # prompt to grounding, so in stage 2 the planner's hidden state at its end already "points at" the key object
    box = info["target_box"]
    qa.append(dict(kind="box", question=SPATIAL_PROMPT.format(instruction=ins), answer=format_box(clip(box)),
                   label=list(map(float, box))))
    qa.append(trace)
    # the same picture and the same sentence with another object named: only binding the words to the objects
    # tells these answers apart. Drawn last, from their own stream, so the questions above stay as they were.
    crng = np.random.default_rng(int(rng.integers(2**62))) if counterfactual_prompts else None
    named = {sc["target_object"]}
    for _ in range(counterfactual_prompts * 4):  # a few draws each, to name objects not named yet
        if len(named) > counterfactual_prompts:
            break
        other = sim.retarget(sc, crng)
        if other is None:  # a one-object table, or no other object allowed by the split
            break
        if other["target_object"] in named:
            continue
        named.add(other["target_object"])
        o = other["objects"][other["target_object"]]
        box = info["boxes"][f"{o['colour']} {o['shape']}"]
        qa.append(dict(kind="box", question=SPATIAL_PROMPT.format(instruction=other["instruction"]),
                       answer=format_box(clip(box)), label=list(map(float, box))))
    return qa


def _scene_seed(seed: int, split: str, index: int) -> int:
    # distinct streams per split and per data kind, so train and test scenes never coincide
    return (seed * 1_000_003 + index * 7 + (0 if split == "train" else 3)) % (2 ** 63)


# Which renderer drew a folder's pictures (sim.reference_frame): kept beside them as a PNG, checked before more
# pictures are added, and copied into stage-2 checkpoints so eval.py can warn when it draws differently.
RENDER_REFERENCE = "render_reference.png"
RENDER_TOLERANCE = 0.1  # mean grey levels; the same renderer gives exactly 0.0


def frame_to_text(image: np.ndarray) -> str:
    """uint8 (S, S, 3) -> base64 PNG text (~10 KB at 96 px), for JSON configs."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def frame_from_text(text: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def read_render_reference(folder: str) -> np.ndarray | None:
    """The reference frame a data folder was drawn with, or None (a folder made before this check existed)."""
    from PIL import Image

    path = os.path.join(folder, RENDER_REFERENCE)
    return np.asarray(Image.open(path).convert("RGB")) if os.path.exists(path) else None


def check_render_reference(folder: str, image_size: int):
    """Call before drawing (more) pictures into `folder`: the first call keeps this machine's reference frame
    there; later calls refuse to mix in pictures from a renderer that draws the same table differently."""
    import sim
    from PIL import Image

    old = read_render_reference(folder)
    if old is None:
        Image.fromarray(sim.reference_frame(image_size)).save(os.path.join(folder, RENDER_REFERENCE))
        return
    diff = sim.picture_difference(old)
    if diff > RENDER_TOLERANCE:
        raise ValueError(
            f"{folder} was begun by a renderer that draws differently from this machine's (mean difference "
            f"{diff:.2f} grey levels on the reference table, {RENDER_REFERENCE}): a policy learns the pictures of "
            "one renderer, so the two must not be mixed. Finish the folder where it was begun, or use another "
            "--out / data folder here (README: 'Training on another machine').")


def render_check(config: dict, name: str) -> float | None:
    """How differently this machine draws the table the checkpoint's demonstrations were drawn with (mean grey
    levels; sim.reference_frame); warns when it is not the same renderer. None for checkpoints made before
    the check existed."""
    text = config.get("render_reference")
    if not text:
        return None
    import sim

    diff = sim.picture_difference(frame_from_text(text))
    if diff > RENDER_TOLERANCE:
        print(f"WARNING: {name} learned from pictures drawn by another renderer: this machine draws the reference "
              f"table {diff:.2f} grey levels (mean) differently. Policies do much worse on another renderer's "
              "pictures (EXPERIMENTS.md, item 19). Record the demonstrations with this machine's renderer, or "
              "render with Mesa's llvmpipe on the training machine too (README: 'Training on another machine').",
              flush=True)
    return diff


def _atomic_savez(path: str, **arrays):
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)  # a shard is either complete or absent: an interrupted run resumes cleanly


def generate_grounding(out_dir: str, n_scenes: int, split: str = "train", seed: int = 0, image_size: int = 96,
                       shard_size: int = 250, progress: bool = True, n_objects=(2, 4), n_containers=(1, 2),
                       counterfactual_prompts: int = 0, counterfactual_containers: bool = False) -> str:
    """Write n_scenes grounding scenes as shards `shard_00000.npz` (images uint8 (n,H,W,3), qa JSON).
    Shards already on disk are kept, so an interrupted run continues where it stopped.
    n_objects / n_containers (inclusive ranges) default to sim.py's tables; train_grounding.py also makes a
    set of (1, 1) tables for its curriculum.
    counterfactual_containers: on a table with two containers, also ask the place and trace questions of the
    same object going into the OTHER container (sim.retarget_container; the scene is set up again with the same
    poses, light and start, so labels come from the simulator as usual). Without them the planner sent 24% of
    its test traces on two-container tables to the wrong container (EXPERIMENTS.md, "Wrong container")."""
    import sim
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    meta = dict(n_scenes=n_scenes, split=split, seed=seed, image_size=image_size, shard_size=shard_size,
                n_objects=list(n_objects), n_containers=list(n_containers), questions=QUESTIONS_VERSION)
    if counterfactual_prompts:  # only then, so folders written before this option still match their meta
        meta["counterfactual_prompts"] = counterfactual_prompts
    if counterfactual_containers:
        meta["counterfactual_containers"] = True
    _check_meta(out_dir, meta)
    env = sim.SO100Env(image_size=image_size, split=split, n_objects=tuple(n_objects), n_containers=tuple(n_containers))
    n_shards = math.ceil(n_scenes / shard_size)
    if any(not os.path.exists(os.path.join(out_dir, f"shard_{k:05d}.npz")) for k in range(n_shards)):
        check_render_reference(out_dir, image_size)
    bar = tqdm(total=n_scenes, desc=f"grounding {split}", disable=not progress, unit="scene")
    for k in range(n_shards):
        path = os.path.join(out_dir, f"shard_{k:05d}.npz")
        lo, hi = k * shard_size, min(n_scenes, (k + 1) * shard_size)
        if os.path.exists(path):
            bar.update(hi - lo)
            continue
        images, qa = [], []
        for i in range(lo, hi):
            s = _scene_seed(seed, split, i)
            obs, info = env.reset(seed=s)
            images.append(obs["image"])
            questions = scene_questions(info, np.random.default_rng(s), image_size, counterfactual_prompts)
            other = sim.retarget_container(info["scene"], np.random.default_rng([s, 1])) \
                if counterfactual_containers else None  # its own random stream: the questions above stay as they were
            if other is not None:  # the same first frame, another task: only its labels are used
                _, info2 = env.reset(options={"scene": other, "look": env.look, "start": env.start})
                questions += task_questions(info2, np.random.default_rng([s, 2]), image_size)
            for q in questions:
                q["image"] = i - lo
                qa.append(q)
            bar.update(1)
        _atomic_savez(path, images=np.stack(images), qa=np.array(json.dumps(qa)))
    bar.close()
    env.close()
    return out_dir


def _check_meta(out_dir: str, meta: dict):
    """Refuse to mix data made with different settings in one folder (resuming must continue the same run)."""
    path = os.path.join(out_dir, "meta.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        keys = [k for k in meta if k != "n_scenes" and k != "n_episodes"]
        if any(old.get(k) != meta[k] for k in keys):
            raise ValueError(f"{out_dir} holds data made with {old}, not {meta}: use another --out or delete it")
    tmp = f"{path}.{os.getpid()}.tmp"  # write then rename: two runs sharing a folder never read half a file
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, path)


def load_grounding(data_dir: str, max_scenes: int | None = None):
    """All shards of a grounding folder -> (images uint8 (N,H,W,3), list of qa dicts with a global image index)."""
    paths = sorted(glob.glob(os.path.join(data_dir, "shard_*.npz")))
    if not paths:
        raise FileNotFoundError(f"no grounding shards in {data_dir}: make them with "
                                f"`python data.py --grounding 1000 --out {data_dir}`")
    images, qa = [], []
    for p in paths:
        z = np.load(p)
        base = sum(len(im) for im in images)
        for q in json.loads(str(z["qa"])):
            q["image"] += base
            qa.append(q)
        images.append(z["images"])
        if max_scenes and base + len(z["images"]) >= max_scenes:
            break
    images = np.concatenate(images)
    if max_scenes:
        images = images[:max_scenes]
        qa = [q for q in qa if q["image"] < max_scenes]
    return images, qa


# ----------------------------------------------------------------------------------------------------------
# 6. Preprocessing shared by training and control


def preprocess_image(image: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (H, W, 3) or (B, H, W, 3) camera image(s) -> float (3, H, W) or (B, 3, H, W) in [-1, 1]."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape[-1] != 3 or image.shape[-3:-1] != (image_size, image_size):
        raise ValueError(f"expected uint8 image(s) of shape ({image_size}, {image_size}, 3), got {image.dtype} "
                         f"{image.shape}; resize camera frames to the model's image_size first")
    x = torch.from_numpy(np.ascontiguousarray(image)).float() / 127.5 - 1.0
    return x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(2, 0, 1)


def encode_question(tok: tiktoken.Encoding, question: str) -> list:
    """A grounding question's tokens, ending with <|answer|>, after which the model writes the answer."""
    return tok.encode(question) + [tok.encode_single_token(ANSWER)]


def encode_prompt(tok: tiktoken.Encoding, instruction: str, spatial_prompt: bool = True) -> list:
    """The stage-2 text the planner reads: the instruction wrapped in the spatial prompt (or bare)."""
    text = SPATIAL_PROMPT.format(instruction=instruction) if spatial_prompt else instruction
    return tok.encode(text) + [tok.encode_single_token(ANSWER)]


PLAN_QUESTION = PLACE_QUESTIONS[0]  # asked for the place point of a written plan


def plan_tokens(tok: tiktoken.Encoding, box, point, image_size: int) -> list:
    """The written plan, as the planner writes it: its answer to the spatial prompt (the key object's box) and to
    PLAN_QUESTION (where the object should go), e.g. "[40,59,47,67](60,71)". Written once per episode, on the
    first frame (the arm at rest, nothing occluded, the object still where it lies): in training from the first
    frame's labels (teacher forcing), in control by the planner itself (model.Policy.condition_inputs).
    With train_action.py --written-plan the planner then reads [image; prompt; plan] at every step."""
    return tok.encode(format_box(np.clip(box, 0, image_size - 1)) + format_point(np.clip(point, 0, image_size - 1)))


def parse_plan(text: str):
    """A written plan "[x1,y1,x2,y2](x,y)" -> (box (4,) or None, point (2,) or None)."""
    box, _, point = (text or "").partition("(")
    return parse_box(box), parse_point("(" + point)


PLAN_DIM = 6  # a written plan as numbers: the box's x1, y1, x2, y2 and the place point's x, y


def plan_vector(text: str, image_size: int) -> np.ndarray:
    """A written plan's text -> (PLAN_DIM,) float32 in [-1, 1] (pixels / image_size * 2 - 1): the numbers the action
    expert reads beside the joint state with train_action.py --plan-numbers. Training and control both go
    through the text, so they round alike. A part the planner failed to write reads 0 (the image's middle)."""
    box, point = parse_plan(text)
    v = np.zeros(PLAN_DIM, np.float32)
    if box is not None:
        v[:4] = np.asarray(box, np.float32) / image_size * 2 - 1
    if point is not None:
        v[4:] = np.asarray(point, np.float32) / image_size * 2 - 1
    return v


GRIPPER_DIM = 2  # the jaws' position in the picture (x, y), for train_action.py --gripper-point


def gripper_vector(states, image_size: int) -> np.ndarray:
    """Joint states (..., 6) -> (..., GRIPPER_DIM) float32 in [-1, 1]: where the jaws are over the table, in the
    picture (sim.gripper_pixel: forward kinematics, then the camera, of the point straight below the jaws at the
    place point's height), in plan_vector's units. With --gripper-point the action expert reads it beside the
    plan's place point: "over the container" is then these two numbers equal to the plan's last two at any
    height, a comparison, not a picture to decode. Training and control both call this."""
    import sim

    return (sim.gripper_pixel(states, image_size, sim.PLACE_POINT_Z) / image_size * 2 - 1).astype(np.float32)


def pad_batch(seqs: list, pad_id: int, fill=None):
    """Right-pad token lists -> (tokens int64 (B, L), pad_mask bool (B, L) True on PADDING, as model.py expects)."""
    L = max(len(s) for s in seqs)
    out = torch.full((len(seqs), L), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.ones((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = False
    return out, mask


def patch_classes() -> tuple:
    """Class counts of the patch labels below: (colours + 1, shapes + 1); class 0 is "table, no item"."""
    import sim
    return (len(sim.PALETTE) + 1, len(sim.SHAPES) + len(sim.CONTAINERS) + 1)


def patch_word_targets(tok, vocab_size: int) -> tuple:
    """The words each patch label class is called by, as target distributions over the vocabulary, for the
    --word-aux loss (model.Planner.word_loss): (colours (C+1, V), shapes (S+1, V)) float32 tensors; row k is
    class k of data.patch_labels (row 0, the bare table, is all zero). A shape's mass is split over its
    synonyms ("cube" and "block"), each the space-prefixed token the questions spell it with."""
    import sim
    def rows(names_per_class):
        t = torch.zeros(len(names_per_class) + 1, vocab_size)
        for k, names in enumerate(names_per_class, start=1):
            for w in names:
                ids = tok.encode(" " + w)
                if len(ids) != 1:
                    raise ValueError(f"the word {w!r} is {len(ids)} tokens; --word-aux needs one token per word")
                t[k, ids[0]] += 1.0 / len(names)
        return t
    return rows([(c,) for c in sim.PALETTE]), rows([sim.SYNONYMS[s] for s in sim.SHAPES + sim.CONTAINERS])


def patch_overlap(box, image_size: int, patch_size: int) -> np.ndarray:
    """(g, g) pixels of the rectangle box = (x1, y1, x2, y2) that fall in each image patch (g = image_size //
    patch_size), rows and columns like the planner's image tokens."""
    x1, y1, x2, y2 = box
    edges = np.arange(image_size // patch_size + 1) * patch_size
    ox = np.clip(np.minimum(edges[1:], x2) - np.maximum(edges[:-1], x1), 0, None)  # (g,) overlap per column
    oy = np.clip(np.minimum(edges[1:], y2) - np.maximum(edges[:-1], y1), 0, None)  # (g,) overlap per row
    return oy[:, None] * ox[None, :]


def patch_labels(questions: list, image_size: int, patch_size: int) -> np.ndarray:
    """What each image patch shows, read off one scene's plain box questions (each names one item and gives its
    box): int64 (2, n_patches) = (colour class, shape class), row-major like the planner's image tokens.

    A patch gets an item's classes when it holds a quarter of the item's box (a small object) or the box covers
    half the patch (a container); containers are written first and objects over them, so a cube in a bowl
    labels its patch "cube". For the --patch-aux loss of train_grounding.py: it tells the image tokens directly
    which colour and shape they show."""
    import sim
    g = image_size // patch_size
    labels = np.zeros((2, g, g), np.int64)
    colours, shapes = list(sim.PALETTE), list(sim.SHAPES + sim.CONTAINERS)
    noun = {w: shape for shape, words in sim.SYNONYMS.items() for w in words}
    items = []
    for q in questions:
        names = _names_in_instruction(re.findall(r"[a-z]+", q["question"].lower()), sim) if q["kind"] == "box" else []
        if len(names) == 1:  # "where is the red can?"; the spatial prompt names two things and is skipped
            colour, word = names[0].split()
            items.append((colour, noun[word], q["label"]))
    items.sort(key=lambda it: it[1] in sim.SHAPES)  # containers first, objects on top
    for colour, shape, (x1, y1, x2, y2) in items:
        area = patch_overlap((x1, y1, x2, y2), image_size, patch_size)  # (g, g)
        hit = (area >= 0.25 * (x2 - x1) * (y2 - y1)) | (area >= 0.5 * patch_size ** 2)  # small item | large one
        labels[0][hit] = colours.index(colour) + 1
        labels[1][hit] = shapes.index(shape) + 1
    return labels.reshape(2, g * g)


def lookup_target(q: dict, image_size: int, patch_size: int):
    """Where a question's answer lies, as a distribution over the image patches (float32 (n_patches,), row-major
    like the planner's image tokens), or None for a trace (its answer runs across the table).

    A box question's answer lies in its box; a point or place question's in its region (the object, the
    container). Each patch gets its share of that rectangle's area. For the --lookup-aux loss of
    train_grounding.py: it tells one attention head of the language model which patches the words name."""
    if q["kind"] == "trace":
        return None
    rect = q["label"] if q["kind"] == "box" else q["region"]
    area = patch_overlap(rect, image_size, patch_size).reshape(-1)  # (g*g,)
    return (area / area.sum()).astype(np.float32) if area.sum() > 0 else None


class GroundingDataset(torch.utils.data.Dataset):
    """Grounding Q/A for training. Item i is image i with ALL of its questions, packed into one row:

    tokens    = q1 ... <|answer|> a1 ... | q2 ... <|answer|> a2 ... | <|pad|> ...      (B, L)
    targets   = -100 ...  a1_1 ... <eot> | -100 ... a2_1  ... <eot> | -100 ...         (B, L)
    segments  = 0    ...  0          0   | 1    ...  1    ...  1    | -1   ...         (B, L)
    positions = 0 1 2 ...                | 0 1 2 ...                | 0 ...            (B, L)

    The planner's packed_mask lets each question see the image and itself only, so this trains exactly like
    one row per question while encoding each image once. Targets are shifted: at <|answer|> the target is
    the first answer token, at the last answer token it is <|endoftext|>.
    """

    def __init__(self, data_dir: str, tok: tiktoken.Encoding, max_scenes: int | None = None,
                 images=None, qa=None, packed: bool = False, patch_size: int = 0, lookup_patch: int = 0):
        if images is None:
            images, qa = load_grounding(data_dir, max_scenes)
        self.images, self.qa, self.tok, self.packed = images, qa, tok, packed
        self.image_size = images.shape[1]
        self.pad, self.eot = tok.encode_single_token(PAD), tok.encode_single_token(EOT)
        self.by_image = {}
        for q in qa:
            self.by_image.setdefault(q["image"], []).append(q)
        self.image_ids = sorted(self.by_image)
        # patch_size > 0: packed batches also carry what each patch shows (data.patch_labels), worked out once here
        self.patch_targets = {i: patch_labels(qs, self.image_size, patch_size) for i, qs in self.by_image.items()} \
            if patch_size else None
        # lookup_patch > 0: packed batches also carry, for every answer token, the patches its answer lies in
        self.lookup_targets = {i: [lookup_target(q, self.image_size, lookup_patch) for q in qs]
                               for i, qs in self.by_image.items()} if lookup_patch else None
        self.lookup_patches = (self.image_size // lookup_patch) ** 2 if lookup_patch else 0

    def __len__(self):
        return len(self.image_ids) if self.packed else len(self.qa)

    def __getitem__(self, i):
        qs = self.by_image[self.image_ids[i]] if self.packed else [self.qa[i]]
        return qs[0]["image"], [(encode_question(self.tok, q["question"]), self.tok.encode(q["answer"]) + [self.eot])
                                for q in qs]

    def collate(self, batch):
        """-> images, tokens, targets, segments, positions (packed; + patch labels when patch_size > 0; + lookup
        targets (B, L, n_patches) when lookup_patch > 0, last) or images, tokens, targets, prefix_len."""
        if not self.packed:  # one question per row; the question is the planner's bidirectional prefix
            images = preprocess_image(self.images[[b[0] for b in batch]], self.image_size)
            q, a = [b[1][0][0] for b in batch], [b[1][0][1] for b in batch]
            tokens, _ = pad_batch([qq + aa[:-1] for qq, aa in zip(q, a)], self.pad)
            targets, _ = pad_batch([[-100] * (len(qq) - 1) + aa for qq, aa in zip(q, a)], self.pad, fill=-100)
            return images, tokens, targets, torch.tensor([len(qq) for qq in q])
        images = preprocess_image(self.images[[b[0] for b in batch]], self.image_size)  # (B, 3, H, W)
        rows = []
        for _, pairs in batch:
            tok, tgt, seg, pos = [], [], [], []
            for k, (q, a) in enumerate(pairs):
                tok += q + a[:-1]
                tgt += [-100] * (len(q) - 1) + a
                seg += [k] * (len(q) + len(a) - 1)
                pos += list(range(len(q) + len(a) - 1))
            rows.append((tok, tgt, seg, pos))
        tokens, _ = pad_batch([r[0] for r in rows], self.pad)
        targets, _ = pad_batch([r[1] for r in rows], self.pad, fill=-100)
        segments, _ = pad_batch([r[2] for r in rows], self.pad, fill=-1)
        positions, _ = pad_batch([r[3] for r in rows], self.pad, fill=0)
        out = [images, tokens, targets, segments, positions]
        if self.patch_targets is not None:  # for the auxiliary loss (train_grounding.py --patch-aux)
            labels = np.stack([self.patch_targets[b[0]] for b in batch])
            out.append(torch.from_numpy(labels))  # labels (B, 2, P)
        if self.lookup_targets is not None:  # for the auxiliary loss (train_grounding.py --lookup-aux)
            look = np.zeros((len(batch), tokens.shape[1], self.lookup_patches), np.float32)  # (B, L, P); 0 rows: no target
            for r, (image_id, pairs) in enumerate(batch):
                at = 0
                for (q, a), where in zip(pairs, self.lookup_targets[image_id]):
                    if where is not None:  # the answer's positions: from <|answer|> to the last answer token
                        look[r, at + len(q) - 1: at + len(q) + len(a) - 1] = where
                    at += len(q) + len(a) - 1
            out.append(torch.from_numpy(look))
        return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# 4. Demonstrations (stage 2); robot.py's `record` writes the same format


def write_demo_episode(root: str, episode: dict, index: int | None = None) -> str:
    """Save one episode as `episode_000012.npz`.

    episode = {"images": uint8 (T,H,W,3), "states": float32 (T,6), "actions": float32 (T,6),
               "instruction": str, "success": bool, "source": "sim" | "robot",
               optional per-frame grounding labels: "target_box" (T,4), "container_box" (T,4), "target_point" (T,2),
               "trace" (TRACE_POINTS,2), "label_mask" (T,) bool (False: a deliberately missed try, not a label)}
    """
    os.makedirs(root, exist_ok=True)
    T = len(episode["actions"])
    if episode["images"].shape[0] != T or episode["states"].shape != (T, 6) or episode["actions"].shape != (T, 6):
        raise ValueError("an episode needs images (T,H,W,3), states (T,6) and actions (T,6) of the same length T")
    if index is None:
        index = len(glob.glob(os.path.join(root, "episode_*.npz")))
    path = os.path.join(root, f"episode_{index:06d}.npz")
    arrays = {k: np.asarray(v) for k, v in episode.items() if k not in ("instruction", "source", "success")}
    meta = dict(instruction=episode["instruction"], source=episode.get("source", "sim"),
                success=bool(episode.get("success", True)))
    _atomic_savez(path, meta=np.array(json.dumps(meta)), **arrays)
    return path


def read_demo_episodes(root: str, successful_only: bool = True) -> list:
    paths = sorted(glob.glob(os.path.join(root, "episode_*.npz")))
    if not paths:
        raise FileNotFoundError(f"no demonstrations in {root}: make them with `python data.py --demos 100 --out {root}`"
                                " or record them with `python robot.py record`")
    episodes = []
    for p in paths:
        z = np.load(p)
        ep = {k: z[k] for k in z.files if k != "meta"}
        ep.update(json.loads(str(z["meta"])))
        if ep["success"] or not successful_only:
            episodes.append(ep)
    return episodes


def demo_noise_offsets(rng: np.random.Generator, n_steps: int, noise: float, hold=(3, 6), p_on: float = 0.5):
    """DART-style perturbations for the expert's executed actions: (n_steps, 6) joint offsets in radians.
    Offsets are held for 3-6 steps (a servo follows a one-step blip at once, so white noise would barely move
    the arm), switched on for about half of those segments, Gaussian with std `noise` on the 5 arm joints and
    never on the jaw (the jaw's command is the grasp itself)."""
    out, t = np.zeros((n_steps, 6), np.float32), 0
    while t < n_steps:
        k = int(rng.integers(hold[0], hold[1] + 1))
        if rng.random() < p_on:
            out[t:t + k, :5] = rng.normal(0, noise, 5)
        t += k
    return out


MISS_OFFSET = 0.03  # m: a deliberate miss (sim.py --grasp-offset: the expert itself succeeds 12/100 at 3 cm)


def generate_demos(out_dir: str, n_episodes: int, split: str = "train", seed: int = 0, image_size: int = 96,
                   progress: bool = True, noise: float = 0.0, paired: bool = False, miss: float = 0.0,
                   workers: int = 1) -> str:
    """Run the scripted expert for n_episodes seeds and keep every episode (failed ones are marked so a resumed
    run does not redo them; training reads only successful ones). Writes norm_stats.json at the end.

    noise > 0 records DART-style demonstrations (Laskey et al. 2017): the arm executes the expert's action plus
    a held random offset (demo_noise_offsets), but the *expert's* action is what is recorded. The frames then
    show the arm a little off the expert's path while the labels lead back to it: the recovery data a scripted
    expert that never misses cannot give otherwise, and the joint state no longer predicts the next action
    by itself, so the policy has to look at the image (EXPERIMENTS.md, "Why the closed loop fails").

    paired=True records counterfactual pairs: episodes 2k and 2k+1 start from the same table, the same light
    and the same start pose (the same first image), but ask for different objects (sim.retarget). Unpaired,
    every table comes with one instruction, so a policy can learn "this table -> reach there" from the image
    alone and never read the words (EXPERIMENTS.md, item 10). Paired, the first frames differ only in the words.

    miss > 0: that fraction of episodes starts with a deliberate miss (the grasp MISS_OFFSET beside the object),
    then the expert sees the jaws come up empty and grasps again at the true position (sim.ScriptedExpert,
    miss_once). The frames of the missed try are kept but marked "label_mask" = False: a policy should not
    learn to miss, only to recover (DemoDataset skips them).

    workers > 1 records episodes in that many processes; every episode depends only on its index, so the
    folder is the same whatever the number of workers."""
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(n_episodes=n_episodes, split=split, seed=seed, image_size=image_size)
    if noise:  # folders made without these settings keep their old meta
        meta["noise"] = noise
    if paired:
        meta["paired"] = True
    if miss:
        meta["miss"] = miss
    _check_meta(out_dir, meta)
    todo = [i for i in range(n_episodes) if not os.path.exists(os.path.join(out_dir, f"episode_{i:06d}.npz"))]
    if todo:  # a complete folder needs no simulator or renderer (training on a copied folder)
        from tqdm import tqdm

        check_render_reference(out_dir, image_size)

        job = dict(out_dir=out_dir, split=split, seed=seed, image_size=image_size, noise=noise, paired=paired,
                   miss=miss)
        bar = tqdm(total=len(todo), desc=f"demos {split}", disable=not progress, unit="ep")
        if workers <= 1:
            _demo_worker(job, todo, bar.update)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed
            # spawn, not fork: each worker builds its own renderer (an EGL context does not survive a fork).
            # If a worker dies (out of memory, killed), the executor raises BrokenProcessPool instead of
            # waiting for ever; the episodes already written stay, and the same command resumes.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                parts = [todo[k:k + 8] for k in range(0, len(todo), 8)]
                for f in as_completed([pool.submit(_demo_worker, job, p) for p in parts]):
                    bar.update(f.result())
        bar.close()
    if not os.path.exists(os.path.join(out_dir, "norm_stats.json")) or todo:
        stats = compute_norm_stats(read_demo_episodes(out_dir))
        with open(os.path.join(out_dir, "norm_stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
    return out_dir


def _demo_worker(job: dict, indices: list, done=None) -> int:
    """Record and write the demonstrations with these indices (one simulator per worker)."""
    import sim

    env = sim.SO100Env(image_size=job["image_size"], split=job["split"])
    seed, split, paired = job["seed"], job["split"], job["paired"]
    for i in indices:
        obs, info = env.reset(seed=_scene_seed(seed, split, i - i % 2 if paired else i) + 1)
        if paired and i % 2 == 1:  # the partner of episode i - 1: its table, look and start, another object
            partner = sim.retarget(info["scene"], np.random.default_rng(_scene_seed(seed, split, i) + 3))
            if partner is not None:
                obs, info = env.reset(options=dict(scene=partner, look=env.look, start=env.start))
        rng = np.random.default_rng(_scene_seed(seed, split, i) + 2)
        offsets = demo_noise_offsets(rng, env.cfg.max_steps, job["noise"])
        missed = job["miss"] > 0 and rng.random() < job["miss"]  # drawn after the offsets: miss=0 folders unchanged
        expert = sim.ScriptedExpert(env, MISS_OFFSET if missed else 0.0, seed=_scene_seed(seed, split, i) + 4,
                                    miss_once=True)
        expert.reset()
        trace = trace_label(info)
        rec = _new_record()
        for step in range(env.cfg.max_steps):
            action = expert.act(obs, info)
            _record_frame(rec, obs, info, action, not (missed and expert.retries == 0))  # the missed try: not a label
            obs, _, terminated, truncated, info = env.step(action + offsets[step])  # executed != recorded
            if terminated or truncated:
                break
        ep = _finish_record(rec, trace, info, keep_mask=missed)  # folders without misses keep their old files
        write_demo_episode(job["out_dir"], ep, index=i)
        if done:
            done(1)
    env.close()
    return len(indices)


def _new_record() -> dict:
    return {k: [] for k in ("images", "states", "actions", "target_box", "container_box", "target_point", "label_mask")}


def _record_frame(rec: dict, obs: dict, info: dict, action: np.ndarray, label: bool):
    """Append one frame: what the camera and the joints showed, the action taken, the scene's labels."""
    rec["images"].append(obs["image"])
    rec["states"].append(obs["state"])
    rec["actions"].append(action)
    rec["target_box"].append(info["target_box"])
    rec["container_box"].append(info["container_box"])
    rec["target_point"].append(info["target_point"])
    rec["label_mask"].append(label)


def _finish_record(rec: dict, trace: np.ndarray, info: dict, keep_mask: bool) -> dict:
    ep = {k: np.asarray(v, np.uint8 if k == "images" else bool if k == "label_mask" else np.float32)
          for k, v in rec.items()}
    if not keep_mask:
        del ep["label_mask"]
    ep.update(trace=trace.astype(np.float32), instruction=info["instruction"], success=bool(info["success"]),
              source="sim")
    return ep


TAKEOVER_DELAY = (0, 6)  # steps after the policy lifts the target before the expert takes over (drawn per episode)
TAKEOVER_FALLBACK = (10, 60)  # a policy that never lifts the target is taken over at a step drawn from this range
TAKEOVER_STREAM = 1000  # takeover scenes use the seed stream seed + 1000: not the demonstrations' tables


def generate_takeover_demos(ckpt: str, out_dir: str, n_episodes: int, split: str = "train", seed: int = 0,
                            noise: float = 0.08, workers: int = 1, progress: bool = True,
                            after_lift_only: bool = False) -> str:
    """DAgger-style demonstrations from a trained policy's own states (Ross et al. 2011; HG-DAgger's "the
    expert takes over"). Each episode: the policy (stage-2 checkpoint `ckpt`) runs closed-loop until the
    scripted expert takes over, then the expert (sim.ScriptedExpert, which plans from wherever things are,
    also from a target already in the jaws) finishes the task, with DART offsets on its executed actions.

    When it takes over: TAKEOVER_DELAY steps after the policy lifted the target (sim.SO100Env.target_held),
    or at once if the policy let go of it before then; a policy that never lifts the target is taken over at a
    step drawn from TAKEOVER_FALLBACK (after_lift_only=True: never, and the episode is marked failed, so only
    takeovers after the policy's own lift are kept). Why there: the policy's closed-loop failure is letting go at the end of
    its own lift, away from the container (EXPERIMENTS.md, item 15), in states the expert's demonstrations never
    visit. The frames the policy drove are kept but marked label_mask = False (its actions are not labels);
    the frames from the takeover on are labelled by the expert, so the first labels come from the policy's own
    states. Episodes the expert could not finish are marked failed (training reads only successful ones).

    Scenes come from the seed stream seed + TAKEOVER_STREAM (generate_demos uses `seed`, eval.py's suites their
    own seeds), so these tables are neither demonstration tables nor evaluation tables."""
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(n_episodes=n_episodes, split=split, seed=seed, noise=noise, takeover=os.path.normpath(ckpt))
    if after_lift_only:
        meta["after_lift_only"] = True
    _check_meta(out_dir, meta)
    todo = [i for i in range(n_episodes) if not os.path.exists(os.path.join(out_dir, f"episode_{i:06d}.npz"))]
    if todo:
        from tqdm import tqdm

        job = dict(ckpt=ckpt, out_dir=out_dir, split=split, seed=seed + TAKEOVER_STREAM, noise=noise,
                   after_lift_only=after_lift_only)
        bar = tqdm(total=len(todo), desc=f"takeover demos {split}", disable=not progress, unit="ep")
        if workers <= 1:
            _takeover_worker(job, todo, bar.update)
        else:  # as in generate_demos: spawned processes, each with its own renderer and policy
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                parts = [todo[k:k + 8] for k in range(0, len(todo), 8)]
                for f in as_completed([pool.submit(_takeover_worker, job, p) for p in parts]):
                    bar.update(f.result())
        bar.close()
    return out_dir


def _takeover_worker(job: dict, indices: list, done=None) -> int:
    """Record and write the takeover episodes with these indices (one simulator and one policy per worker)."""
    import sim
    from model import Policy

    torch.set_num_threads(1)
    policy = Policy.load(job["ckpt"])
    env = sim.SO100Env(image_size=policy.image_size, split=job["split"])
    for i in indices:
        obs, info = env.reset(seed=_scene_seed(job["seed"], job["split"], i) + 1)
        policy.reset()
        rng = np.random.default_rng(_scene_seed(job["seed"], job["split"], i) + 2)
        offsets = demo_noise_offsets(rng, env.cfg.max_steps, job["noise"])
        delay = int(rng.integers(TAKEOVER_DELAY[0], TAKEOVER_DELAY[1] + 1))
        fallback = int(rng.integers(TAKEOVER_FALLBACK[0], TAKEOVER_FALLBACK[1] + 1))
        if job.get("after_lift_only"):  # wait for a lift as long as the episode lasts; none: not kept (below)
            fallback = env.cfg.max_steps
        trace = trace_label(info)
        rec, expert, lifted_at = _new_record(), None, None
        for step in range(env.cfg.max_steps):
            if expert is None:
                held = env.target_held()
                lifted_at = step if held and lifted_at is None else lifted_at
                let_go = lifted_at is not None and not held
                if (lifted_at is not None and (step - lifted_at >= delay or let_go)) or \
                        (lifted_at is None and step >= fallback):
                    expert = sim.ScriptedExpert(env, seed=_scene_seed(job["seed"], job["split"], i) + 4)
                    expert.reset()  # plans from here: from the carry if the target is in the jaws
            if expert is None:
                action = policy.act(obs, info["instruction"])
                _record_frame(rec, obs, info, action, False)  # the policy's action: not a label
                obs, _, terminated, truncated, info = env.step(action)
            else:
                action = expert.act(obs, info)
                _record_frame(rec, obs, info, action, True)
                obs, _, terminated, truncated, info = env.step(action + offsets[step])  # DART, as in generate_demos
            if terminated or truncated:
                break
        # an episode the policy finished on its own has no expert label at all: kept, but as a failure
        ep = _finish_record(rec, trace, info, keep_mask=True)
        ep["success"] = bool(info["success"]) and expert is not None
        write_demo_episode(job["out_dir"], ep, index=i)
        if done:
            done(1)
    env.close()
    return len(indices)


# ----------------------------------------------------------------------------------------------------------
# 5. Normalisation to [-1, 1] by percentiles


def compute_norm_stats(episodes: list) -> dict:
    """1st/99th percentiles of actions and states: robust to the odd outlier (paper, following the field)."""
    acts = np.concatenate([e["actions"] for e in episodes])
    states = np.concatenate([e["states"] for e in episodes])
    stats = {}
    for name, x in (("action", acts), ("state", states)):
        lo, hi = np.percentile(x, 1, axis=0), np.percentile(x, 99, axis=0)
        hi = np.maximum(hi, lo + 1e-3)  # a joint that never moves must not divide by zero
        stats[name] = {"low": lo.tolist(), "high": hi.tolist()}
    return stats


def chunk_actions(episode: dict, t: int, chunk: int) -> np.ndarray:
    """The next `chunk` actions from time t: (chunk, 6) radians. Past the episode's end the last action
    repeats ("stay there")."""
    return episode["actions"][np.minimum(np.arange(t, t + chunk), len(episode["actions"]) - 1)]


def chunk_deltas(episode: dict, t: int, chunk: int) -> np.ndarray:
    """chunk_actions relative to the joint state at t: (chunk, 6) radians."""
    return chunk_actions(episode, t, chunk) - episode["states"][t]


def compute_delta_stats(episodes: list, chunk: int) -> dict:
    """1st/99th percentiles of chunk_deltas, separately for each of the chunk's steps: {"low", "high"} (chunk, 6).
    Per step because the first action is a few degrees from the state and the eighth tens of degrees: one
    shared range would squeeze the near actions -- the ones the robot executes -- into a sliver of [-1, 1]."""
    d = np.stack([chunk_deltas(e, t, chunk) for e in episodes for t in range(len(e["actions"]))])  # (N, chunk, 6)
    lo, hi = np.percentile(d, 1, axis=0), np.percentile(d, 99, axis=0)
    return {"low": lo.tolist(), "high": np.maximum(hi, lo + 1e-3).tolist()}


def normalize(x, stats: dict):
    lo, hi = np.asarray(stats["low"], np.float32), np.asarray(stats["high"], np.float32)
    return np.clip(2 * (np.asarray(x, np.float32) - lo) / (hi - lo) - 1, -1.5, 1.5)


def unnormalize(x, stats: dict):
    lo, hi = np.asarray(stats["low"], np.float32), np.asarray(stats["high"], np.float32)
    return (np.asarray(x, np.float32) + 1) / 2 * (hi - lo) + lo


def split_episodes(episodes: list) -> tuple:
    """-> (training episodes, held-out episodes): the first 5% (at least one) are held out. train_action.py's
    validation loss and eval.py --open-loop both use this split, so "held-out" means the same episodes."""
    n_val = max(1, len(episodes) // 20)
    return episodes[n_val:], episodes[:n_val]


EARLY_STEPS = 8  # "the start of an episode" for DemoDataset.sample_indices (the approach takes 8-18 steps)


def object_resting(episode: dict, tol: float = 1.0) -> np.ndarray:
    """(T,) bool: the key object still lies where it started (its box centre within tol px of frame 0's).
    Once it is in the jaws its box is wherever the gripper is, so labels from those frames reward the shortcut
    "the object is at the gripper"; in the closed loop the planner does answer near an empty gripper (EXPERIMENTS.md,
    "Why the closed loop fails", item 8). train_action.py --no-held-labels takes the object labels only from
    resting frames: measured, that weakened the habit but did not bring the arm closer, so it is off by default."""
    c = box_centre(episode["target_box"])  # (T, 2)
    return np.linalg.norm(c - c[0], axis=1) <= tol


class DemoDataset(torch.utils.data.Dataset):
    """Items are (episode, time) pairs; each gives the image and state at t and the chunk of the next
    `chunk` actions (repeating the last action past the episode's end, i.e. "stay there"). Frames marked
    label_mask = False (a deliberate miss) are not items.
    relative=True: the chunk is the actions minus the state at t, normalised with stats["delta"]
    (compute_delta_stats); otherwise absolute joint targets normalised with stats["action"].

    collate -> images (B,3,H,W), tokens (B,L), pad_mask (B,L), actions (B,chunk,6) normalised,
               state (B,6) normalised (then the previous step's with prev_state, then the plan's numbers with
               plan_numbers, then the jaws' place in the picture with gripper_point), where (B,4) object and
               container centres in [0, 1] (or None; the object's are NaN while it is off the table, unless
               held_labels).
    """

    def __init__(self, episodes: list, tok: tiktoken.Encoding, stats: dict, chunk: int = 8,
                 spatial_prompt: bool = True, relative: bool = False, held_labels: bool = True,
                 written_plan: bool = False, plan_numbers: bool = False, prev_state: bool = False,
                 gripper_point: bool = False):
        self.eps, self.tok, self.stats, self.chunk, self.relative = episodes, tok, stats, chunk, relative
        self.prev_state = prev_state  # also the state one control step earlier (frame 0: the same state again)
        if written_plan and not spatial_prompt:
            raise ValueError("a written plan is the answer to the spatial prompt: it needs spatial_prompt=True")
        if plan_numbers and not written_plan:
            raise ValueError("plan_numbers are the written plan's numbers: they need written_plan=True")
        if written_plan and any("target_box" not in ep for ep in episodes):
            raise ValueError("a written plan needs the key object's box and place point (sim demonstrations)")
        # held_labels=False: no object position label once it has left the table (computed once per episode)
        self.resting = None if held_labels else [object_resting(ep) if "target_box" in ep else None for ep in episodes]
        # every frame is an item, except the frames of a deliberately missed try (generate_demos(miss=...))
        self.index = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep["actions"]))
                      if ep.get("label_mask") is None or ep["label_mask"][t]]
        # the frames before the arm has moved much: only the image says where to go (see sample_indices)
        self.early = np.array([i for i, (e, t) in enumerate(self.index) if t < EARLY_STEPS])
        self.image_size = episodes[0]["images"].shape[1]
        self.pad = tok.encode_single_token(PAD)
        self.prompts = [encode_prompt(tok, ep["instruction"], spatial_prompt) for ep in episodes]
        if written_plan:  # prompt + <|answer|> + "[x1,y1,x2,y2](x,y)" from the episode's first frame
            plans = [plan_tokens(tok, ep["target_box"][0], ep["target_point"][0], self.image_size) for ep in episodes]
            self.prompts = [p + q for p, q in zip(self.prompts, plans)]
        # plan_numbers: the same plan as PLAN_DIM numbers, appended to each frame's normalised state (plan_vector)
        self.plan_vecs = [plan_vector(tok.decode(q), self.image_size) for q in plans] if plan_numbers else None
        # gripper_point: where the jaws are in the picture at every frame, from its joint state (gripper_vector)
        self.grips = [gripper_vector(ep["states"], self.image_size) for ep in episodes] if gripper_point else None

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        e, t = self.index[i]
        ep = self.eps[e]
        state = normalize(ep["states"][t], self.stats["state"])  # (6,)
        if self.prev_state:  # (12,): now, then one step ago -- which way the arm is moving
            state = np.concatenate([state, normalize(ep["states"][max(t - 1, 0)], self.stats["state"])])
        if self.plan_vecs is not None:
            state = np.concatenate([state, self.plan_vecs[e]])  # (... + PLAN_DIM,)
        if self.grips is not None:
            state = np.concatenate([state, self.grips[e][t]])  # (... + GRIPPER_DIM,)
        if self.relative:
            return e, t, normalize(chunk_deltas(ep, t, self.chunk), self.stats["delta"]), state
        return e, t, normalize(chunk_actions(ep, t, self.chunk), self.stats["action"]), state

    def sample_indices(self, rng: np.random.Generator, n: int, early_fraction: float = 0.0) -> np.ndarray:
        """n random items; about early_fraction of them from the first EARLY_STEPS frames of an episode.
        Why: once the arm moves, its joint state (and its picture) already say where it is heading, so most
        frames can be fitted by continuing the motion; the few frames at the start are the only ones where
        the policy must find the object in the image, and uniform sampling gives them ~15% of the batch."""
        idx = rng.integers(len(self.index), size=n)
        if early_fraction > 0 and len(self.early):  # (none when every episode starts with a masked miss)
            pick = rng.random(n) < early_fraction
            idx[pick] = self.early[rng.integers(len(self.early), size=int(pick.sum()))]
        return idx

    def collate(self, batch):
        images = preprocess_image(np.stack([self.eps[e]["images"][t] for e, t, _, _ in batch]), self.image_size)
        tokens, mask = pad_batch([self.prompts[e] for e, _, _, _ in batch], self.pad)
        actions = torch.from_numpy(np.stack([b[2] for b in batch]))  # (B, chunk, 6)
        state = torch.from_numpy(np.stack([b[3] for b in batch]))     # (B, 6 [+ 6] [+ PLAN_DIM] [+ GRIPPER_DIM])
        return images, tokens, mask, actions, state, self.where_labels(batch)

    def where_labels(self, batch):
        """(B, 4): centres of the key object's and the container's boxes at each frame, in [0, 1] of the
        image (for the optional where head, model.VLA.where_loss); None when the episodes carry no boxes."""
        if any("target_box" not in self.eps[e] for e, *_ in batch):
            return None
        boxes = np.stack([np.stack([self.eps[e]["target_box"][t], self.eps[e]["container_box"][t]])
                          for e, t, _, _ in batch])  # (B, 2, 4): object, container
        centres = box_centre(boxes).reshape(len(batch), 4)  # (B, 4) object x y, container x y
        if self.resting is not None:  # the object in the jaws: no label (NaN, skipped by the loss)
            held = np.array([not self.resting[e][t] for e, t, _, _ in batch])
            centres[held, :2] = np.nan
        return torch.from_numpy(centres / self.image_size)


def demo_grounding_qa(episodes: list, rng: np.random.Generator, n: int, image_size: int,
                      held_labels: bool = True):
    """Grounding Q/A drawn from demonstration frames (mid-task views, the arm anywhere) for co-training:
    boxes of the task's object and container, where the object should go, and the spatial prompt answered
    with the key object's box (as in scene_questions). Returns (images, qa).
    held_labels=False: questions about the key object come only from frames where it still rests on the
    table (object_resting), never from frames where it is in the jaws."""
    import sim

    images, qa = [], []
    for k in range(n):
        e = int(rng.integers(len(episodes)))
        ep = episodes[e]
        if "target_box" not in ep:
            continue
        t = int(rng.integers(len(ep["actions"])))
        words = ep["instruction"].split()
        kind = int(rng.integers(4))
        if kind in (0, 3) and not held_labels:  # about the key object: a frame where it rests on the table
            resting = np.flatnonzero(object_resting(ep))
            t = t if t in resting else int(resting[rng.integers(len(resting))])
        images.append(ep["images"][t])
        if kind == 3:  # the spatial prompt -> the key object's box, as in scene_questions
            qa.append(dict(kind="box", question=SPATIAL_PROMPT.format(instruction=ep["instruction"]),
                           answer=format_box(np.clip(ep["target_box"][t], 0, image_size - 1)), image=len(images) - 1))
            continue
        if kind == 2:
            q = PLACE_QUESTIONS[int(rng.integers(len(PLACE_QUESTIONS)))].format(instruction=ep["instruction"])
            qa.append(dict(kind="place", question=q, answer=format_point(np.clip(ep["target_point"][t], 0, image_size - 1)),
                           image=len(images) - 1))
            continue
        box = ep["target_box"][t] if kind == 0 else ep["container_box"][t]
        name = _names_in_instruction(words, sim)[kind]
        q = BOX_QUESTIONS[int(rng.integers(len(BOX_QUESTIONS)))].format(name=name)
        qa.append(dict(kind="box", question=q, answer=format_box(np.clip(box, 0, image_size - 1)), image=len(images) - 1))
    return np.stack(images), qa


def _names_in_instruction(words, sim):
    """The two '<colour> <noun>' phrases of an instruction, in order (object first, then container)."""
    names = []
    for i in range(len(words) - 1):
        if words[i] in sim.PALETTE and any(words[i + 1] in syn for syn in sim.SYNONYMS.values()):
            names.append(f"{words[i]} {words[i + 1]}")
    return names


# ----------------------------------------------------------------------------------------------------------
# 7. Grounding metrics (metrics.md)


def box_centre(box) -> np.ndarray:
    """[..., 4] boxes x1 y1 x2 y2 -> [..., 2] centres."""
    box = np.asarray(box, np.float32)
    return (box[..., :2] + box[..., 2:]) / 2


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def discrete_frechet(p: np.ndarray, q: np.ndarray) -> float:
    """C[i,j] = max(min(C[i-1,j], C[i,j-1], C[i-1,j-1]), d(p_i, q_j)); the answer is C[-1,-1]."""
    d = np.linalg.norm(p[:, None, :] - q[None, :, :], axis=2)
    C = np.zeros_like(d)
    for i in range(len(p)):
        for j in range(len(q)):
            prev = 0.0 if i == j == 0 else min(C[i - 1, j] if i else np.inf, C[i, j - 1] if j else np.inf,
                                              C[i - 1, j - 1] if i and j else np.inf)
            C[i, j] = max(prev, d[i, j])
    return float(C[-1, -1])


def in_box(p, box, image_size: int) -> bool:
    return bool(0 <= p[0] <= image_size and 0 <= p[1] <= image_size and box[0] - 0.5 <= p[0] <= box[2] + 0.5
                and box[1] - 0.5 <= p[1] <= box[3] + 0.5)


def grounding_metrics(samples: list, answers: list, image_size: int) -> dict:
    """Score generated answer texts against their samples' labels.

    box_other_object splits the box misses: the share of box answers that overlap another thing asked about in
    the same scene more than the thing asked for (IoU > 0.1), i.e. the planner found *an* object but not the one
    the words name (a colour/shape binding error, not a precision one). prompt_box_acc50 and place_acc score
    only the spatial prompt's box and the "where should it go" points: what a written plan is made of;
    object_box_acc50 the other box questions about a graspable object (not a container)."""
    import sim

    ious, box_ok, pt_ok, dfd, parsed, other = [], [], [], [], [], []
    prompt_ok, place_ok = [], []  # the two answers a written plan is made of (plan_tokens)
    object_ok = []  # box questions about a graspable object only (the containers are big and easier)
    container_words = {w for shape in sim.CONTAINERS for w in sim.SYNONYMS[shape]}
    prompt_tail = SPATIAL_PROMPT.split("{instruction}")[1]  # every spatial prompt ends with this
    boxes_in_scene = {}  # image index -> labels of every box question about it
    for q in samples:
        if q["kind"] == "box":
            boxes_in_scene.setdefault(q.get("image"), set()).add(tuple(q["label"]))
    for q, text in zip(samples, answers):
        pred = PARSERS[q["kind"]](text)
        parsed.append(pred is not None)
        if q["kind"] == "box":
            iou = 0.0 if pred is None else box_iou(pred, q["label"])
            ious.append(iou)
            box_ok.append(iou >= 0.5)
            rivals = [] if pred is None else [box_iou(pred, b) for b in boxes_in_scene[q.get("image")]
                                              if b != tuple(q["label"])]
            other.append(max(rivals, default=0.0) > max(iou, 0.1))
            if q.get("question", "").endswith(prompt_tail):
                prompt_ok.append(iou >= 0.5)
            elif "question" in q and not container_words & set(q["question"].rstrip("?.").split()):
                object_ok.append(iou >= 0.5)
        elif q["kind"] in ("point", "place"):
            pt_ok.append(pred is not None and in_box(pred, q["region"], image_size))
            if q["kind"] == "place":
                place_ok.append(pt_ok[-1])
        else:
            true = resample_path(np.asarray(q["label"]), 16)
            # an unparsable trace counts as the worst case: the image diagonal
            dfd.append(image_size * math.sqrt(2) if pred is None else discrete_frechet(resample_path(pred, 16), true))
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"parse_rate": mean(parsed), "box_acc50": mean(box_ok), "box_miou": mean(ious),
            "box_other_object": mean(other), "point_acc": mean(pt_ok), "trace_dfd": mean(dfd),
            "prompt_box_acc50": mean(prompt_ok), "object_box_acc50": mean(object_ok), "place_acc": mean(place_ok),
            "n": len(samples)}


@torch.no_grad()
def evaluate_grounding(planner, tok, images: np.ndarray, qa: list, device="cpu", batch_size: int = 64,
                       max_new_tokens: int = 40) -> tuple:
    """Generate an answer for every question (greedy) and score them. Returns (metrics, answer texts).

    `planner.generate(images, tokens, max_new_tokens, eos_id)` needs equal prompt lengths in a batch, so
    questions are grouped by length.
    """
    planner.eval()
    eot = tok.encode_single_token(EOT)
    image_size = images.shape[1]
    answers = [None] * len(qa)
    by_len = {}
    for i, q in enumerate(qa):
        by_len.setdefault(len(encode_question(tok, q["question"])), []).append(i)
    for idxs in by_len.values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s:s + batch_size]
            x = preprocess_image(images[[qa[i]["image"] for i in chunk]], image_size).to(device)
            toks = torch.tensor([encode_question(tok, qa[i]["question"]) for i in chunk], device=device)
            outs = planner.generate(x, toks, max_new_tokens, eot)
            for i, o in zip(chunk, outs):
                o = list(o)[:list(o).index(eot)] if eot in list(o) else list(o)
                answers[i] = tok.decode([t for t in o if t < eot])  # special tokens (ids >= eot) are not text
    return grounding_metrics(qa, answers, image_size), answers


# ----------------------------------------------------------------------------------------------------------
# Command line: build/inspect the data


@dataclass
class DataArgs:
    grounding: int = 0          # grounding scenes to write
    demos: int = 0              # expert demonstrations to write
    demo_noise: float = 0.08    # DART offsets (rad) on the executed actions (generate_demos); train_action's default
    paired: bool = False        # counterfactual pairs: two episodes per table, two different objects asked for
    miss: float = 0.0           # share of demonstrations that start with a deliberate miss, then recover
    workers: int = 1            # processes recording demonstrations
    split: str = "train"        # train or test
    seed: int = 0
    image_size: int = 96
    takeover: str = ""          # a stage-2 checkpoint: --demos N records N takeover episodes (generate_takeover_demos)
    after_lift_only: bool = False  # with --takeover: keep only takeovers after the policy lifted the target
    out: str = ""               # default: out/data/grounding_<split> or out/data/demos_<split>
    build_tokenizer: bool = False  # (re)train tokenizer.bpe from the project's own text


def main(argv=None):
    p = argparse.ArgumentParser(description="tiny-m1 data: tokenizer, grounding scenes, demonstrations")
    for f in DataArgs.__dataclass_fields__.values():
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true")
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default)
    args = DataArgs(**vars(p.parse_args(argv)))
    if args.build_tokenizer:
        train_tokenizer()
    tok = get_tokenizer()
    print(f"tokenizer: {tok.n_vocab} tokens (tokenizer.bpe)")
    if args.grounding:
        out = args.out or f"out/data/grounding_{args.split}"
        generate_grounding(out, args.grounding, args.split, args.seed, args.image_size)
        images, qa = load_grounding(out)
        print(f"{out}: {len(images)} scenes, {len(qa)} questions")
    if args.demos and args.takeover:
        out = args.out or f"out/data/takeover_{args.split}"
        generate_takeover_demos(args.takeover, out, args.demos, args.split, args.seed, args.demo_noise,
                                args.workers, after_lift_only=args.after_lift_only)
        eps = read_demo_episodes(out, successful_only=False)
        print(f"{out}: {len(eps)} episodes, {sum(e['success'] for e in eps)} successful, "
              f"{sum(int(e['label_mask'].sum()) for e in eps if e['success'])} expert-labelled frames")
    elif args.demos:
        out = args.out or f"out/data/demos_{args.split}"
        generate_demos(out, args.demos, args.split, args.seed, args.image_size, noise=args.demo_noise,
                       paired=args.paired, miss=args.miss, workers=args.workers)
        eps = read_demo_episodes(out, successful_only=False)
        print(f"{out}: {len(eps)} episodes, {sum(e['success'] for e in eps)} successful, "
              f"{sum(len(e['actions']) for e in eps)} frames")
    if not (args.grounding or args.demos):
        import sim
        env = sim.SO100Env(image_size=args.image_size, split=args.split)
        obs, info = env.reset(seed=args.seed)
        for q in scene_questions(info, np.random.default_rng(args.seed), args.image_size):
            ids = encode_question(tok, q["question"]) + tok.encode(q["answer"])
            print(f"{q['kind']:6s} {q['question']!r} -> {q['answer']}   ({len(ids)} tokens)")


if __name__ == "__main__":
    main()
