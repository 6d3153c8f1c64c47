"""Tests of data.py: tokenizer, answer formats, labels, shards, normalisation, metrics."""
import json
import os

import numpy as np
import pytest
import torch

import data
import sim


@pytest.fixture(scope="module")
def tok():
    return data.get_tokenizer()


def test_tokenizer_round_trip(tok):
    for text in ["put the red cube in the blue bowl", "[12,3,95,40]", "[(1,2),(30,40),(95,95)]",
                 data.SPATIAL_PROMPT.format(instruction="move the white can to the green tray"),
                 "words it never saw: zebra 1234!"]:
        assert tok.decode(tok.encode(text)) == text
    # coordinates of a 96 px image are single tokens, so an answer is short
    assert sum(len(tok.encode(str(v))) == 1 for v in range(96)) >= 90
    assert tok.encode_single_token(data.EOT) != tok.encode_single_token(data.PAD)


def test_formats_round_trip():
    box, point, trace = [3, 4, 50.4, 61.6], (7.2, 94.9), [(0, 0), (10, 20), (95, 95)]
    assert np.array_equal(data.parse_box(data.format_box(box)), [3, 4, 50, 62])
    assert np.array_equal(data.parse_point(data.format_point(point)), [7, 95])
    assert np.array_equal(data.parse_trace(data.format_trace(trace)), np.array(trace, float))
    assert data.parse_box(" [1, 2, 3, 4] ") is not None  # spaces are tolerated


@pytest.mark.parametrize("text", ["", None, "[1,2,3]", "[1,2,3,4", "[1,2,3,4,5]", "[a,2,3,4]", "[5,2,3,4]",
                                  "box: [1,2,3,4] ok"])
def test_malformed_box_is_refused(text):
    assert data.parse_box(text) is None


@pytest.mark.parametrize("text", ["", "(1,2", "1,2", "(1,2,3)", "(1,2)(3,4)"])
def test_malformed_point_is_refused(text):
    assert data.parse_point(text) is None


@pytest.mark.parametrize("text", ["", "[(1,2)]", "[(1,2),(3,4)", "[(1,2),,(3,4)]", "[(1,2) x (3,4)]", "(1,2),(3,4)"])
def test_malformed_trace_is_refused(text):
    assert data.parse_trace(text) is None


def test_labels_agree_with_the_scene():
    env = sim.SO100Env(image_size=96)
    for seed in range(3):
        obs, info = env.reset(seed=seed)
        qa = data.scene_questions(info, np.random.default_rng(seed), 96)
        sc = info["scene"]
        for i, ob in enumerate(sc["objects"]):
            centre = sim.project(env.model, env.data, env.data.xpos[env.model.body(f"obj{i}").id][None], 96, 96)[0]
            box = info["boxes"][f"{ob['colour']} {ob['shape']}"]
            assert box[0] <= centre[0] <= box[2] and box[1] <= centre[1] <= box[3]
        box_answers = [data.parse_box(q["answer"]) for q in qa if q["kind"] == "box"]
        assert len(box_answers) == len(sc["objects"]) + len(sc["containers"]) + 1  # + the spatial prompt's
        # the spatial prompt (the stage-2 text) is answered with the box of the object the task picks up
        key = [q for q in qa if q["question"] == data.SPATIAL_PROMPT.format(instruction=info["instruction"])]
        assert len(key) == 1 and np.allclose(data.parse_box(key[0]["answer"]), np.round(info["target_box"]), atol=1)
        place = [q for q in qa if q["kind"] == "place"][0]
        assert data.in_box(data.parse_point(place["answer"]), info["container_box"], 96)
        trace = data.parse_trace([q for q in qa if q["kind"] == "trace"][0]["answer"])
        assert trace.shape == (data.TRACE_POINTS, 2)
        # the trace's grasp point lies on the target object, its release point on the container
        assert data.in_box(trace[2], np.add(info["target_box"], [-1.5, -1.5, 1.5, 1.5]), 96)
        assert data.in_box(trace[4], info["container_box"], 96)


def test_patch_labels_name_the_items_in_their_patches():
    # a 48 px image cut into 12 px patches (4x4); a red cube in a blue bowl, a white can alone, and the spatial
    # prompt (it names two items, so it gives no label)
    qs = [dict(kind="box", question="where is the blue bowl?", label=[0.0, 0.0, 23.0, 23.0]),
          dict(kind="box", question="locate the red block.", label=[13.0, 13.0, 18.0, 18.0]),
          dict(kind="box", question="find the white can.", label=[38.0, 38.0, 43.0, 43.0]),
          dict(kind="box", question=data.SPATIAL_PROMPT.format(instruction="put the red cube in the blue bowl"),
               label=[40.0, 2.0, 45.0, 7.0]),
          dict(kind="point", question="point to the white can.", label=[40.0, 40.0])]
    colours, shapes = list(sim.PALETTE), list(sim.SHAPES + sim.CONTAINERS)
    c, s = data.patch_labels(qs, 48, 12).reshape(2, 4, 4)
    assert data.patch_classes() == (len(colours) + 1, len(shapes) + 1)
    bowl = (colours.index("blue") + 1, shapes.index("bowl") + 1)
    assert [(c[0, 0], s[0, 0]), (c[0, 1], s[0, 1]), (c[1, 0], s[1, 0])] == [bowl] * 3  # the bowl's patches
    assert (c[1, 1], s[1, 1]) == (colours.index("red") + 1, shapes.index("cube") + 1)  # the cube, over the bowl
    assert (c[3, 3], s[3, 3]) == (colours.index("white") + 1, shapes.index("cylinder") + 1)  # "can" -> cylinder
    assert c[0, 3] == 0 and s[0, 3] == 0  # where only the spatial prompt's box is: table
    assert (c > 0).sum() == 5 and ((c > 0) == (s > 0)).all()


