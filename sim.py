"""sim.py -- an SO-100 pick-and-place world in MuJoCo, its scripted expert, and camera geometry.

This is tiny-m1's *simulation data engine* (paper section "simulation data engine"): every later stage learns
from scenes and demonstrations produced here.

    python sim.py --episodes 20 --seed 0                 # run the expert, print `expert success: k/N`
    python sim.py --episodes 5 --split test --gif out/expert.gif
    python sim.py --viewer                               # watch it in MuJoCo's viewer (needs a display)
    python sim.py --episodes 100 --no-render --grasp-offset 0.01   # how far off may a grasp be?

What is in the world
--------------------
    camera (front, like a webcam beside the arm)
        \\
         \\        containers: bowl / plate / tray          objects: cube / cylinder
          \\          (static, 1-2 per episode)            (free bodies, 2-4 per episode)
           v
    +-----------------------------------------------------------+   table top at z = 0
    | arm base at the origin, reaching along +x                 |
    +-----------------------------------------------------------+

* The arm is the SO-100's kinematic chain built from MuJoCo primitives (no meshes): shoulder_pan (z),
  shoulder_lift, elbow_flex, wrist_flex (all about the link's y axis, positive = "down"), wrist_roll (about
  the gripper's long axis) and a gripper whose single moving jaw is a hinge that closes against a fixed jaw.
  Link lengths, joint ranges, position servos (kp, force limits, friction loss, armature) follow
  ../shared/reference/so100.md. Zero pose: the whole arm stretched horizontally along +x.
* Grasping is physical: an object is held only by the contact and friction between the two jaws. Nothing in
  this file welds, attaches or moves an object kinematically.
* Actions are 6 absolute joint targets in radians (the same action space as the real arm's servos), applied
  at `control_hz` with `physics substeps` in between.

The observation is {"image": uint8 (H, W, 3), "state": float32 (6,)}; `info` holds the instruction, the
success flag and the ground truth later stages need (2D boxes, the target point, the expert's path as a
pixel trace).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

# Headless rendering by default: EGL works on a machine without a display. Respect a user's explicit choice.
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl"

import mujoco  # noqa: E402  (must come after MUJOCO_GL is chosen)

# ----------------------------------------------------------------------------------------------------------
# The arm: names, ranges and servo constants (so100.md)

JOINT_NAMES = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
JOINT_LOW = np.array([-1.92, -3.32, -0.17, -1.66, -2.79, -0.17])   # radians
JOINT_HIGH = np.array([1.92, 0.17, 3.14, 1.66, 2.79, 1.75])
ARM_JOINTS = 5                 # the first five joints place the gripper; the sixth opens/closes it

BASE_HEIGHT = 0.119            # table to shoulder-lift axis
UPPER_ARM = 0.116              # shoulder-lift axis to elbow axis
FOREARM = 0.135                # elbow axis to wrist-flex axis
WRIST = 0.060                  # wrist-flex axis to wrist-roll frame
JAW_START, JAW_END = 0.035, 0.101  # jaw pads span this far beyond the roll frame

GRIPPER_OPEN = 0.6             # jaw angle (rad) used by the expert to approach an object
GRIPPER_CLOSED = -0.15         # commanded when grasping: the jaw stalls on the object, the force limit squeezes
PAD_ANGLE = 0.25               # moving-jaw pad angle: its face is parallel to the fixed jaw at this jaw angle
HOME = np.array([0.0, -1.75, 1.65, 1.65, 0.0, 0.2])  # a folded pose above the table, gripper pointing down

# ----------------------------------------------------------------------------------------------------------
# Objects, containers, colours and the language of tasks

PALETTE = {  # name -> rgb; chosen to stay distinguishable at 96x96 under lighting randomisation
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.12, 0.30, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.55, 0.20, 0.75),
    "orange": (1.00, 0.50, 0.05),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("cube", "cylinder")          # graspable objects; both ~2.4 cm across so the jaw fits around them
CONTAINERS = ("bowl", "plate", "tray")  # static receptacles
SYNONYMS = {
    "cube": ("cube", "block"),
    "cylinder": ("cylinder", "can"),
    "bowl": ("bowl",),
    "plate": ("plate", "dish"),
    "tray": ("tray", "bin"),
}
CONTAINER_RADIUS = {"bowl": 0.050, "plate": 0.050, "tray": 0.050}  # half-extent of the footprint (m)
CONTAINER_INNER = {"bowl": 0.042, "plate": 0.045, "tray": 0.043}   # where an object counts as "in/on" it
OBJECT_HALF = 0.012  # half the width of a cube / radius of a cylinder (m)
OBJECT_HEIGHT = 0.026

# Phrasings. {o} is the object ("red cube"), {c} the container ("blue bowl").
TRAIN_TEMPLATES = (
    "put the {o} in the {c}",
    "place the {o} onto the {c}",
    "pick up the {o} and drop it into the {c}",
    "move the {o} to the {c}",
    "put the {o} on the {c}",
    "place the {o} in the {c}",
    "pick up the {o} and put it in the {c}",
    "drop the {o} into the {c}",
)
# Reserved for split="test": new sentence shapes built from words that the training phrasings already use,
# so that a model can in principle understand them.
TEST_TEMPLATES = (
    "pick up the {o} and place it onto the {c}",
    "move the {o} into the {c}",
    "put the {o} into the {c}",
)
# Reserved (object colour, object shape, container kind) combinations, only ever the task in split="test".
# Every colour, shape and container kind still appears in training, only never in these combinations.
TEST_COMBOS = frozenset({
    ("red", "cylinder", "plate"),
    ("green", "cube", "tray"),
    ("blue", "cylinder", "bowl"),
    ("yellow", "cube", "plate"),
    ("purple", "cylinder", "tray"),
    ("orange", "cube", "bowl"),
    ("white", "cylinder", "plate"),
})

# Workspace: where objects and containers may be placed (arm base at the origin).
REACH_MIN, REACH_MAX = 0.12, 0.24   # distance from the pan axis (m); beyond ~0.24 a straight-down grasp is out of reach
WORK_X = (0.04, 0.26)
WORK_Y = (-0.21, 0.21)


def sample_scene(rng: np.random.Generator, split: str = "train", n_objects=(2, 4), n_containers=(1, 2)) -> dict:
    """Draw a random table: objects, containers, their poses, the task and its instruction.

    Objects have distinct colours (so "the red cube" is never ambiguous), containers have distinct colours.
    Poses are non-overlapping and within reach. The task's (colour, shape, container kind) and the
    phrasing follow the split: reserved ones appear only with split="test".
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    colours = list(PALETTE)
    for _ in range(1000):
        n_obj = int(rng.integers(n_objects[0], n_objects[1] + 1))
        n_con = int(rng.integers(n_containers[0], n_containers[1] + 1))
        obj_colours = rng.choice(colours, size=n_obj, replace=False)
        con_colours = rng.choice(colours, size=n_con, replace=False)
        objects = [dict(kind="object", shape=str(rng.choice(SHAPES)), colour=str(c)) for c in obj_colours]
        containers = [dict(kind="container", shape=str(rng.choice(CONTAINERS)), colour=str(c)) for c in con_colours]
        # the task: which object into which container; reject draws whose combination is wrong for the split
        ti, tc = int(rng.integers(n_obj)), int(rng.integers(n_con))
        if not _task_in_split(objects[ti], containers[tc], split):
            continue
        # every name must pick out exactly one thing: no two containers of the same kind+colour (colours differ)
        if not _place(rng, objects, containers):
            continue
        return _with_task(rng, dict(objects=objects, containers=containers, split=split), ti, tc)
    raise RuntimeError("could not sample a scene; the workspace is too small for the requested counts")


