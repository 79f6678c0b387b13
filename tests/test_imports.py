"""Every module of the package imports on its own, so no name is used without its import."""

import importlib
import pkgutil

import pytest

import dpo_lightning

MODULES = sorted(m.name for m in pkgutil.iter_modules(dpo_lightning.__path__, prefix="dpo_lightning."))


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    assert importlib.import_module(name).__doc__, f"{name} opens with no docstring"
