"""Tests of the simulated world: determinism, the expert, camera geometry, action checks, the split."""
import re

import numpy as np
import pytest

import sim


def _rollout(seed, n_steps, split="train"):
    env = sim.SO100Env(image_size=64, split=split)
    obs, info = env.reset(seed=seed)
    expert = sim.ScriptedExpert(env)
    expert.reset()
    images, states = [obs["image"]], [obs["state"]]
    for _ in range(n_steps):
        obs, *_ = env.step(expert.act())
        images.append(obs["image"])
        states.append(obs["state"])
    return info["instruction"], np.stack(images), np.stack(states)


def test_same_seed_same_episode():
    a, b = _rollout(3, 12), _rollout(3, 12)
    assert a[0] == b[0]
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    c = _rollout(4, 0)
    assert c[0] != a[0] or not np.array_equal(c[1][0], a[1][0])


def test_observation_format():
    env = sim.SO100Env(image_size=48)
    obs, info = env.reset(seed=0)
    assert obs["image"].shape == (48, 48, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (6,) and obs["state"].dtype == np.float32
    for key in ("instruction", "success", "boxes", "target_box", "target_point", "trace", "ee_pixel"):
        assert key in info
    assert obs["image"].std() > 5  # a real picture, not a blank frame


@pytest.mark.parametrize("split", ["train", "test"])
def test_expert_succeeds(split):
    env = sim.SO100Env(image_size=64, split=split, render=False)
    wins = sum(sim.run_expert_episode(env, seed)["success"] for seed in range(100, 105))
    assert wins >= 4, f"expert solved only {wins}/5 {split} episodes"


def test_projected_boxes_contain_the_objects_pixels():
    env = sim.SO100Env(image_size=96)
    checked = 0
    for seed in range(4):
        env.reset(seed=seed)
        seg = env.render(segmentation=True)  # (H, W) geom id per pixel, -1 for background
        for i, ob in enumerate(env.scene["objects"]):
            body = env.model.body(f"obj{i}").id
            geoms = [g for g in range(env.model.ngeom) if env.model.geom_bodyid[g] == body]
            rows, cols = np.nonzero(np.isin(seg, geoms))
            if len(rows) < 4:  # hidden behind the arm: nothing to check
                continue
            x1, y1, x2, y2 = sim.box_of(env.model, env.data, f"obj{i}", 96, 96)
            # every pixel of the object lies inside its projected box (1 px of rasterisation slack)
            assert cols.min() >= x1 - 1 and cols.max() + 1 <= x2 + 1
            assert rows.min() >= y1 - 1 and rows.max() + 1 <= y2 + 1
            # and the box is tight: it is not much bigger than the object's visible extent
            seg_area = (cols.max() + 1 - cols.min()) * (rows.max() + 1 - rows.min())
            assert (x2 - x1) * (y2 - y1) <= 2.5 * seg_area + 10
            checked += 1
    assert checked >= 6


def test_project_centre_of_image():
    env = sim.SO100Env(image_size=80)
    env.reset(seed=0)
    cam = env.model.camera("front").id
    pos, rot = env.data.cam_xpos[cam], env.data.cam_xmat[cam].reshape(3, 3)
    ahead = pos - 0.5 * rot[:, 2]  # half a metre along the viewing direction
    uv = sim.project(env.model, env.data, ahead[None], 80, 80)[0]
    assert np.allclose(uv, [40, 40], atol=1e-6)
    up = ahead + 0.01 * rot[:, 1]  # a point above it appears higher in the image (smaller y)
    assert sim.project(env.model, env.data, up[None], 80, 80)[0][1] < 40


def test_bad_actions_are_refused():
    env = sim.SO100Env(image_size=32, render=False)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.array([0, 0, np.nan, 0, 0, 0]))