def _with_task(rng, scene: dict, ti: int, tc: int) -> dict:
    """The scene with object ti to go into container tc, and a freshly phrased instruction for it."""
    objects, containers, split = scene["objects"], scene["containers"], scene["split"]
    templates = TEST_TEMPLATES if split == "test" else TRAIN_TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    o_word = SYNONYMS[objects[ti]["shape"]][int(rng.integers(len(SYNONYMS[objects[ti]["shape"]])))]
    c_word = SYNONYMS[containers[tc]["shape"]][int(rng.integers(len(SYNONYMS[containers[tc]["shape"]])))]
    instruction = template.format(o=f"{objects[ti]['colour']} {o_word}", c=f"{containers[tc]['colour']} {c_word}")
    combo = (objects[ti]["colour"], objects[ti]["shape"], containers[tc]["shape"])
    return dict(scene, target_object=ti, target_container=tc, instruction=instruction, template=template,
                combo=combo)


def _task_in_split(obj: dict, container: dict, split: str) -> bool:
    """The split's rule: tasks whose (colour, shape, container shape) is in TEST_COMBOS belong to 'test' only."""
    return ((obj["colour"], obj["shape"], container["shape"]) in TEST_COMBOS) == (split == "test")


def retarget(scene: dict, rng: np.random.Generator) -> dict | None:
    """The same table (same items, same poses) with a task on a DIFFERENT object, for counterfactual
    demonstrations (data.generate_demos(paired=True)): two episodes whose first frames are identical and whose
    instructions and actions differ, so only the words can tell the policy which object to reach for.
    The container is drawn again (it may stay the same). Keeps the split's rule on reserved combinations;
    returns None when no other object allows it."""
    options = [(i, j) for i, o in enumerate(scene["objects"]) if i != scene["target_object"]
               for j, c in enumerate(scene["containers"]) if _task_in_split(o, c, scene["split"])]
    if not options:
        return None
    ti, tc = options[int(rng.integers(len(options)))]
    return _with_task(rng, scene, ti, tc)


def retarget_container(scene: dict, rng: np.random.Generator) -> dict | None:
    """The same table and the same object to pick, to go into a DIFFERENT container (freshly phrased), for the
    counterfactual place and trace questions of data.generate_grounding: on a two-container table only the
    container's words tell the answers apart. Keeps the split's rule on reserved combinations; None when no
    other container allows it (a one-container table)."""
    ti = scene["target_object"]
    options = [j for j, c in enumerate(scene["containers"]) if j != scene["target_container"]
               and _task_in_split(scene["objects"][ti], c, scene["split"])]
    if not options:
        return None
    return _with_task(rng, scene, ti, options[int(rng.integers(len(options)))])


def _place(rng, objects, containers) -> bool:
    """Give every item a non-overlapping (x, y, yaw) within reach. Containers first: they are bigger."""
    placed = []  # (x, y, radius)
    for item in containers + objects:
        r = CONTAINER_RADIUS[item["shape"]] if item["kind"] == "container" else OBJECT_HALF * 1.45
        for _ in range(200):
            x, y = rng.uniform(*WORK_X), rng.uniform(*WORK_Y)
            d = math.hypot(x, y)
            if not (REACH_MIN <= d <= REACH_MAX):
                continue
            if item["kind"] == "container" and not (REACH_MIN + 0.02 <= d <= REACH_MAX):
                continue
            if all(math.hypot(x - px, y - py) > r + pr + 0.015 for px, py, pr in placed):
                break
        else:
            return False
        item["pos"] = (float(x), float(y))
        item["yaw"] = float(rng.uniform(-math.pi / 4, math.pi / 4))
        placed.append((x, y, r))
    return True


# ----------------------------------------------------------------------------------------------------------
# The MJCF model, written out per scene (compiling takes ~3 ms)


def _rgba(rgb, a=1.0):
    return f"{rgb[0]:.3f} {rgb[1]:.3f} {rgb[2]:.3f} {a}"


