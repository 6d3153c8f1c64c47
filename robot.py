"""Drive a real SO-100 arm (six Feetech STS3215 serial bus servos) -- or a simulated one -- from a laptop.

What is in this file, top to bottom:
  1. the joint table and the simulator's joint ranges (radians), shared with sim.py
  2. the Feetech "protocol 0" packets: checksum, sign-magnitude values, status error bits
  3. ServoBus: PING / READ / WRITE / REG_WRITE / ACTION / SYNC_READ / SYNC_WRITE over a serial port,
     with timeouts and retries and error messages that say what to check
  4. SimBus: a stand-in for the serial port that answers byte for byte like a chain of STS3215 servos,
     either "ideal" servos (no physics, fast tests) or sim.py's MuJoCo arm; faults can be injected
  5. Calibration: homing offsets and ranges (steps) <-> simulator joint radians, saved as JSON
  6. SO100Arm: connect, configure, torque on/off, read all joints, send all goals safely
  7. the commands below, and main()

Units: the servos count "steps", 4096 per turn (0..4095); this file converts them to the simulator's joint
radians so that a policy trained in sim.py sees the same numbers on the real arm.

Commands (PORT is e.g. /dev/ttyACM0 on Linux, /dev/tty.usbmodem58760431 on macOS, COM3 on Windows,
or `sim` for the simulated arm in every command):
  python robot.py scan --port PORT                  # which servo IDs answer, at which baud rate
  python robot.py setup-id --port PORT --joint gripper   # give the one connected motor its ID (6)
  python robot.py calibrate --port PORT --arm follower   # middle pose + range sweep -> calibration/*.json
  python robot.py read --port PORT                  # print the joint angles live
  python robot.py teleop --leader-port PORT2 --port PORT # leader arm (moved by hand) -> follower arm
  python robot.py record --leader-port PORT2 --port PORT --root demos --episodes 5
  python robot.py replay --port PORT --root demos --index 0
  python robot.py run --port PORT --ckpt checkpoints/latest   # a trained policy in a control loop
A webcam (record, run on a real arm) needs OpenCV: pip install opencv-python.
"""

import argparse
import errno
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# The joints. The simulator owns the joint ranges; fall back to the same numbers if sim.py cannot be imported
# (e.g. MuJoCo missing on the laptop that drives the real arm).

try:
    from sim import JOINT_HIGH, JOINT_LOW, JOINT_NAMES
except Exception:  # ImportError, or a broken/missing MuJoCo install
    JOINT_NAMES = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
    JOINT_LOW = (-1.92, -3.32, -0.17, -1.66, -2.79, -0.17)   # radians, from the public MuJoCo model
    JOINT_HIGH = (1.92, 0.17, 3.14, 1.66, 2.79, 1.75)

JOINT_NAMES = tuple(JOINT_NAMES)
JOINT_LOW = np.asarray(JOINT_LOW, dtype=np.float64)    # (6,) radians
JOINT_HIGH = np.asarray(JOINT_HIGH, dtype=np.float64)  # (6,) radians
JOINT_MID = (JOINT_LOW + JOINT_HIGH) / 2               # (6,) the middle pose, where the servos read 2047
MOTOR_IDS = (1, 2, 3, 4, 5, 6)                         # servo ID of each joint, in JOINT_NAMES order
GRIPPER = JOINT_NAMES.index("gripper")
WRIST_ROLL = JOINT_NAMES.index("wrist_roll")

STEPS_PER_TURN = 4096
RAD_PER_STEP = 2 * math.pi / STEPS_PER_TURN   # 0.00153 rad = 0.088 degrees
MIDDLE = 2047                                 # the reading of every joint in the middle pose after calibration

# ----------------------------------------------------------------------------------------------------------
# Protocol constants (Feetech "protocol 0", STS/SMS series)

HEADER = b"\xff\xff"
BROADCAST_ID = 0xFE   # every servo obeys; none replies (except in turn to a SYNC_READ)
PING, READ, WRITE, REG_WRITE, ACTION, RESET, SYNC_READ, SYNC_WRITE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x0A, 0x82, 0x83

# baud rate index (register 6) -> bits per second
BAUD_RATES = {0: 1_000_000, 1: 500_000, 2: 250_000, 3: 128_000, 4: 115_200}
DEFAULT_BAUD = 1_000_000

# name -> (address, bytes, sign bit or None). Values are little-endian; negative values are sign-magnitude
# with the sign in the given bit (not two's complement).
REGISTERS = {
    "model_number":       (3, 2, None),   # EEPROM, read-only: 777 for the STS3215
    "id":                 (5, 1, None),
    "baud_rate":          (6, 1, None),   # index into BAUD_RATES
    "return_delay":       (7, 1, None),   # units of 2 us; 0 = answer at once
    "min_angle_limit":    (9, 2, None),
    "max_angle_limit":    (11, 2, None),
    "max_torque_limit":   (16, 2, None),  # 0..1000 (per mille of stall torque)
    "p_coefficient":      (21, 1, None),
    "d_coefficient":      (22, 1, None),
    "i_coefficient":      (23, 1, None),
    "protection_current": (28, 2, None),
    "homing_offset":      (31, 2, 11),    # present = actual - offset, so it holds -2047..2047
    "operating_mode":     (33, 1, None),  # 0 position, 1 speed, 2 PWM, 3 step
    "overload_torque":    (36, 1, None),  # percent
    "torque_enable":      (40, 1, None),  # RAM from here on
    "acceleration":       (41, 1, None),
    "goal_position":      (42, 2, 15),
    "goal_time":          (44, 2, None),
    "goal_speed":         (46, 2, 15),
    "torque_limit":       (48, 2, None),
    "lock":               (55, 1, None),  # 1 = EEPROM write-protected
    "present_position":   (56, 2, 15),
    "present_speed":      (58, 2, 15),
    "present_load":       (60, 2, 10),
    "present_voltage":    (62, 1, None),  # 0.1 V
    "present_temperature": (63, 1, None), # deg C
    "moving":             (66, 1, None),
    "present_current":    (69, 2, None),
}
EEPROM_END = 40                          # addresses below this live in EEPROM (guarded by the lock register)
READ_ONLY = {3, 4} | set(range(56, 71))  # model number and the "present ..." registers
STS3215_MODEL = 777

# status error byte: bit -> (name, what to do about it)
ERROR_BITS = {
    0: ("input voltage error", "check the power supply: voltage, current rating, and its plug"),
    1: ("angle sensor error", "power-cycle the arm; if it comes back, the servo's sensor is faulty"),
    2: ("overheat", "let the servo cool down and give it less load"),
    3: ("over-current", "the joint is blocked or pushing hard: free it, or lower the P gain"),
    5: ("overload", "the joint stalled (e.g. the gripper squeezing an object) and the servo cut its torque: "
                    "free the joint and power-cycle the arm"),
}


def checksum(body: bytes) -> int:
    """Bitwise NOT of the low byte of the sum of everything after the two header bytes."""
    return ~sum(body) & 0xFF


def instruction_packet(servo_id: int, instruction: int, params: bytes = b"") -> bytes:
    """FF FF | ID | LEN | INSTR | P1..Pn | CHK, with LEN = n + 2."""
    body = bytes([servo_id, len(params) + 2, instruction]) + bytes(params)
    return HEADER + body + bytes([checksum(body)])


def status_packet(servo_id: int, error: int, data: bytes = b"") -> bytes:
    """FF FF | ID | LEN | ERR | data | CHK, with LEN = len(data) + 2. What a servo sends back."""
    body = bytes([servo_id, len(data) + 2, error]) + bytes(data)
    return HEADER + body + bytes([checksum(body)])


def parse_status(packet: bytes) -> tuple:
    """Split a complete status packet into (servo_id, error byte, data). Raises ValueError if malformed."""
    if len(packet) < 6 or packet[:2] != HEADER:
        raise ValueError(f"not a status packet: {packet.hex(' ')}")
    servo_id, length, error = packet[2], packet[3], packet[4]
    if len(packet) != length + 4:
        raise ValueError(f"length field says {length + 4} bytes, got {len(packet)}")
    if checksum(packet[2:-1]) != packet[-1]:
        raise ValueError(f"checksum mismatch (got {packet[-1]:#04x}, expected {checksum(packet[2:-1]):#04x})")
    return servo_id, error, bytes(packet[5:-1])


