"""The ``api`` environment: answer arithmetic and fact questions, calling a real HTTP tool API.

Each episode is one question ("What is 17 * 23?"). Every action of the policy is read line by line:

* a **tool call** is a line that starts with a tool name, then ``:``, ``=``, a space, or ``( ... )``:

      calc: 17*23          calc(17 * 23)        Calculate = 2^10
      lookup: capital of France                 lookup(days in a week)

  names are case-insensitive; ``calc``/``calculate``/``compute`` call ``GET /calc?expr=``,
  ``lookup``/``look up``/``search`` call ``GET /lookup?key=``. Leading ``-``, ``>``, `` ` ``, ``*``
  and spaces are ignored. The first tool line of an action is called; the rest of it is ignored.
  The observation is the API's JSON body on a line of its own: ``{"expr": "17*23", "result": 391}``, or for a
  malformed call its error, ``{"error": "division by zero"}`` (reward 0, the episode goes on).
* **anything else is the final answer**: its first non-blank line, after an optional
  ``answer:`` / ``final answer:`` / ``the answer is`` prefix. A numeric answer is right if the
  line holds exactly one number (after the last ``=``, if any; ``1,000`` is one number) within
  ``1e-6`` relative of the truth; a word answer if it matches case-insensitively, punctuation and a
  leading "the" aside. Reward 1.0 if right, else 0.0; ``info["success"]`` says which; done.

The episode also ends (done, reward 0, ``info["truncated"]``) when its ``max_turns``-th action is
still a tool call. The tool server (``api_server.py``) is a subprocess bound to 127.0.0.1 that this
env starts when built and stops on ``close()``, on leaving a ``with`` block (also by an exception),
when the env is garbage-collected, at interpreter exit, and by itself when this process dies.
A server that stops answering makes ``step`` raise: the rollout records that episode as failed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path

from tiltlm.envs.base import Env, StepResult, register_env
from tiltlm.errors import TiltlmError

# (question, answer): the answers are what /calc and /lookup return (tests check the two agree)
DEFAULT_TASKS: tuple[tuple[str, str], ...] = (
    ("What is 17 * 23?", "391"),
    ("What is 1234 + 5678?", "6912"),
    ("What is 2 ^ 10?", "1024"),
    ("What is (48 - 6) / 7?", "6"),
    ("What is 987 - 1234?", "-247"),
    ("What is 144 // 5 + 144 % 5?", "32"),
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Australia?", "Canberra"),
    ("How many legs does a spider have? (lookup key: legs of a spider)", "8"),
    ("How many days are in a leap year times 24? (use lookup, then calc)", "8784"),
    ("Which planet is the largest?", "Jupiter"),
)

PROMPT = ("Answer the question. To use a tool, write one line 'calc: <arithmetic>' or "
          "'lookup: <key>' (e.g. 'lookup: capital of France'). Any other line is your final answer.\n")

_TOOLS = {"calc": "calc", "calculate": "calc", "compute": "calc", "lookup": "lookup", "look up": "lookup",
          "search": "lookup"}
_TOOL_LINE = re.compile(r"^[\s>*`-]*(calculate|calc|compute|look up|lookup|search)\b\s*[:=]?\s*(.*)$", re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"^\s*(final answer|the answer is|answer is|answer)\s*[:=]?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_SERVER = Path(__file__).with_name("api_server.py")


def parse_tool_call(action: str) -> tuple[str, str] | None:
    """(tool, argument) of the first tool line of ``action``, or None if it is a final answer."""
    for line in action.splitlines():
        m = _TOOL_LINE.match(line)
        if m:
            return _TOOLS[" ".join(m.group(1).lower().split())], _unwrap(m.group(2).strip().strip("`").strip())
    return None


def _unwrap(arg: str) -> str:
    """'(17*23)' -> '17*23', but '(1+2)*(3)' stays: outer parentheses go only if they pair up."""
    if not (arg.startswith("(") and arg.endswith(")")):
        return arg
    depth = 0
    for k, ch in enumerate(arg):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and k < len(arg) - 1:
            return arg
    return arg[1:-1].strip()


def is_correct(answer_text: str, truth: str) -> bool:
    """Whether a final answer matches the truth (numeric with tolerance, or a case-insensitive word)."""
    lines = [ln for ln in answer_text.splitlines() if ln.strip()]
    line = _ANSWER_PREFIX.sub("", lines[0]) if lines else ""
    expected = _as_number(truth)
    if expected is not None:
        numbers = _NUMBER.findall(line.rsplit("=", 1)[-1])
        if len(numbers) != 1:
            return False
        got = _as_number(numbers[0])
        return got is not None and math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
    return _words(line) == _words(truth)


def _as_number(text: str) -> float | None:
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _words(text: str) -> str:
    words = re.sub(r"[^\w\s-]", " ", text.lower()).split()
    return " ".join(words[1:] if words[:1] == ["the"] else words)


@dataclass
class _Server:
    """The running tool server: its process and where it listens."""

    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _start_server(startup_timeout_s: float) -> _Server:
    """Start ``api_server.py`` (a stdlib-only script: ``-I`` keeps tiltlm and torch out of it) and read its port."""
    with tempfile.TemporaryFile() as stderr:  # only read if the server fails to start
        proc = subprocess.Popen(
            [sys.executable, "-I", str(_SERVER), "--port", "0", "--parent-pid", str(os.getpid()), "--watch-stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        )
        box: dict[str, bytes] = {}
        reader = threading.Thread(target=lambda: box.setdefault("line", proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(startup_timeout_s)
        try:
            info = json.loads(box.get("line", b""))
            port = int(info["port"])
            if info["host"] != "127.0.0.1":
                raise ValueError(f"bound to {info['host']}")
        except (ValueError, KeyError, TypeError):
            _stop_server(proc, grace_s=1.0)
            stderr.seek(0)
            err = stderr.read().decode("utf-8", "replace").strip().splitlines()
            why = f"it said: {err[-1][:200]}" if err else f"no port within {startup_timeout_s:g}s"
            raise TiltlmError(f"the api tool server did not start ({why}); check that {sys.executable} runs "
                              f"{_SERVER}, or raise startup_timeout_s") from None
    proc.stdout.close()  # the server writes nothing after its port line
    return _Server(proc, port)


def _stop_server(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """Terminate, kill after ``grace_s``, reap. Safe to call twice and at interpreter exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None and not pipe.closed:
            pipe.close()