def _camera_xyaxes(pos, target):
    """MuJoCo cameras look along their -z axis with +y up: build the x and y axes that aim pos at target."""
    pos, target = np.asarray(pos, float), np.asarray(target, float)
    fwd = target - pos
    fwd /= np.linalg.norm(fwd)
    x = np.cross(fwd, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(x, fwd)
    return " ".join(f"{v:.5f}" for v in (*x, *y))


CAMERA_POS = (0.38, -0.14, 0.38)     # in front of the table, a little to the side, like a webcam
CAMERA_TARGET = (0.12, -0.04, 0.0)
CAMERA_FOVY = 58.0                    # chosen so the whole reachable table fills the frame


def build_mjcf(scene: dict, look: dict) -> str:
    """Return the MJCF text of the whole world for one scene. `look` holds the rendering randomisation."""
    arm_class = """
      <default class="arm">
        <joint damping="0.0" frictionloss="0.1" armature="0.1"/>
        <geom contype="1" conaffinity="1" condim="3" friction="0.8 0.01 0.001" rgba="0.92 0.92 0.90 1"/>
        <position kp="50" dampratio="1.0" forcerange="-3.5 3.5"/>
        <default class="jaw">
          <geom condim="4" friction="1.5 0.02 0.002" solref="0.004 1" solimp="0.95 0.99 0.001" rgba="0.2 0.2 0.22 1"/>
        </default>
      </default>"""
    table_rgb = look["table_rgb"]
    cam_pos = np.asarray(CAMERA_POS) + look["camera_jitter"]
    light_dir = look["light_dir"]
    items = []
    for i, ob in enumerate(scene["objects"]):
        x, y = ob["pos"]
        rgb = _rgba(PALETTE[ob["colour"]])
        h = OBJECT_HEIGHT / 2
        if ob["shape"] == "cube":
            geom = f'<geom name="obj{i}" type="box" size="{OBJECT_HALF} {OBJECT_HALF} {h}" rgba="{rgb}"/>'
        else:
            geom = f'<geom name="obj{i}" type="cylinder" size="{OBJECT_HALF} {h}" rgba="{rgb}"/>'
        items.append(f"""
    <body name="obj{i}" pos="{x:.4f} {y:.4f} {h + 0.0005:.4f}" euler="0 0 {ob['yaw']:.4f}">
      <freejoint name="obj{i}"/>
      <inertial pos="0 0 0" mass="0.03" diaginertia="3e-6 3e-6 3e-6"/>
      {geom.replace('/>', ' condim="4" friction="1.2 0.02 0.002" solref="0.004 1" solimp="0.95 0.99 0.001"/>')}
    </body>""")
    for j, co in enumerate(scene["containers"]):
        x, y = co["pos"]
        rgb = _rgba(PALETTE[co["colour"]])
        R = CONTAINER_RADIUS[co["shape"]]
        parts = []
        if co["shape"] == "plate":
            parts.append(f'<geom type="cylinder" size="{R} 0.003" pos="0 0 0.003" rgba="{rgb}"/>')
        elif co["shape"] == "bowl":
            parts.append(f'<geom type="cylinder" size="{R - 0.004} 0.002" pos="0 0 0.002" rgba="{rgb}"/>')
            n = 14  # a ring of short wall segments approximates the round wall
            for k in range(n):
                a = 2 * math.pi * k / n
                seg = R * math.tan(math.pi / n) + 0.002
                parts.append(f'<geom type="box" size="0.003 {seg:.4f} 0.011" pos="{(R - 0.003) * math.cos(a):.4f} '
                             f'{(R - 0.003) * math.sin(a):.4f} 0.011" euler="0 0 {a:.4f}" rgba="{rgb}"/>')
        else:  # tray: a square floor with four low walls
            parts.append(f'<geom type="box" size="{R} {R} 0.002" pos="0 0 0.002" rgba="{rgb}"/>')
            for (px, py, sx, sy) in ((R - 0.003, 0, 0.003, R), (-R + 0.003, 0, 0.003, R),
                                     (0, R - 0.003, R, 0.003), (0, -R + 0.003, R, 0.003)):
                parts.append(f'<geom type="box" size="{sx} {sy} 0.008" pos="{px} {py} 0.008" rgba="{rgb}"/>')
        items.append(f"""
    <body name="con{j}" pos="{x:.4f} {y:.4f} 0" euler="0 0 {co['yaw']:.4f}">
      {''.join(parts)}
    </body>""")

    return f"""
<mujoco model="tiny-m1 so100 table">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.002" integrator="implicitfast" cone="elliptic" impratio="5"/>
  <visual>
    <quality shadowsize="0"/>
    <global offwidth="{max(640, look.get('image_size', 0))}" offheight="{max(480, look.get('image_size', 0))}"/>
    <headlight ambient="{look['ambient']:.3f} {look['ambient']:.3f} {look['ambient']:.3f}" diffuse="0.3 0.3 0.3" specular="0 0 0"/>
  </visual>
  <default>{arm_class}
  </default>
  <worldbody>
    <light name="sun" directional="true" castshadow="false" dir="{light_dir[0]:.3f} {light_dir[1]:.3f} {light_dir[2]:.3f}"
           diffuse="{look['light']:.3f} {look['light']:.3f} {look['light']:.3f}"/>
    <geom name="table" type="box" size="0.45 0.40 0.02" pos="0.15 0 -0.02" rgba="{_rgba(table_rgb)}"
          friction="0.8 0.01 0.001"/>
    <camera name="front" pos="{cam_pos[0]:.4f} {cam_pos[1]:.4f} {cam_pos[2]:.4f}"
            xyaxes="{_camera_xyaxes(cam_pos, CAMERA_TARGET)}" fovy="{CAMERA_FOVY}"/>
    <body name="base" childclass="arm">
      <geom type="cylinder" size="0.045 0.02" pos="0 0 0.02" rgba="0.25 0.25 0.28 1"/>
      <body name="shoulder" pos="0 0 0.04">
        <joint name="shoulder_pan" axis="0 0 1" range="{JOINT_LOW[0]} {JOINT_HIGH[0]}"/>
        <inertial pos="0 0 0.04" mass="0.16" diaginertia="1e-4 1e-4 1e-4"/>
        <geom type="box" size="0.025 0.03 0.04" pos="0 0 0.04"/>
        <body name="upper_arm" pos="0 0 {BASE_HEIGHT - 0.04}">
          <joint name="shoulder_lift" axis="0 1 0" range="{JOINT_LOW[1]} {JOINT_HIGH[1]}"/>
          <inertial pos="{UPPER_ARM / 2} 0 0" mass="0.10" diaginertia="1e-4 1e-4 1e-4"/>
          <geom type="capsule" fromto="0 0 0 {UPPER_ARM} 0 0" size="0.016"/>
          <body name="forearm" pos="{UPPER_ARM} 0 0">
            <joint name="elbow_flex" axis="0 1 0" range="{JOINT_LOW[2]} {JOINT_HIGH[2]}"/>
            <inertial pos="{FOREARM / 2} 0 0" mass="0.08" diaginertia="8e-5 8e-5 8e-5"/>
            <geom type="capsule" fromto="0 0 0 {FOREARM} 0 0" size="0.014"/>
            <body name="wrist" pos="{FOREARM} 0 0">
              <joint name="wrist_flex" axis="0 1 0" range="{JOINT_LOW[3]} {JOINT_HIGH[3]}"/>
              <inertial pos="{WRIST / 2} 0 0" mass="0.05" diaginertia="2e-5 2e-5 2e-5"/>
              <geom type="capsule" fromto="0 0 0 {WRIST - 0.015} 0 0" size="0.013"/>
              <body name="gripper" pos="{WRIST} 0 0">
                <joint name="wrist_roll" axis="1 0 0" range="{JOINT_LOW[4]} {JOINT_HIGH[4]}"/>
                <inertial pos="0.02 0 0" mass="0.06" diaginertia="2e-5 2e-5 2e-5"/>
                <geom name="palm" type="box" size="0.017 0.022 0.014" pos="0.0 0.0 0"/>
                <geom name="fixed_jaw" class="jaw" type="box" size="{(JAW_END - 0.015) / 2} 0.003 0.011"
                      pos="{(JAW_END + 0.015) / 2} -0.005 0"/>
                <site name="grasp" pos="0.085 0.010 0" size="0.003" rgba="1 0 0 0"/>
                <body name="moving_jaw" pos="0.015 0.006 0">
                  <joint name="gripper" axis="0 0 1" range="{JOINT_LOW[5]} {JOINT_HIGH[5]}" armature="0.005"/>
                  <inertial pos="0.04 0.003 0" mass="0.02" diaginertia="5e-6 5e-6 5e-6"/>
                  <!-- a straight bar from the hinge, then a pad turned by -{PAD_ANGLE} rad so that its face is
                       parallel to the fixed jaw when the jaw closes on a 2.4 cm object (as the real jaw's curve does) -->
                  <geom name="jaw_bar" class="jaw" type="box" size="0.029 0.003 0.011" pos="0.029 0.007 0"/>
                  <geom name="moving_jaw" class="jaw" type="box" size="0.0165 0.0025 0.011"
                        pos="0.0718 -0.0006 0" euler="0 0 -{PAD_ANGLE}"/>
                </body>
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>{''.join(items)}
  </worldbody>
  <contact>
    <exclude body1="base" body2="shoulder"/>
    <exclude body1="gripper" body2="moving_jaw"/>
  </contact>
  <actuator>
    <position class="arm" name="shoulder_pan" joint="shoulder_pan" ctrlrange="{JOINT_LOW[0]} {JOINT_HIGH[0]}"/>
    <position class="arm" name="shoulder_lift" joint="shoulder_lift" ctrlrange="{JOINT_LOW[1]} {JOINT_HIGH[1]}"/>
    <position class="arm" name="elbow_flex" joint="elbow_flex" ctrlrange="{JOINT_LOW[2]} {JOINT_HIGH[2]}"/>
    <position class="arm" name="wrist_flex" joint="wrist_flex" ctrlrange="{JOINT_LOW[3]} {JOINT_HIGH[3]}"/>
    <position class="arm" name="wrist_roll" joint="wrist_roll" ctrlrange="{JOINT_LOW[4]} {JOINT_HIGH[4]}"/>
    <!-- the gripper's torque is reduced (so100.md): the jaw stalls on an object and squeezes with this force -->
    <position class="arm" name="gripper" joint="gripper" ctrlrange="{JOINT_LOW[5]} {JOINT_HIGH[5]}" kp="20" forcerange="-0.6 0.6"/>
  </actuator>
</mujoco>"""


# ----------------------------------------------------------------------------------------------------------
# Camera geometry: world points -> pixels of the front camera


def project(model: mujoco.MjModel, data: mujoco.MjData, points: np.ndarray, width: int, height: int,
            camera: str = "front") -> np.ndarray:
    """Project world points (N, 3) to pixel coordinates (N, 2) of `camera`.

    Pixel convention (used by every label in tiny-m1): x grows to the right, y grows downwards, and pixel
    (col, row) covers [col, col + 1) x [row, row + 1), so the image spans 0..width and 0..height.
    A MuJoCo camera looks along its own -z axis with +y up; fovy is the vertical field of view.
    """
    cam = model.camera(camera).id
    pos, rot = data.cam_xpos[cam], data.cam_xmat[cam].reshape(3, 3)  # rot's columns are the camera axes
    p = (np.asarray(points, float).reshape(-1, 3) - pos) @ rot       # (N, 3) in the camera frame
    f = 0.5 * height / math.tan(math.radians(model.cam_fovy[cam]) / 2)  # focal length in pixels
    depth = np.maximum(-p[:, 2], 1e-6)
    u = width / 2 + f * p[:, 0] / depth
    v = height / 2 - f * p[:, 1] / depth
    return np.stack([u, v], axis=1)


def _body_points(model, data, body_id: int) -> np.ndarray:
    """Points on the surface of every geom of a body whose projection outlines it (corners, rims)."""
    pts = []
    for g in range(model.ngeom):
        if model.geom_bodyid[g] != body_id:
            continue
        size, pos, rot = model.geom_size[g], data.geom_xpos[g], data.geom_xmat[g].reshape(3, 3)
        if model.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX:
            c = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * size
        elif model.geom_type[g] == mujoco.mjtGeom.mjGEOM_CYLINDER:
            a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
            ring = np.stack([size[0] * np.cos(a), size[0] * np.sin(a)], 1)
            c = np.concatenate([np.c_[ring, np.full(48, -size[1])], np.c_[ring, np.full(48, size[1])]])
        else:
            continue
        pts.append(c @ rot.T + pos)
    return np.concatenate(pts)


def box_of(model, data, body: str, width: int, height: int) -> np.ndarray:
    """The 2D box [x1, y1, x2, y2] (pixels, clipped to the image) around a body's projected outline."""
    uv = project(model, data, _body_points(model, data, model.body(body).id), width, height)
    x1, y1 = uv.min(0)
    x2, y2 = uv.max(0)
    return np.array([max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)])