def to_sign_magnitude(value: int, sign_bit: int) -> int:
    """-5 with sign bit 15 -> 0x8005. Magnitudes must fit below the sign bit."""
    magnitude = abs(int(value))
    if magnitude >= 1 << sign_bit:
        raise ValueError(f"{value} does not fit: magnitude must be below {1 << sign_bit} (sign bit {sign_bit})")
    return magnitude | (1 << sign_bit) if value < 0 else magnitude


def from_sign_magnitude(raw: int, sign_bit: int) -> int:
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


def encode_value(register: str, value: int) -> bytes:
    """A register value as the little-endian bytes the servo expects. Out-of-range values are refused."""
    _, size, sign_bit = REGISTERS[register]
    raw = int(value) if sign_bit is None else to_sign_magnitude(value, sign_bit)
    if not 0 <= raw < 1 << (8 * size):
        raise ValueError(f"{register}: {value} does not fit in {size} byte(s)")
    return raw.to_bytes(size, "little")


def decode_value(register: str, data: bytes) -> int:
    _, size, sign_bit = REGISTERS[register]
    raw = int.from_bytes(data[:size], "little")
    return raw if sign_bit is None else from_sign_magnitude(raw, sign_bit)


def decode_errors(error: int) -> list:
    """The status error byte as a list of names, e.g. 0x21 -> ['input voltage error', 'overload']."""
    return [ERROR_BITS[bit][0] if bit in ERROR_BITS else f"unknown error bit {bit}"
            for bit in range(8) if error & (1 << bit)]


# ----------------------------------------------------------------------------------------------------------
# Errors that reach the person at the keyboard. The CLI prints their message instead of a traceback.

class ArmError(Exception):
    """Something went wrong with the arm; the message says what to check."""


class PortNotFoundError(ArmError):
    pass


class NoReplyError(ArmError):
    pass


class BadReplyError(ArmError):
    pass


class ServoFaultError(ArmError):
    def __init__(self, message, servo_id=None, errors=()):
        super().__init__(message)
        self.servo_id, self.errors = servo_id, list(errors)


class CalibrationError(ArmError):
    pass


def port_not_found_message(port: str) -> str:
    message = (f"serial port {port} not found: is the arm plugged in and powered? "
               "on Linux try ls /dev/ttyACM*; on macOS ls /dev/tty.usbmodem*; on Windows look in Device Manager")
    try:
        from serial.tools import list_ports
        found = [p.device for p in list_ports.comports()]
        message += f" (ports seen now: {', '.join(found) if found else 'none'})"
    except Exception:
        pass
    return message