@register_env
class ApiEnv(Env):
    """Questions answered with a calculator and a fact table behind a real HTTP server (see module doc)."""

    name = "api"
    prompt = PROMPT

    def __init__(self, *, max_turns: int = 3, timeout_s: float = 5.0, startup_timeout_s: float = 15.0,
                 tasks_file: str | None = None):
        """max_turns: actions per episode; timeout_s: per HTTP call; startup_timeout_s: for the server
        to report its port; tasks_file: JSON Lines of {"question": ..., "answer": ...} (default: built-in)."""
        if not isinstance(max_turns, int) or max_turns < 1:
            raise TiltlmError(f"api env: max_turns must be a positive integer, got {max_turns!r}; use e.g. max_turns=3")
        if not timeout_s > 0 or not startup_timeout_s > 0:
            raise TiltlmError("api env: timeout_s and startup_timeout_s must be positive seconds; use e.g. timeout_s=5")
        self.max_turns, self.timeout_s = max_turns, float(timeout_s)
        self.answers = dict(_read_tasks(tasks_file) if tasks_file else DEFAULT_TASKS)
        self.server = _start_server(float(startup_timeout_s))
        self._finalizer = weakref.finalize(self, _stop_server, self.server.proc)  # also runs at exit
        # no proxy, even if http_proxy is set: the server is on this machine's loopback
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def port(self) -> int:
        return self.server.port

    def tasks(self) -> list[str]:
        return list(self.answers)

    def episode(self, seed: int) -> ApiEpisode:
        return ApiEpisode(self)  # deterministic: the seed has no noise to drive

    def close(self) -> None:
        self._finalizer()

    def call(self, tool: str, argument: str) -> str:
        """The API's JSON body for one tool call; a 4xx body (the error) too. Raises if unreachable."""
        param = "expr" if tool == "calc" else "key"
        url = f"{self.server.url}/{tool}?{urllib.parse.urlencode({param: argument})}"
        try:
            with self._opener.open(url, timeout=self.timeout_s) as response:
                return response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500:
                return e.read().decode("utf-8", "replace")
            raise ConnectionError(f"api server answered HTTP {e.code} for /{tool}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionError(f"api server at {self.server.url} unreachable: {reason}") from e


class ApiEpisode:
    def __init__(self, env: ApiEnv):
        self.env = env
        self.truth: str | None = None
        self.turn = 0
        self.done = False

    def reset(self, task: str) -> str:
        if task not in self.env.answers:
            raise KeyError(f"unknown task {task[:80]!r}")
        self.truth, self.turn, self.done = self.env.answers[task], 0, False
        return f"Question: {task}\n"

    def step(self, action: str) -> StepResult:
        if self.truth is None or self.done:
            raise RuntimeError("step on an episode that is not running; call reset(task) first")
        self.turn += 1
        call = parse_tool_call(action)
        if call is None:
            right = is_correct(action, self.truth)
            self.done = True
            return StepResult("", 1.0 if right else 0.0, True, {"success": right, "tool": None})
        body = self.env.call(*call)
        if self.turn >= self.env.max_turns:
            self.done = True
            return StepResult(f"\n{body}\n", 0.0, True, {"success": False, "tool": call[0], "truncated": True})
        return StepResult(f"\n{body}\n", 0.0, False, {"tool": call[0]})


def _read_tasks(path: str) -> list[tuple[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise TiltlmError(f"api env: tasks_file '{path}' not found; give a JSON Lines file of "
                          '{"question": ..., "answer": ...}')
    tasks = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, answer = row["question"], row["answer"]
            if not isinstance(question, str) or not question.strip() or isinstance(answer, bool) \
                    or not isinstance(answer, (str, int, float)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise TiltlmError(f"api env: {path} line {n} is not "
                              '{"question": "<text>", "answer": "<word or number>"}; fix that line') from None
        tasks.append((question, str(answer)))
    if not tasks:
        raise TiltlmError(f"api env: tasks_file '{path}' has no tasks; add lines of " '{"question": ..., "answer": ...}')
    return tasks