# ----------------------------------------------------------------------------------------------------------
# The environment


class RenderError(RuntimeError):
    pass


class Camera:
    """Offscreen rendering of one fixed camera with MuJoCo's low-level API.

    One OpenGL context lives as long as the environment and serves every episode's freshly compiled model:
    our models use only built-in shapes (no meshes or textures), so the GPU-side context does not depend
    on which objects are on the table. (Creating a context per episode costs ~50 ms, and the first frame of
    each new context another ~90 ms; a frame from a warm one costs ~1 ms.)
    """

    def __init__(self, model: mujoco.MjModel, width: int, height: int):
        try:
            self.gl = mujoco.GLContext(width, height)
            self.gl.make_current()
            self.ctx = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_100)
        except Exception as e:  # no OpenGL backend could start
            raise RenderError(
                f"MuJoCo could not start an OpenGL context (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): {e}\n"
                "On a headless Linux machine install EGL (Debian/Ubuntu: apt install libegl1 libgl1) or OSMesa "
                "(apt install libosmesa6, then MUJOCO_GL=osmesa); on a desktop set MUJOCO_GL=glfw. "
                "Or construct the environment with render=False.") from e
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self.ctx)
        self.rect = mujoco.MjrRect(0, 0, width, height)
        self.rgb = np.zeros((height, width, 3), np.uint8)
        self.opt = mujoco.MjvOption()
        self.cam = mujoco.MjvCamera()
        self.cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self.scene = mujoco.MjvScene(model, maxgeom=2000)

    def render(self, model, data, camera: str = "front", segmentation: bool = False) -> np.ndarray:
        """RGB uint8 (H, W, 3); with segmentation=True, the geom id of every pixel (H, W), -1 for background."""
        self.gl.make_current()
        self.cam.fixedcamid = model.camera(camera).id
        mujoco.mjv_updateScene(model, data, self.opt, None, self.cam, mujoco.mjtCatBit.mjCAT_ALL, self.scene)
        self.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0       # shadows off: ~1 ms per frame
        self.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.scene.flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = segmentation
        self.scene.flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = segmentation
        mujoco.mjr_render(self.rect, self.scene, self.ctx)
        mujoco.mjr_readPixels(self.rgb, None, self.rect, self.ctx)
        rgb = np.flipud(self.rgb)  # OpenGL's rows run bottom-up
        if not segmentation:
            return rgb.copy()
        # each scene geom is drawn in a flat colour that encodes its index + 1 (0 = background)
        seg = rgb[..., 0].astype(np.int64) + rgb[..., 1].astype(np.int64) * 256 + rgb[..., 2].astype(np.int64) * 65536
        lookup = np.full(self.scene.ngeom + 1, -1)
        for i in range(self.scene.ngeom):
            g = self.scene.geoms[i]
            if g.objtype == mujoco.mjtObj.mjOBJ_GEOM:
                lookup[g.segid + 1] = g.objid
        seg[seg > self.scene.ngeom] = 0
        return lookup[seg]

    def close(self):
        if self.ctx is not None:
            self.gl.make_current()
            self.ctx.free()
            self.gl.free()
            self.ctx = None


@dataclass
class EnvConfig:
    image_size: int = 96           # square images; the model's input size
    split: str = "train"           # which tasks and phrasings may appear ("train" or "test")
    control_hz: float = 10.0       # policy/expert actions per second
    max_steps: int = 120           # an episode is truncated after this many actions
    n_objects: tuple = (2, 4)      # objects per table (inclusive range)
    n_containers: tuple = (1, 2)   # containers per table (inclusive range)
    randomize: bool = False        # domain randomisation: light, table colour, small camera jitter
    render: bool = True            # False skips images (much faster, for the expert's statistics)


