"""eval.py: the Wilson interval, failure modes, open-loop error, and the whole smoke pipeline end to end."""
import json
import os
import subprocess
import sys

import pytest

import data
import eval as evaluation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wilson_known_values():
    # values computed by hand from metrics.md's formula (z = 1.96)
    lo, hi = evaluation.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = evaluation.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = evaluation.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = evaluation.wilson(200, 200)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.9812, abs=1e-4)


def test_smoke_pipeline_end_to_end(tmp_path):
    out = str(tmp_path / "pipe")
    r = subprocess.run([sys.executable, "eval.py", "--pipeline", "--preset", "smoke", "--out", out, "--no-progress",
                        "--episodes", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(os.path.join(out, "eval", "results.json")) as f:
        res = json.load(f)
    for suite in ("seen", "unseen", "distractors"):
        row = res["suites"][suite]["m1"]
        for key in ("success_rate", "successes", "episodes", "ci95", "mean_steps_to_success", "ms_per_chunk", "outcomes"):
            assert key in row
        assert row["episodes"] == 2 and 0 <= row["ci95"][0] <= row["success_rate"] <= row["ci95"][1] <= 1
    assert {"machine", "grounding", "timings_seconds"} <= set(res)
    assert res["render_difference"]["m1"] == 0.0  # the demonstrations' reference frame reached the checkpoint
    assert os.path.exists(os.path.join(out, "stage1", "ckpt", "model.safetensors"))
    assert os.path.exists(os.path.join(out, "eval", "success.png"))
    # workers split a suite's episodes between processes: every episode must come out exactly the same
    from model import Policy
    ck = os.path.join(out, "m1", "ckpt")
    one = evaluation.run_suite(Policy.load(ck), "seen", 2, progress=False)
    two = evaluation.run_suite(None, "seen", 2, progress=False, workers=2, ckpt=ck)
    assert one["final_states"] == two["final_states"] and one["successes"] == two["successes"]
    # --init-from starts every weight from a stage-2 checkpoint: with every learning rate 0 the fine-tuned
    # weights are the checkpoint's; --extra-demos adds a folder's episodes to the training set
    import torch
    import train_action
    from model import load_checkpoint
    ft = os.path.join(out, "ft")
    demo_dir = os.path.join(out, "data", "demos_train_48_noise0.08_paired")
    train_action.main(["--preset", "smoke", "--data-dir", os.path.join(out, "data"), "--stage1",
                       os.path.join(out, "stage1", "ckpt"), "--init-from", ck, "--extra-demos", demo_dir,
                       "--extra-repeat", "2",
                       "--max-steps", "2", "--eval-interval", "2", "--lr-planner", "0", "--lr-action", "0",
                       "--lr-other", "0", "--muon-lr", "0", "--out", ft, "--no-progress"])
    a, b = load_checkpoint(ck)[0].state_dict(), load_checkpoint(os.path.join(ft, "ckpt"))[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --muon-lr in stage 2: with every AdamW rate 0, exactly the DiT's and the queries' block matrices move
    mu = os.path.join(out, "muon")
    train_action.main(["--preset", "smoke", "--data-dir", os.path.join(out, "data"), "--stage1",
                       os.path.join(out, "stage1", "ckpt"), "--init-from", ck, "--max-steps", "2",
                       "--eval-interval", "2", "--lr-planner", "0", "--lr-action", "0", "--lr-other", "0",
                       "--muon-lr", "0.02", "--out", mu, "--no-progress"])
    c = load_checkpoint(os.path.join(mu, "ckpt"))[0].state_dict()
    moved = {k for k in a if not torch.equal(a[k], c[k])}
    assert moved and moved == {k for k in a if a[k].dim() == 2 and k.startswith(("expert.blocks.", "queries.blocks."))}
    assert os.path.exists(os.path.join(mu, "ckpt", "optimizer_muon.safetensors"))
    with pytest.raises(ValueError, match="--muon-lr 0.02"):  # resuming with the other optimizer is refused
        train_action.main(["--preset", "smoke", "--data-dir", os.path.join(out, "data"), "--stage1",
                           os.path.join(out, "stage1", "ckpt"), "--resume", "--max-steps", "4", "--muon-lr", "0",
                           "--out", mu, "--no-progress"])
    # --gripper-point: the DiT reads two more numbers; the checkpoint says so and drives a closed-loop episode
    gp = os.path.join(out, "gp")
    train_action.main(["--preset", "smoke", "--data-dir", os.path.join(out, "data"), "--stage1",
                       os.path.join(out, "stage1", "ckpt"), "--gripper-point", "--max-steps", "2",
                       "--eval-interval", "2", "--out", gp, "--no-progress"])
    gpol = Policy.load(os.path.join(gp, "ckpt"))
    assert gpol.gripper_point and gpol.vla.expert.config.state_dim == 12 + data.PLAN_DIM + data.GRIPPER_DIM
    assert evaluation.run_suite(gpol, "seen", 1, progress=False)["episodes"] == 1
    # --ema: model.safetensors is the weights' average, train_weights.safetensors the raw weights; --resume
    # continues from the raw ones (and keeps averaging)
    em = os.path.join(out, "ema")
    args = ["--preset", "smoke", "--data-dir", os.path.join(out, "data"), "--stage1", os.path.join(out, "stage1", "ckpt"),
            "--ema", "0.9", "--eval-interval", "2", "--out", em, "--no-progress"]
    train_action.main(args + ["--max-steps", "2"])
    from safetensors.torch import load_file
    avg, cfg_em = load_checkpoint(os.path.join(em, "ckpt"))
    raw = load_file(os.path.join(em, "ckpt", "train_weights.safetensors"))
    assert cfg_em["weights"] == "ema" and raw.keys() == avg.state_dict().keys()
    assert any(not torch.equal(raw[k], v) for k, v in avg.state_dict().items())
    train_action.main(args + ["--max-steps", "4", "--resume"])
    avg4, cfg4 = load_checkpoint(os.path.join(em, "ckpt"))
    raw4 = load_file(os.path.join(em, "ckpt", "train_weights.safetensors"))
    assert cfg4["step"] == 4 and any(not torch.equal(raw4[k], raw[k]) for k in raw)
    assert any(not torch.equal(raw4[k], v) for k, v in avg4.state_dict().items())
    with pytest.raises(ValueError, match="extra-repeat"):
        train_action.main(["--preset", "smoke", "--data-dir", os.path.join(out, "data"), "--extra-demos", demo_dir,
                           "--extra-repeat", "0", "--out", ft + "3", "--no-progress"])
    import train_grounding  # stage 1 resumes only with the optimizers it was trained with, and says so
    with pytest.raises(ValueError, match="--muon-lr 0.02"):
        train_grounding.main(["--preset", "smoke", "--data-dir", os.path.join(out, "data"), "--out",
                              os.path.join(out, "stage1"), "--resume", "--max-steps", "40", "--muon-lr", "0",
                              "--no-progress"])
    with pytest.raises(ValueError, match="init-from"):  # a checkpoint with other inputs is refused, and says why
        train_action.main(["--preset", "smoke", "--data-dir", os.path.join(out, "data"), "--stage1",
                           os.path.join(out, "stage1", "ckpt"), "--init-from", ck, "--no-prev-state", "--out", ft + "2",
                           "--no-progress"])


def test_render_check_warns_only_when_this_machine_draws_differently(capsys):
    import numpy as np

    import data
    import sim
    ref = sim.reference_frame(32)
    assert data.render_check({}, "old") is None  # checkpoints from before the check
    assert data.render_check({"render_reference": data.frame_to_text(ref)}, "same") == 0.0
    assert "WARNING" not in capsys.readouterr().out
    other = np.clip(ref.astype(np.int16) + 3, 0, 255).astype(np.uint8)  # as another renderer might draw it
    assert data.render_check({"render_reference": data.frame_to_text(other)}, "gpu") > data.RENDER_TOLERANCE
    assert "gpu learned from pictures drawn by another renderer" in capsys.readouterr().out


def test_open_loop_error_is_zero_for_the_expert_and_measures_an_offset_in_degrees():
    import numpy as np

    rng = np.random.default_rng(0)
    ep = {"images": np.zeros((30, 8, 8, 3), np.uint8), "states": rng.normal(size=(30, 6)),
          "actions": rng.normal(size=(30, 6)), "instruction": "put the red cube in the blue bowl"}

    class Replay:  # a stand-in policy that knows the expert's actions, plus a fixed offset
        replan_every = 4

        def __init__(self, offset):
            self.offset = offset

        def reset(self, keep_plan=False):  # the Policy interface
            pass

        def predict_chunk(self, obs, instruction):
            t = int(np.flatnonzero((ep["states"] == obs["state"]).all(1))[0])  # which frame we were shown
            return ep["actions"][t:t + 8] + self.offset

    exact = evaluation.open_loop_error(Replay(0.0), [ep])
    assert exact["chunks"] == len(range(0, 30 - 4, 4)) and all(exact[j] == 0.0 for j in evaluation.sim.JOINT_NAMES)
    off = evaluation.open_loop_error(Replay(np.array([0.1, 0, 0, 0, 0, -0.2])), [ep])
    assert off["shoulder_pan"] == pytest.approx(np.degrees(0.1)) and off["gripper"] == pytest.approx(np.degrees(0.2))


def test_failure_modes_are_named_from_object_heights():
    c = evaluation.classify_episode
    assert c(True, 0.08, 0.0, True) == "success"
    assert c(False, 0.08, 0.0, True) == "target placed, not released"
    assert c(False, 0.08, 0.0, False) == "target lifted, not placed"
    assert c(False, 0.01, 0.06, False) == "wrong object lifted"  # a 1 cm nudge of the target is not a lift
    assert c(False, 0.0, 0.0, False) == "nothing lifted"


def test_an_arm_that_holds_still_lifts_nothing():
    import numpy as np

    class Still:  # a stand-in policy: keep every joint where it is
        image_size, n_plans = 48, 0

        def reset(self):
            pass

        def act(self, obs, instruction):
            return np.asarray(obs["state"], np.float32)

    r = evaluation.run_episodes(Still(), "single", 0, 2, progress=False)  # one object, one container
    assert r["success"] == [False, False] and r["outcomes"] == ["nothing lifted"] * 2
    assert r["held_steps"] == [0, 0] and r["carried_cm"] == [None, None] and r["falls"] == [[], []]


def test_a_carried_target_is_counted_as_held_until_it_reaches_its_container(monkeypatch):
    """The scripted expert as the policy: the target stays up for the whole carry and ends over its container;
    lift_summary takes medians over the lifted-but-not-placed episodes only."""
    import sim

    env = sim.SO100Env(image_size=48)
    monkeypatch.setattr(evaluation, "_suite_env", lambda suite, size, offset=0: (env, 3))

    class Expert:
        image_size, n_plans = 48, 0

        def reset(self):  # called after env.reset: plan from this table
            self.expert = sim.ScriptedExpert(env)
            self.expert.reset()

        def act(self, obs, instruction):
            return self.expert.act()

    r = evaluation.run_episodes(Expert(), "seen", 0, 1, progress=False)
    assert r["success"] == [True] and r["held_steps"][0] >= 15 and r["carried_cm"][0] < 3.0
    # it comes down once, lowered into its container with the jaws still closed: no fall "after opening"
    assert evaluation.fall_summary(r["falls"]) == {"falls": 1, "falls_opened": 0, "falls_opened_outside": 0,
                                                   "falls_closed_outside": 0, "falls_other_container": 0}

    class LetsGo(Expert):  # the same expert, but it opens its jaws 6 steps into the lift (8 steps long)
        def act(self, obs, instruction):
            a = self.expert.act()
            if self.expert.t > 6 + self.expert.phase_of.index("lift"):
                a[5] = sim.GRIPPER_OPEN
            return a

    r = evaluation.run_episodes(LetsGo(), "seen", 0, 1, progress=False)
    assert r["success"] == [False] and 0 < r["held_steps"][0] < 10
    s = evaluation.fall_summary(r["falls"])  # every try (the expert retries after a drop) ends the same way
    assert s["falls"] >= 1 and s["falls_opened"] == s["falls_opened_outside"] == s["falls"]
    assert s["falls_closed_outside"] == 0
    # set down short: jaws closed, not over its container; over it with closed jaws is the placing itself
    down = [[{"opened": False, "over_container": False, "over_other": True}],
            [{"opened": False, "over_container": True, "over_other": False}]]
    assert evaluation.fall_summary(down)["falls_closed_outside"] == 1
    assert evaluation.fall_summary(down)["falls_other_container"] == 1
    s = evaluation.lift_summary(["target lifted, not placed", "success", "target lifted, not placed"],
                                [4, 30, 10], [12.0, 0.5, 6.0])
    assert s["lifted_not_placed_median_held_steps"] == 7 and s["lifted_not_placed_median_carried_cm"] == 9.0


def test_condition_probe_finds_a_position_only_when_the_condition_holds_one():
    """condition_probe must say R^2 ~1 for condition tokens that encode the object's centre (plus noise) and
    ~0 or below for tokens that are pure noise."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    eps = []
    for i in range(60):
        cx, cy = rng.uniform(10, 80, 2)
        eps.append({"images": np.full((1, 8, 8, 3), i, np.uint8), "states": np.zeros((1, 6), np.float32),
                    "actions": np.zeros((1, 6), np.float32), "instruction": "put the red cube in the blue bowl",
                    "target_box": np.array([[cx - 2, cy - 2, cx + 2, cy + 2]], np.float32)})
    centres = {i: (e["target_box"][0, :2] + 2) for i, e in enumerate(eps)}
    mix = rng.normal(size=(2, 32))

    class FakeVLA:
        informative = True

        def condition(self, image, tokens):
            i = int(image[0, 0, 0, 0])  # the fake image carries the episode's index
            noise = rng.normal(size=32)
            x = centres[i] @ mix + 0.5 * noise if self.informative else noise
            return torch.tensor(x, dtype=torch.float32).reshape(1, 2, 16)  # (1, K, d)

    import data

    class FakePolicy:
        tok, spatial_prompt, vla = data.get_tokenizer(), True, FakeVLA()

        def reset(self, keep_plan=False):
            pass

        def condition_inputs(self, obs, instruction):
            return torch.from_numpy(obs["image"].astype(np.float32))[None], torch.zeros(1, 3), obs["state"]

    good = evaluation.condition_probe(FakePolicy(), eps, alpha=1.0)
    FakePolicy.vla.informative = False
    bad = evaluation.condition_probe(FakePolicy(), eps, alpha=1.0)
    assert good["episodes"] == 60 and good["r2_x"] > 0.9 and good["r2_y"] > 0.9, good
    assert bad["r2_x"] < 0.2 and bad["r2_y"] < 0.2, bad


def test_planner_tracking_tells_an_answer_at_the_jaws_from_one_at_the_target():
    """_tracking_row/_tracking_bins: an answer on the target has error 0 and is never nearer the jaws; one on
    the jaws is; unparsable answers are left out; the bins follow the jaws' distance from the target."""
    target_box, jaws = [40, 40, 44, 44], (62, 42)  # target centre (42, 42): jaws 20 px away
    on_target = evaluation._tracking_row([40, 40, 44, 44], target_box, jaws)
    on_jaws = evaluation._tracking_row([60, 40, 64, 44], target_box, jaws)
    assert on_target == (20.0, 0.0, 20.0) and on_jaws == (20.0, 20.0, 0.0)
    near = evaluation._tracking_row([40, 40, 44, 44], target_box, (44, 42))  # jaws 2 px away
    bins = evaluation._tracking_bins([on_target, on_jaws, near, evaluation._tracking_row(None, target_box, jaws)])
    assert bins["16-1000"] == {"plans": 2, "median_error_px": 10.0, "nearer_jaws": 0.5}
    assert bins["0-4"]["plans"] == 1 and bins["0-4"]["nearer_jaws"] == 0.0 and bins["4-8"]["plans"] == 0


def test_planner_tracking_runs_closed_loop():
    import numpy as np

    class Still:  # keeps still and answers nonsense: every answer is left out, the plans still happen
        image_size, n_plans = 48, 0

        def reset(self):
            pass

        def act(self, obs, instruction):
            self.n_plans += 1
            return np.asarray(obs["state"], np.float32)

        def ask(self, obs, question):
            assert "where is the" in question
            return "no idea"

    bins = evaluation.planner_tracking(Still(), "single", 1)
    assert set(bins) == {f"{lo}-{hi}" for lo, hi in evaluation.TRACK_BINS}
    assert all(b["plans"] == 0 for b in bins.values())


def test_swap_instruction_tells_a_policy_that_ignores_the_words():
    """swap_instruction names another object of the same table: a policy that ignores the words predicts the
    same chunk (change 0, slope 0); one whose pan depends on the named colour changes it."""
    import numpy as np

    import sim

    class Stand:
        image_size = 48
        follows = False

        def reset(self):
            pass

        def predict_chunk(self, obs, instruction):
            chunk = np.tile(np.asarray(obs["state"], np.float32), (8, 1))
            if self.follows:  # turn by an amount that depends on which colour is named
                colour = next(w for w in instruction.split() if w in sim.PALETTE)
                chunk[:, 0] += 0.1 * (list(sim.PALETTE).index(colour) + 1)
            return chunk

    deaf = evaluation.swap_instruction(Stand(), "seen", 4)
    assert deaf["scenes"] == 4 and deaf["median_pan_change_deg"] == 0.0 and deaf["slope"] == 0.0
    assert deaf["median_angle_apart_deg"] > 0  # two different objects
    listener = Stand()
    listener.follows = True
    assert evaluation.swap_instruction(listener, "seen", 4)["median_pan_change_deg"] > 5


def test_swap_instruction_scores_a_written_plan():
    """With a written plan, swap_instruction also checks which of the two objects the written box is nearer;
    a plan that is not a box never counts as right."""
    import numpy as np

    class Writer:
        image_size = 48
        written_plan = True
        last_plan = None

        def reset(self):
            pass

        def predict_chunk(self, obs, instruction):
            self.last_plan = "no box here(3,4)"
            return np.tile(np.asarray(obs["state"], np.float32), (8, 1))

    r = evaluation.swap_instruction(Writer(), "seen", 3)
    assert r["plans"] == 2 * r["scenes"] and r["plan_names_right_object"] == 0.0


def test_swap_place_tells_a_carry_that_reads_the_place_point_from_one_that_does_not():
    """swap_place moves the written plan's place point on early-carry frames: a stand-in whose pan follows the
    plan's point changes by the point's move, one that ignores it by nothing."""
    import numpy as np

    import data

    tokenizer = data.get_tokenizer()

    def episode(k):
        T = 20
        box = np.tile(np.array([10.0, 10.0, 16.0, 16.0], np.float32), (T, 1))
        box[5:] += np.arange(T - 5)[:, None] * 3.0  # lifted and carried from frame 5
        return {"images": np.zeros((T, 48, 48, 3), np.uint8), "states": np.zeros((T, 6), np.float32),
                "actions": np.zeros((T, 6), np.float32), "target_box": box, "instruction": "put the red cube in the blue bowl",
                "target_point": np.tile(np.array([5.0 + 10 * k, 30.0], np.float32), (T, 1))}

    class Stand:
        image_size, written_plan, tok, reads = 48, True, tokenizer, False

        def reset(self):
            self.plan = None

        def predict_chunk(self, obs, instruction):
            chunk = np.zeros((8, 6), np.float32)
            if self.reads:
                _, point = data.parse_plan(self.tok.decode(self.plan[1]))
                chunk[:, 0] = 0.01 * point[0]
            return chunk

    eps = [episode(k) for k in range(4)]
    assert evaluation.carry_frame(eps[0]) == 9  # moved > 6 px at frame 7, plus 2
    deaf = evaluation.swap_place(Stand(), eps)
    assert deaf["frames"] == 4 and deaf["median_pan_change_deg"] == 0.0 and deaf["median_place_moved_px"] == 25.0
    reader = Stand()
    reader.reads = True
    r = evaluation.swap_place(reader, eps)
    assert abs(r["median_pan_change_deg"] - np.degrees(0.01 * 25)) < 0.01
