"""Security: tensors only through safetensors, no remote code unless asked, user code only from a
``module:function`` / ``file.py:function`` the user names, and no secret from the environment in a run's files.

The static checks read the source (AST, not regexes over comments); the behavioural ones plant files
that would leave a marker on disk if they were ever unpickled, imported or evaluated.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tiltlm.errors import TiltlmError

SRC = Path(__file__).resolve().parent.parent / "src" / "tiltlm"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    """'torch.load', 'pickle.loads', 'AutoModel.from_pretrained', 'eval', ..."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _sources():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    return [(f, ast.parse(f.read_text(), filename=str(f))) for f in files]


def test_no_pickle_eval_or_unsafe_yaml_in_the_source():
    problems = []
    for path, tree in _sources():
        where = path.relative_to(SRC.parent)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal") for n in names):
                    problems.append(f"{where}:{node.lineno} imports a pickle-like module")
        for call in _calls(tree):
            name = _name(call.func)
            if name.endswith("torch.load"):
                weights_only = _kw(call, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where}:{call.lineno} torch.load without weights_only=True")
            if isinstance(call.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{where}:{call.lineno} calls {name}()")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                problems.append(f"{where}:{call.lineno} {name} (use yaml.safe_load)")
            if name.endswith(("np.load", "numpy.load")):
                allow = _kw(call, "allow_pickle")
                if isinstance(allow, ast.Constant) and allow.value is True:
                    problems.append(f"{where}:{call.lineno} np.load(allow_pickle=True)")
    assert problems == []


def test_models_load_through_safetensors_and_no_remote_code_by_default():
    problems, model_loads = [], 0
    for path, tree in _sources():
        where = path.relative_to(SRC.parent)
        for call in _calls(tree):
            name = _name(call.func)
            if not name.endswith("from_pretrained"):
                continue
            remote = _kw(call, "trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is not False:
                problems.append(f"{where}:{call.lineno} {name}(trust_remote_code={remote.value!r})")
            receiver = name.rsplit(".", 1)[0]
            if "Tokenizer" in receiver or receiver in ("HFPolicy", "cls"):
                continue  # tokenizers hold no tensors; HFPolicy.from_pretrained goes through load_model_and_tokenizer
            model_loads += 1
            safe = _kw(call, "use_safetensors")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                problems.append(f"{where}:{call.lineno} {name} without use_safetensors=True")
        for node in ast.walk(tree):  # every trust_remote_code parameter defaults to False
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                defaults = dict(zip([a.arg for a in positional][len(positional) - len(args.defaults):], args.defaults))
                defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
                if "trust_remote_code" in [a.arg for a in positional + args.kwonlyargs]:
                    d = defaults.get("trust_remote_code")
                    if not (isinstance(d, ast.Constant) and d.value is False):
                        problems.append(f"{where}:{node.lineno} {node.name}(trust_remote_code=...) does not default to False")
    assert model_loads >= 2  # the policy loader and the similarity reward's encoder
    assert problems == []


def test_the_config_schema_has_no_remote_code_switch():
    """trust_remote_code can only be set from Python (HFPolicy.from_pretrained); no YAML key turns it on."""
    from tiltlm.train.config import parse_config

    with pytest.raises(TiltlmError, match="unknown config key 'trust_remote_code'"):
        parse_config({"algorithm": "kl-pg", "trust_remote_code": True})


@pytest.fixture(scope="module")
def tb(tmp_path_factory):
    from tiltlm.testbed import make_testbed

    return make_testbed(tmp_path_factory.mktemp("sec") / "tb", vocab_size=4, n_layer=1, n_embd=16, seed=0)


class _Plant:
    """Unpickling this creates the file ``path`` (what a malicious pickle could do, harmlessly)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_checkpoint_is_never_unpickled(tb, tmp_path):
    from tiltlm.policies import HFPolicy

    model = tmp_path / "model"
    shutil.copytree(tb, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    torch.save({"transformer.wte.weight": _Plant(str(marker))}, model / "pytorch_model.bin")
    with pytest.raises(TiltlmError, match="model.safetensors"):
        HFPolicy.from_pretrained(model)
    assert not marker.exists()


def test_remote_code_in_a_model_dir_is_not_run(tb, tmp_path):
    from tiltlm.policies import HFPolicy

    model = tmp_path / "model"
    shutil.copytree(tb, model)
    marker = tmp_path / "IMPORTED"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import GPT2LMHeadModel as EvilLM\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil-lm", auto_map={"AutoConfig": "evil.EvilLM", "AutoModelForCausalLM": "evil.EvilLM"})
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(TiltlmError):
        HFPolicy.from_pretrained(model)
    assert not marker.exists()


@pytest.mark.parametrize("spec", [
    "__import__('os').system('touch {m}')",
    "lambda texts: [open('{m}', 'w')] * len(texts)",
    "eval(\"open('{m}', 'w')\")",
    "count:a; open('{m}', 'w')",
    "os.system('touch {m}')",
    "exec:open('{m}','w')",
    "{m}",
])
def test_a_reward_spec_is_never_evaluated(spec, tmp_path):
    from tiltlm.rewards import get_reward

    marker = tmp_path / "EVALUATED"
    spec = spec.replace("{m}", str(marker))
    try:
        reward = get_reward(spec)
    except TiltlmError as e:
        assert "\n" not in str(e)
    else:  # a built-in with an odd argument is a plain string to match (count:'a; open(...)')
        assert reward(["aaa", "b"]).tolist() == [0.0, 0.0]
    assert not marker.exists()


def test_a_reward_file_is_the_only_code_loaded(tmp_path):
    """``dir/r.py:f`` runs r.py only: its folder is not added to sys.path, so a neighbour module stays unimported."""
    from tiltlm.rewards import get_reward

    marker = tmp_path / "NEIGHBOUR"
    (tmp_path / "r.py").write_text("def f(texts):\n    return [float(len(t)) for t in texts]\n")
    (tmp_path / "neighbour.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    path_before = list(sys.path)
    assert get_reward(f"{tmp_path}/r.py:f")(["ab", ""]).tolist() == [2.0, 0.0]
    assert sys.path == path_before
    with pytest.raises(ImportError):
        __import__("neighbour")
    assert not marker.exists()


def test_a_yaml_config_cannot_construct_python_objects(tmp_path):
    from tiltlm.train.config import load_config

    marker = tmp_path / "YAML"
    path = tmp_path / "cfg.yaml"
    path.write_text(f"algorithm: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(TiltlmError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()


SECRETS = {
    "WANDB_API_KEY": "wandbsecret0123456789abcdef0123456789abcd",
    "HF_TOKEN": "hf_secretTokenValue0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_otherSecret9876543210",
    "OPENAI_API_KEY": "sk-secretOpenAIKey0123456789",
    "AWS_SECRET_ACCESS_KEY": "awsSecretAccessKey/0123456789",
    "MLFLOW_TRACKING_PASSWORD": "mlflowPassword0123456789",
    "GITHUB_TOKEN": "ghp_secretGithubToken0123456789",
}


def test_no_secret_from_the_environment_reaches_the_run_directory(tb, tmp_path):
    """`tiltlm train` with every tracker on and API keys in the environment: no file it writes holds a key."""
    import importlib.util

    trackers = [name for name, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb"))
                if importlib.util.find_spec(module) is not None]
    cfg = {"prior": str(tb), "target": {"reward": "count:a", "beta": 1.0}, "algorithm": {"name": "kl-pg"},
           "sampling": {"n_per_context": 4, "max_new_tokens": 3}, "optim": {"steps": 2, "lr": 0.01}, "checkpoint": {"every": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **SECRETS, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "tiltlm.cli", "train", str(tmp_path / "cfg.yaml"), "--out", str(out)]
    r = subprocess.run(args + (["--log", ",".join(trackers)] if trackers else []), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 8
    leaks = [(str(p.relative_to(out)), name) for p in files for name, value in SECRETS.items() if value.encode() in p.read_bytes()]
    leaks += [("stdout/stderr", name) for name, value in SECRETS.items() if value in r.stdout + r.stderr]
    assert leaks == []