class SO100Env:
    """Gymnasium-style environment (without depending on gymnasium).

    reset(seed=None, options=None) -> (obs, info)
    step(action) -> (obs, reward, terminated, truncated, info)

    obs    = {"image": uint8 (H, W, 3) from the front camera, "state": float32 (6,) joint radians}
    action = float (6,) absolute joint targets in radians, clipped to the joint ranges
    info   = {"instruction", "success", "boxes" {name: [x1,y1,x2,y2]}, "target_box", "container_box",
              "target_point" (x, y), "ee_pixel" (x, y), "trace" [(x, y), ...] of the expert's planned path,
              "object_pos", "container_pos", "scene"}
    """

    def __init__(self, image_size: int = 96, split: str = "train", **kwargs):
        self.cfg = EnvConfig(image_size=image_size, split=split, **kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.substeps = int(round(1.0 / (self.cfg.control_hz * 0.002)))  # physics steps per action
        self.model = self.data = self.renderer = None
        self.scene = None
        self._rng = np.random.default_rng()

    # -- building a scene ------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict | None = None):
        """Start a new episode on a freshly sampled table. options may hold {"scene": dict} to replay one, and
        {"look": dict, "start": (6,) joints} (self.look, self.start of an earlier episode) to replay its exact
        lighting, camera and start pose too: then the first frame is the same image."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        rng = self._rng
        options = options or {}
        self.scene = options.get("scene") or sample_scene(rng, self.cfg.split, self.cfg.n_objects, self.cfg.n_containers)
        if "look" in options:
            look = dict(options["look"])
        elif self.cfg.randomize:
            look = dict(table_rgb=tuple(rng.uniform([0.45, 0.35, 0.25], [0.75, 0.65, 0.55])),
                        camera_jitter=rng.uniform(-0.01, 0.01, 3), light=float(rng.uniform(0.5, 0.9)),
                        ambient=float(rng.uniform(0.25, 0.45)),
                        light_dir=tuple(np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), -1.0])))
        else:
            look = dict(table_rgb=(0.62, 0.52, 0.40), camera_jitter=np.zeros(3), light=0.7, ambient=0.35,
                        light_dir=(0.2, 0.3, -1.0))
        look["image_size"] = self.cfg.image_size  # the offscreen buffer must be at least this big
        self.look = look
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(self.scene, look))
        self.data = mujoco.MjData(self.model)
        q0 = HOME + rng.uniform(-0.05, 0.05, 6) * np.array([1, 1, 1, 1, 1, 0])  # a slightly different start
        q0 = np.asarray(options.get("start", q0), np.float64)
        self.start = q0.copy()
        self.data.qpos[:6] = q0
        self.data.ctrl[:6] = q0
        mujoco.mj_forward(self.model, self.data)
        for _ in range(50):  # let the objects settle on the table and the servos take hold
            mujoco.mj_step(self.model, self.data)
        self._new_renderer()
        self.steps = 0
        self._trace3d = _plan_waypoints(self)  # the expert's planned path, used only as a label
        obs = self._obs()
        return obs, self._info(obs_success=False)

    def _new_renderer(self):
        if self.cfg.render and self.renderer is None:
            self.renderer = Camera(self.model, self.cfg.image_size, self.cfg.image_size)

    # -- stepping ----------------------------------------------------------------------------------------
    def step(self, action):
        if self.model is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (6,):
            raise ValueError(f"action must have shape (6,) -- six absolute joint targets in radians "
                             f"{JOINT_NAMES} -- but got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action contains NaN or inf: {a}; refusing to send it to the servos")
        self.data.ctrl[:6] = np.clip(a, JOINT_LOW, JOINT_HIGH)  # a servo cannot be asked to leave its range
        for _ in range(self.substeps):
            mujoco.mj_step(self.model, self.data)
        self.steps += 1
        success = self.is_success()
        obs = self._obs()
        terminated = success
        truncated = (not success) and self.steps >= self.cfg.max_steps
        return obs, float(success), terminated, truncated, self._info(success)

    def is_success(self) -> bool:
        """The target object rests inside/on the target container and the jaws no longer touch it."""
        m, d = self.model, self.data
        ob = m.body(f"obj{self.scene['target_object']}").id
        low = d.xpos[ob][2] < 0.045             # resting, not held in the air
        still = np.linalg.norm(d.cvel[ob][3:]) < 0.05
        return bool(self.target_over_container() and low and still and not self._touches_gripper(ob))

    def target_to_container(self, container: int | None = None) -> float:
        """Horizontal distance (m) from the target object to the centre of its container (or of container j)."""
        j = self.scene["target_container"] if container is None else container
        p = self.data.xpos[self.model.body(f"obj{self.scene['target_object']}").id]
        co = self.scene["containers"][j]["pos"]
        return math.hypot(p[0] - co[0], p[1] - co[1])

    def target_over_container(self, container: int | None = None) -> bool:
        """The target object is within its container's rim (or container j's; seen from above), at any height."""
        j = self.scene["target_container"] if container is None else container
        return self.target_to_container(j) <= CONTAINER_INNER[self.scene["containers"][j]["shape"]]

    def target_held(self) -> bool:
        """The target object is off the table (its centre > 1.5 cm above resting) and touches the jaws: it is
        being carried. The scripted expert then plans from the carry instead of from the approach."""
        ob = self.model.body(f"obj{self.scene['target_object']}").id
        up = self.data.xpos[ob][2] > OBJECT_HEIGHT / 2 + 0.015
        return bool(up and self._touches_gripper(ob))

    def _touches_gripper(self, body_id: int) -> bool:
        m, d = self.model, self.data
        jaws = {m.body("gripper").id, m.body("moving_jaw").id}
        for i in range(d.ncon):
            b1, b2 = m.geom_bodyid[d.contact[i].geom1], m.geom_bodyid[d.contact[i].geom2]
            if (b1 == body_id and b2 in jaws) or (b2 == body_id and b1 in jaws):
                return True
        return False

    # -- observations and ground truth ----------------------------------------------------------------------
    def _obs(self):
        image = self.render() if self.cfg.render else np.zeros((self.cfg.image_size,) * 2 + (3,), np.uint8)
        return {"image": image, "state": self.data.qpos[:6].astype(np.float32).copy()}

    def render(self, segmentation: bool = False) -> np.ndarray:
        """The front camera's image (H, W, 3) uint8, or with segmentation=True the geom id per pixel (H, W)."""
        if self.renderer is None:
            self.renderer = Camera(self.model, self.cfg.image_size, self.cfg.image_size)
        return self.renderer.render(self.model, self.data, "front", segmentation)

    def name_of(self, item: dict) -> str:
        return f"{item['colour']} {item['shape']}"

    def _info(self, obs_success: bool) -> dict:
        m, d, S = self.model, self.data, self.cfg.image_size
        sc = self.scene
        boxes = {}
        for i, ob in enumerate(sc["objects"]):
            boxes[self.name_of(ob)] = box_of(m, d, f"obj{i}", S, S).tolist()
        for j, co in enumerate(sc["containers"]):
            boxes[self.name_of(co)] = box_of(m, d, f"con{j}", S, S).tolist()
        tob, tco = sc["objects"][sc["target_object"]], sc["containers"][sc["target_container"]]
        cpos = np.array([*tco["pos"], PLACE_POINT_Z])
        ee = d.site_xpos[m.site("grasp").id]
        return {
            "instruction": sc["instruction"],
            "success": bool(obs_success),
            "boxes": boxes,
            "target_name": self.name_of(tob),
            "container_name": self.name_of(tco),
            "target_box": boxes[self.name_of(tob)],
            "container_box": boxes[self.name_of(tco)],
            "target_point": project(m, d, cpos[None], S, S)[0].tolist(),
            "ee_pixel": project(m, d, ee[None], S, S)[0].tolist(),
            "trace": project(m, d, self._trace3d, S, S).tolist(),
            "object_pos": d.xpos[m.body(f"obj{sc['target_object']}").id].copy(),
            "container_pos": cpos,
            "steps": self.steps,
            "scene": sc,
        }

    def close(self):
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None


