"""The ``api`` environment: a real HTTP tool server on 127.0.0.1, its lifecycle, and known answers."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from tiltlm.envs import get_env, rollout
from tiltlm.envs.api import DEFAULT_TASKS, ApiEnv, is_correct, parse_tool_call
from tiltlm.envs.api_server import ApiError, calc
from tiltlm.errors import TiltlmError


@pytest.fixture(scope="module")
def env():
    with ApiEnv() as e:
        yield e


def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method), timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _refuses(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet (a container's pid 1 may not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# ---- the calculator and the fact table, by hand ---------------------------------------------
@pytest.mark.parametrize("expr, value", [("17*23", 391), ("2^10", 1024), ("(48 - 6) / 7", 6), ("7 // 2", 3),
                                         ("-3 % 5", 2), ("2 ** -2", 0.25), ("1.5 * 4", 6), ("((1))", 1),
                                         ("10 - 2 - 3", 5), ("2 ** 3 ** 2", 512), ("3 × 4 ÷ 6", 2)])
def test_calc_known_answers(expr, value):
    assert calc(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os')", "open('/etc/passwd')", "().__class__", "x + 1", "lambda: 1",
                                  "[1, 2]", "'a' * 3", "9 ** 9 ** 9", "2 ** 65", "10 ** 60 * 10 ** 60", "1 / 0",
                                  "(-8) ** 0.5", "True + 1", "1 +", "", "1" * 300, "(" * 150 + "1" + ")" * 150])
def test_calc_rejects_everything_but_bounded_arithmetic(expr):
    with pytest.raises(ApiError):
        calc(expr)


def test_answer_syntax():
    assert parse_tool_call("calc: 17*23") == ("calc", "17*23")
    assert parse_tool_call("Calculate(17 * 23)") == ("calc", "17 * 23")
    assert parse_tool_call("calc(1+2)*(3)") == ("calc", "(1+2)*(3)")  # outer parens only when they pair
    assert parse_tool_call("thinking...\n - Look up = capital of France") == ("lookup", "capital of France")
    assert parse_tool_call("Paris") is None and parse_tool_call("391") is None
    assert is_correct("391", "391") and is_correct("The answer is 391.", "391") and is_correct("17*23 = 391", "391")
    assert is_correct("answer: 6.0000001", "6") and is_correct("1,000", "1000") and is_correct("-247", "-247")
    assert not is_correct("391 392", "391") and not is_correct("390", "391") and not is_correct("", "391")
    assert is_correct("the answer is paris.", "Paris") and not is_correct("Paris London", "Paris")


# ---- the server over HTTP -------------------------------------------------------------------
def test_endpoints_and_errors(env):
    assert _get(env.port, "/health")[0] == 200
    assert _get(env.port, "/calc?expr=17%2A23") == (200, {"expr": "17*23", "result": 391})
    assert _get(env.port, "/lookup?key=What+is+the+capital+of+France%3F")[1]["value"] == "Paris"
    for path, code in [("/calc?expr=1%2F0", 400), ("/calc", 400), ("/lookup?key=capital+of+narnia", 404),
                       ("/lookup", 400), ("/nope", 404)]:
        status, body = _get(env.port, path)
        assert status == code and set(body) == {"error"}, (path, status, body)
    assert _get(env.port, "/calc?expr=1", method="POST")[0] == 405


def test_binds_loopback_only(env):
    with open("/proc/net/tcp") as f:  # IPv4 listening sockets: local address 0100007F = 127.0.0.1
        listening = [line.split()[1] for line in f.readlines()[1:] if line.split()[3] == "0A"]
    mine = [addr for addr in listening if int(addr.split(":")[1], 16) == env.port]
    assert mine == [f"0100007F:{env.port:04X}"]
    with open("/proc/net/tcp6") if os.path.exists("/proc/net/tcp6") else open(os.devnull) as f:
        assert not any(int(line.split()[1].split(":")[1], 16) == env.port for line in f.readlines()[1:] if line.split()[3] == "0A")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # UDP connect sends nothing: it only picks the outgoing interface
        ip = probe.getsockname()[0]
    except OSError:
        ip = None
    finally:
        probe.close()
    if ip and not ip.startswith("127."):
        assert _refuses(ip, env.port)


def test_two_envs_get_their_own_ports(env):
    with ApiEnv() as other:
        assert other.port != env.port and other.server.proc.pid != env.server.proc.pid
        assert _get(other.port, "/health")[1]["pid"] == other.server.proc.pid


# ---- lifecycle: nothing outlives its env ----------------------------------------------------
def test_close_stops_server():
    e = ApiEnv()
    proc, port = e.server.proc, e.port
    assert proc.poll() is None
    e.close()
    e.close()  # twice is fine
    assert proc.poll() is not None and _refuses("127.0.0.1", port)
    ep = e.episode(0)
    ep.reset(e.tasks()[0])
    with pytest.raises(ConnectionError, match="unreachable"):
        ep.step("calc: 1+1")


def test_exception_in_with_block_stops_server():
    with pytest.raises(ValueError, match="boom"), ApiEnv() as e:
        proc, port = e.server.proc, e.port
        raise ValueError("boom")
    assert proc.poll() is not None and _refuses("127.0.0.1", port)


def test_garbage_collection_stops_server():
    e = ApiEnv()
    proc = e.server.proc
    del e
    gc.collect()
    assert proc.poll() is not None


def test_server_exits_when_parent_is_sigkilled(tmp_path):
    script = "import time\nfrom tiltlm.envs.api import ApiEnv\ne = ApiEnv()\n" \
             "print(e.server.proc.pid, e.port, flush=True)\ntime.sleep(120)\n"
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        pid, port = map(int, child.stdout.readline().split())
        assert not _gone(pid) and not _refuses("127.0.0.1", port)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 5
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), "server outlived its SIGKILLed parent"
        assert _refuses("127.0.0.1", port)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_startup_failure_is_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    from tiltlm.envs import api

    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(api.subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nsys.exit('address already in use')\n")
    monkeypatch.setattr(api, "_SERVER", crash)
    with pytest.raises(TiltlmError, match="did not start.*address already in use"):
        ApiEnv()
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(api, "_SERVER", hang)
    with pytest.raises(TiltlmError, match=r"no port within 0.3s.*startup_timeout_s"):
        ApiEnv(startup_timeout_s=0.3)
    assert len(started) == 2 and all(p.poll() is not None for p in started)


def test_options_and_tasks_file(tmp_path):
    with pytest.raises(TiltlmError, match="did you mean 'max_turns'"):
        get_env("api", max_turn=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1+1?", "answer": 2}\n{"q": 1}\n')
    with pytest.raises(TiltlmError, match="line 2"):
        ApiEnv(tasks_file=str(bad))
    with pytest.raises(TiltlmError, match="not found"):
        ApiEnv(tasks_file=str(tmp_path / "missing.jsonl"))
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "What is 6*7?", "answer": 42}\n')
    with get_env("api", tasks_file=str(good), max_turns=2) as e:
        assert e.tasks() == ["What is 6*7?"] and e.max_turns == 2


# ---- episodes --------------------------------------------------------------------------------
def test_episode_tool_call_then_answer(env):
    ep = env.episode(seed=0)
    assert "17 * 23" in ep.reset("What is 17 * 23?")
    obs, reward, done, info = _unpack(ep.step("calc: 17 * 23"))
    assert json.loads(obs) == {"expr": "17 * 23", "result": 391} and reward == 0.0 and not done
    obs, reward, done, info = _unpack(ep.step("calc: 17 * * 23"))  # malformed: the API's error, episode goes on
    assert "error" in json.loads(obs) and not done
    obs, reward, done, info = _unpack(ep.step("The answer is 391."))
    assert reward == 1.0 and done and info["success"] is True
    ep.reset("What is the capital of France?")
    assert _unpack(ep.step("lookup: capital of France"))[0].strip() == '{"key": "capital of france", "value": "Paris"}'
    assert _unpack(ep.step("Lyon"))[1:3] == (0.0, True)


def test_episode_ends_at_turn_limit_and_injection_is_an_error(env):
    ep = env.episode(seed=0)
    ep.reset("What is 17 * 23?")
    for turn in range(1, env.max_turns + 1):
        obs, reward, done, info = _unpack(ep.step("calc: __import__('os').system('echo hi')"))
        assert "not allowed" in json.loads(obs)["error"] and reward == 0.0
    assert done and info == {"success": False, "tool": "calc", "truncated": True}


def _unpack(result):
    return result.observation, result.reward, result.done, result.info


# ---- rollout with a scripted tool-using policy -------------------------------------------------
ORACLE = {  # task -> tool calls; the final answer is the last result the API gave
    "How many legs does a spider have? (lookup key: legs of a spider)": ["lookup: legs of a spider"],
    "How many days are in a leap year times 24? (use lookup, then calc)": ["lookup: days in a leap year", "calc: {} * 24"],
    "Which planet is the largest?": ["lookup: largest planet"],
}


class ScriptedPolicy:
    """A byte-level test double with the rollout's policy protocol; it reads the transcript and acts."""

    eos_id = pad_id = 256
    window = None

    def encode_context(self, text):
        return list(text.encode())

    encode_text = encode_context

    def decode(self, rows):
        return [bytes(t for t in row if t < 256).decode() for row in rows]

    def generate(self, prefixes, *, max_new_tokens, seeds):
        rows = [(list(self.act(self.decode([p])[0]).encode()) + [self.eos_id])[:max_new_tokens] for p in prefixes]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for k, r in enumerate(rows):
            ids[k, : len(r)], mask[k, : len(r)] = torch.tensor(r), True
        return ids, torch.zeros(ids.shape), mask

    @staticmethod
    def act(transcript):
        question = transcript.split("Question: ", 1)[1].splitlines()[0]
        results = [json.loads(line) for line in transcript.splitlines() if line.startswith("{")]
        last = str(results[-1].get("result", results[-1].get("value"))) if results else None
        if question.startswith("What is") and "capital" not in question:
            script = ["calc: " + question[len("What is "):].rstrip("?")]
        else:
            script = ORACLE.get(question, ["lookup: " + question])
        return script[len(results)].format(last) if len(results) < len(script) else last


def test_rollout_solves_every_default_task(env):
    samples = rollout(ScriptedPolicy(), env, env.tasks(), 1, seed=0, max_action_tokens=64)
    trajs = samples.trajectories
    assert len(trajs) == len(DEFAULT_TASKS)
    for t in trajs:
        assert t.failure is None and t.success and t.total_reward == 1.0 and not t.truncated, t.transcript()
    # the env's tokens are observations, never trained: the policy mask covers exactly the actions
    policy_tokens = sum(len(a.encode()) + 1 for t in trajs for a in t.actions)
    assert int(samples.mask.sum()) == policy_tokens


def test_dead_server_is_an_episode_failure_not_an_observation():
    e = ApiEnv()
    try:
        e.server.proc.kill()
        e.server.proc.wait()
        samples = rollout(ScriptedPolicy(), e, e.tasks()[:2], 1, seed=0, max_action_tokens=64)
        for t in samples.trajectories:
            assert t.failure and t.failure.startswith("step 1 raised ConnectionError"), t.failure
            assert t.observations == [f"Question: {t.task}\n"]
    finally:
        e.close()
