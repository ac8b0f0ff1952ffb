"""The one Registry (did-you-mean, duplicates, listing), package discovery and the user-code importer."""

from __future__ import annotations

import json
import sys

import pytest

from tiltlm.errors import TiltlmError
from tiltlm.registry import Registry, UserCodeError, import_submodules, load_user_object


def test_get_lists_names_and_suggests_the_closest():
    registry = Registry("widget")
    registry.register("sprocket", 1)
    registry.register("gear", 2)
    assert registry.get("gear") == 2
    with pytest.raises(TiltlmError) as e:
        registry.get("sprockt")
    assert str(e.value) == "unknown widget 'sprockt' (did you mean 'sprocket'?); available: gear, sprocket"
    with pytest.raises(TiltlmError) as e:
        registry.get("zzzzzz")
    assert str(e.value) == "unknown widget 'zzzzzz'; available: gear, sprocket"
    with pytest.raises(TiltlmError) as e:  # a non-string name (from a YAML config) is an unknown name too
        registry.get(5)
    assert str(e.value) == "unknown widget '5'; available: gear, sprocket"
    assert registry.suggest("gaer") == "gear" and registry.suggest(["x"]) is None


def test_duplicates_listing_containment_and_copy():
    registry = Registry("widget")
    assert registry.register("b", "B") == "B"
    registry.register("a", "A")
    with pytest.raises(ValueError, match="widget 'a' registered twice: it is already registered"):
        registry.register("a", "again")
    assert registry.get("a") == "A"
    assert registry.names() == ["a", "b"] and list(registry) == ["a", "b"] and len(registry) == 2
    assert registry.items() == [("a", "A"), ("b", "B")]
    assert "a" in registry and "c" not in registry and 3 not in registry and ["a"] not in registry
    copy = registry.copy()
    copy.register("c", "C")
    assert "c" in copy and "c" not in registry


def test_the_three_registries_keep_their_messages():
    from tiltlm.algorithms import get_algorithm
    from tiltlm.envs import get_env
    from tiltlm.rewards import available_rewards, get_reward

    with pytest.raises(TiltlmError) as e:
        get_algorithm("kl-pgg")
    assert str(e.value) == ("unknown algorithm 'kl-pgg' (did you mean 'kl-pg'?); available: cdpo, clip-cov, dpg, dpo, f-dpg, flowrl, "
                            "gdc++, grpo, ipo, kl-cov, kl-pg, maxrl, online-dpo, ppo-kl, reinforce")
    with pytest.raises(TiltlmError) as e:
        get_env("serch")
    assert str(e.value) == "unknown environment 'serch' (did you mean 'search'?); available: api, dialogue, search, tabular"
    with pytest.raises(TiltlmError) as e:
        get_reward("sentimnt")
    assert str(e.value) == f"unknown reward 'sentimnt' (did you mean 'sentiment'?); available: {', '.join(available_rewards())}"


