"""Bounded work: every size a user controls is checked before work starts, and nothing a user writes
(a YAML file, a regular expression, a reward function) can hang the process or take its memory.

Each CLI case must end in one line ``error: …``, exit code 2, no traceback, --out untouched, and fast:
the wall-clock bounds below are what the case takes with the checks (plus the CLI's imports), far below
what it took without them (the alias bomb grew past 5 GB, the regex and the huge lengths never ended).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

from test_bad_inputs import _set, one_line, snapshot, tiltlm
from tiltlm.errors import TiltlmError
from tiltlm.exact import count_sequences
from tiltlm.io import YAML_MAX_ALIAS_EXPANSION, parse_yaml
from tiltlm.rewards import Reward, get_reward

# anchors nested 9 deep, ten aliases each: 10^9 strings once expanded, a few hundred bytes as written
_LAUGHS = "[" + ", ".join(['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
                          + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]) + "]"

REWARDS_PY = '''
import sys, time

def leave(texts):
    sys.exit(0)

def hang(texts):
    while True:
        time.sleep(0.01)

def interrupt(texts):
    raise KeyboardInterrupt
'''


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A tiny testbed model, one rigged to always write 'a' (never EOS), and a file of misbehaving rewards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiltlm.testbed import make_testbed

    root = tmp_path_factory.mktemp("bounded")
    tb = make_testbed(root / "tb", vocab_size=4, n_layer=1, n_embd=16, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tb, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(tb)
    a = tokenizer.convert_tokens_to_ids("a")
    with torch.no_grad():  # logits = W · ln_f(h); with ln_f's weight 0 the output is its bias, 100 along a's axis only
        head = model.get_output_embeddings().weight  # (V, d)
        head[:, 0] = 0.0
        head[a, 0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 100.0
    only_a = root / "only_a"
    model.save_pretrained(only_a)
    tokenizer.save_pretrained(only_a)
    (root / "rewards.py").write_text(REWARDS_PY)
    (root / "exits.py").write_text("import sys\nsys.exit(0)\ndef f(texts):\n    return [0.0] * len(texts)\n")
    (root / "prompts.jsonl").write_text('{"prompt": "ab", "answer": "a"}\n{"prompt": "b", "answer": "b"}\n')
    return SimpleNamespace(root=root, tb=tb, only_a=only_a)


def base_config(ctx) -> dict:
    return {"prior": str(ctx.tb), "target": {"reward": "count:a", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
            "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 1, "lr": 0.01}}


def _raw(text: str):
    return lambda cfg, ctx: text.replace("{root}", str(ctx.root)).replace("{tb}", str(ctx.tb))


def _bytes(data: bytes):
    return lambda cfg, ctx: data


# id -> (config edit, the command (train CONFIG unless given), needles of the one line, seconds it may take)
CASES = {
    "yaml-alias-bomb": (_raw("target: {reward: 'count:a', beta: 1.0}\nalgorithm: kl-pg\n"
                             f"env: {{name: tabular, options: {{depth: {_LAUGHS}}}}}\n"), None,
                        ["has YAML aliases (*name) that expand to 1,234,567,9", "more than 100,000 beyond the file's own",
                         "alias smaller anchors or fewer times"], 30),
    "yaml-alias-bomb-sweep": (None, "sweep", ["sweep config '", "expand to 1,234,567,9", "alias smaller anchors"], 30),
    "yaml-alias-recursive": (_raw("prior: {tb}\nalgorithm: kl-pg\nenv: {name: tabular, options: &o {depth: *o}}\n"), None,
                             ["has a YAML alias (*name) inside its own anchor (&name)", "remove that alias"], 30),
    "yaml-nested-too-deep": (_raw("prior: {tb}\nx: " + "[" * 20000 + "]" * 20000 + "\n"), None,
                             ["nests its values too deeply to read; flatten it"], 30),
    "config-not-utf8": (_bytes(b'prior: default\ntarget: {reward: "contains:\xff"}\n'), None,
                        ["is not UTF-8 text (byte 0xff at offset 42); save the file as UTF-8"], 30),
    "reward-regex-backtracking": (lambda cfg, ctx: cfg.update(prior=str(ctx.only_a), target={"reward": r"regex:(a|aa)+\d", "beta": 1.0},
                                                              sampling={"n_per_context": 2, "max_new_tokens": 60}), None,
                                  [r"reward 'regex:(a|aa)+\\d' took more than 1 s to search one text of 60 characters",
                                   "simplify the pattern"], 10),
    "reward-sys-exit": (_set("target.reward", lambda c: f"{c.root}/rewards.py:leave"), None,
                        ["raised SystemExit: 0 (a reward returns its scores; it must not end the program)", "fix the reward function"], 30),
    "reward-sys-exit-no-limit": (lambda cfg, ctx: cfg["target"].update(reward=f"{ctx.root}/rewards.py:leave", reward_timeout_s=None), None,
                                 ["raised SystemExit: 0", "fix the reward function"], 30),
    "reward-raises-keyboardinterrupt": (_set("target.reward", lambda c: f"{c.root}/rewards.py:interrupt"), None,
                                        ["raised KeyboardInterrupt", "fix the reward function"], 30),
    "reward-hangs": (lambda cfg, ctx: cfg["target"].update(reward=f"{ctx.root}/rewards.py:hang", reward_timeout_s=1), None,
                     ["did not return within 1 s on 4 texts", "target.reward_timeout_s"], 30),
    "reward-file-exits-on-import": (_set("target.reward", lambda c: f"{c.root}/exits.py:f"), None,
                                    ["exits.py' raised SystemExit: 0; fix the file"], 30),
    "reward-timeout-zero": (_set("target.reward_timeout_s", 0), None, ["'target.reward_timeout_s'", "greater than 0"], 30),
    "n-per-context-huge": (_set("sampling.n_per_context", 10**12), None,
                           ["1,000,000,000,000 samples (sampling.n_per_context) of up to 3 tokens", "GiB of", "lower sampling.n_per_context"], 30),
    "max-new-tokens-huge": (_set("sampling.max_new_tokens", 10**12), None,
                            ["sampling.max_new_tokens 1,000,000,000,000 does not fit the model's window of 64 tokens",
                             "lower sampling.max_new_tokens below 64"], 30),
    "eval-n-huge": (lambda cfg, ctx: cfg.update(data={"path": str(ctx.root / "prompts.jsonl"), "eval_size": 1}, eval={"n": 10**11}), None,
                    ["100,000,000,000 samples (eval.n)", "lower eval.n"], 30),
    "lr-huge": (_set("optim.lr", 1.0e300), None, ["'optim.lr'", "less than or equal to 1000000"], 30),
    "weight-decay-huge": (_set("optim.weight_decay", 1.0e300), None, ["'optim.weight_decay'", "less than or equal to 1000000"], 30),
    "steps-past-int64": (_set("optim.steps", 10**30), None, ["with optim.steps 1,000,000,000,000,000,000,000,000,000,000",
                                                             "pick fewer steps or a smaller seed"], 30),
    "seed-huge": (_set("seed", 10**20), None, ["config 'seed': must be between -9223343366818 and 9223343366818",
                                                "seed·1000003 + its number, a 64-bit integer"], 30),
    "eval-seed-huge": (lambda cfg, ctx: cfg.update(data={"path": str(ctx.root / "prompts.jsonl"), "eval_size": 1}, eval={"seed": 2**63}), None,
                       ["config 'eval.seed': must be between"], 30),
    "temperature-inf": (_set("sampling.temperature", float("inf")), None, ["'sampling.temperature'", "finite number"], 30),
    "temperature-nan": (_set("sampling.temperature", float("nan")), None, ["'sampling.temperature'", "finite number"], 30),
    "temperature-zero": (_set("sampling.temperature", 0), None, ["'sampling.temperature'", "greater than 0"], 30),
    "temperature-negative": (_set("sampling.temperature", -1.0), None, ["'sampling.temperature'", "greater than 0"], 30),
    "temperature-tiny": (_set("sampling.temperature", 1e-300), None, ["'sampling.temperature': must be at least 1e-06"], 30),
    "top-p-zero": (_set("sampling.top_p", 0), None, ["'sampling.top_p'", "greater than 0"], 30),
    "top-p-above-one": (_set("sampling.top_p", 1.5), None, ["'sampling.top_p'", "less than or equal to 1"], 30),
    "exact-length-huge": (None, ["exact", "--prior", "{tb}", "--reward", "count:a", "--beta", "1", "--max-new-tokens", "1000000000000"],
                          ["over 1,000,000,000,000 new tokens has about 10^477,121,254,720 sequences, over the limit of 2e+06",
                           "lower --max-new-tokens"], 30),
    "exact-length-past-int64": (None, ["exact", "--prior", "{tb}", "--reward", "count:a", "--beta", "1", "--max-new-tokens",
                                       "99999999999999999999"], ["has about 10^47,712,125,471,966,240,768 sequences"], 30),
    "exact-length-zero": (None, ["exact", "--prior", "{tb}", "--reward", "count:a", "--beta", "1", "--max-new-tokens", "0"],
                          ["--max-new-tokens must be >= 1 (got 0)"], 30),
    "sample-n-huge": (None, ["sample", "--model", "{tb}", "-n", "1000000000000", "--max-new-tokens", "3"],
                      ["1,000,000,000,000 samples (-n) of up to 3 tokens", "lower -n or --max-new-tokens"], 30),
    "sample-n-past-int64": (None, ["sample", "--model", "{tb}", "-n", "99999999999999999999", "--max-new-tokens", "3"],
                            ["99,999,999,999,999,999,999 samples (-n)"], 30),
    "sample-n-zero": (None, ["sample", "--model", "{tb}", "-n", "0"], ["-n must be >= 1 (got 0)"], 30),
    "sample-max-new-tokens-huge": (None, ["sample", "--model", "{tb}", "--max-new-tokens", "1000000000000"],
                                   ["--max-new-tokens 1,000,000,000,000 does not fit the model's window of 64 tokens"], 30),
    "sample-temperature-inf": (None, ["sample", "--model", "{tb}", "--temperature", "inf", "--max-new-tokens", "3"],
                               ["temperature must be > 0 and finite (got inf)"], 30),
    "sample-seed-huge": (None, ["sample", "--model", "{tb}", "--seed", "99999999999999999999", "--max-new-tokens", "3"],
                         ["--seed 99999999999999999999 is outside ±9,223,372,036,854,775,807"], 30),
    "sample-reward-hangs": (None, ["sample", "--model", "{tb}", "-n", "2", "--max-new-tokens", "3", "--reward", "{root}/rewards.py:hang",
                                   "--reward-timeout", "1"], ["reward '", "rewards.py:hang' did not return within 1 s on 2 texts"], 30),
    "eval-n-huge-cli": (None, ["eval", "--model", "{tb}", "--data", "{root}/prompts.jsonl", "--reward", "contains:a", "-n", "1000000000000",
                               "--max-new-tokens", "3"], ["2,000,000,000,000 samples (-n)", "lower -n"], 30),
    "eval-seed-huge-cli": (None, ["eval", "--model", "{tb}", "--data", "{root}/prompts.jsonl", "--reward", "contains:a", "--seed",
                                  "100000000000000000"], ["--seed 100000000000000000 is outside ±9,223,343,366,818"], 30),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_up_front_in_one_line(case, ctx, tmp_path, monkeypatch, capsys):
    edit, command, needles, seconds = CASES[case]
    out = tmp_path / "run"
    if case == "yaml-alias-bomb-sweep":
        (tmp_path / "sweep.yaml").write_text(f"base:\n  target: {{reward: 'count:a'}}\n  env: {{name: tabular, options: {{depth: {_LAUGHS}}}}}\n"
                                             "grid: {algorithms: [kl-pg], betas: [1.0]}\n")
        argv = ["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out)]
    elif command is not None:
        argv = [a.replace("{tb}", str(ctx.tb)).replace("{root}", str(ctx.root)) for a in command]
        argv += ["--out", str(out / "samples.jsonl")] if argv[0] == "sample" else []
    else:
        cfg = base_config(ctx)
        written = edit(cfg, ctx)
        path = tmp_path / "cfg.yaml"
        path.write_bytes(written) if isinstance(written, bytes) else path.write_text(written if written is not None else yaml.safe_dump(cfg))
        argv = ["train", str(path), "--out", str(out)]

    start = time.perf_counter()
    code, printed = tiltlm(argv, monkeypatch, capsys)
    took = time.perf_counter() - start

    line = one_line(code, printed, needles)
    assert snapshot(out) is None  # nothing written
    assert took < seconds, (took, line)
    print(line)  # shown by `pytest -rA`: the catalogue's message column


def test_alias_bomb_ends_fast_in_little_memory(tmp_path):
    """The whole CLI, in its own process: the bomb costs the imports' memory, not the expansion's (> 5 GB before)."""
    (tmp_path / "sweep.yaml").write_text(f"base:\n  target: {{reward: 'count:a'}}\n  env: {{name: tabular, options: {{depth: {_LAUGHS}}}}}\n"
                                         "grid: {algorithms: [kl-pg], betas: [1.0]}\n")
    script = textwrap.dedent(f"""
        import resource, sys, time
        from tiltlm.io import load_yaml
        from tiltlm.errors import TiltlmError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; tiltlm's imports (torch) included
        start = time.perf_counter()
        try:
            load_yaml({str(tmp_path / 'sweep.yaml')!r}, "sweep")
        except TiltlmError as e:
            print(f"{{time.perf_counter() - start:.3f}} {{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    seconds, grown_kib = r.stdout.split()
    assert float(seconds) < 1.0, r.stdout
    assert int(grown_kib) < 20 * 1024, r.stdout  # reading the bomb grows the process by less than 20 MiB
    r = subprocess.run([sys.executable, "-m", "tiltlm.cli", "sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert peak_kib < 2 * 1024 * 1024, peak_kib  # the largest child so far: torch's imports, far from the expansion's gigabytes
    assert not (tmp_path / "out").exists()


# ---- the YAML bound ----------------------------------------------------------------------------


def test_a_config_with_a_few_anchors_still_loads():
    text = textwrap.dedent("""
        sampling: &sampling {n_per_context: 4, max_new_tokens: 3, contexts: ["", "a"]}
        target: {reward: "count:a", beta: 1.0}
        algorithm: kl-pg
        eval_sampling: *sampling
        more: [*sampling, *sampling, *sampling]
    """)
    data = parse_yaml(text, "config 'x.yaml'")
    assert data["eval_sampling"] == data["sampling"] == data["more"][2]
    assert parse_yaml("", "config") is None


def test_alias_expansion_bound_is_exact():
    """Aliases may add up to YAML_MAX_ALIAS_EXPANSION values; one more is refused, counted without expanding."""
    def doc(copies: int) -> str:  # an anchored list of 99 scalars (100 nodes) aliased ``copies`` times
        return "a: &a [" + ", ".join(["x"] * 99) + "]\nb: [" + ", ".join(["*a"] * copies) + "]\n"

    fits = YAML_MAX_ALIAS_EXPANSION // 100
    assert len(parse_yaml(doc(fits), "t")["b"]) == fits
    with pytest.raises(TiltlmError, match=r"expand to .* more than 100,000 beyond the file's own"):
        parse_yaml(doc(fits + 1), "t")
    start = time.perf_counter()
    with pytest.raises(TiltlmError, match="expand to 1,234,567,9"):
        parse_yaml(f"x: {_LAUGHS}\n", "config")
    assert time.perf_counter() - start < 1.0


def test_yaml_keeps_its_other_refusals():
    with pytest.raises(TiltlmError, match="is not valid YAML at line 1, column 4: could not determine a constructor.*remove the tag"):
        parse_yaml("a: !!python/object/apply:os.system ['true']\n", "config 'x'")
    with pytest.raises(TiltlmError, match="is not valid YAML at line 2.*fix its syntax"):
        parse_yaml("a: {b: 1\n  oops", "config 'x'")
    with pytest.raises(TiltlmError, match="inside its own anchor"):
        parse_yaml("a: &a [1, *a]\n", "config 'x'")


# ---- the reward time limit and user code that tries to end the program --------------------------


def test_a_hanging_reward_is_abandoned_after_its_limit():
    release = []

    def hang(texts):
        while not release:
            time.sleep(0.01)
        return [1.0] * len(texts)

    reward = get_reward(hang).limited(0.2)
    start = time.perf_counter()
    with pytest.raises(TiltlmError, match=r"did not return within 0.2 s on 2 texts \(the call is abandoned\)"):
        reward(["a", "b"])
    assert time.perf_counter() - start < 2.0
    release.append(True)  # the abandoned thread ends; its result goes nowhere
    assert reward(["a"]).tolist() == [1.0]  # and the reward can be called again


def test_user_code_cannot_end_the_program():
    def leave(texts):
        sys.exit(0)

    def interrupt(texts):
        raise KeyboardInterrupt

    for limit in (None, 5.0):
        with pytest.raises(TiltlmError, match="raised SystemExit: 0 .*must not end the program"):
            get_reward(leave).limited(limit)(["a"])
        with pytest.raises(TiltlmError, match="raised GeneratorExit"):
            get_reward(lambda texts: (_ for _ in ()).throw(GeneratorExit))(["a"])
    # in the reward's own thread a KeyboardInterrupt can only come from the reward; in the caller's it may be Ctrl-C
    with pytest.raises(TiltlmError, match="raised KeyboardInterrupt"):
        get_reward(interrupt).limited(5.0)(["a"])
    with pytest.raises(KeyboardInterrupt):
        get_reward(interrupt)(["a"])


def test_a_limited_reward_scores_as_before_and_keeps_grad_mode():
    seen = []

    def f(texts):
        seen.append(torch.is_grad_enabled())
        return (float(len(t)) for t in texts)  # a generator: drawn under the limit too

    reward = get_reward(f).limited(5.0)
    assert reward(["ab", "c"]).tolist() == [2.0, 1.0]
    with torch.no_grad():
        reward(["ab"])
    assert seen == [True, False]
    assert isinstance(reward, Reward) and reward.timeout_s == 5.0 and get_reward(f).timeout_s is None


def test_regex_reward_keeps_matching_and_refusing_bad_patterns():
    assert get_reward("regex:^a.c$")(["abc", "abcd"]).tolist() == [1.0, 0.0]
    assert get_reward(r"regex:(\w+)+!")(["a" * 40]).tolist() == [0.0]  # the classic blow-up, optimised away by regex
    with pytest.raises(TiltlmError, match=r"invalid pattern '\('.*fix the regular expression"):
        get_reward("regex:(")
    start = time.perf_counter()
    with pytest.raises(TiltlmError, match=r"took more than 1 s to search one text of 41 characters"):
        get_reward("regex:(a|aa)+$")(["a" * 40 + "b"])
    assert time.perf_counter() - start < 5.0


# ---- counting without enumerating -------------------------------------------------------------------


def test_count_sequences_answers_huge_lengths_at_once():
    assert count_sequences(4, 4) == 1 + 3 + 9 + 27 + 81
    assert count_sequences(5, 3, at_most=10**6) == 1 + 4 + 16 + 64
    assert count_sequences(4, 10**12, at_most=2_000_000) == 2_000_001
    assert count_sequences(4, 99999999999999999999, at_most=10) == 11
    assert count_sequences(2, 10**12) == 10**12 + 1  # one free token: one sequence per length
    assert count_sequences(4, 13, at_most=count_sequences(4, 13)) == count_sequences(4, 13)