# ----------------------------------------------------------------------------------------------------------
# Where the jaws are in the picture, from the joint angles alone (forward kinematics + the camera's projection)

_ARM_MODEL = []  # [(MjModel, MjData)] of one fixed table, built on first use: only the arm's links matter here


def gripper_pixel(states, image_size: int = 96, height: float | None = None) -> np.ndarray:
    """The jaws' grasp point as the front camera sees it: states (..., 6) joint radians -> (..., 2) pixels.
    With `height` (m), the point straight below (or above) the grasp point at that height is projected instead:
    with height=PLACE_POINT_Z, jaws held right over a container give the same pixel as its place point
    (info["target_point"]), however high they are. Without it they do not: the camera looks down at an angle, so
    at the carry's height the jaws appear ~12 px (~6 cm on the table) above the container they are over.

    Forward kinematics (mj_kinematics with the arm's joints set) and then `project`, the projection of every
    label: the same number as info["ee_pixel"] of a frame with that state (default look; the optional camera
    jitter of randomize=True moves it by about 1 px). It needs no picture, only the joint angles, which a real
    arm reports too, and a camera placed as the simulator's is (as any policy trained here assumes).
    train_action.py --gripper-point hands it to the action expert beside the written plan's place point, in
    the same units, so "the object is over its container" is two numbers being equal (measured: it did not
    help, before and after the height correction; EXPERIMENTS.md, items 24 and 34)."""
    if not _ARM_MODEL:  # the image size enters only through `project`
        env = SO100Env(render=False)
        env.reset(seed=0)  # any table: objects do not move the arm or the camera
        _ARM_MODEL.append((env.model, env.data))
    m, d = _ARM_MODEL[0]
    states = np.asarray(states, np.float64)
    if states.shape[-1] != 6:
        raise ValueError(f"gripper_pixel needs joint states of shape (..., 6), got {states.shape}")
    site = m.site("grasp").id
    flat = states.reshape(-1, 6)
    points = np.empty((len(flat), 3))
    for i, q in enumerate(flat):
        d.qpos[:6] = q
        mujoco.mj_kinematics(m, d)  # link poses only: no contacts, no dynamics (microseconds)
        points[i] = d.site_xpos[site]
    if height is not None:
        points[:, 2] = height
    return project(m, d, points, image_size, image_size).reshape(states.shape[:-1] + (2,))


# ----------------------------------------------------------------------------------------------------------
# Which renderer drew the pictures? The same scene drawn by two OpenGL backends (Mesa's software llvmpipe on a
# laptop, NVIDIA's driver on a GPU box) differs in a few pixels, and a policy trained on one backend's pictures
# does far worse on the other's (EXPERIMENTS.md, closed-loop item 19: 6% against 14% for the same recipe). Data folders
# and stage-2 checkpoints keep the first frame of one fixed table; eval.py draws it again and compares.


def reference_frame(image_size: int = 96) -> np.ndarray:
    """uint8 (S, S, 3): the first frame of a fixed table (train split, seed 0, the default look)."""
    env = SO100Env(image_size=image_size)
    try:
        obs, _ = env.reset(seed=0)
    finally:
        env.close()
    return obs["image"]


def picture_difference(reference: np.ndarray) -> float:
    """Mean absolute difference in grey levels (0-255) between `reference` (a reference_frame drawn elsewhere)
    and this machine's drawing of it: 0.0 when the same renderer drew both."""
    reference = np.asarray(reference)
    here = reference_frame(reference.shape[0])
    return float(np.abs(here.astype(np.int16) - reference.astype(np.int16)).mean())


# ----------------------------------------------------------------------------------------------------------
# The scripted expert: inverse kinematics (MuJoCo's Jacobian, damped least squares) along a Cartesian plan

APPROACH_Z = 0.080   # height of the grasp site above the table before descending (m)
GRASP_Z = 0.020      # grasp site height when closing: the jaw tips are then ~4 mm above the table
# The expert grasps with the object this far from the fixed jaw (towards the moving one). The grasp site sits
# where a 2.4 cm object touches the fixed jaw, so a grasp aimed at the object's centre leaves no room on that
# side: a policy a few mm off towards it sets the fixed jaw down ON the object, the arm stops 2-3 cm high and
# the jaws close on air (EXPERIMENTS.md, item 33: 16 of the 18 "nothing lifted" in 100 `seen` episodes).
# With the clearance the moving jaw pushes the object the last few mm against the fixed jaw, and the
# demonstrations teach a grasp that forgives a miss either way.
GRASP_CLEARANCE = 0.008
CARRY_Z = 0.095      # height while carrying
RELEASE_Z = 0.048    # grasp site height when the jaw opens over the container
PLACE_POINT_Z = 0.006  # height of the place-point label (info["target_point"]): the container's floor


def _down_rotation(yaw: float) -> np.ndarray:
    """Gripper frame pointing straight down with its closing direction (frame y) at `yaw` in the table plane."""
    x = np.array([0.0, 0.0, -1.0])                      # long axis: down
    y = np.array([math.cos(yaw), math.sin(yaw), 0.0])   # from the fixed jaw towards the moving jaw
    return np.stack([x, y, np.cross(x, y)], axis=1)     # columns are the frame's axes


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def _grasp_yaw(env: "SO100Env", xy, shape: str, obj_yaw: float) -> float:
    """The closing direction (yaw of the gripper frame's y axis) for grasping an object at xy.

    A cube can be taken across either pair of faces, in either direction (4 choices); a cylinder in any
    direction (we try the same 4 around the arm's natural yaw). The open moving jaw sweeps several
    centimetres to one side of the object, so pick the choice whose jaws stay farthest from the other
    objects and the container walls, preferring little wrist roll.
    """
    natural = math.atan2(xy[1], xy[0]) + math.pi / 2   # the jaw's direction with wrist_roll = 0
    base = obj_yaw if shape == "cube" else natural
    others = []  # (x, y, radius) of everything else on the table
    for i, ob in enumerate(env.scene["objects"]):
        p = env.data.xpos[env.model.body(f"obj{i}").id]
        if np.hypot(p[0] - xy[0], p[1] - xy[1]) > 1e-6:
            others.append((p[0], p[1], OBJECT_HALF * 1.45))
    for co in env.scene["containers"]:
        others.append((*co["pos"], CONTAINER_RADIUS[co["shape"]]))
    best, best_score = natural, -1e9
    for k in range(4):
        yaw = base + k * math.pi / 2
        roll = _wrap(natural - yaw)
        if abs(roll) > JOINT_HIGH[4] - 0.2:
            continue
        u = np.array([math.cos(yaw), math.sin(yaw)])
        jaw_pts = [np.asarray(xy) + d * u for d in (0.02, 0.035, 0.05, -0.02)]  # moving jaw side, fixed jaw
        clear = min((np.hypot(q[0] - x, q[1] - y) - r for q in jaw_pts for x, y, r in others), default=1.0)
        score = min(clear, 0.03) - 0.002 * abs(roll)  # beyond 3 cm of clearance, only the roll matters
        if score > best_score:
            best, best_score = yaw, score
    return best