def test_discovery_imports_every_public_module_but_the_skipped(tmp_path, monkeypatch):
    package = tmp_path / "tilt_discovery_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "alpha.py").write_text("LOADED = True\n")
    (package / "beta.py").write_text("LOADED = True\n")
    (package / "_private.py").write_text("raise RuntimeError('must not be imported')\n")
    (package / "script.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tilt_discovery_pkg

    names = import_submodules("tilt_discovery_pkg", tilt_discovery_pkg.__path__, skip=("script",))
    assert names == ["alpha", "beta"]
    assert sys.modules["tilt_discovery_pkg.alpha"].LOADED and sys.modules["tilt_discovery_pkg.beta"].LOADED
    assert "tilt_discovery_pkg._private" not in sys.modules and "tilt_discovery_pkg.script" not in sys.modules
    for name in ("tilt_discovery_pkg", "tilt_discovery_pkg.alpha", "tilt_discovery_pkg.beta"):
        monkeypatch.delitem(sys.modules, name)


def test_builtin_environments_and_algorithms_are_discovered():
    """In a fresh interpreter (other tests import modules of their own): importing the packages imports every
    module of them, and not the scripts the envs package skips."""
    import subprocess

    code = ("import json, sys, tiltlm.algorithms, tiltlm.envs; "
            "print(json.dumps([m for m in sys.modules if m.startswith(('tiltlm.envs.', 'tiltlm.algorithms.'))]))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout))
    assert {"tiltlm.envs.api", "tiltlm.envs.dialogue", "tiltlm.envs.search", "tiltlm.envs.tabular"} <= loaded
    assert {"tiltlm.algorithms.dpg", "tiltlm.algorithms.kl_pg", "tiltlm.algorithms.reinforce"} <= loaded
    assert "tiltlm.envs.make_search_collection" not in loaded and "tiltlm.envs.api_server" not in loaded


# --- load_user_object ---------------------------------------------------------------------------


def _error(spec: str) -> UserCodeError:
    with pytest.raises(UserCodeError) as e:
        load_user_object(spec, "widget")
    assert "\n" not in str(e.value)
    return e.value


def test_loads_from_a_file_and_a_module(tmp_path, monkeypatch):
    path = tmp_path / "my widgets.py"
    path.write_text("class Box:\n    SIZE = 3\n\ndef make():\n    return 7\n")
    assert load_user_object(f"{path}:make", "widget")() == 7
    assert load_user_object(f"{path}:Box.SIZE", "widget") == 3
    (tmp_path / "tilt_widget_mod.py").write_text("VALUE = 11\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tilt_widget_mod", raising=False)
    assert load_user_object("tilt_widget_mod:VALUE", "widget") == 11


def test_missing_file(tmp_path):
    e = _error(f"{tmp_path}/nope.py:f")
    assert e.reason == "file-missing" and e.cause is None
    assert str(e) == f"widget '{tmp_path}/nope.py:f': file '{tmp_path}/nope.py' not found; give the path to an existing .py file"


def test_missing_module_and_a_module_whose_import_fails(tmp_path, monkeypatch):
    e = _error("tilt_no_such_module_xyz:f")
    assert e.reason == "module-missing" and isinstance(e.cause, ModuleNotFoundError)
    assert str(e).startswith("widget 'tilt_no_such_module_xyz:f': no module 'tilt_no_such_module_xyz' on the path")
    (tmp_path / "tilt_imports_missing.py").write_text("import tilt_not_there_either\n")
    (tmp_path / "tilt_boom_on_import.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    e = _error("tilt_imports_missing:f")  # the module exists; one of *its* imports is missing
    assert e.reason == "import-failed"
    assert str(e) == ("widget 'tilt_imports_missing:f': importing 'tilt_imports_missing' raised ModuleNotFoundError: "
                      "No module named 'tilt_not_there_either'; fix the module")
    e = _error("tilt_boom_on_import:f")
    assert e.reason == "import-failed" and isinstance(e.cause, RuntimeError)
    assert str(e) == "widget 'tilt_boom_on_import:f': importing 'tilt_boom_on_import' raised RuntimeError: boom; fix the module"


def test_a_file_that_raises_is_not_left_in_sys_modules(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def f(:\n")
    before = set(sys.modules)
    e = _error(f"{path}:f")
    assert e.reason == "import-failed" and isinstance(e.cause, SyntaxError)
    assert f"running '{path}' raised SyntaxError" in str(e) and str(e).endswith("; fix the file")
    assert set(sys.modules) == before


def test_missing_attribute(tmp_path):
    path = tmp_path / "w.py"
    path.write_text("def make():\n    return 1\n")
    for attribute in ("nope", "make.nope", "1bad", ""):
        e = _error(f"{path}:{attribute}")
        assert e.reason == "attribute-missing" and e.attribute == attribute and e.module.make() == 1
        assert str(e) == f"widget '{path}:{attribute}': file '{path}' has no attribute '{attribute}'; define it or fix the name"
