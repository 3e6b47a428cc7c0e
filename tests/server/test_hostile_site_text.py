"""A hostile site cannot write into the coordinator's logs: names come from the registry (or the
node's own greeting in a simulation), reasons from a fixed vocabulary or made one safe line."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message

from fedmeta.protocol.errors import SiteErrorCode, one_line, refusal_reason

FORGED = ("policy refusal: ok\n2026-12-07 10:00:00 INFO fedmeta.progress: site Hungary joined\r"
          "\x1b[2K\x1b[1A  and more")


def test_a_refusal_is_one_printable_line_and_other_codes_only_their_category() -> None:
    text = refusal_reason(Error(code=int(SiteErrorCode.POLICY_REFUSAL), reason=FORGED))
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert text.startswith("policy refusal: ok 2026-12-07 10:00:00 INFO")
    assert len(one_line("x" * 1000)) == 200
    # any other code: the fixed category, whatever text came with it
    assert refusal_reason(Error(code=int(SiteErrorCode.DATA_ERROR), reason="Doe, John\nMRN 123")) == "data error"
    assert refusal_reason(Error(code=4999, reason="anything")) == "site error 4999"
    # a non-refusal code dressed as a refusal keeps only its category
    assert refusal_reason(Error(code=int(SiteErrorCode.BAD_REQUEST), reason=FORGED)) == "bad request"


def test_a_site_s_forged_refusal_reaches_the_progress_log_as_one_line(tmp_path) -> None:
    from fedmeta.client.app import app
    from fedmeta.common.config import load_config
    from fedmeta.server.driver import run_experiment
    from fedmeta.server.local_grid import LocalGrid
    from fedmeta.sitecore.policy import PolicyRefusal

    def hostile(message: Message, context):  # type: ignore[no-untyped-def]
        if context.node_config["partition-id"] == 1 and message.metadata.message_type == "query":
            raise PolicyRefusal(FORGED.removeprefix("policy refusal: "))  # sent as a policy refusal
        return app(message, context)

    grid = LocalGrid(hostile, [{"partition-id": i} for i in range(4)])  # type: ignore[arg-type]
    lines: list[str] = []
    cfg = load_config(None, ["algorithm=reptile", "rounds=1", "tasks.meta_batch=2", "eval.adapt_steps=2",
                             "eval.bootstrap=0", "eval.repeats=1"])
    run_experiment(grid, cfg, tmp_path / "run", expected_nodes=4, progress=lines.append)
    declined = [x for x in lines if "declined the run" in x]
    assert len(declined) == 1
    assert "\n" not in declined[0] and "\r" not in declined[0] and "\x1b" not in declined[0]
    assert not any(x.startswith("2026-12-07") for x in lines)  # no forged line of its own
    with pytest.raises(AssertionError):  # control: the raw reason would have split the line
        assert "\n" not in FORGED


def test_a_submitted_run_cannot_make_the_coordinator_read_a_file_of_its_host(tmp_path) -> None:
    from fedmeta.common.errors import ConfigError
    from fedmeta.server.app import experiment_from_run_config

    secret = tmp_path / "secret.yaml"
    secret.write_text("algorithm: fedavg\n")
    assert secret.exists()  # control: the file is there to be read
    for name in (str(secret), "../../etc/passwd", "/etc/hostname"):
        with pytest.raises(ConfigError, match="not a bundled experiment"):
            experiment_from_run_config({"config": name})
    assert experiment_from_run_config({"config": "heart-maml", "set": "rounds=3"}).algorithm == "maml"
