"""robot.py: protocol bytes, the simulated servo chain, faults and retries, calibration, arm safety, the CLI.

Run: python -m pytest tests/test_robot.py -q     (a few seconds; the MuJoCo tests skip without sim.SO100Env)
"""

import json
import os
import re
import select
import sys
import threading
import time
import types

import numpy as np
import pytest

import robot
from robot import (BROADCAST_ID, JOINT_HIGH, JOINT_LOW, JOINT_MID, JOINT_NAMES, MOTOR_IDS, PING, ArmConfig,
                   ArmError, BadReplyError, Calibration, CalibrationError, NoReplyError,
                   PortNotFoundError, ServoBus, ServoFaultError, SimBus, SO100Arm, decode_errors, decode_value,
                   encode_value, from_sign_magnitude, instruction_packet, parse_status, status_packet,
                   to_sign_magnitude)


class RecordingSimBus(SimBus):
    """A SimBus that remembers every packet written to it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    def write(self, data):
        self.sent.append(bytes(data))
        return super().write(data)


def frame(text):
    return bytes.fromhex(text)


def connected_arm(bus=None, max_step=None):
    bus = bus or SimBus()
    return SO100Arm(bus, robot.sim_calibration(), ArmConfig(max_step=max_step)).connect()


# ---- packets, byte for byte (the worked frames of so100.md) ----------------------------------------------

def test_worked_frames():
    assert instruction_packet(1, PING) == frame("FF FF 01 02 01 FB")
    assert instruction_packet(1, robot.READ, bytes([56, 2])) == frame("FF FF 01 04 02 38 02 BE")
    assert instruction_packet(1, robot.WRITE, bytes([42]) + encode_value("goal_position", 2048)) == \
        frame("FF FF 01 05 03 2A 00 08 C4")
    assert instruction_packet(BROADCAST_ID, robot.SYNC_READ, bytes([56, 2, 1, 2, 3, 4, 5, 6])) == \
        frame("FF FF FE 0A 82 38 02 01 02 03 04 05 06 26")


def test_bus_sends_the_worked_frames():
    bus = RecordingSimBus()
    servos = ServoBus(bus)
    assert servos.ping(1)
    servos.read(1, "present_position")
    servos.write(1, "goal_position", 2048)
    servos.sync_read("present_position", MOTOR_IDS)
    assert bus.sent == [frame("FF FF 01 02 01 FB"), frame("FF FF 01 04 02 38 02 BE"),
                        frame("FF FF 01 05 03 2A 00 08 C4"), frame("FF FF FE 0A 82 38 02 01 02 03 04 05 06 26")]


def test_status_packet_round_trip_and_rejects():
    packet = status_packet(3, 0x20, bytes([0x34, 0x12]))
    assert packet == frame("FF FF 03 04 20 34 12") + bytes([~(3 + 4 + 0x20 + 0x34 + 0x12) & 0xFF])
    assert parse_status(packet) == (3, 0x20, bytes([0x34, 0x12]))
    with pytest.raises(ValueError, match="checksum"):
        parse_status(packet[:-1] + bytes([packet[-1] ^ 1]))
    with pytest.raises(ValueError):
        parse_status(packet[:-2])


# ---- sign-magnitude values ---------------------------------------------------------------------------------

def test_sign_magnitude_edges():
    assert to_sign_magnitude(0, 15) == 0 and from_sign_magnitude(0, 15) == 0
    assert from_sign_magnitude(0x8000, 15) == 0            # "negative zero" reads as 0
    assert to_sign_magnitude(32767, 15) == 0x7FFF
    assert to_sign_magnitude(-32767, 15) == 0xFFFF
    for bit in (15, 11, 10):
        assert to_sign_magnitude(-1, bit) == (1 << bit) | 1
        assert from_sign_magnitude((1 << bit) | 1, bit) == -1
        with pytest.raises(ValueError):
            to_sign_magnitude(1 << bit, bit)
        with pytest.raises(ValueError):
            to_sign_magnitude(-(1 << bit), bit)


@pytest.mark.parametrize("register, value, raw", [
    ("goal_position", -1, "01 80"), ("goal_position", 2048, "00 08"), ("present_position", -4095, "FF 8F"),
    ("goal_speed", -100, "64 80"), ("homing_offset", -2047, "FF 0F"), ("homing_offset", 2047, "FF 07"),
    ("homing_offset", -1, "01 08"), ("present_load", -1023, "FF 07"), ("present_load", 1023, "FF 03"),
    ("model_number", 777, "09 03"), ("lock", 1, "01"),
])
def test_register_encoding(register, value, raw):
    assert encode_value(register, value) == frame(raw)         # little-endian, sign in the register's bit
    assert decode_value(register, frame(raw)) == value


@pytest.mark.parametrize("register, value", [
    ("homing_offset", 2048), ("homing_offset", -2048), ("present_load", 1024), ("goal_position", 32768),
    ("lock", 256), ("lock", -1), ("min_angle_limit", 65536),
])
def test_out_of_range_values_are_refused(register, value):
    with pytest.raises(ValueError):
        encode_value(register, value)


def test_error_byte_names():
    assert decode_errors(0) == []
    assert decode_errors(0x21) == ["input voltage error", "overload"]
    assert decode_errors(0x0E) == ["angle sensor error", "overheat", "over-current"]
    assert decode_errors(0x10) == ["unknown error bit 4"]


# ---- the simulated servo chain -----------------------------------------------------------------------------

def test_register_round_trips_on_the_sim_bus():
    bus = ServoBus(SimBus())
    for i in MOTOR_IDS:
        assert bus.read(i, "model_number") == 777
        assert bus.read(i, "id") == i
    bus.write(2, "goal_position", 1234)
    assert bus.read(2, "goal_position") == 1234
    bus.write(2, "goal_speed", -300)
    assert bus.read(2, "goal_speed") == -300
    bus.sync_write("acceleration", {i: 10 * i for i in MOTOR_IDS})
    assert bus.sync_read("acceleration", MOTOR_IDS) == [10, 20, 30, 40, 50, 60]
    bus.write(3, "model_number", 1)   # read-only: accepted on the wire, unchanged
    assert bus.read(3, "model_number") == 777


def test_reg_write_waits_for_action():
    bus = ServoBus(SimBus())
    bus.reg_write(4, "acceleration", 77)
    assert bus.read(4, "acceleration") == 0
    bus.action()
    assert bus.read(4, "acceleration") == 77


def test_eeprom_lock():
    port = SimBus()
    bus = ServoBus(port)
    assert bus.read(1, "lock") == 1
    bus.write(1, "return_delay", 0)            # locked: ignored
    assert bus.read(1, "return_delay") == 250
    bus.write(1, "lock", 0)
    bus.write(1, "return_delay", 0)
    assert bus.read(1, "return_delay") == 0
    bus.write(1, "torque_enable", 1)           # RAM is writable whatever the lock
    assert bus.read(1, "torque_enable") == 1


def test_broadcast_never_replies_and_baud_must_match():
    port = SimBus()
    port.write(instruction_packet(BROADCAST_ID, PING))
    assert port.in_waiting == 0
    port.write(instruction_packet(BROADCAST_ID, robot.WRITE, bytes([41, 5])))   # obeyed silently
    assert port.in_waiting == 0 and all(s.get("acceleration") == 5 for s in port.servos)
    bus = ServoBus(SimBus(baud_index=1), retries=0)   # servos at 500,000 baud
    assert not bus.ping(1)
    bus.port.baudrate = 500_000
    assert bus.ping(1)


def test_ideal_servo_moves_a_bounded_step_per_tick():
    port = SimBus(max_speed=50)
    bus = ServoBus(port)
    start = bus.read(1, "present_position")
    bus.write(1, "torque_enable", 1)
    bus.write(1, "goal_position", start + 400)
    assert bus.read(1, "present_position") == start + 50
    for _ in range(10):
        bus.sync_write("goal_position", {1: start + 400})
    assert bus.read(1, "present_position") == start + 400


# ---- faults: retries and errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["drop", "checksum", "wrong_id", "truncate"])
def test_one_bad_reply_is_retried(fault):
    port = RecordingSimBus()
    bus = ServoBus(port, retries=2)
    port.inject(fault)
    assert bus.read(3, "model_number") == 777
    assert len(port.sent) == 2                     # the first try failed, the second worked
    port.inject(fault)
    assert len(bus.sync_read("present_position", MOTOR_IDS)) == 6


@pytest.mark.parametrize("fault, error, words", [
    ("drop", NoReplyError, re.escape("no reply from servo 3 (elbow_flex) at 1000000 baud")),
    ("checksum", BadReplyError, "checksum"),
    ("wrong_id", BadReplyError, "came from servo 4"),
    ("truncate", BadReplyError, "truncated"),
])
def test_persistent_bad_replies_raise_clear_errors(fault, error, words):
    port = RecordingSimBus()
    bus = ServoBus(port, retries=2)
    port.inject(fault, times=3)
    with pytest.raises(error, match=words) as info:
        bus.read(3, "present_position")
    assert len(port.sent) == 3
    assert "check" in str(info.value)              # says what to do


def test_overload_is_reported_not_retried():
    port = RecordingSimBus()
    bus = ServoBus(port)
    port.inject("overload", servo_id=6)
    with pytest.raises(ServoFaultError, match="servo 6 \\(gripper\\) reports overload.*power-cycle") as info:
        bus.sync_read("present_position", MOTOR_IDS)
    assert info.value.errors == ["overload"] and len(port.sent) == 1
    port.power_cycle()
    assert len(bus.sync_read("present_position", MOTOR_IDS)) == 6


def test_missing_servo_named_on_connect():
    with pytest.raises(NoReplyError, match="servo 4 \\(wrist_flex\\).*check its cable and power"):
        SO100Arm(SimBus(ids=(1, 2, 3, 5, 6)), robot.sim_calibration()).connect()
    with pytest.raises(NoReplyError, match="no servo answered.*power supply"):
        SO100Arm(SimBus(baud_index=2), robot.sim_calibration()).connect()


def test_wrong_model_refused():
    port = SimBus()
    port.servo(2).regs[3:5] = (1000).to_bytes(2, "little")
    with pytest.raises(ArmError, match="servo 2 \\(shoulder_lift\\) is model 1000"):
        SO100Arm(port).connect()


# ---- calibration ----------------------------------------------------------------------------------------------

def test_calibration_maps_middle_and_ends():
    cal = robot.sim_calibration()
    np.testing.assert_allclose(cal.steps_to_radians([2047] * 6)[:5], JOINT_MID[:5], atol=1e-6)
    j = cal.joints["gripper"]
    assert cal.steps_to_radians([2047] * 5 + [j.range_min])[5] == pytest.approx(JOINT_LOW[5])
    assert cal.steps_to_radians([2047] * 5 + [j.range_max])[5] == pytest.approx(JOINT_HIGH[5])
    q = np.random.default_rng(0).uniform(JOINT_LOW, JOINT_HIGH)
    np.testing.assert_allclose(cal.steps_to_radians(cal.radians_to_steps(q)), q, atol=robot.RAD_PER_STEP)
    steps = cal.radians_to_steps(JOINT_HIGH + 1.0)                 # beyond the range: clamped
    assert all(steps[k] == cal.joints[n].range_max for k, n in enumerate(JOINT_NAMES))


def test_drive_sign_flips_direction():
    cal = robot.sim_calibration()
    cal.joints["elbow_flex"].drive_sign = -1
    q = cal.steps_to_radians([2047, 2047, 2147, 2047, 2047, 2047])
    assert q[2] == pytest.approx(JOINT_MID[2] - 100 * robot.RAD_PER_STEP, abs=1e-6)


def test_calibrate_on_sim_finds_the_true_calibration():
    port = SimBus()
    with SO100Arm(port) as arm:
        found = robot.calibrate_sim(arm, log=lambda *a: None)
    truth = robot.sim_calibration()
    for name in JOINT_NAMES:
        assert found.joints[name].homing_offset == truth.joints[name].homing_offset
        assert abs(found.joints[name].range_min - truth.joints[name].range_min) <= 2
        assert abs(found.joints[name].range_max - truth.joints[name].range_max) <= 2
    bus = ServoBus(port)      # written to the servos' EEPROM too
    assert bus.read(5, "homing_offset") == truth.joints["wrist_roll"].homing_offset == 1853
    assert bus.read(1, "min_angle_limit") == found.joints["shoulder_pan"].range_min
    # the middle pose now reads 2047 on every joint
    port.set_by_hand(JOINT_MID)
    assert bus.sync_read("present_position", MOTOR_IDS) == [2047] * 6


def test_calibration_save_load(tmp_path):
    path = tmp_path / "arm.json"
    robot.sim_calibration().save(str(path))
    assert Calibration.load(str(path)) == robot.sim_calibration()


@pytest.mark.parametrize("change, words", [
    (lambda d: d["elbow_flex"].update(homing_offset=3000), "elbow_flex homing offset 3000 is outside"),
    (lambda d: d["wrist_flex"].update(range_min=2000, range_max=2000), "wrist_flex range 2000..2000"),
    (lambda d: d.pop("gripper"), "joint 'gripper' is missing"),
    (lambda d: d["shoulder_pan"].update(drive_sign=2), "drive_sign"),
    (lambda d: d["shoulder_pan"].pop("id"), "not a calibration file"),
])
def test_invalid_calibration_files_refused(tmp_path, change, words):
    path = tmp_path / "arm.json"
    robot.sim_calibration().save(str(path))
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(CalibrationError, match=words):
        Calibration.load(str(path))


def test_missing_calibration_file_says_what_to_do(tmp_path):
    with pytest.raises(CalibrationError, match="calibrate"):
        Calibration.load(str(tmp_path / "none.json"))


# ---- the arm ----------------------------------------------------------------------------------------------------

def test_connect_configures_the_servos():
    port = SimBus()
    connected_arm(port)
    bus = ServoBus(port)
    for i in MOTOR_IDS:
        assert [bus.read(i, r) for r in ("return_delay", "operating_mode", "p_coefficient", "i_coefficient",
                                         "d_coefficient", "lock")] == [0, 0, 16, 0, 32, 1]
    assert bus.read(6, "max_torque_limit") == 500 and bus.read(6, "torque_limit") == 500
    assert bus.read(6, "protection_current") == 250 and bus.read(6, "overload_torque") == 25
    assert bus.read(1, "max_torque_limit") == 1000


def test_read_and_send_round_trip():
    port = SimBus(max_speed=4000)
    arm = connected_arm(port)
    np.testing.assert_allclose(arm.read_joints(), port.joint_radians(), atol=robot.RAD_PER_STEP)
    arm.torque_on()
    goal = JOINT_MID + np.array([0.3, -0.2, 0.4, -0.5, 1.0, 0.5])
    sent = arm.send_action(goal)
    np.testing.assert_allclose(sent, goal, atol=robot.RAD_PER_STEP)
    np.testing.assert_allclose(arm.read_joints(), goal, atol=robot.RAD_PER_STEP)
    np.testing.assert_allclose(port.joint_radians(), goal, atol=robot.RAD_PER_STEP)


def test_goals_clamped_and_step_limited():
    port = SimBus(max_speed=4000)
    arm = connected_arm(port, max_step=0.1)
    arm.torque_on()
    start = arm.read_joints()
    sent = arm.send_action(start + 1.0)
    np.testing.assert_allclose(sent - start, 0.1, atol=robot.RAD_PER_STEP)   # at most max_step per tick
    for _ in range(100):
        arm.read_joints()
        sent = arm.send_action(JOINT_HIGH + 5.0)
    np.testing.assert_allclose(sent, JOINT_HIGH, atol=robot.RAD_PER_STEP)      # never past the range
    goals = ServoBus(port).sync_read("goal_position", MOTOR_IDS)
    assert goals == [arm.calibration.joints[n].range_max for n in JOINT_NAMES]
    with pytest.raises(ValueError):
        arm.send_action([np.nan] * 6)


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_torque_off_after_an_exception(exception):
    port = SimBus()
    with pytest.raises(exception):
        with SO100Arm(port, robot.sim_calibration()) as arm:
            arm.torque_on()
            assert all(s.get("torque_enable") == 1 for s in port.servos)
            raise exception()
    assert all(s.get("torque_enable") == 0 for s in port.servos)
    assert not port.is_open


def test_torque_off_even_when_a_servo_faults():
    port = SimBus()
    with pytest.raises(ServoFaultError):
        with SO100Arm(port, robot.sim_calibration()) as arm:
            arm.torque_on()
            port.inject("overload", servo_id=6)
            arm.read_joints()
    assert all(s.get("torque_enable") == 0 for s in port.servos)


def test_absent_port_gives_a_clear_message(capsys):
    with pytest.raises(PortNotFoundError, match="serial port /dev/ttyNOPE0 not found: is the arm plugged in"):
        SO100Arm("/dev/ttyNOPE0").connect()
    assert robot.main(["read", "--port", "/dev/ttyNOPE0"]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "ls /dev/ttyACM*" in err and "Traceback" not in err


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a POSIX pseudo-terminal")
def test_real_serial_port_through_a_pty():
    """pyserial.Serial on one end of a pseudo-terminal, a SimBus on the other: the real-port code path."""
    master, slave = os.openpty()
    port = SimBus(ids=(1, 2, 3, 4, 6))   # wrist_roll unplugged
    stop = threading.Event()

    def pump():
        while not stop.is_set():
            if select.select([master], [], [], 0.01)[0]:
                port.write(os.read(master, 4096))
                os.write(master, port.read(4096))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        with pytest.raises(NoReplyError, match="servo 5 \\(wrist_roll\\)"):   # a real timeout
            SO100Arm(os.ttyname(slave), robot.sim_calibration()).connect()
        port.servos.append(robot.SimServo(5, joint=4))
        with SO100Arm(os.ttyname(slave), robot.sim_calibration()) as arm:
            arm.torque_on()
            for _ in range(10):
                arm.read_joints()
                arm.send_action(JOINT_MID + 0.2)
            np.testing.assert_allclose(arm.read_joints(), JOINT_MID + 0.2, atol=robot.RAD_PER_STEP)
        for _ in range(100):   # the pump thread may still be handing over the torque-off packet
            if all(s.get("torque_enable") == 0 for s in port.servos):
                break
            time.sleep(0.01)
        assert all(s.get("torque_enable") == 0 for s in port.servos)
    finally:
        stop.set()
        thread.join()
        os.close(slave)
        os.close(master)


# ---- procedures and the command line on the simulated bus --------------------------------------------------

def test_scan_and_setup_id():
    port = SimBus(ids=(1,), baud_index=4)           # a factory motor left at 115,200 baud
    assert robot.scan(port, ids=range(10)) == [(115_200, 1, 777)]
    assert robot.setup_id(port, 6) == (115_200, 1)
    assert robot.scan(port, ids=range(10)) == [(1_000_000, 6, 777)]
    with pytest.raises(ArmError, match="connect only the one motor"):
        robot.setup_id(SimBus(ids=(1, 2)), 3)


def test_cli_on_sim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert robot.main(["scan", "--port", "sim"]) == 0
    assert capsys.readouterr().out.count("model 777") == 6
    assert robot.main(["setup-id", "--port", "sim", "--joint", "elbow_flex"]) == 0
    assert "now ID 3" in capsys.readouterr().out
    assert robot.main(["calibrate", "--port", "sim"]) == 0
    assert Calibration.load("calibration/sim_follower.json").joints["wrist_roll"].homing_offset == 1853
    assert robot.main(["read", "--port", "sim", "--seconds", "0.05"]) == 0
    assert "shoulder_pan" in capsys.readouterr().out
    assert robot.main(["teleop", "--port", "sim", "--leader-port", "sim", "--seconds", "0.3", "--fps", "100"]) == 0
    assert "ticks" in capsys.readouterr().out


# ---- the MuJoCo backend (needs sim.SO100Env) ---------------------------------------------------------------

def mujoco_sim():
    sim = pytest.importorskip("sim")
    if not hasattr(sim, "SO100Env"):
        pytest.skip("sim.SO100Env not available yet")
    return sim


def test_mujoco_backend_tracks_the_env():
    mujoco_sim()
    port = SimBus.with_mujoco(seed=0)
    with SO100Arm(port, robot.sim_calibration(), ArmConfig(max_step=None)) as arm:
        np.testing.assert_allclose(arm.read_joints(), port.obs["state"], atol=2 * robot.RAD_PER_STEP)
        arm.torque_on()
        goal = arm.read_joints() + np.array([0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
        ticks = port.ticks
        for _ in range(8):
            arm.send_action(goal)
        assert port.ticks == ticks + 8                # one env step per goal SYNC_WRITE
        assert abs(arm.read_joints()[0] - goal[0]) < 0.05


def test_cli_record_replay_run_on_mujoco(tmp_path, monkeypatch, capsys):
    mujoco_sim()
    monkeypatch.chdir(tmp_path)
    written = []
    fake_data = types.ModuleType("data")
    fake_data.write_demo_episode = lambda root, ep: written.append(ep) or f"{root}/episode_{len(written)}"
    fake_data.read_demo_episodes = lambda root: written
    monkeypatch.setitem(sys.modules, "data", fake_data)
    args = ["--port", "sim", "--leader-port", "sim", "--seconds", "0.5", "--fps", "10"]
    assert robot.main(["record", *args, "--root", "demos"]) == 0
    ep = written[0]
    T = len(ep["actions"])
    assert ep["images"].shape == (T, 96, 96, 3) and ep["images"].dtype == np.uint8
    assert ep["states"].shape == ep["actions"].shape == (T, 6) and ep["states"].dtype == np.float32
    assert ep["source"] == "sim" and isinstance(ep["instruction"], str) and ep["instruction"]
    assert robot.main(["replay", "--port", "sim", "--root", "demos", "--index", "0"]) == 0
    assert "replayed" in capsys.readouterr().out

    seen = []

    class FakePolicy:
        image_size = 64
        config = {"render_reference": "a picture"}

        @classmethod
        def load(cls, path):
            return cls()

        def reset(self):
            pass

        def act(self, obs, instruction):
            seen.append((obs["image"].shape, obs["state"].shape, instruction))
            return obs["state"]

    fake_model = types.ModuleType("model")
    fake_model.Policy = FakePolicy
    monkeypatch.setitem(sys.modules, "model", fake_model)
    checks = []  # in simulation, run compares the checkpoint's renderer with this machine's (data.render_check)
    fake_data.render_check = lambda config, name: checks.append((config["render_reference"], name))
    assert robot.main(["run", "--port", "sim", "--ckpt", "ckpt", "--seconds", "0.5", "--fps", "10"]) == 0
    assert checks == [("a picture", "ckpt")]
    assert seen[0][:2] == ((64, 64, 3), (6,)) and len(seen) == 5
    assert "task failed" in capsys.readouterr().out
