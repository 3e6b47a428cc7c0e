"""The one door to Flower's internals: everything behind it is where the pinned Flower has it,
nothing is patched on import, and a moved name or patch point is named, not silently ignored."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fedmeta.protocol import flower_compat


def test_every_name_patch_point_and_log_line_is_where_fedmeta_expects_it() -> None:
    assert flower_compat.missing() == []
    import flwr

    assert flwr.__version__ == flower_compat.PINNED


def test_a_moved_name_a_patch_point_or_a_log_line_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(flower_compat.NAMES, "Gone", ("flwr.supercore.runtime", "NoSuchClient"))
    monkeypatch.setitem(flower_compat._LOG_SOURCES, "a line", ("flwr.supercore.error.catalog", "no such words"))
    from flwr.supercore.inflatable import inflatable_utils

    monkeypatch.delitem(inflatable_utils.pull_objects.__kwdefaults__, "initial_backoff")
    out = flower_compat.missing()
    assert out == ["Gone: flwr.supercore.runtime.NoSuchClient (AttributeError)",
                   "flwr.supercore.inflatable.inflatable_utils.pull_objects no longer takes initial_backoff",
                   "a line: flwr.supercore.error.catalog no longer logs 'no such words'"]


def test_the_type_checker_sees_exactly_the_names_served_at_run_time() -> None:
    tree = ast.parse(Path(flower_compat.__file__).read_text(encoding="utf-8"))
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    typed = {(n.module, a.name, a.asname) for n in guarded.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert typed == {(m, attr, name) for name, (m, attr) in flower_compat.NAMES.items()}
    for name, (module, attribute) in flower_compat.NAMES.items():
        assert getattr(flower_compat, name) is getattr(__import__(module, fromlist=[attribute]), attribute)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        _ = flower_compat.Nothing  # type: ignore[attr-defined]


def test_importing_fedmeta_patches_nothing_of_flower_s() -> None:
    """Importing the ServerApp, the site worker and the compat module leaves Flower's object pulls
    as Flower ships them; only a serving process applies its patch (explicitly)."""
    code = (
        "import sys\n"
        "import fedmeta.protocol.flower_compat\n"
        "assert not [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')], 'compat imported flwr'\n"
        "import fedmeta.server.app, fedmeta.client.worker, fedmeta.deploy.supernode\n"
        "from flwr.supercore.constant import PULL_INITIAL_BACKOFF\n"
        "from flwr.supercore.inflatable import inflatable_utils as u\n"
        "from flwr.supernode import start_client_internal as sci\n"
        "import time\n"
        "assert u.pull_objects.__kwdefaults__['initial_backoff'] == PULL_INITIAL_BACKOFF\n"
        "assert sci.time is time\n"
        "from fedmeta.protocol import transport\n"
        "transport.apply()\n"
        "assert u.pull_objects.__kwdefaults__['initial_backoff'] == transport.INITIAL_BACKOFF_S\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_in_process_grid_sets_who_computes_and_who_replied() -> None:
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    flower_compat.set_task_identity(run_id=5, task_id=0, node_id=7)
    assert (TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id) == (5, 0, 7)
    flower_compat.set_task_identity(node_id=9)
    assert (TaskIdentity.run_id, TaskIdentity.node_id) == (5, 9)
    reply = Message(RecordDict(), dst_node_id=9, message_type="train")
    flower_compat.set_reply_source(reply, 1234)
    assert reply.metadata.src_node_id == 1234