def solve_ik(model, data, q_init, pos, rot, iters: int = 60, damping: float = 0.05, tol: float = 1e-4):
    """Joint angles (5,) that put the `grasp` site at `pos` with orientation `rot` (3x3).

    Damped least squares: dq = J^T (J J^T + lambda^2 I)^-1 e, with e = [position error; orientation error]
    and J the site's 6x5 Jacobian from mj_jacSite. `data` is a scratch MjData (only kinematics are run).
    """
    site = model.site("grasp").id
    q = np.array(q_init, dtype=float)
    jacp, jacr = np.zeros((3, model.nv)), np.zeros((3, model.nv))
    for _ in range(iters):
        data.qpos[:5] = q
        mujoco.mj_kinematics(model, data)
        mujoco.mj_comPos(model, data)
        cur_p, cur_r = data.site_xpos[site], data.site_xmat[site].reshape(3, 3)
        e_pos = pos - cur_p
        E = rot @ cur_r.T  # the rotation still to go; its skew part is the small-angle rotation error
        e_rot = 0.5 * np.array([E[2, 1] - E[1, 2], E[0, 2] - E[2, 0], E[1, 0] - E[0, 1]])
        err = np.concatenate([e_pos, 0.1 * e_rot])  # 0.1: 1 rad of orientation ~ 10 cm of position
        if np.linalg.norm(err) < tol:
            break
        mujoco.mj_jacSite(model, data, jacp, jacr, site)
        J = np.concatenate([jacp[:, :5], 0.1 * jacr[:, :5]])       # (6, 5): the arm joints only
        dq = J.T @ np.linalg.solve(J @ J.T + damping ** 2 * np.eye(6), err)
        q = np.clip(q + dq, JOINT_LOW[:5], JOINT_HIGH[:5])
    return q


def expert_plan(env: "SO100Env") -> list:
    """Keyframes (name, site position (3,), yaw, jaw angle, steps to get there) for the current scene.
    If the target is already in the jaws (env.target_held(): another controller picked it up and handed over,
    data.generate_takeover_demos) the plan starts at the lift, from where the jaws are, with the yaw they have."""
    m, d, sc = env.model, env.data, env.scene
    ob = sc["objects"][sc["target_object"]]
    co = sc["containers"][sc["target_container"]]
    obj_p = d.xpos[m.body(f"obj{sc['target_object']}").id].copy()
    # the object's current yaw (it may have settled slightly differently from the sampled one)
    R = d.xmat[m.body(f"obj{sc['target_object']}").id].reshape(3, 3)
    obj_yaw = math.atan2(R[1, 0], R[0, 0])
    yaw = _grasp_yaw(env, obj_p[:2], ob["shape"], obj_yaw)
    # the grasp site is offset along the closing direction so the object rests against the fixed jaw
    start = d.site_xpos[m.site("grasp").id].copy()
    start_yaw = math.atan2(*d.site_xmat[m.site("grasp").id].reshape(3, 3)[[1, 0], 1])
    cx, cy = co["pos"]
    # the site goes GRASP_CLEARANCE beyond the object's centre towards the fixed jaw (the gripper frame's -y,
    # whose yaw is `yaw`), so the object starts that far from the fixed jaw's face
    gx, gy = obj_p[:2] - GRASP_CLEARANCE * np.array([math.cos(yaw), math.sin(yaw)])
    above_obj = np.array([gx, gy, APPROACH_Z])
    grasp = np.array([gx, gy, GRASP_Z])
    lift = np.array([gx, gy, CARRY_Z])
    above_con = np.array([cx, cy, CARRY_Z])
    release = np.array([cx, cy, RELEASE_Z])
    n_app = int(np.clip(np.linalg.norm(above_obj - start) / 0.018, 8, 18))
    n_carry = int(np.clip(np.linalg.norm(above_con - lift) / 0.018, 8, 18))
    if env.target_held():  # carrying already: lift straight up from here, keep the wrist as it is, then as usual
        lift = np.array([start[0], start[1], CARRY_Z])
        n_lift = int(np.clip(abs(CARRY_Z - start[2]) / 0.012, 2, 8))
        n_carry = int(np.clip(np.linalg.norm(above_con - lift) / 0.018, 8, 18))
        return [
            ("start", start, start_yaw, GRIPPER_CLOSED, 0),
            ("lift", lift, start_yaw, GRIPPER_CLOSED, n_lift),
            ("carry", above_con, start_yaw, GRIPPER_CLOSED, n_carry),
            ("lower", release, start_yaw, GRIPPER_CLOSED, 6),
            ("open", release, start_yaw, GRIPPER_OPEN, 4),
            ("retreat", np.array([cx, cy, CARRY_Z + 0.02]), start_yaw, GRIPPER_OPEN, 6),
        ]
    # the yaw is kept while carrying: turning the wrist on the way would only add motion
    return [
        ("start", start, start_yaw, GRIPPER_OPEN, 0),
        ("approach", above_obj, yaw, GRIPPER_OPEN, n_app),
        ("descend", grasp, yaw, GRIPPER_OPEN, 8),
        ("close", grasp, yaw, GRIPPER_CLOSED, 5),
        ("hold", grasp, yaw, GRIPPER_CLOSED, 3),
        ("lift", lift, yaw, GRIPPER_CLOSED, 8),
        ("carry", above_con, yaw, GRIPPER_CLOSED, n_carry),
        ("lower", release, yaw, GRIPPER_CLOSED, 6),
        ("open", release, yaw, GRIPPER_OPEN, 4),
        ("retreat", np.array([cx, cy, CARRY_Z + 0.02]), yaw, GRIPPER_OPEN, 6),
    ]


def _plan_waypoints(env: "SO100Env") -> np.ndarray:
    """The expert's planned grasp-site path (N, 3): the 3D source of the trace labels."""
    plan = expert_plan(env)
    pts = [p for name, p, _, _, _ in plan if name in ("start", "approach", "descend", "lift", "carry", "lower")]
    return np.array(pts)


def _min_jerk(t: float) -> float:
    """Smooth 0 -> 1 profile with zero velocity and acceleration at both ends."""
    return 10 * t ** 3 - 15 * t ** 4 + 6 * t ** 5


