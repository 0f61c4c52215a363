import subprocess
import sys

import entropy_lens


def test_every_public_name_resolves_to_its_module_object():
    import importlib

    for name, module in entropy_lens._EXPORTS.items():
        assert getattr(entropy_lens, name) is getattr(importlib.import_module(module), name), name
        assert not isinstance(getattr(entropy_lens, name), type(entropy_lens)), f"{name} is shadowed by a subpackage"


def test_unknown_name_is_an_attribute_error():
    try:
        entropy_lens.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_light():
    code = "import sys, entropy_lens; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