def test_joint_targets_are_limited_to_the_ranges():
    env = sim.SO100Env(image_size=32, render=False)
    env.reset(seed=0)
    for target in (np.full(6, 10.0), np.full(6, -10.0)):
        for _ in range(5):
            obs, *_ = env.step(target)
        assert np.all(env.data.ctrl[:6] <= sim.JOINT_HIGH + 1e-9) and np.all(env.data.ctrl[:6] >= sim.JOINT_LOW - 1e-9)
        assert np.all(obs["state"] <= sim.JOINT_HIGH + 0.05) and np.all(obs["state"] >= sim.JOINT_LOW - 0.05)


def _template_regex(t):
    return re.compile("^" + re.escape(t).replace(r"\{o\}", ".+").replace(r"\{c\}", ".+") + "$")


def test_split_never_leaks():
    rng = np.random.default_rng(0)
    test_res = [_template_regex(t) for t in sim.TEST_TEMPLATES]
    train_res = [_template_regex(t) for t in sim.TRAIN_TEMPLATES]
    seen_combos = set()
    for _ in range(3000):
        sc = sim.sample_scene(rng, "train")
        assert sc["combo"] not in sim.TEST_COMBOS
        assert sc["template"] in sim.TRAIN_TEMPLATES
        assert not any(r.match(sc["instruction"]) for r in test_res), sc["instruction"]
        seen_combos.add(sc["combo"])
    for _ in range(500):
        sc = sim.sample_scene(rng, "test")
        assert sc["combo"] in sim.TEST_COMBOS and sc["template"] in sim.TEST_TEMPLATES
        assert not any(r.match(sc["instruction"]) for r in train_res), sc["instruction"]
    # the reserved combinations are new only as combinations: each colour, shape and container is trained on
    words = {w for c in seen_combos for w in c}
    assert {w for c in sim.TEST_COMBOS for w in c} <= words


def test_grasp_offset_moves_only_the_grasp_keyframes_by_that_distance():
    env = sim.SO100Env(image_size=32, render=False)
    env.reset(seed=3)
    clean = sim.ScriptedExpert(env)
    clean.reset()
    shifted = sim.ScriptedExpert(env, grasp_offset=0.02, seed=1)
    shifted.reset()
    for (name, p0, *_), (_, p1, *_) in zip(clean.plan, shifted.plan):
        d = p1 - p0
        if name in ("approach", "descend", "close", "hold", "lift"):
            assert abs(np.hypot(d[0], d[1]) - 0.02) < 1e-9 and d[2] == 0, name
        else:
            assert np.allclose(d, 0), name
    env.close()


def test_the_expert_closes_with_the_object_clear_of_the_fixed_jaw(monkeypatch):
    """When the expert starts closing, the object's centre is GRASP_CLEARANCE from the grasp site, towards the
    moving jaw (the gripper frame's +y), so its face is that far from the fixed jaw's; it then lifts it."""
    assert sim.GRASP_CLEARANCE >= 0.005  # the default leaves room on the fixed jaw's side (EXPERIMENTS.md item 33)
    clearance = 0.008  # set, so that the test checks the geometry (side and size), whatever the default
    monkeypatch.setattr(sim, "GRASP_CLEARANCE", clearance)
    env = sim.SO100Env(image_size=32, render=False)
    for seed in (3, 4, 5):
        env.reset(seed=seed)
        expert = sim.ScriptedExpert(env)
        expert.reset()
        m, d = env.model, env.data
        obj, site = m.body(f"obj{env.scene['target_object']}").id, m.site("grasp").id
        while expert.phase_of[expert.t] != "close":
            env.step(expert.act())
        R = d.site_xmat[site].reshape(3, 3)
        local = R.T @ (d.xpos[obj] - d.site_xpos[site])  # the object's centre in the grasp site's frame
        assert abs(local[1] - clearance) < 0.002, (seed, local)
        while expert.phase_of[min(expert.t, len(expert.phase_of) - 1)] != "carry":
            env.step(expert.act())
        assert env.target_held(), seed
    env.close()