def open_port(port: str, baudrate: int = DEFAULT_BAUD, timeout: float = 0.05):
    """Open a real serial port (pyserial), turning the usual failures into messages a hobbyist can act on."""
    import serial
    if not port.upper().startswith("COM") and not os.path.exists(port):
        raise PortNotFoundError(port_not_found_message(port))
    try:
        return serial.Serial(port, baudrate=baudrate, timeout=timeout)
    except serial.SerialException as e:
        if e.errno == errno.ENOENT or isinstance(e, FileNotFoundError):
            raise PortNotFoundError(port_not_found_message(port)) from None
        if e.errno == errno.EACCES:
            raise ArmError(f"permission denied on {port}: on Linux run  sudo usermod -aG dialout $USER  then log "
                           "out and in again (or, for this session only, sudo chmod 666 " + port + ")") from None
        if e.errno == errno.EBUSY:
            raise ArmError(f"{port} is busy: another program (another robot.py, a serial monitor) has it open")
        raise ArmError(f"could not open {port}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# ServoBus: the protocol over any object with pyserial's write/read/reset_input_buffer/baudrate.

class _ReplyProblem(Exception):
    """A missing or damaged reply; retried, then turned into NoReplyError/BadReplyError."""

    def __init__(self, servo_id, missing, reason):
        super().__init__(reason)
        self.servo_id, self.missing, self.reason = servo_id, missing, reason


class ServoBus:
    """Instructions to Feetech servos over one serial port.

    Registers are named (see REGISTERS) and values are plain ints; the sign-magnitude and little-endian
    encoding happen here. A missing or corrupted reply (no bytes, truncated, bad checksum, wrong ID) is
    retried `retries` more times -- under load these are transient -- and then raised with a message.
    A reply whose error byte is set is raised at once as ServoFaultError: retrying does not fix a fault.
    """

    def __init__(self, port, retries: int = 2, names: dict | None = None):
        self.port = port
        self.retries = retries
        self.names = dict(zip(MOTOR_IDS, JOINT_NAMES)) if names is None else names

    def who(self, servo_id: int) -> str:
        return f"servo {servo_id} ({self.names[servo_id]})" if servo_id in self.names else f"servo {servo_id}"

    # -- one status packet ---------------------------------------------------------------------------------
    def _receive(self, expected_id: int) -> tuple:
        """Read one status packet from expected_id -> (error, data)."""
        buf = bytearray(self.port.read(4))
        skipped = 0
        # slide past stray bytes until FF FF <id != FF>; read() returns fewer bytes when the timeout passes
        while len(buf) >= 4 and not (buf[0] == 0xFF and buf[1] == 0xFF and buf[2] != 0xFF):
            buf = buf[1:] + self.port.read(1)
            skipped += 1
            if skipped > 64:
                raise _ReplyProblem(expected_id, False, "no packet header in the reply")
        if not buf:
            raise _ReplyProblem(expected_id, True, "no reply")
        if len(buf) < 4:
            raise _ReplyProblem(expected_id, False, "truncated reply")
        rest = self.port.read(buf[3])
        if len(rest) < buf[3]:
            raise _ReplyProblem(expected_id, False, "truncated reply")
        try:
            servo_id, error, data = parse_status(bytes(buf) + rest)
        except ValueError as e:
            raise _ReplyProblem(expected_id, False, str(e)) from None
        if servo_id != expected_id:
            raise _ReplyProblem(expected_id, False, f"the reply came from servo {servo_id}: two servos share an ID?")
        if error:
            names = decode_errors(error)
            hints = "; ".join(ERROR_BITS[b][1] for b in ERROR_BITS if error & (1 << b))
            raise ServoFaultError(f"{self.who(servo_id)} reports {', '.join(names)}: {hints or 'power-cycle it'}",
                                  servo_id, names)
        return error, data

    def _transact(self, servo_id: int, instruction: int, params: bytes, reply_ids, retries=None) -> list:
        """Send one instruction packet and collect one status packet per ID in reply_ids -> [data, ...]."""
        retries = self.retries if retries is None else retries
        packet = instruction_packet(servo_id, instruction, params)
        for attempt in range(retries + 1):
            self.port.reset_input_buffer()   # drop leftovers of an earlier failed exchange
            self.port.write(packet)
            try:
                return [self._receive(i)[1] for i in reply_ids]
            except _ReplyProblem as problem:
                last = problem
        who, baud, tries = self.who(last.servo_id), self.port.baudrate, retries + 1
        if last.missing:
            raise NoReplyError(f"no reply from {who} at {baud} baud ({tries} tries): check its cable and power; "
                               "a new motor may still have the factory ID 1 (see setup-id)")
        raise BadReplyError(f"bad reply from {who} at {baud} baud ({last.reason}; {tries} tries): check the cable "
                            "and its connectors, and that no other program uses the port")

    def _send(self, servo_id: int, instruction: int, params: bytes = b""):
        """Send without waiting for a reply (broadcast, SYNC_WRITE)."""
        self.port.write(instruction_packet(servo_id, instruction, params))

    # -- the instructions ----------------------------------------------------------------------------------
    def ping(self, servo_id: int, retries: int | None = None) -> bool:
        try:
            self._transact(servo_id, PING, b"", [servo_id], retries)
            return True
        except NoReplyError:
            return False

    def read_bytes(self, servo_id: int, address: int, count: int) -> bytes:
        data = self._transact(servo_id, READ, bytes([address, count]), [servo_id])[0]
        if len(data) != count:
            raise BadReplyError(f"{self.who(servo_id)} sent {len(data)} bytes, asked for {count}")
        return data

    def write_bytes(self, servo_id: int, address: int, data: bytes):
        self._transact(servo_id, WRITE, bytes([address]) + bytes(data), [servo_id])

    def read(self, servo_id: int, register: str) -> int:
        address, size, _ = REGISTERS[register]
        return decode_value(register, self.read_bytes(servo_id, address, size))

    def write(self, servo_id: int, register: str, value: int):
        self.write_bytes(servo_id, REGISTERS[register][0], encode_value(register, value))

    def write_no_reply(self, servo_id: int, register: str, value: int):
        """A WRITE whose reply we do not wait for: used when changing the servo's ID or baud rate, where it is
        not obvious under which ID/baud the answer will come back."""
        self._send(servo_id, WRITE, bytes([REGISTERS[register][0]]) + encode_value(register, value))
        time.sleep(0.005)
        self.port.reset_input_buffer()

    def reg_write(self, servo_id: int, register: str, value: int):
        """Like write, but the servo holds the value until ACTION: moves several servos at the same instant."""
        payload = bytes([REGISTERS[register][0]]) + encode_value(register, value)
        self._transact(servo_id, REG_WRITE, payload, [servo_id])

    def action(self):
        self._send(BROADCAST_ID, ACTION)

    def sync_read(self, register: str, ids) -> list:
        """One packet asks every listed servo; they answer in turn. Returns [value, ...] in the order of ids."""
        address, size, _ = REGISTERS[register]
        ids = list(ids)
        datas = self._transact(BROADCAST_ID, SYNC_READ, bytes([address, size] + ids), ids)
        return [decode_value(register, d) for d in datas]

    def sync_write(self, register: str, values: dict):
        """One packet sets the register on every servo in {id: value}; nobody replies."""
        address, size, _ = REGISTERS[register]
        params = bytearray([address, size])
        for servo_id, value in values.items():
            params += bytes([servo_id]) + encode_value(register, value)
        self._send(BROADCAST_ID, SYNC_WRITE, bytes(params))


# ----------------------------------------------------------------------------------------------------------
# SimBus: a serial-port stand-in that answers like a chain of STS3215 servos.
#
# Each simulated servo has a 256-byte register file and an encoder reading `actual` (steps, 0..4096).
# How the encoder sits on the joint is fixed by SIM_ENCODER_AT_MIDDLE, like a real arm assembled without
# care for the horn angle: the homing offset found by calibration must undo it. wrist_roll's travel crosses
# the encoder's wrap point (3900 +- 1819), the case the homing offset exists for.

SIM_ENCODER_AT_MIDDLE = (2300, 1700, 2150, 1900, 3900, 2600)   # raw steps at JOINT_MID, per joint


def sim_joint_to_encoder(joint: int, q: float) -> float:
    """Simulated arm: joint radians -> raw encoder steps in [0, 4096)."""
    return (SIM_ENCODER_AT_MIDDLE[joint] + (q - JOINT_MID[joint]) / RAD_PER_STEP) % STEPS_PER_TURN


def sim_encoder_to_joint(joint: int, actual: float) -> float:
    d = (actual - SIM_ENCODER_AT_MIDDLE[joint] + STEPS_PER_TURN / 2) % STEPS_PER_TURN - STEPS_PER_TURN / 2
    return JOINT_MID[joint] + d * RAD_PER_STEP


class SimServo:
    def __init__(self, servo_id: int, joint: int, baud_index: int = 0):
        self.regs = bytearray(256)
        self.joint = joint          # which simulated joint it drives (kept when its ID changes)
        self.actual = sim_joint_to_encoder(joint, JOINT_MID[joint])
        self.error = 0              # status error bits, sticky until power_cycle()
        self.pending = None         # (address, data) from REG_WRITE, applied by ACTION
        for register, value in [("model_number", STS3215_MODEL), ("id", servo_id), ("baud_rate", baud_index),
                                ("return_delay", 250), ("max_angle_limit", 4095), ("max_torque_limit", 1000),
                                ("p_coefficient", 32), ("d_coefficient", 32), ("protection_current", 500),
                                ("overload_torque", 80), ("torque_limit", 1000), ("lock", 1),
                                ("present_voltage", 120), ("present_temperature", 30)]:
            self.set(register, value)
        self.set("goal_position", self.present())

    def get(self, register: str) -> int:
        address, size, _ = REGISTERS[register]
        return decode_value(register, self.regs[address:address + size])

    def set(self, register: str, value: int):
        address, size, _ = REGISTERS[register]
        self.regs[address:address + size] = encode_value(register, value)

    @property
    def id(self) -> int:
        return self.regs[5]

    @property
    def baudrate(self) -> int:
        return BAUD_RATES.get(self.regs[6], -1)

    def present(self) -> float:
        """present = actual - homing offset, within one turn."""
        return (self.actual - self.get("homing_offset")) % STEPS_PER_TURN

    def write(self, address: int, data: bytes):
        for i, byte in enumerate(data):
            a = address + i
            if a in READ_ONLY or (a < EEPROM_END and self.regs[55]):
                continue  # like the real servo: read-only bytes, and EEPROM while locked, are left unchanged
            self.regs[a] = byte

    def goal_steps(self) -> int:
        """The goal, clamped by the servo itself to its EEPROM angle limits."""
        low, high = self.get("min_angle_limit"), self.get("max_angle_limit")
        goal = self.get("goal_position")
        return min(max(goal, low), high) if low < high else goal

    def drives(self) -> bool:
        return self.get("torque_enable") == 1 and not self.error & 0x20  # overload cuts torque


class SimBus:
    """Serial-port stand-in: write() instruction bytes, read() the servos' answers, byte for byte.

    env=None -> "ideal" servos: each control tick (each goal SYNC_WRITE/WRITE) every torqued servo moves
                toward its goal by at most max_speed steps. With torque off, `hand()` (if set) is the
                person moving the joints: it returns (6,) joint radians, applied before each read.
    env=SO100Env -> the MuJoCo arm: each goal write steps the env once, with the goals as joint targets;
                positions come from obs["state"]. The last obs/info are in .obs and .info.

    Faults for tests: inject("drop" | "checksum" | "wrong_id" | "truncate", times) spoils the next replies;
    inject("overload", servo_id=6) sets the overload error bit until power_cycle().
    A servo only hears packets sent at its own baud rate (register 6).
    """

    def __init__(self, ids=MOTOR_IDS, baudrate: int = DEFAULT_BAUD, baud_index: int = 0, env=None, seed=None,
                 max_speed: float = 80.0):
        self.port = "sim"
        self.baudrate = baudrate
        self.timeout = 0.0      # reads never wait: a missing reply shows up at once as b""
        self.is_open = True
        self.servos = [SimServo(i, joint=(i - 1) % 6, baud_index=baud_index) for i in ids]
        self.max_speed = max_speed   # steps per tick for the ideal servos (80 steps ~ 0.12 rad)
        self.hand = None
        self.faults = []             # pending reply faults, consumed one per reply
        self.ticks = 0
        self._in, self._out = bytearray(), bytearray()
        self.env, self.obs, self.info = env, None, {}
        self.reward, self.terminated, self.truncated = 0.0, False, False
        if env is not None:
            self.reset_env(seed)

    @classmethod
    def with_mujoco(cls, seed=None, image_size: int = 96, split: str = "train", **kwargs):
        """A SimBus driving sim.py's MuJoCo arm (imported only here)."""
        try:
            import sim
            env = sim.SO100Env(image_size=image_size, split=split)
        except (ImportError, AttributeError) as e:
            raise ArmError(f"the simulated arm needs sim.py with SO100Env and MuJoCo (pip install mujoco): {e}")
        except RuntimeError as e:   # e.g. sim.RenderError: no OpenGL; its message says what to install
            raise ArmError(str(e)) from None
        return cls(env=env, seed=seed, **kwargs)

    def reset_env(self, seed=None):
        """A new episode on the MuJoCo arm (a new table); the servos keep their registers."""
        self.obs, self.info = self.env.reset(seed=seed)
        self.reward, self.terminated, self.truncated = 0.0, False, False
        self._positions_from_env()

    # -- the pyserial methods robot.py uses ----------------------------------------------------------------
    def write(self, data: bytes) -> int:
        self._in += data
        while (packet := self._take_packet()) is not None:
            self._handle(*packet)
        return len(data)

    def read(self, size: int = 1) -> bytes:
        out = bytes(self._out[:size])
        del self._out[:size]
        return out

    @property
    def in_waiting(self) -> int:
        return len(self._out)

    def reset_input_buffer(self):
        self._out.clear()

    def reset_output_buffer(self):
        pass

    def flush(self):
        pass

    def close(self):
        self.is_open = False

    # -- test hooks -----------------------------------------------------------------------------------------
    def inject(self, fault: str, times: int = 1, servo_id: int = 6):
        if fault == "overload":
            servo = self.servo(servo_id)
            servo.error |= 0x20
            servo.set("torque_enable", 0)
        elif fault in ("drop", "checksum", "wrong_id", "truncate"):
            self.faults += [fault] * times
        else:
            raise ValueError(f"unknown fault {fault!r}")

    def power_cycle(self):
        for s in self.servos:
            s.error, s.pending = 0, None
            s.set("torque_enable", 0)
            s.set("lock", 1)

    def servo(self, servo_id: int) -> SimServo:
        return next(s for s in self.servos if s.id == servo_id)

    def joint_radians(self) -> np.ndarray:
        """The simulated arm's true joint angles (6,) radians, for checking the driver."""
        q = JOINT_MID.copy()
        for s in self.servos:
            q[s.joint] = sim_encoder_to_joint(s.joint, s.actual)
        return q

    def set_by_hand(self, q):
        """Move the joints whose torque is off to q (6,) radians, as a person would; hard stops apply."""
        for s in self.servos:
            if not s.drives():
                joint = s.joint
                s.actual = sim_joint_to_encoder(joint, float(np.clip(q[joint], JOINT_LOW[joint], JOINT_HIGH[joint])))

    # -- packets in, packets out ----------------------------------------------------------------------------
    def _take_packet(self):
        start = self._in.find(HEADER)
        if start < 0:
            del self._in[:-1]
            return None
        del self._in[:start]
        if len(self._in) < 4 or len(self._in) < 4 + self._in[3]:
            return None
        packet = bytes(self._in[:4 + self._in[3]])
        del self._in[:len(packet)]
        if checksum(packet[2:-1]) != packet[-1] or packet[3] < 2:
            return self._take_packet()   # a corrupted instruction: real servos ignore it
        return packet[2], packet[4], packet[5:-1]   # id, instruction, params

    def _reply(self, servo: SimServo, data: bytes = b""):
        packet = bytearray(status_packet(servo.id, servo.error, data))
        fault = self.faults.pop(0) if self.faults else None
        if fault == "drop":
            return
        if fault == "checksum":
            packet[-1] ^= 0xFF
        elif fault == "wrong_id":
            packet = bytearray(status_packet((servo.id + 1) % 253, servo.error, data))
        elif fault == "truncate":
            packet = packet[:-2]
        self._out += packet

    def _handle(self, target: int, instruction: int, params: bytes):
        listening = [s for s in self.servos if s.baudrate == self.baudrate]
        if instruction == SYNC_READ and target == BROADCAST_ID:
            address, count = params[0], params[1]
            self._before_read()
            for servo_id in params[2:]:  # each listed servo answers in turn
                for s in listening:
                    if s.id == servo_id:
                        self._reply(s, bytes(s.regs[address:address + count]))
            return
        if instruction == SYNC_WRITE and target == BROADCAST_ID:
            address, count = params[0], params[1]
            for k in range(2, len(params), count + 1):
                for s in listening:
                    if s.id == params[k]:
                        s.write(address, params[k + 1:k + 1 + count])
            if address == REGISTERS["goal_position"][0]:
                self._tick()
            return
        for s in listening:
            if target not in (s.id, BROADCAST_ID):
                continue
            reply = target != BROADCAST_ID   # broadcast is obeyed silently
            if instruction == PING:
                pass
            elif instruction == READ:
                self._before_read()
                address, count = params[0], params[1]
                if reply:
                    self._reply(s, bytes(s.regs[address:address + count]))
                continue
            elif instruction in (WRITE, REG_WRITE):
                if reply:  # answered before the write takes effect: a new ID or baud applies afterwards
                    self._reply(s)
                    reply = False
                if instruction == WRITE:
                    s.write(params[0], params[1:])
                    if params[0] == REGISTERS["goal_position"][0]:
                        self._tick()
                else:
                    s.pending = (params[0], params[1:])
            elif instruction == ACTION:
                if s.pending:
                    s.write(*s.pending)
                    s.pending = None
            else:
                continue  # RESET and unknown instructions are not simulated
            if reply:
                self._reply(s)
        if instruction == ACTION:
            self._tick()

    def _before_read(self):
        """Refresh the 'present' registers; let the hand move the limp joints first."""
        if self.env is None and self.hand is not None:
            q = self.hand()
            if q is not None:
                self.set_by_hand(q)
        for s in self.servos:
            s.set("present_position", int(round(s.present())) % STEPS_PER_TURN)
            s.set("moving", int(s.drives() and abs(s.goal_steps() - s.present()) > 2))

    def _tick(self):
        """One control period."""
        self.ticks += 1
        if self.env is None:   # ideal servos: move in present-position coordinates by a bounded step
            for s in self.servos:
                if s.drives():
                    p = s.present()
                    p += float(np.clip(s.goal_steps() - p, -self.max_speed, self.max_speed))
                    q = sim_encoder_to_joint(s.joint, (p + s.get("homing_offset")) % STEPS_PER_TURN)
                    q = float(np.clip(q, JOINT_LOW[s.joint], JOINT_HIGH[s.joint]))   # hard stops
                    s.actual = sim_joint_to_encoder(s.joint, q)
            return
        target = np.asarray(self.obs["state"], dtype=np.float64).copy()   # limp joints: hold where they are
        for s in self.servos:
            if s.drives():
                target[s.joint] = sim_encoder_to_joint(
                    s.joint, (s.goal_steps() + s.get("homing_offset")) % STEPS_PER_TURN)
        self.obs, self.reward, self.terminated, self.truncated, self.info = self.env.step(target)
        self._positions_from_env()

    def _positions_from_env(self):
        for s in self.servos:
            s.actual = sim_joint_to_encoder(s.joint, float(self.obs["state"][s.joint]))


# ----------------------------------------------------------------------------------------------------------
# Calibration: steps <-> the simulator's joint radians.
#
#   joints 0-4: q = mid + drive_sign * (steps - 2047) * 2pi/4096          mid = middle of the sim range
#   gripper:    q = low + f * (high - low),  f = (steps - min) / (max - min)  (1 - f if drive_sign = -1)

@dataclass
class JointCalibration:
    id: int
    drive_sign: int = 1       # -1 if the real joint turns the other way from the simulator's
    homing_offset: int = 0    # steps, written to the servo: the middle pose then reads 2047
    range_min: int = 0        # steps, as read after the offset, from the sweep
    range_max: int = 4095


@dataclass
class Calibration:
    joints: dict = field(default_factory=dict)   # joint name -> JointCalibration

    def validate(self, source: str = "calibration"):
        for name in JOINT_NAMES:
            if name not in self.joints:
                raise CalibrationError(f"{source}: joint {name!r} is missing; run calibrate again")
            j = self.joints[name]
            if abs(j.homing_offset) > 2047:
                raise CalibrationError(f"{source}: {name} homing offset {j.homing_offset} is outside -2047..2047; "
                                       "run calibrate again, with the arm in its middle pose")
            if not 0 <= j.range_min < j.range_max <= 4095:
                raise CalibrationError(f"{source}: {name} range {j.range_min}..{j.range_max} is empty or outside "
                                       "0..4095 (min must be below max); run calibrate again and sweep the joint "
                                       "through its whole range")
            if j.drive_sign not in (1, -1):
                raise CalibrationError(f"{source}: {name} drive_sign must be 1 or -1, not {j.drive_sign}")
        return self

    def save(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({name: asdict(j) for name, j in self.joints.items()}, f, indent=2)

    @classmethod
    def load(cls, path: str) -> "Calibration":
        if not os.path.exists(path):
            raise CalibrationError(f"no calibration file {path}: run  python robot.py calibrate  first")
        try:
            with open(path) as f:
                raw = json.load(f)
            joints = {name: JointCalibration(**fields) for name, fields in raw.items()}
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise CalibrationError(f"{path} is not a calibration file ({e}); run calibrate again") from None
        return cls(joints).validate(path)

    def ids(self) -> list:
        return [self.joints[name].id for name in JOINT_NAMES]

    def steps_to_radians(self, steps) -> np.ndarray:
        """(6,) present positions in steps -> (6,) float32 joint radians in the simulator's convention."""
        q = np.zeros(6, dtype=np.float32)
        for k, name in enumerate(JOINT_NAMES):
            j = self.joints[name]
            if k == GRIPPER:
                f = (steps[k] - j.range_min) / (j.range_max - j.range_min)
                f = 1 - f if j.drive_sign < 0 else f
                q[k] = JOINT_LOW[k] + f * (JOINT_HIGH[k] - JOINT_LOW[k])
            else:
                q[k] = JOINT_MID[k] + j.drive_sign * (steps[k] - MIDDLE) * RAD_PER_STEP
        return q

    def radians_to_steps(self, q) -> np.ndarray:
        """(6,) joint radians -> (6,) int goal steps, clamped to each joint's calibrated range."""
        steps = np.zeros(6, dtype=np.int64)
        for k, name in enumerate(JOINT_NAMES):
            j = self.joints[name]
            if k == GRIPPER:
                f = (q[k] - JOINT_LOW[k]) / (JOINT_HIGH[k] - JOINT_LOW[k])
                f = 1 - f if j.drive_sign < 0 else f
                s = j.range_min + f * (j.range_max - j.range_min)
            else:
                s = MIDDLE + j.drive_sign * (q[k] - JOINT_MID[k]) / RAD_PER_STEP
            steps[k] = int(np.clip(round(float(s)), j.range_min, j.range_max))
        return steps


def sim_calibration() -> Calibration:
    """The simulated arm's exact calibration (what calibrate --port sim should find)."""
    joints = {}
    for k, name in enumerate(JOINT_NAMES):
        offset = (SIM_ENCODER_AT_MIDDLE[k] - MIDDLE + 2048) % STEPS_PER_TURN - 2048
        half = int(round((JOINT_HIGH[k] - JOINT_LOW[k]) / 2 / RAD_PER_STEP))
        joints[name] = JointCalibration(MOTOR_IDS[k], 1, offset, MIDDLE - half, MIDDLE + half)
    return Calibration(joints)


# ----------------------------------------------------------------------------------------------------------
# The arm

@dataclass
class ArmConfig:
    p_gain: int = 16                    # the servo's default 32 makes the arm jitter
    i_gain: int = 0
    d_gain: int = 32
    gripper_torque_limit: int = 500     # of 1000: a jaw squeezing an object at full torque trips overload
    gripper_protection_current: int = 250
    gripper_overload_torque: int = 25   # percent
    max_step: float | None = 0.3        # rad: largest change of a goal in one tick (None: no limit)
    baudrate: int = DEFAULT_BAUD
    timeout: float = 0.05               # s to wait for a reply; ~1 ms is typical at 1 Mbaud
    retries: int = 2


class SO100Arm:
    """One SO-100 arm: six servos on one serial port, in the simulator's joint radians.

        with SO100Arm("/dev/ttyACM0", Calibration.load("calibration/follower.json")) as arm:
            arm.torque_on()
            q = arm.read_joints()            # (6,) float32 radians, one SYNC_READ
            arm.send_action(q + 0.1)         # clamped, step-limited, one SYNC_WRITE

    port is a device path, "sim" (a SimBus with the MuJoCo arm) or an already-open port object (e.g. a
    SimBus). Leaving the `with` block -- normally, by an exception or by Ctrl-C -- switches torque off.
    """

    def __init__(self, port, calibration: Calibration | None = None, config: ArmConfig | None = None,
                 name: str = "arm"):
        self.port_name = port if isinstance(port, str) else getattr(port, "port", "port")
        self.port = None if isinstance(port, str) else port
        self.calibration = calibration
        self.config = config or ArmConfig()
        self.name = name
        self.bus = None
        self.reference = None   # (6,) radians the next goal may step away from (last read or last goal)

    def __enter__(self):
        if self.bus is None:
            self.connect()
        return self

    def __exit__(self, *exc):
        self.disconnect()
        return False

    def connect(self) -> "SO100Arm":
        """Open the port, find and check the six servos, configure them. On failure the port is closed again."""
        cfg = self.config
        if self.port is None:
            self.port = SimBus.with_mujoco() if self.port_name == "sim" else \
                open_port(self.port_name, cfg.baudrate, cfg.timeout)
        self.bus = ServoBus(self.port, cfg.retries)
        try:
            self._find_and_configure()
        except BaseException:
            self.disconnect()
            raise
        return self

    def _find_and_configure(self):
        cfg = self.config
        ids = list(MOTOR_IDS)
        missing = [i for i in ids if not self.bus.ping(i)]
        if missing == ids:
            raise NoReplyError(f"no servo answered on {self.port_name} at {self.port.baudrate} baud: is the arm's "
                               "power supply on? is this the right port? (python robot.py scan --port ...)")
        if missing:
            raise NoReplyError("; ".join(f"no reply from {self.bus.who(i)} at {self.port.baudrate} baud" for i in missing)
                               + ": check its cable and power (a loose daisy-chain plug silences every servo "
                               "after it); a new motor needs its ID (python robot.py setup-id)")
        for i in ids:
            model = self.bus.read(i, "model_number")
            if model != STS3215_MODEL:
                raise ArmError(f"{self.bus.who(i)} is model {model}, not an STS3215 ({STS3215_MODEL}): "
                               "is this an SO-100 arm?")
        self.bus.sync_write("torque_enable", {i: 0 for i in ids})   # EEPROM is only written with torque off
        for i in ids:
            settings = {"return_delay": 0, "operating_mode": 0, "p_coefficient": cfg.p_gain,
                        "i_coefficient": cfg.i_gain, "d_coefficient": cfg.d_gain}
            if i == MOTOR_IDS[GRIPPER]:
                settings.update(max_torque_limit=cfg.gripper_torque_limit,
                                protection_current=cfg.gripper_protection_current,
                                overload_torque=cfg.gripper_overload_torque)
            if self.calibration is not None:   # the file is the truth: a swapped servo gets it too
                j = self.calibration.joints[JOINT_NAMES[ids.index(i)]]
                settings.update(homing_offset=j.homing_offset, min_angle_limit=j.range_min,
                                max_angle_limit=j.range_max)
            for register, value in settings.items():
                if self.bus.read(i, register) != value:   # only write what differs: EEPROM wears out
                    self.write_eeprom(i, register, value)
        self.bus.write(MOTOR_IDS[GRIPPER], "torque_limit", cfg.gripper_torque_limit)
        if self.calibration is not None:
            self.reference = self.read_joints()

    def disconnect(self):
        """Torque off (best effort: this also runs after errors) and close the port."""
        if self.bus is not None:
            try:
                self.torque_off()
            except Exception as e:   # e.g. the USB cable was pulled; nothing more we can do
                print(f"warning: could not switch torque off on {self.name}: {e}", file=sys.stderr)
            self.bus = None
        if self.port is not None:
            try:
                self.port.flush()   # let the torque-off packet leave before the port closes
            except Exception:
                pass
            self.port.close()

    def write_eeprom(self, servo_id: int, register: str, value: int):
        """Unlock, write, lock again, and read back: a locked EEPROM ignores writes without complaint."""
        self.bus.write(servo_id, "lock", 0)
        self.bus.write(servo_id, register, value)
        self.bus.write(servo_id, "lock", 1)
        got = self.bus.read(servo_id, register)
        if got != value:
            raise ArmError(f"{self.bus.who(servo_id)}: wrote {register}={value} but it reads {got}; "
                           "power-cycle the arm and try again")

    def torque_on(self):
        """Hold the current pose: goals are set to the present positions before torque comes on."""
        present = self.read_steps()
        self.bus.sync_write("goal_position", dict(zip(MOTOR_IDS, (int(p) for p in present))))
        self.bus.sync_write("torque_enable", {i: 1 for i in MOTOR_IDS})

    def torque_off(self):
        # a SYNC_WRITE needs no reply, so it also works when a servo reports a fault
        self.bus.sync_write("torque_enable", {i: 0 for i in MOTOR_IDS})

    def read_steps(self) -> np.ndarray:
        """(6,) int present positions in steps, one SYNC_READ."""
        return np.array(self.bus.sync_read("present_position", MOTOR_IDS), dtype=np.int64)

    def read_joints(self) -> np.ndarray:
        """(6,) float32 joint radians (simulator convention), one SYNC_READ."""
        if self.calibration is None:
            raise CalibrationError(f"{self.name} has no calibration: run  python robot.py calibrate  first")
        self.reference = self.calibration.steps_to_radians(self.read_steps())
        return self.reference.copy()

    def send_action(self, goal) -> np.ndarray:
        """(6,) joint radians -> one SYNC_WRITE of goal positions. Returns the (6,) radians actually sent.

        Safety: the goal is clipped to the simulator's joint range, moved at most max_step radians from the
        reference (the last read, or the last goal if nothing was read since), then clamped to the calibrated
        range in steps. NaN or inf is refused.
        """
        goal = np.asarray(goal, dtype=np.float64)
        if goal.shape != (6,) or not np.all(np.isfinite(goal)):
            raise ValueError(f"goal must be 6 finite joint angles in radians, got {goal}")
        goal = np.clip(goal, JOINT_LOW, JOINT_HIGH)
        if self.config.max_step is not None:
            if self.reference is None:
                self.read_joints()
            goal = self.reference + np.clip(goal - self.reference, -self.config.max_step, self.config.max_step)
        steps = self.calibration.radians_to_steps(goal)
        self.bus.sync_write("goal_position", dict(zip(MOTOR_IDS, (int(s) for s in steps))))
        self.reference = self.calibration.steps_to_radians(steps)
        return self.reference.copy()


# ----------------------------------------------------------------------------------------------------------
# Procedures: scan, setup-id, calibrate

def scan(port, ids=range(253), bauds=tuple(BAUD_RATES.values())) -> list:
    """Ping every ID at every baud rate -> [(baud, id, model number), ...]. About 2 s per baud on a real port."""
    bus = ServoBus(port, retries=0)
    found = []
    for baud in bauds:
        port.baudrate = baud
        for i in ids:
            if bus.ping(i, retries=0):
                found.append((baud, i, bus.read(i, "model_number")))
    port.baudrate = DEFAULT_BAUD
    return found


def setup_id(port, new_id: int) -> tuple:
    """Give the one connected motor ID new_id and baud 1,000,000. Returns (old baud, old id)."""
    if not 0 <= new_id <= 252:
        raise ArmError(f"servo IDs are 0..252, not {new_id}")
    found = scan(port)
    if not found:
        raise NoReplyError("no motor answered at any baud rate: connect exactly one motor, to the controller board, "
                           "and switch its power on")
    if len(found) > 1:
        listing = ", ".join(f"ID {i} at {b} baud" for b, i, _ in found)
        raise ArmError(f"found {len(found)} motors ({listing}): connect only the one motor you want to set up")
    baud, old_id, _ = found[0]
    bus = ServoBus(port)
    port.baudrate = baud
    bus.write(old_id, "lock", 0)
    bus.write_no_reply(old_id, "id", new_id)          # it may answer under the old or the new ID
    bus.write_no_reply(new_id, "baud_rate", 0)        # and at the old baud rate
    port.baudrate = DEFAULT_BAUD
    bus.write(new_id, "lock", 1)
    if bus.read(new_id, "id") != new_id:
        raise ArmError(f"the motor did not take ID {new_id}; power-cycle it and run setup-id again")
    return baud, old_id


def calibrate(arm: SO100Arm, wait_for_middle, sweep_done, poll_period: float = 0.02, log=print) -> Calibration:
    """Torque off; middle pose -> homing offsets; sweep -> ranges, also written to the EEPROM angle limits.

    wait_for_middle(): returns once the arm is in its middle pose. sweep_done(): True once every joint
    (but wrist_roll, a full turn) went through its range. Positions are polled every poll_period s (50 Hz).
    """
    bus, ids = arm.bus, list(MOTOR_IDS)
    arm.torque_off()
    for i in ids:   # start from a blank slate: old offsets and limits would distort what we read
        for register, value in [("homing_offset", 0), ("min_angle_limit", 0), ("max_angle_limit", 4095)]:
            if bus.read(i, register) != value:
                arm.write_eeprom(i, register, value)
    wait_for_middle()
    actual = bus.sync_read("present_position", ids)
    offsets = []
    for name, i, a in zip(JOINT_NAMES, ids, actual):
        offset = a - MIDDLE   # a in 0..4095, so -2047..2048
        if abs(offset) > 2047:
            raise CalibrationError(f"{name} sits exactly on its encoder's wrap point (reads {a}), so no homing "
                                   "offset in -2047..2047 can centre it: move it a few degrees and calibrate again")
        arm.write_eeprom(i, "homing_offset", offset)
        offsets.append(offset)
    middle = np.array(bus.sync_read("present_position", ids))
    if np.any(np.abs(middle - MIDDLE) > 2):
        raise CalibrationError(f"after writing the homing offsets the middle pose reads {middle.tolist()}, not "
                               "2047: keep the arm still while calibrating and try again")
    log("sweep every joint except wrist_roll through its whole range ...")
    low, high = middle.copy(), middle.copy()
    while not sweep_done():
        steps = np.array(bus.sync_read("present_position", ids))
        low, high = np.minimum(low, steps), np.maximum(high, steps)
        time.sleep(poll_period)
    half_roll = int(round((JOINT_HIGH[WRIST_ROLL] - JOINT_LOW[WRIST_ROLL]) / 2 / RAD_PER_STEP))
    low[WRIST_ROLL], high[WRIST_ROLL] = MIDDLE - half_roll, MIDDLE + half_roll   # not swept: the sim's range
    joints = {}
    for k, (name, i) in enumerate(zip(JOINT_NAMES, ids)):
        if high[k] - low[k] < 200:
            raise CalibrationError(f"{name} moved only {high[k] - low[k]} steps during the sweep: move every joint "
                                   "to both ends of its range, then calibrate again")
        arm.write_eeprom(i, "min_angle_limit", int(low[k]))
        arm.write_eeprom(i, "max_angle_limit", int(high[k]))
        joints[name] = JointCalibration(i, 1, offsets[k], int(low[k]), int(high[k]))
    return Calibration(joints).validate()


def sim_sweep_poses(moves_per_joint: int = 12):
    """The simulated person's sweep: each joint but wrist_roll goes middle -> low -> high -> middle."""
    poses = []
    for k in range(6):
        if k == WRIST_ROLL:
            continue
        for a, b in [(JOINT_MID[k], JOINT_LOW[k]), (JOINT_LOW[k], JOINT_HIGH[k]), (JOINT_HIGH[k], JOINT_MID[k])]:
            for t in np.linspace(0, 1, moves_per_joint):
                q = JOINT_MID.copy()
                q[k] = a + t * (b - a)
                poses.append(q)
    return poses


def calibrate_sim(arm: SO100Arm, log=print) -> Calibration:
    """calibrate() on a SimBus with a simulated person moving the limp joints (no input() needed)."""
    sim_bus = arm.port
    poses = iter(sim_sweep_poses())
    pose = {"q": JOINT_MID.copy()}
    sim_bus.hand = lambda: pose["q"]

    def sweep_done():
        q = next(poses, None)
        if q is not None:
            pose["q"] = q
        return q is None

    try:
        return calibrate(arm, lambda: None, sweep_done, poll_period=0.0, log=log)
    finally:
        sim_bus.hand = None


# ----------------------------------------------------------------------------------------------------------
# Commands

def is_sim(port: str) -> bool:
    return port == "sim"


def default_calibration_path(port: str, arm_name: str) -> str:
    return os.path.join("calibration", ("sim_" if is_sim(port) else "") + f"{arm_name}.json")


def load_calibration(port: str, arm_name: str, path: str | None) -> Calibration:
    """The arm's calibration file; the simulated arm falls back to its exact calibration."""
    path = path or default_calibration_path(port, arm_name)
    if is_sim(port) and not os.path.exists(path):
        return sim_calibration()
    return Calibration.load(path)


def make_arm(port: str, calibration, args, name: str, mujoco: bool = False, seed=None) -> SO100Arm:
    """An arm on a real port, or on a SimBus: ideal servos, or the MuJoCo arm when a camera is needed."""
    config = ArmConfig(max_step=args.max_step if getattr(args, "max_step", 0) else None)
    if is_sim(port):
        bus = SimBus.with_mujoco(seed=seed, image_size=getattr(args, "image_size", 96)) if mujoco else SimBus()
        return SO100Arm(bus, calibration, config, name)
    return SO100Arm(port, calibration, config, name)


class Camera:
    """A webcam through OpenCV (imported here only), or the simulated arm's camera. read() -> (H, W, 3) RGB."""

    def __init__(self, index: int, sim_bus=None):
        self.sim_bus, self.capture = sim_bus, None
        if sim_bus is None:
            try:
                import cv2
            except ImportError:
                raise ArmError("a webcam needs OpenCV: pip install opencv-python") from None
            self.cv2 = cv2
            self.capture = cv2.VideoCapture(index)
            if not self.capture.isOpened():
                raise ArmError(f"camera {index} did not open: try --camera 1, and close other programs using it")

    def read(self) -> np.ndarray:
        if self.sim_bus is not None:
            return np.asarray(self.sim_bus.obs["image"], dtype=np.uint8)
        ok, frame = self.capture.read()
        if not ok:
            raise ArmError("the camera returned no frame: is it still plugged in?")
        return self.cv2.cvtColor(frame, self.cv2.COLOR_BGR2RGB)

    def close(self):
        if self.capture is not None:
            self.capture.release()


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, the model's input size."""
    if frame.shape[:2] == (size, size):
        return frame
    from PIL import Image
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def sleep_until(t: float):
    time.sleep(max(0.0, t - time.monotonic()))


def fmt_joints(q) -> str:
    return "  ".join(f"{n} {np.degrees(v):+7.1f}" for n, v in zip(JOINT_NAMES, q))


def cmd_scan(args):
    port = SimBus() if is_sim(args.port) else open_port(args.port, timeout=args.timeout)
    try:
        found = scan(port)
    finally:
        port.close()
    if not found:
        print(f"no servo answered on {args.port} at any baud rate: check power and cables")
    for baud, i, model in found:
        print(f"baud {baud:>9}: servo {i:3d}  model {model}" + ("  (STS3215)" if model == STS3215_MODEL else ""))
    return found


def cmd_setup_id(args):
    new_id = MOTOR_IDS[JOINT_NAMES.index(args.joint)] if args.joint else args.id
    if new_id is None:
        raise ArmError("say which ID to give: --joint gripper (or another joint name) or --id N")
    # the simulated "one connected motor" is a factory-new servo: ID 1 at 1,000,000 baud
    port = SimBus(ids=(1,)) if is_sim(args.port) else open_port(args.port, timeout=0.01)
    try:
        baud, old_id = setup_id(port, new_id)
    finally:
        port.close()
    print(f"motor with ID {old_id} at {baud} baud is now ID {new_id} at {DEFAULT_BAUD} baud")


def cmd_calibrate(args):
    path = args.calibration or default_calibration_path(args.port, args.arm)
    with make_arm(args.port, None, args, args.arm) as arm:
        if is_sim(args.port):
            calibration = calibrate_sim(arm)
        else:
            stop = threading.Event()

            def sweep_done():   # first call: wait for Enter on another thread while positions are polled
                if not hasattr(sweep_done, "thread"):
                    print("... and press Enter when done")
                    sweep_done.thread = threading.Thread(target=lambda: (input(), stop.set()), daemon=True)
                    sweep_done.thread.start()
                return stop.is_set()

            calibration = calibrate(arm, lambda: input(f"{args.arm}: torque is off. Move every joint to the middle "
                                                       "of its range, then press Enter "), sweep_done)
    calibration.save(path)
    print(f"saved {path}")
    for name, j in calibration.joints.items():
        print(f"  {name:14s} offset {j.homing_offset:+5d}  range {j.range_min}..{j.range_max}")
    return calibration


def cmd_read(args):
    calibration = load_calibration(args.port, args.arm, args.calibration)
    with make_arm(args.port, calibration, args, args.arm) as arm:
        t_end = time.monotonic() + args.seconds if args.seconds > 0 else math.inf
        while time.monotonic() < t_end:
            print("\r" + fmt_joints(arm.read_joints()) + " (deg)", end="", flush=True)
            time.sleep(0.1)
        print()


def _sim_hand_sine(t0: float = 0.0):
    """A simulated leader moved by hand: every joint swings slowly around the middle pose."""
    tick = {"n": 0}

    def hand():
        tick["n"] += 1
        s = math.sin(0.05 * tick["n"] + t0)
        return JOINT_MID + 0.3 * s * (JOINT_HIGH - JOINT_LOW) / 2
    return hand


def cmd_teleop(args):
    leader_cal = load_calibration(args.leader_port, "leader", args.leader_calibration)
    follower_cal = load_calibration(args.port, args.arm, args.calibration)
    with make_arm(args.leader_port, leader_cal, args, "leader") as leader, \
            make_arm(args.port, follower_cal, args, args.arm) as follower:
        if is_sim(args.leader_port):
            leader.port.hand = _sim_hand_sine()
        follower.torque_on()
        period, ticks, t_next = 1.0 / args.fps, 0, time.monotonic()
        t_end = t_next + args.seconds if args.seconds > 0 else math.inf
        while time.monotonic() < t_end:
            q_leader = leader.read_joints()
            q_follower = follower.read_joints()
            follower.send_action(q_leader)
            ticks += 1
            if ticks % max(1, int(args.fps)) == 0:
                print("\r" + fmt_joints(q_follower) + " (deg)", end="", flush=True)
            t_next += period
            sleep_until(t_next)   # also in sim: teleop is watched live
        error = np.abs(follower.read_joints() - leader.read_joints()).max()
        print(f"\n{ticks} ticks; follower - leader now {np.degrees(error):.1f} deg at most")
        return ticks, error


def import_project_module(name: str, what: str):
    """data.py / model.py, imported only by the commands that need them (torch is not needed to teleoperate)."""
    try:
        return __import__(name)
    except ImportError as e:
        raise ArmError(f"{what} needs {name}.py from this repository and its dependencies: {e}") from None


def cmd_record(args):
    data = import_project_module("data", "record")   # the demonstration file format lives in data.py
    sim_arm = is_sim(args.port)
    follower_cal = load_calibration(args.port, args.arm, args.calibration)
    leader_cal = load_calibration(args.leader_port, "leader", args.leader_calibration)
    paths = []
    with make_arm(args.port, follower_cal, args, args.arm, mujoco=sim_arm, seed=args.seed) as follower, \
            make_arm(args.leader_port, leader_cal, args, "leader") as leader:
        camera = Camera(args.camera, follower.port if sim_arm else None)
        try:
            for episode in range(args.episodes):
                if sim_arm and episode > 0:
                    follower.port.reset_env()
                expert = None
                if sim_arm and is_sim(args.leader_port):
                    expert = _leader_follows_expert(leader.port, follower.port)
                instruction = args.instruction or (follower.port.info["instruction"] if sim_arm else "")
                if not instruction:
                    instruction = input("instruction for this episode: ")
                if not sim_arm:
                    input(f"episode {episode}: press Enter to start recording ({args.seconds} s) ")
                follower.torque_on()
                images, states, actions = [], [], []
                period, t_next = 1.0 / args.fps, time.monotonic()
                for t in range(int(args.seconds * args.fps)):
                    image = resize_frame(camera.read(), args.image_size)   # (H, W, 3) before the action
                    state = follower.read_joints()                        # (6,) radians before the action
                    sent = follower.send_action(leader.read_joints())     # (6,) what the follower was told
                    images.append(image), states.append(state), actions.append(sent)
                    t_next += period
                    if sim_arm:
                        if follower.port.info.get("success") or follower.port.truncated:
                            break
                    else:
                        sleep_until(t_next)
                success = bool(follower.port.info.get("success")) if sim_arm else \
                    input("did it succeed? [y/n] ").strip().lower().startswith("y")
                follower.torque_off()
                ep = {"images": np.stack(images), "states": np.stack(states).astype(np.float32),
                      "actions": np.stack(actions).astype(np.float32), "instruction": instruction,
                      "success": success, "source": "sim" if sim_arm else "robot"}
                paths.append(data.write_demo_episode(args.root, ep))
                print(f"episode {episode}: {len(images)} steps, success={success} -> {paths[-1]}"
                      + (" (leader driven by the scripted expert)" if expert else ""))
        finally:
            camera.close()
    return paths


def _leader_follows_expert(leader_bus: SimBus, follower_bus: SimBus):
    """Simulated recording: the 'person' moving the leader arm is sim.py's scripted expert, if it exists."""
    try:
        import sim
        expert = sim.ScriptedExpert(follower_bus.env)
        expert.reset()
    except (ImportError, AttributeError):
        leader_bus.hand = _sim_hand_sine()
        return None
    leader_bus.hand = lambda: expert.act(follower_bus.obs, follower_bus.info)
    return expert


def _sim_expert_episode(seed: int, image_size: int) -> dict:
    """replay --port sim without a file: the scripted expert's actions on a table with the same seed."""
    import sim
    env = sim.SO100Env(image_size=image_size)
    obs, info = env.reset(seed=seed)
    expert = sim.ScriptedExpert(env)
    expert.reset()
    actions = []
    for _ in range(env.cfg.max_steps):
        actions.append(expert.act(obs, info))
        obs, _, terminated, truncated, info = env.step(actions[-1])
        if terminated or truncated:
            break
    env.close()
    return {"actions": np.stack(actions).astype(np.float32), "instruction": info["instruction"],
            "success": info["success"]}


def cmd_replay(args):
    sim_arm = is_sim(args.port)
    if args.root:
        data = import_project_module("data", "replay")
        episodes = data.read_demo_episodes(args.root)
        if not 0 <= args.index < len(episodes):
            raise ArmError(f"{args.root} holds {len(episodes)} episodes; --index {args.index} is not one of them")
        episode = episodes[args.index]
    elif sim_arm:
        episode = _sim_expert_episode(args.seed, args.image_size)
        print(f"no --root given: replaying the scripted expert on table seed {args.seed}")
    else:
        raise ArmError("say which demonstrations to replay: --root DIR (and --index N)")
    calibration = load_calibration(args.port, args.arm, args.calibration)
    with make_arm(args.port, calibration, args, args.arm, mujoco=sim_arm, seed=args.seed) as arm:
        arm.torque_on()
        period, t_next = 1.0 / args.fps, time.monotonic()
        for action in episode["actions"]:
            arm.read_joints()
            arm.send_action(action)
            t_next += period
            if not sim_arm:
                sleep_until(t_next)
        print(f"replayed {len(episode['actions'])} actions: {episode['instruction']!r}")
        if sim_arm:
            print(f"success: {bool(arm.port.info.get('success'))}")
            return bool(arm.port.info.get("success"))


def cmd_run(args):
    Policy = import_project_module("model", "run").Policy
    policy = Policy.load(args.ckpt)
    policy.reset()
    sim_arm = is_sim(args.port)
    if sim_arm:  # warns when this machine draws the scene differently from the demonstrations' renderer
        import_project_module("data", "run").render_check(policy.config, args.ckpt)
    calibration = load_calibration(args.port, args.arm, args.calibration)
    args.image_size = policy.image_size
    with make_arm(args.port, calibration, args, args.arm, mujoco=sim_arm, seed=args.seed) as arm:
        camera = Camera(args.camera, arm.port if sim_arm else None)
        instruction = args.instruction or (arm.port.info["instruction"] if sim_arm else None)
        if not instruction:
            raise ArmError('say what to do: --instruction "put the red cube in the bowl"')
        print(f"running {args.ckpt} at {args.fps} Hz: {instruction!r} (Ctrl-C stops and switches torque off)")
        try:
            arm.torque_on()
            period, t_next, steps, t = 1.0 / args.fps, time.monotonic(), int(args.seconds * args.fps) if args.seconds > 0 else 10**9, -1
            for t in range(steps):
                obs = {"image": resize_frame(camera.read(), policy.image_size),   # (S, S, 3) uint8
                       "state": arm.read_joints()}                                # (6,) float32 radians
                arm.send_action(policy.act(obs, instruction))
                t_next += period
                if sim_arm:
                    if arm.port.info.get("success") or arm.port.truncated:
                        break
                else:
                    sleep_until(t_next)
        finally:
            camera.close()
        if sim_arm:
            success = bool(arm.port.info.get("success"))
            print(f"{t + 1} steps; task {'succeeded' if success else 'failed'}")
            return success


# ----------------------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Drive an SO-100 arm (or the simulated one with --port sim).")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help, func, calibration=True):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--port", required=True, help="serial port of the arm (/dev/ttyACM0, COM3) or 'sim'")
        if calibration:
            p.add_argument("--arm", default="follower", help="arm name: picks calibration/<arm>.json")
            p.add_argument("--calibration", default=None, help="calibration file (default calibration/<arm>.json)")
            p.add_argument("--max-step", type=float, default=0.3,
                           help="largest goal change per tick, radians (0 = no limit)")
        return p

    p = add("scan", "find servos and their IDs at each baud rate", cmd_scan, calibration=False)
    p.add_argument("--timeout", type=float, default=0.01, help="seconds to wait for each ping's reply")
    p = add("setup-id", "give the one connected motor its ID (and baud 1,000,000)", cmd_setup_id, calibration=False)
    p.add_argument("--joint", choices=JOINT_NAMES, default=None, help="joint the motor is for (sets its ID)")
    p.add_argument("--id", type=int, default=None, help="or the ID itself, 0..252")
    add("calibrate", "record the middle pose and each joint's range", cmd_calibrate)
    p = add("read", "print the joint angles live", cmd_read)
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0 = until Ctrl-C)")

    def add_control(p, fps, seconds, seconds_help="how long to run (0 = until Ctrl-C)"):
        p.add_argument("--fps", type=float, default=fps, help="control ticks per second")
        p.add_argument("--seconds", type=float, default=seconds, help=seconds_help)
        p.add_argument("--seed", type=int, default=0, help="--port sim: which simulated table")
        p.add_argument("--image-size", type=int, default=96, help="camera frames are resized to this square")
        p.add_argument("--camera", type=int, default=0, help="OpenCV camera index (ignored with --port sim)")
        p.add_argument("--instruction", default=None, help="the task in words (sim: the table's instruction)")

    for name, help, func, fps, seconds, seconds_help in [
            ("teleop", "a leader arm moved by hand drives the follower", cmd_teleop, 60, 0,
             "how long to run (0 = until Ctrl-C)"),
            ("record", "record teleoperated demonstrations", cmd_record, 30, 12,
             "longest episode (sim: an episode also ends on success)")]:
        p = add(name, help, func)
        add_control(p, fps, seconds, seconds_help)
        p.add_argument("--leader-port", required=True, help="serial port of the leader arm, or 'sim'")
        p.add_argument("--leader-calibration", default=None, help="default calibration/leader.json")
        if name == "record":
            p.add_argument("--root", default="demos", help="folder the episodes are written to")
            p.add_argument("--episodes", type=int, default=1, help="how many episodes to record")
    p = add("replay", "send a recorded episode's actions to the arm", cmd_replay)
    add_control(p, 30, 0, "unused: the episode sets the length")
    p.add_argument("--root", default=None, help="folder of recorded episodes (sim: optional)")
    p.add_argument("--index", type=int, default=0, help="which episode in --root")
    p = add("run", "run a trained policy: camera frame + joint state -> action", cmd_run)
    add_control(p, 10, 12)
    p.add_argument("--ckpt", required=True, help="checkpoint folder written by the training script")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for port in (args.port, getattr(args, "leader_port", "sim")):   # before anything else is loaded
            if not is_sim(port) and not port.upper().startswith("COM") and not os.path.exists(port):
                raise PortNotFoundError(port_not_found_message(port))
        args.func(args)
    except ArmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # the `with` blocks have already switched torque off
        print("\nstopped; torque is off", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