class ScriptedExpert:
    """Solves the task from privileged state: approach, descend, close, lift, carry, lower, open, retreat.

    expert = ScriptedExpert(env); obs, info = env.reset(seed=0); expert.reset()
    while True: action = expert.act(obs, info); obs, r, term, trunc, info = env.step(action)

    Every control step interpolates between the plan's keyframes with a minimum-jerk profile and solves
    inverse kinematics, warm-started from the previous solution, so motions are smooth and repeatable.
    """

    def __init__(self, env: SO100Env, grasp_offset: float = 0.0, seed: int = 0, miss_once: bool = False):
        self.env = env
        # a deliberate miss (m): the grasp point is moved this far in a random horizontal direction. It
        # measures how precise a policy has to be (EXPERIMENTS.md: `python sim.py --grasp-offset 0.02`)
        self.grasp_offset, self.rng = grasp_offset, np.random.default_rng(seed)
        # miss_once: only the first try is off; the retry after the slip aims at the object's true position.
        # That records a recovery -- "the jaws came up empty: open, go back down, grasp again" -- which an
        # expert that never misses cannot show (data.generate_demos(miss=...))
        self.miss_once = miss_once

    def reset(self):
        self.retries = 0
        self._replan()

    def _replan(self):
        """Plan from the current state: keyframes -> one (position, yaw, jaw) target per control step."""
        env = self.env
        self.plan = expert_plan(env)
        if self.grasp_offset and not (self.miss_once and self.retries > 0):
            a = self.rng.uniform(0, 2 * math.pi)
            off = self.grasp_offset * np.array([math.cos(a), math.sin(a), 0.0])
            self.plan = [(name, p + off if name in ("approach", "descend", "close", "hold", "lift") else p, y, j, n)
                         for name, p, y, j, n in self.plan]
        self.scratch = mujoco.MjData(env.model)
        self.q = env.data.qpos[:5].copy()
        self.targets, self.phase_of = [], []
        for (_, p0, y0, j0, _), (name, p1, y1, j1, n) in zip(self.plan[:-1], self.plan[1:]):
            y1 = y0 + _wrap(y1 - y0)
            for k in range(1, n + 1):
                s = _min_jerk(k / n)
                self.targets.append((p0 + s * (p1 - p0), y0 + s * (y1 - y0), j0 + s * (j1 - j0)))
                self.phase_of.append(name)
        self.t = 0

    def act(self, obs=None, info=None) -> np.ndarray:
        # Closed loop at one point: when the lift is over, check (from privileged state) that the object came
        # up with the jaws. If it slipped, plan again from here -- a retry, as a person would do.
        if 0 < self.t < len(self.targets) and self.phase_of[self.t - 1] == "lift" and self.phase_of[self.t] != "lift":
            sc = self.env.scene
            z = self.env.data.xpos[self.env.model.body(f"obj{sc['target_object']}").id][2]
            if z < CARRY_Z - 0.05 and self.retries < 2:
                self.retries += 1
                self._replan()
        pos, yaw, jaw = self.targets[min(self.t, len(self.targets) - 1)]
        self.t += 1
        self.q = solve_ik(self.env.model, self.scratch, self.q, pos, _down_rotation(yaw))
        return np.concatenate([self.q, [jaw]]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Running episodes, GIFs, and the command line


def run_expert_episode(env: SO100Env, seed: int, keep_frames: bool = False, grasp_offset: float = 0.0) -> dict:
    """One expert episode. Returns {"success", "steps", "frames" (list of uint8 images if keep_frames)}."""
    obs, info = env.reset(seed=seed)
    expert = ScriptedExpert(env, grasp_offset, seed)
    expert.reset()
    frames = [obs["image"]] if keep_frames else []
    for _ in range(env.cfg.max_steps):
        obs, reward, terminated, truncated, info = env.step(expert.act(obs, info))
        if keep_frames:
            frames.append(obs["image"])
        if terminated or truncated:
            break
    return {"success": bool(info["success"]), "steps": env.steps, "frames": frames, "instruction": info["instruction"]}


def save_gif(frames, path: str, fps: float = 10.0, caption: str | None = None, scale: int = 3):
    """Write frames (uint8 HxWx3) as an animated GIF, upscaled so a 96 px image is watchable, with a caption."""
    from PIL import Image, ImageDraw

    images = []
    for f in frames:
        im = Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
        if caption:
            canvas = Image.new("RGB", (im.width, im.height + 18), (20, 20, 20))
            canvas.paste(im, (0, 18))
            ImageDraw.Draw(canvas).text((4, 3), caption, fill=(255, 255, 255))
            im = canvas
        images.append(im)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


@dataclass
class SimArgs:
    episodes: int = 10          # how many expert episodes to run
    seed: int = 0               # first seed; episode i uses seed + i
    split: str = "train"        # train or test tasks/phrasings
    image_size: int = 96        # camera resolution (square)
    gif: str = ""               # write an animation of the first episode here (e.g. out/expert.gif)
    randomize: bool = False     # domain randomisation (light, table colour, camera jitter)
    no_render: bool = False     # skip rendering (faster statistics)
    viewer: bool = False        # watch the expert in MuJoCo's interactive viewer (needs a display)
    bench: bool = False         # measure environment steps per second with and without rendering
    grasp_offset: float = 0.0   # move the expert's grasp point this far (m), random direction: how precise must a policy be?
    grasp_clearance: float = GRASP_CLEARANCE  # the object's distance from the fixed jaw when the expert grasps (m)


def _parse_args(argv=None) -> SimArgs:
    p = argparse.ArgumentParser(description="Run tiny-m1's scripted expert in the SO-100 pick-and-place world.")
    for f in SimArgs.__dataclass_fields__.values():
        if f.type in ("bool", bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true")
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default)
    return SimArgs(**vars(p.parse_args(argv)))


def benchmark(image_size: int = 96, steps: int = 300) -> dict:
    """Environment steps per second with a random-ish policy (the expert), with and without rendering."""
    out = {}
    for render in (True, False):
        env = SO100Env(image_size=image_size, render=render)
        n, t0, seed = 0, time.perf_counter(), 0
        while n < steps:
            obs, info = env.reset(seed=seed)
            expert = ScriptedExpert(env)
            expert.reset()
            t_ep = time.perf_counter()
            for _ in range(60):
                obs, *_ = env.step(expert.act())
                n += 1
            seed += 1
        out["render" if render else "no_render"] = n / (time.perf_counter() - t0)
        env.close()
    return out


def main(argv=None):
    args = _parse_args(argv)
    if args.viewer:
        import mujoco.viewer
        env = SO100Env(args.image_size, args.split, randomize=args.randomize, render=False)
        obs, info = env.reset(seed=args.seed)
        expert = ScriptedExpert(env)
        expert.reset()
        print(info["instruction"])
        with mujoco.viewer.launch_passive(env.model, env.data) as v:
            for _ in range(env.cfg.max_steps):
                t = time.time()
                obs, _, term, trunc, info = env.step(expert.act())
                v.sync()
                time.sleep(max(0.0, 1 / env.cfg.control_hz - (time.time() - t)))
                if term or trunc or not v.is_running():
                    break
        print("success" if info["success"] else "failure")
        return
    if args.bench:
        b = benchmark(args.image_size)
        print(f"env steps/s at {args.image_size}x{args.image_size}: with rendering {b['render']:.0f}, "
              f"without {b['no_render']:.0f} (expert IK included)")
    global GRASP_CLEARANCE
    GRASP_CLEARANCE = args.grasp_clearance  # read by expert_plan
    env = SO100Env(args.image_size, args.split, randomize=args.randomize, render=not args.no_render or bool(args.gif))
    wins, lengths = 0, []
    for i in range(args.episodes):
        ep = run_expert_episode(env, args.seed + i, keep_frames=bool(args.gif) and i == 0, grasp_offset=args.grasp_offset)
        wins += ep["success"]
        if ep["success"]:
            lengths.append(ep["steps"])
        print(f"episode {i:3d} seed {args.seed + i:5d}  {'ok  ' if ep['success'] else 'FAIL'}  "
              f"steps {ep['steps']:3d}  {ep['instruction']}")
        if i == 0 and args.gif:
            save_gif(ep["frames"], args.gif, env.cfg.control_hz, caption=ep["instruction"])
            print(f"wrote {args.gif}")
    if lengths:
        print(f"mean steps of successful episodes: {np.mean(lengths):.1f}")
    print(f"expert success: {wins}/{args.episodes}")


if __name__ == "__main__":
    main()