def test_retarget_names_another_object_and_keeps_the_split_rule():
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        n_changed = 0
        for _ in range(300):
            sc = sim.sample_scene(rng, split)
            other = sim.retarget(sc, rng)
            if other is None:  # only allowed when no other object makes a combination legal for the split
                continue
            n_changed += 1
            assert other["target_object"] != sc["target_object"]
            assert other["objects"] == sc["objects"] and other["containers"] == sc["containers"]  # the same table
            assert (other["combo"] in sim.TEST_COMBOS) == (split == "test")
            assert other["objects"][other["target_object"]]["colour"] in other["instruction"]
        assert n_changed > (200 if split == "train" else 0)


def test_retarget_container_keeps_the_object_and_names_the_other_container():
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        n_changed = 0
        for _ in range(300):
            sc = sim.sample_scene(rng, split)
            other = sim.retarget_container(sc, rng)
            if other is None:  # one container, or the other one would break the split's rule on combinations
                o = sc["objects"][sc["target_object"]]
                assert all(((o["colour"], o["shape"], c["shape"]) in sim.TEST_COMBOS) != (split == "test")
                           for j, c in enumerate(sc["containers"]) if j != sc["target_container"])
                continue
            n_changed += 1
            assert other["target_object"] == sc["target_object"] and other["target_container"] != sc["target_container"]
            assert other["objects"] == sc["objects"] and other["containers"] == sc["containers"]
            assert (other["combo"] in sim.TEST_COMBOS) == (split == "test")
            assert other["containers"][other["target_container"]]["colour"] in other["instruction"]
        assert n_changed > (100 if split == "train" else 0)


def test_expert_taking_over_a_carried_target_carries_it_on_instead_of_starting_again():
    # another controller (here: a first expert) lifts the target; a fresh expert that takes over mid-lift must
    # plan from the carry -- jaws closed all the way to the container -- and still finish the task
    env = sim.SO100Env(image_size=48, render=False)
    for seed in (0, 1, 2):
        env.reset(seed=seed)
        first = sim.ScriptedExpert(env)
        first.reset()
        assert not env.target_held()
        while not (first.phase_of[first.t] == "lift" and env.target_held()):
            env.step(first.act())
        for _ in range(3):  # a few steps into the lift
            env.step(first.act())
        second = sim.ScriptedExpert(env)
        second.reset()
        assert [name for name, *_ in second.plan][:3] == ["start", "lift", "carry"]
        assert all(jaw == sim.GRIPPER_CLOSED for name, _, _, jaw, _ in second.plan[:4])
        info = {"success": False}
        for _ in range(env.cfg.max_steps - env.steps):
            _, _, term, trunc, info = env.step(second.act())
            if term or trunc:
                break
        assert info["success"], seed


def test_the_reference_frame_is_drawn_the_same_again_and_a_changed_picture_is_measured():
    ref = sim.reference_frame(32)
    assert ref.shape == (32, 32, 3) and ref.dtype == np.uint8 and ref.std() > 5  # a table, not a blank frame
    assert sim.picture_difference(ref) == 0.0  # the same renderer draws exactly the same pixels
    changed = ref.astype(np.int16)
    changed[:8] = np.clip(changed[:8] + 40, 0, 255)  # a quarter of the rows brighter
    expected = np.abs(changed - ref).mean()
    assert expected > 1 and sim.picture_difference(changed.astype(np.uint8)) == pytest.approx(expected)


