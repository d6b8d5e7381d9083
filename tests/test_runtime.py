import builtins

import pytest

from embcompress.errors import DependencyError
from embcompress.runtime import execution_providers, import_onnxruntime


def test_missing_onnxruntime_names_both_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr("importlib.import_module", lambda name: fake_import(name))
    with pytest.raises(DependencyError, match=r"embcompress\[onnxruntime\].*embcompress\[onnxruntime-gpu\]"):
        import_onnxruntime()


def test_cpu_provider_always_last() -> None:
    pytest.importorskip("onnxruntime")
    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    assert execution_providers("auto")[-1] == "CPUExecutionProvider"