def test_collate_adds_patch_labels_only_when_asked(tok, tmp_path):
    d = data.generate_grounding(str(tmp_path / "g"), 3, "train", 0, 48, progress=False)
    plain = data.GroundingDataset(d, tok, packed=True).collate([data.GroundingDataset(d, tok, packed=True)[i]
                                                               for i in range(2)])
    ds = data.GroundingDataset(d, tok, packed=True, patch_size=12)
    batch = ds.collate([ds[i] for i in range(2)])
    assert len(plain) == 5 and len(batch) == 6 and batch[5].shape == (2, 2, 16)
    assert all(torch.equal(a, b) for a, b in zip(plain, batch[:5]))
    assert (batch[5][:, 0] > 0).sum(1).min() >= 2  # every table has at least one object and one container


def test_lookup_targets_share_each_rectangle_by_area_and_skip_traces():
    # 48 px image, 12 px patches (4x4)
    inside = data.lookup_target(dict(kind="box", label=[13.0, 13.0, 18.0, 18.0]), 48, 12).reshape(4, 4)
    assert inside[1, 1] == 1.0 and inside.sum() == 1.0  # a box inside one patch: all there
    split = data.lookup_target(dict(kind="point", label=[21.0, 3.0], region=[20.0, 2.0, 28.0, 6.0]), 48, 12)
    split = split.reshape(4, 4)
    assert split[0, 1] == pytest.approx(0.5) and split[0, 2] == pytest.approx(0.5)  # the region, not the point
    place = data.lookup_target(dict(kind="place", label=[30.0, 30.0], region=[24.0, 24.0, 48.0, 48.0]), 48, 12)
    assert place.reshape(4, 4)[2:, 2:].min() == pytest.approx(0.25) and place.sum() == pytest.approx(1.0)
    assert data.lookup_target(dict(kind="trace", label=[[1.0, 1.0], [40.0, 40.0]]), 48, 12) is None


def test_collate_adds_lookup_targets_at_the_answer_positions(tok):
    images = np.zeros((1, 48, 48, 3), np.uint8)
    qa = [dict(kind="box", question="where is the red cube?", answer="[13,13,18,18]", image=0,
               label=[13.0, 13.0, 18.0, 18.0]),
          dict(kind="trace", question="draw the gripper path.", answer="[(1,1),(40,40)]", image=0,
               label=[[1.0, 1.0], [40.0, 40.0]]),
          dict(kind="point", question="point to the blue bowl.", answer="(40,40)", image=0, label=[40.0, 40.0],
               region=[36.0, 36.0, 48.0, 48.0])]
    plain = data.GroundingDataset(None, tok, images=images, qa=qa, packed=True)
    ds = data.GroundingDataset(None, tok, images=images, qa=qa, packed=True, lookup_patch=12)
    batch = ds.collate([ds[0]])
    assert len(batch) == 6 and all(torch.equal(a, b) for a, b in zip(plain.collate([plain[0]]), batch[:5]))
    targets, segments, look = batch[2], batch[3], batch[5]  # look (B, L, 16)
    has = look.sum(-1) > 0  # (B, L)
    answer = targets != -100
    assert torch.equal(has, answer & (segments != 1))  # every answer position except the trace's
    assert (look[0, has[0] & (segments[0] == 0)][:, 5] == 1).all()  # the box: patch (1, 1)
    assert (look[0, has[0] & (segments[0] == 2)][:, 15] == 1).all()  # the point: the bowl's patch (3, 3)


def test_counterfactual_prompts_name_other_objects_and_keep_the_usual_questions():
    env = sim.SO100Env(image_size=96)
    for seed in range(4):
        obs, info = env.reset(seed=seed)
        usual = data.scene_questions(info, np.random.default_rng(seed), 96)
        more = data.scene_questions(info, np.random.default_rng(seed), 96, counterfactual_prompts=2)
        assert more[:len(usual)] == usual  # the usual questions are untouched
        extra, sc = more[len(usual):], info["scene"]
        assert 1 <= len(extra) <= min(2, len(sc["objects"]) - 1)
        answers = [tuple(data.parse_box(q["answer"])) for q in extra]
        assert len(set(answers)) == len(answers)  # each names a different object
        for q, box in zip(extra, answers):
            assert q["kind"] == "box" and q["question"].startswith("Your task is to")
            assert q["question"] != data.SPATIAL_PROMPT.format(instruction=info["instruction"])
            # answered with the box of another object on the table, the one whose colour the sentence says
            o = [o for o in sc["objects"] if np.allclose(box, np.round(info["boxes"][f"{o['colour']} {o['shape']}"]), atol=1)]
            assert len(o) == 1 and o[0] is not sc["objects"][sc["target_object"]]
            assert f"{o[0]['colour']} " in q["question"]