def test_gripper_pixel_from_the_joint_angles_is_where_the_jaws_are_drawn():
    """sim.gripper_pixel (forward kinematics, then the camera) equals the projection of the jaws' grasp point of
    any table in that state, lies on the jaws' drawn pixels, and keeps the batch shape of its input."""
    import mujoco

    env = sim.SO100Env(image_size=96)
    rng = np.random.default_rng(0)
    states, pixels = [], []
    for seed in (3, 4):  # two different tables: objects do not change where the arm is
        obs, _ = env.reset(seed=seed)
        for _ in range(6):
            obs, *_ = env.step(obs["state"] + rng.normal(0, 0.15, 6))
        mujoco.mj_kinematics(env.model, env.data)  # the site as of the state now (mj_step leaves it a substep old)
        site = env.data.site_xpos[env.model.site("grasp").id]
        want = sim.project(env.model, env.data, site[None], 96, 96)[0]
        got = sim.gripper_pixel(obs["state"], 96)
        assert got.shape == (2,) and np.allclose(got, want, atol=1e-3)
        # the jaws' drawn pixels surround it (the grasp point sits between the jaws' tips)
        seg = env.render(segmentation=True)
        jaw_bodies = {env.model.body("gripper").id, env.model.body("moving_jaw").id}
        geoms = [g for g in range(env.model.ngeom) if env.model.geom_bodyid[g] in jaw_bodies]
        rows, cols = np.nonzero(np.isin(seg, geoms))
        assert cols.min() - 3 <= got[0] <= cols.max() + 3 and rows.min() - 3 <= got[1] <= rows.max() + 3
        states.append(obs["state"])
        pixels.append(got)
    batch = sim.gripper_pixel(np.stack(states)[None], 96)  # (1, 2, 6) -> (1, 2, 2)
    assert batch.shape == (1, 2, 2) and np.allclose(batch[0], np.stack(pixels))
    assert np.allclose(sim.gripper_pixel(states[0], 48), pixels[0] / 2, atol=1e-3)  # scales with the image
    with pytest.raises(ValueError, match="6"):
        sim.gripper_pixel(np.zeros(5), 96)


def test_gripper_pixel_at_the_place_points_height_is_the_place_point_when_the_jaws_are_over_the_container():
    """With height=PLACE_POINT_Z the jaws carried right over the container give its place point's pixel
    (info["target_point"]); their own projection at the carry's height lies well away from it (parallax)."""
    import mujoco

    env = sim.SO100Env(image_size=96)
    obs, info = env.reset(seed=5)  # its carry ends within 1 mm of straight over the container
    expert = sim.ScriptedExpert(env)
    expert.reset()
    m, d = env.model, env.data
    cxy = np.array(env.scene["containers"][env.scene["target_container"]]["pos"])
    best, over = 1.0, None  # the carry's frame nearest to straight over the container, jaws up
    for _ in range(env.cfg.max_steps):
        obs, _, terminated, truncated, info = env.step(expert.act(obs, info))
        mujoco.mj_kinematics(m, d)  # the site as of the state now
        site = d.site_xpos[m.site("grasp").id]
        if site[2] > sim.CARRY_Z - 0.015 and np.linalg.norm(site[:2] - cxy) < best:
            best, over = np.linalg.norm(site[:2] - cxy), obs["state"].copy()
        if terminated or truncated:
            break
    assert best < 0.005, f"the expert's jaws came only within {best:.3f} m of straight over the container"
    on_table = sim.gripper_pixel(over, 96, sim.PLACE_POINT_Z)
    assert np.linalg.norm(on_table - np.array(info["target_point"])) < 1.0  # a pixel is ~5 mm on the table
    assert np.linalg.norm(sim.gripper_pixel(over, 96) - np.array(info["target_point"])) > 5


def test_over_a_container_asks_about_the_target_container_or_any_other():
    """target_over_container() is about the asked-for container; target_over_container(j) about container j
    (eval.py counts a target set down in the wrong container with it)."""
    import mujoco

    import eval as evaluation

    env = sim.SO100Env(image_size=48)
    for seed in range(50):  # a table with two containers
        env.reset(seed=seed)
        if len(env.scene["containers"]) == 2:
            break
    assert len(env.scene["containers"]) == 2
    other = 1 - env.scene["target_container"]
    adr = env.model.jnt_qposadr[env.model.joint(f"obj{env.scene['target_object']}").id]
    env.data.qpos[adr : adr + 2] = env.scene["containers"][other]["pos"][:2]  # the target into the other one
    mujoco.mj_forward(env.model, env.data)
    assert env.target_over_container(other) and not env.target_over_container()
    assert env.target_to_container(other) < 1e-6 < env.target_to_container()
    assert evaluation._over_other_container(env)