def test_counterfactual_containers_ask_about_the_other_container_of_the_same_table(tmp_path):
    d = str(tmp_path / "cc")
    data.generate_grounding(d, 12, seed=0, image_size=48, shard_size=6, progress=False, counterfactual_containers=True)
    plain = str(tmp_path / "plain")
    data.generate_grounding(plain, 12, seed=0, image_size=48, shard_size=6, progress=False)
    images, qa = data.load_grounding(d)
    images0, qa0 = data.load_grounding(plain)
    assert np.array_equal(images, images0)  # the same tables and pictures
    n_two = 0
    for i in range(len(images)):
        mine = [q for q in qa if q["image"] == i]
        usual = [q for q in qa0 if q["image"] == i]
        assert mine[:len(usual)] == usual  # the usual questions are untouched
        extra = mine[len(usual):]
        if not extra:
            continue
        n_two += 1
        assert [q["kind"] for q in extra] == ["place", "trace"]
        place = [q for q in usual if q["kind"] == "place"][0]
        trace = [q for q in usual if q["kind"] == "trace"][0]
        # the other container: another region, another release point, the same start and grasp
        assert extra[0]["region"] != place["region"]
        assert not np.array_equal(data.parse_point(extra[0]["answer"]), data.parse_point(place["answer"]))
        new, old = np.asarray(data.parse_trace(extra[1]["answer"])), np.asarray(data.parse_trace(trace["answer"]))
        assert np.array_equal(new[:3], old[:3]) and not np.array_equal(new[-1], old[-1])
        assert data.in_box(data.parse_point(extra[0]["answer"]), extra[0]["region"], 48)
    assert n_two >= 2
    with pytest.raises(ValueError, match="made with"):  # never mixed into a folder made without them
        data.generate_grounding(plain, 12, seed=0, image_size=48, shard_size=6, progress=False,
                                counterfactual_containers=True)


def test_grounding_shards_are_deterministic_and_resumable(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    data.generate_grounding(a, 5, seed=1, image_size=48, shard_size=2, progress=False)
    os.remove(os.path.join(a, "shard_00001.npz"))  # as if interrupted before the second shard landed
    data.generate_grounding(a, 5, seed=1, image_size=48, shard_size=2, progress=False)
    data.generate_grounding(b, 5, seed=1, image_size=48, shard_size=2, progress=False)
    ia, qa = data.load_grounding(a)
    ib, qb = data.load_grounding(b)
    assert ia.shape == (5, 48, 48, 3) and np.array_equal(ia, ib) and qa == qb
    with pytest.raises(ValueError, match="made with"):
        data.generate_grounding(a, 5, seed=2, image_size=48, shard_size=2, progress=False)
    with pytest.raises(ValueError, match="made with"):  # the curriculum's small tables never mix with full ones
        data.generate_grounding(a, 5, seed=1, image_size=48, shard_size=2, progress=False, n_objects=(1, 1))


def test_curriculum_tables_have_one_object_and_one_container(tmp_path):
    d = str(tmp_path / "easy")
    data.generate_grounding(d, 4, seed=3, image_size=48, progress=False, n_objects=(1, 1), n_containers=(1, 1))
    _, qa = data.load_grounding(d)
    for i in range(4):
        boxes = [q for q in qa if q["image"] == i and q["kind"] == "box"]
        assert len(boxes) == 3  # one box question per item on the table, and the spatial prompt's


def test_pair_curriculum_tables_have_two_objects_that_the_words_tell_apart(tmp_path):
    d = str(tmp_path / "pair")
    data.generate_grounding(d, 6, seed=4, image_size=48, progress=False, n_objects=(2, 2), n_containers=(1, 1))
    _, qa = data.load_grounding(d)
    for i in range(6):
        boxes = [q for q in qa if q["image"] == i and q["kind"] == "box"]
        assert len(boxes) == 4  # two objects, one container, and the spatial prompt
        items = boxes[:3]
        assert len({q["question"] for q in items}) == 3 and len({q["answer"] for q in items}) == 3


def test_collate_packs_questions_and_aligns_targets(tok):
    images = np.zeros((2, 32, 32, 3), np.uint8)
    qa = [dict(kind="box", question="where is the red cube?", answer="[1,2,3,4]", image=0, label=[1, 2, 3, 4]),
          dict(kind="point", question="point to the blue bowl.", answer="(5,6)", image=0, label=[5, 6]),
          dict(kind="point", question="point to the red cube.", answer="(7,8)", image=1, label=[7, 8])]
    ds = data.GroundingDataset(None, tok, images=images, qa=qa, packed=True)
    assert len(ds) == 2  # one item per image, holding all of its questions
    x, tokens, targets, segments, positions = ds.collate([ds[0], ds[1]])
    assert x.shape == (2, 3, 32, 32) and tokens.shape == targets.shape == segments.shape == positions.shape
    start = 0
    for k, q in enumerate(qa[:2]):  # row 0 packs two questions one after the other
        n_q = len(data.encode_question(tok, q["question"]))
        ans = tok.encode(q["answer"])
        seg_len = n_q + len(ans)
        assert (segments[0, start:start + seg_len] == k).all()
        assert positions[0, start:start + seg_len].tolist() == list(range(seg_len))
        assert tokens[0, start + n_q - 1].item() == tok.encode_single_token(data.ANSWER)
        # at <|answer|> predict the first answer token ... at the last answer token predict <|endoftext|>
        assert targets[0, start + n_q - 1:start + n_q - 1 + len(ans)].tolist() == ans
        assert targets[0, start + n_q - 1 + len(ans)].item() == tok.encode_single_token(data.EOT)
        assert (targets[0, start:start + n_q - 1] == -100).all()
        start += seg_len
    assert (segments[1, positions.shape[1] - 1] == -1) or segments[1].max() == 0  # row 1 is padded


def test_preprocess_refuses_wrong_size():
    with pytest.raises(ValueError, match="resize"):
        data.preprocess_image(np.zeros((64, 64, 3), np.uint8), 96)
    x = data.preprocess_image(np.full((96, 96, 3), 255, np.uint8), 96)
    assert x.shape == (3, 96, 96) and torch.allclose(x, torch.ones_like(x))


def test_normalisation_round_trip():
    rng = np.random.default_rng(0)
    eps = [{"actions": rng.normal(size=(50, 6)).astype(np.float32), "states": rng.normal(size=(50, 6)).astype(np.float32)}]
    stats = data.compute_norm_stats(eps)
    x = eps[0]["actions"][:10]
    n = data.normalize(x, stats["action"])
    assert np.abs(n).max() <= 1.5
    inside = np.abs(n) < 1.5
    assert np.allclose(data.unnormalize(n, stats["action"])[inside], x[inside], atol=1e-5)
    assert np.allclose(np.percentile(data.normalize(eps[0]["actions"], stats["action"]), [1, 99], axis=0), [[-1] * 6, [1] * 6], atol=1e-5)


def test_relative_chunks_add_back_to_the_expert_actions(tok):
    rng = np.random.default_rng(0)
    T, H = 12, 4
    states = np.cumsum(rng.normal(size=(T, 6)), 0).astype(np.float32)
    eps = [{"actions": states + rng.normal(0, 0.1, (T, 6)).astype(np.float32), "states": states,
            "images": np.zeros((T, 16, 16, 3), np.uint8), "instruction": "put the red cube in the blue bowl"}]
    stats = {**data.compute_norm_stats(eps), "delta": data.compute_delta_stats(eps, H)}
    assert np.array(stats["delta"]["low"]).shape == (H, 6)  # a range per chunk step and joint
    ds = data.DemoDataset(eps, tok, stats, H, relative=True)
    for t in (0, 5, T - 1):  # the last frames repeat the final action
        e, tt, chunk, _ = ds[t]
        idx = np.minimum(np.arange(t, t + H), T - 1)
        back = data.unnormalize(chunk, stats["delta"]) + states[t]
        inside = np.abs(chunk) < 1.5  # normalize() clips beyond 1.5
        assert np.allclose(back[inside], eps[0]["actions"][idx][inside], atol=1e-4)
    assert np.abs(chunk).max() <= 1.5


def test_metrics_known_values():
    assert data.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert data.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    p = np.array([[0, 0], [1, 0], [2, 0]], float)
    assert data.discrete_frechet(p, p) == 0.0
    assert data.discrete_frechet(p, p + [0, 3]) == pytest.approx(3.0)
    assert data.discrete_frechet(p, p[::-1]) == pytest.approx(2.0)  # same points, opposite direction
    samples = [dict(kind="box", label=[0, 0, 10, 10]), dict(kind="point", label=[5, 5], region=[0, 0, 10, 10]),
               dict(kind="trace", label=[[0, 0], [10, 0]])]
    m = data.grounding_metrics(samples, ["[0,0,10,10]", "(50,50)", "nonsense"], 96)
    assert m["box_acc50"] == 1.0 and m["point_acc"] == 0.0 and m["parse_rate"] == pytest.approx(2 / 3)
    assert m["trace_dfd"] == pytest.approx(96 * np.sqrt(2))
    # two things asked about in one scene: the answer to the first lands on the second -> a binding error
    two = [dict(kind="box", label=[0, 0, 10, 10], image=0), dict(kind="box", label=[50, 50, 60, 60], image=0),
           dict(kind="box", label=[0, 0, 10, 10], image=1)]
    m = data.grounding_metrics(two, ["[50,50,60,60]", "[50,50,60,60]", "[70,70,80,80]"], 96)
    assert m["box_acc50"] == pytest.approx(1 / 3) and m["box_other_object"] == pytest.approx(1 / 3)
    # the written plan's two parts are also scored alone: the spatial prompt's box and the place point
    prompt = data.SPATIAL_PROMPT.format(instruction="put the red cube in the blue bowl")
    plan = [dict(kind="box", label=[0, 0, 10, 10], image=0, question=prompt),
            dict(kind="box", label=[50, 50, 60, 60], image=0, question="where is the blue cube?"),
            dict(kind="place", label=[5, 5], region=[0, 0, 10, 10], question=data.PLAN_QUESTION),
            dict(kind="point", label=[5, 5], region=[0, 0, 10, 10], question="point to the red cube.")]
    m = data.grounding_metrics(plan, ["[50,50,60,60]", "[50,50,60,60]", "(5,5)", "(90,90)"], 96)
    assert m["box_acc50"] == 0.5 and m["prompt_box_acc50"] == 0.0 and m["object_box_acc50"] == 1.0
    assert m["point_acc"] == 0.5 and m["place_acc"] == 1.0


def test_demo_episode_round_trip(tmp_path):
    T = 7
    ep = {"images": np.zeros((T, 16, 16, 3), np.uint8), "states": np.ones((T, 6), np.float32),
          "actions": np.arange(T * 6, dtype=np.float32).reshape(T, 6), "instruction": "put the red cube in the blue bowl",
          "success": True, "source": "robot"}
    data.write_demo_episode(str(tmp_path), ep)
    (back,) = data.read_demo_episodes(str(tmp_path))
    assert back["instruction"] == ep["instruction"] and back["source"] == "robot"
    assert np.array_equal(back["actions"], ep["actions"])
    with pytest.raises(ValueError):
        data.write_demo_episode(str(tmp_path), dict(ep, actions=np.zeros((T + 1, 6), np.float32)))


def test_packed_rows_equal_separate_rows(tok):
    """Packing several questions into one row (packed_mask) gives exactly the logits of one row per question."""
    from model import Planner, PlannerConfig

    torch.manual_seed(0)
    planner = Planner(PlannerConfig(image_size=24, patch_size=12, vocab_size=tok.n_vocab, d_model=32, vit_layers=1,
                                    lm_layers=2, n_heads=2, number_values=data.number_values(tok))).eval()
    images = np.random.default_rng(0).integers(0, 255, (1, 24, 24, 3)).astype(np.uint8)
    qa = [dict(kind="box", question="where is the red cube?", answer="[1,2,3,4]", image=0),
          dict(kind="point", question="point to the blue bowl.", answer="(5,6)", image=0)]
    packed = data.GroundingDataset(None, tok, images=images, qa=qa, packed=True)
    x, tokens, targets, segments, positions = packed.collate([packed[0]])
    logits_packed = planner(x, tokens, targets, segments, positions)[0][0]
    start = 0
    for q in qa:
        seq = data.encode_question(tok, q["question"]) + tok.encode(q["answer"])
        logits = planner(x, torch.tensor([seq]))[0][0]
        assert torch.allclose(logits, logits_packed[start:start + len(seq)], atol=1e-5)
        start += len(seq)


def test_unpacked_rows_put_the_question_in_the_prefix(tok):
    images = np.zeros((1, 32, 32, 3), np.uint8)
    qa = [dict(kind="point", question="point to the blue bowl.", answer="(5,6)", image=0, label=[5, 6])]
    ds = data.GroundingDataset(None, tok, images=images, qa=qa)
    x, tokens, targets, prefix_len = ds.collate([ds[0]])
    n_q = len(data.encode_question(tok, qa[0]["question"]))
    assert prefix_len.tolist() == [n_q] and tokens[0, n_q - 1].item() == tok.encode_single_token(data.ANSWER)
    assert targets[0, n_q - 1:].tolist() == tok.encode("(5,6)") + [tok.encode_single_token(data.EOT)]


def test_early_sampling_and_where_labels(tok):
    """sample_indices(early_fraction=1) draws only the first EARLY_STEPS frames; where labels are the box
    centres in [0, 1]."""
    T = 20
    boxes = np.tile(np.array([[10, 20, 30, 40]], np.float32), (T, 1))
    eps = [{"actions": np.zeros((T, 6), np.float32), "states": np.zeros((T, 6), np.float32),
            "images": np.zeros((T, 16, 16, 3), np.uint8), "instruction": "put the red cube in the blue bowl",
            "target_box": boxes, "container_box": boxes + 4} for _ in range(3)]
    stats = data.compute_norm_stats(eps)
    ds = data.DemoDataset(eps, tok, stats, 4)
    rng = np.random.default_rng(0)
    assert all(ds.index[i][1] < data.EARLY_STEPS for i in ds.sample_indices(rng, 200, early_fraction=1.0))
    assert max(ds.index[i][1] for i in ds.sample_indices(rng, 200)) >= data.EARLY_STEPS  # uniform otherwise
    *_, where = ds.collate([ds[0], ds[5]])
    assert torch.allclose(where, torch.tensor([[20, 30, 24, 34]] * 2) / 16)
    del eps[1]["target_box"]
    assert ds.collate([ds[0], ds[T]])[-1] is None  # an episode without boxes: no labels


def test_no_object_labels_while_it_is_in_the_jaws(tok):
    """Once the key object leaves its place (lifted), the where labels and the co-training questions about it
    stop with held_labels=False; the container keeps its labels; held_labels=True (the default) keeps them all."""
    T = 10
    target = np.tile(np.array([[10, 20, 16, 26]], np.float32), (T, 1))
    target[6:] += [30, -10, 30, -10]  # lifted and carried from frame 6 on
    ep = {"actions": np.zeros((T, 6), np.float32), "states": np.zeros((T, 6), np.float32),
          "images": np.arange(T, dtype=np.uint8)[:, None, None, None] * np.ones((T, 16, 16, 3), np.uint8),
          "instruction": "put the red cube in the blue bowl", "target_box": target,
          "container_box": np.tile(np.array([[60, 60, 80, 80]], np.float32), (T, 1)),
          "target_point": np.tile(np.array([[70, 70]], np.float32), (T, 1))}
    assert data.object_resting(ep).tolist() == [True] * 6 + [False] * 4
    stats = data.compute_norm_stats([ep])
    ds = data.DemoDataset([ep], tok, stats, 4, held_labels=False)
    where = ds.collate([ds[2], ds[8]])[-1]
    assert torch.isfinite(where[0]).all() and torch.isnan(where[1, :2]).all() and torch.isfinite(where[1, 2:]).all()
    ds_old = data.DemoDataset([ep], tok, stats, 4, held_labels=True)
    assert torch.isfinite(ds_old.collate([ds_old[2], ds_old[8]])[-1]).all()
    images, qa = data.demo_grounding_qa([ep], np.random.default_rng(0), 200, 96, held_labels=False)
    about_key = [q for q in qa if "red" in q["question"] and q["kind"] == "box"]  # its box or the spatial prompt
    assert about_key and all(images[q["image"]][0, 0, 0] < 6 for q in about_key)  # only frames 0-5: before the lift
    assert any(images[q["image"]][0, 0, 0] >= 6 for q in qa if "blue" in q["question"])  # the container: any frame
    images, qa = data.demo_grounding_qa([ep], np.random.default_rng(0), 200, 96, held_labels=True)
    assert any(images[q["image"]][0, 0, 0] >= 6 for q in qa if q["question"].startswith("Your task"))


def test_complete_demo_folder_needs_no_simulator(tmp_path, monkeypatch):
    """A finished demonstration folder (copied to a GPU box, say) is reused as it is: the second call must not
    build a simulator, and an unfinished folder must."""
    out = str(tmp_path / "demos")
    data.generate_demos(out, 2, "train", seed=0, image_size=32, progress=False)
    before = sorted(os.listdir(out))

    def no_sim(*a, **k):
        raise AssertionError("built a simulator for a complete folder")

    monkeypatch.setattr(sim, "SO100Env", no_sim)
    assert data.generate_demos(out, 2, "train", seed=0, image_size=32, progress=False) == out
    assert sorted(os.listdir(out)) == before
    os.remove(os.path.join(out, "episode_000001.npz"))
    with pytest.raises(AssertionError, match="built a simulator"):
        data.generate_demos(out, 2, "train", seed=0, image_size=32, progress=False)


def test_a_folder_keeps_its_renderers_reference_and_refuses_another_renderers_pictures(tmp_path):
    out = str(tmp_path / "demos")
    data.generate_demos(out, 1, "train", seed=0, image_size=32, progress=False)
    ref = data.read_render_reference(out)
    assert np.array_equal(ref, sim.reference_frame(32))
    assert np.array_equal(data.frame_from_text(data.frame_to_text(ref)), ref)  # how checkpoints carry it
    from PIL import Image
    Image.fromarray(np.clip(ref.astype(np.int16) + 3, 0, 255).astype(np.uint8)).save(
        os.path.join(out, data.RENDER_REFERENCE))  # as if another renderer had begun the folder
    assert data.generate_demos(out, 1, "train", seed=0, image_size=32, progress=False) == out  # complete: no check
    with pytest.raises(ValueError, match="another --out"):
        data.generate_demos(out, 2, "train", seed=0, image_size=32, progress=False)
    assert not os.path.exists(os.path.join(out, "episode_000001.npz"))  # nothing was mixed in


def test_paired_demos_share_the_first_image_but_not_the_object(tmp_path):
    """Counterfactual pairs: the same first frame with two different instructions and two different targets,
    so only the words can tell them apart."""
    out = str(tmp_path / "paired")
    data.generate_demos(out, 2, "train", seed=0, image_size=32, progress=False, paired=True)
    a, b = data.read_demo_episodes(out, successful_only=False)
    assert np.array_equal(a["images"][0], b["images"][0]) and np.array_equal(a["states"][0], b["states"][0])
    assert a["instruction"] != b["instruction"]
    assert not np.allclose(a["target_box"][0], b["target_box"][0])
    # the unpaired run's first episode is the same table: pairing only replaces every second episode
    plain = str(tmp_path / "plain")
    data.generate_demos(plain, 1, "train", seed=0, image_size=32, progress=False)
    assert np.array_equal(data.read_demo_episodes(plain, successful_only=False)[0]["images"], a["images"])


def test_missed_demos_mark_the_missed_try_and_workers_change_nothing(tmp_path, tok):
    """miss=1: every episode starts with a deliberate miss. Its frames are kept but marked label_mask=False
    until the expert re-plans, the retry's frames are labels, and DemoDataset skips the marked ones. Recording
    in 2 processes writes exactly the same episodes as in 1."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    data.generate_demos(one, 2, "train", seed=0, image_size=32, progress=False, miss=1.0)
    data.generate_demos(two, 2, "train", seed=0, image_size=32, progress=False, miss=1.0, workers=2)
    eps = data.read_demo_episodes(one, successful_only=False)
    for a, b in zip(eps, data.read_demo_episodes(two, successful_only=False)):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a if isinstance(a[k], np.ndarray))
    for ep in eps:
        m = ep["label_mask"]
        assert not m[0] and m[-1]                     # the missed try first, the recovery after it
        assert not np.any(m[np.argmax(m):] == False)  # one switch, from missed to labels
        # the recovery goes back down: the jaws open again after closing on nothing
        grip = ep["actions"][:, 5]
        assert grip[np.argmax(m):].max() > grip[np.argmax(m) - 1] + 0.3
    stats = json.load(open(os.path.join(one, "norm_stats.json")))
    ds = data.DemoDataset(eps, tok, stats)
    assert len(ds) == sum(int(ep["label_mask"].sum()) for ep in eps)
    assert all(eps[e]["label_mask"][t] for e, t in ds.index)
    # every episode starts with a (masked) miss, so no early frames: sampling still works
    assert len(ds.sample_indices(np.random.default_rng(0), 16, early_fraction=0.3)) == 16
    # without misses there is no mask and every frame is an item
    plain = str(tmp_path / "plain")
    data.generate_demos(plain, 1, "train", seed=0, image_size=32, progress=False)
    (p,) = data.read_demo_episodes(plain, successful_only=False)
    assert "label_mask" not in p and len(data.DemoDataset([p], tok, stats)) == len(p["actions"])


def test_written_plan_is_the_first_frames_box_and_place_point(tok):
    """DemoDataset(written_plan=True): every row of an episode is prompt + the key object's box and the place
    point at the episode's FIRST frame, as text (the plan is written once, before the arm moves)."""
    T = 6
    boxes = np.stack([np.array([10 + t, 20, 30 + t, 40], np.float32) for t in range(T)])
    ep = {"actions": np.zeros((T, 6), np.float32), "states": np.zeros((T, 6), np.float32),
          "images": np.zeros((T, 64, 64, 3), np.uint8), "instruction": "put the red cube in the blue bowl",
          "target_box": boxes, "container_box": boxes, "target_point": np.tile([[50.2, 70.0]], (T, 1))}
    stats = data.compute_norm_stats([ep])
    ds = data.DemoDataset([ep], tok, stats, 4, written_plan=True)
    _, tokens, mask, *_ = ds.collate([ds[2], ds[5]])
    prompt = data.encode_prompt(tok, ep["instruction"], True)
    for row, m in zip(tokens, mask):
        ids = row[~m].tolist()
        assert ids[: len(prompt)] == prompt
        plan = tok.decode(ids[len(prompt):])
        assert plan == "[10,20,30,40](50,63)"  # frame 0's box; the point clipped to 63
        box, point = data.parse_plan(plan)
        assert box.tolist() == [10, 20, 30, 40] and point.tolist() == [50, 63]
    with pytest.raises(ValueError, match="spatial prompt"):
        data.DemoDataset([ep], tok, stats, 4, spatial_prompt=False, written_plan=True)


def test_plan_numbers_follow_the_state_and_say_what_the_plan_says(tok):
    """DemoDataset(plan_numbers=True): each row's state is the normalised joint state, then the written plan's
    box and place point as numbers in [-1, 1] (data.plan_vector), the same for every frame of the episode."""
    T = 5
    ep = {"actions": np.zeros((T, 6), np.float32), "states": np.random.default_rng(0).uniform(-1, 1, (T, 6)).astype(np.float32),
          "images": np.zeros((T, 64, 64, 3), np.uint8), "instruction": "put the red cube in the blue bowl",
          "target_box": np.tile([[16, 32, 48, 64]], (T, 1)).astype(np.float32),
          "container_box": np.zeros((T, 4), np.float32), "target_point": np.tile([[0.0, 32.0]], (T, 1))}
    stats = data.compute_norm_stats([ep])
    ds = data.DemoDataset([ep], tok, stats, 4, written_plan=True, plan_numbers=True)
    *_, state, _ = ds.collate([ds[1], ds[4]])
    assert state.shape == (2, 6 + data.PLAN_DIM)
    assert np.allclose(state[:, :6].numpy(), data.normalize(ep["states"][[1, 4]], stats["state"]))
    # the box [16,32,48,63] (clipped to the 64 px image) and the point (0,32), as the text says
    want = np.array([16, 32, 48, 63, 0, 32]) / 64 * 2 - 1
    assert np.allclose(state[:, 6:].numpy(), want[None], atol=1e-6)
    # a part the planner failed to write reads as the image's middle (0)
    assert np.allclose(data.plan_vector("[16,32,48,63](oops", 64), np.r_[want[:4], 0, 0])
    assert not data.plan_vector("", 64).any()
    with pytest.raises(ValueError, match="written_plan"):
        data.DemoDataset([ep], tok, stats, 4, plan_numbers=True)


def test_prev_state_is_the_step_before_and_frame_0_repeats_itself(tok):
    """DemoDataset(prev_state=True): each row's state is the normalised state now, then one step earlier (at
    frame 0 there is no earlier step: the same state again), then the plan's numbers if asked for."""
    T = 4
    ep = {"actions": np.zeros((T, 6), np.float32), "states": np.arange(T * 6, dtype=np.float32).reshape(T, 6) / 30,
          "images": np.zeros((T, 64, 64, 3), np.uint8), "instruction": "put the red cube in the blue bowl",
          "target_box": np.tile([[16, 32, 48, 60]], (T, 1)).astype(np.float32),
          "container_box": np.zeros((T, 4), np.float32), "target_point": np.tile([[8.0, 32.0]], (T, 1))}
    stats = data.compute_norm_stats([ep])
    ds = data.DemoDataset([ep], tok, stats, 4, written_plan=True, plan_numbers=True, prev_state=True)
    *_, state, _ = ds.collate([ds[0], ds[3]])
    norm = data.normalize(ep["states"], stats["state"])
    assert state.shape == (2, 12 + data.PLAN_DIM)
    assert np.allclose(state[0, :12].numpy(), np.r_[norm[0], norm[0]])
    assert np.allclose(state[1, :12].numpy(), np.r_[norm[3], norm[2]])
    assert np.allclose(state[1, 12:].numpy(), np.array([16, 32, 48, 60, 8, 32]) / 64 * 2 - 1)


def test_takeover_demos_label_only_the_experts_frames(tmp_path, monkeypatch):
    """generate_takeover_demos: the policy drives first (its frames are kept, label_mask False), then the
    expert takes over and finishes (label_mask True). A policy that holds still never lifts the target, so
    the expert takes over at a step drawn from TAKEOVER_FALLBACK."""
    import model

    class Still:  # a "policy" that keeps every joint where it is
        image_size = 32

        def reset(self):
            pass

        def act(self, obs, instruction):
            return np.asarray(obs["state"], np.float32)

    monkeypatch.setattr(model.Policy, "load", classmethod(lambda cls, ckpt, **kw: Still()))
    out = str(tmp_path / "takeover")
    data.generate_takeover_demos("fake/ckpt", out, 2, progress=False)
    eps = data.read_demo_episodes(out, successful_only=False)
    assert len(eps) == 2
    for ep in eps:
        m = ep["label_mask"]
        k = int(np.argmax(m))  # the takeover step
        assert data.TAKEOVER_FALLBACK[0] <= k <= data.TAKEOVER_FALLBACK[1]
        assert not m[:k].any() and m[k:].all()
        assert np.allclose(ep["actions"][:k], ep["states"][:k])  # the policy's own (unlabelled) actions
        # the expert finishes from wherever the policy left the arm, unless the episode's time runs out first
        assert ep["success"] or len(m) == 120
    assert any(ep["success"] for ep in eps)
    # the folder refuses to be resumed with another checkpoint
    with pytest.raises(ValueError):
        data.generate_takeover_demos("another/ckpt", out, 2, progress=False)
    # after_lift_only: a policy that never lifts the target gets no takeover, and no episode is kept
    only = str(tmp_path / "only")
    data.generate_takeover_demos("fake/ckpt", only, 2, progress=False, after_lift_only=True)
    eps = data.read_demo_episodes(only, successful_only=False)
    assert len(eps) == 2 and not any(ep["success"] or ep["label_mask"].any() for ep in eps)


def test_gripper_point_follows_the_plan_and_is_the_jaws_place_in_the_picture(tok):
    """DemoDataset(gripper_point=True): after the state (and the plan's numbers) come two numbers, where the jaws
    are over the table in the picture at that frame (data.gripper_vector of its joint state), in the plan's units."""
    import sim

    T = 3
    states = np.stack([sim.HOME, sim.HOME + 0.2, sim.HOME - 0.1]).astype(np.float32)
    ep = {"actions": np.zeros((T, 6), np.float32), "states": states,
          "images": np.zeros((T, 64, 64, 3), np.uint8), "instruction": "put the red cube in the blue bowl",
          "target_box": np.tile([[16, 32, 48, 60]], (T, 1)).astype(np.float32),
          "container_box": np.zeros((T, 4), np.float32), "target_point": np.tile([[8.0, 32.0]], (T, 1))}
    stats = data.compute_norm_stats([ep])
    ds = data.DemoDataset([ep], tok, stats, 4, written_plan=True, plan_numbers=True, gripper_point=True)
    *_, state, _ = ds.collate([ds[0], ds[2]])
    assert state.shape == (2, 6 + data.PLAN_DIM + data.GRIPPER_DIM)
    want = sim.gripper_pixel(states[[0, 2]], 64, sim.PLACE_POINT_Z) / 64 * 2 - 1
    assert np.allclose(state[:, -2:].numpy(), want, atol=1e-6)
    assert not np.allclose(want[0], want[1])  # the arm moved, so did its place in the picture
