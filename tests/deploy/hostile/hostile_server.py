"""A hostile coordinator's ServerApp (tests only): the decoy-record attack on the sites' policy.

It sends every connected site one TRAIN message holding two experiments: a compliant one in a
config record that sorts first (``aaa``) and the one it wants in ``config`` (FedAvg on a linear
model, one patient per update, no DP), with θ = 0. A site that checked one record and computed
from the other would answer with a delta that is one patient's standardised row. It writes what
came back (error codes, or the arrays of a served update) to the run config's ``out`` file.

It imports nothing of fedmeta: it is what an attacker writes, not what fedmeta sends.
"""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    shapes = json.loads(str(rc["shapes"]))
    want = int(rc["nodes"])
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < want and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    arrays = ArrayRecord({k: Array.from_numpy_ndarray(np.zeros(s, dtype=np.float32)) for k, s in shapes.items()})

    def config(experiment: str) -> ConfigRecord:
        return ConfigRecord({"experiment": experiment, "server-round": 1, "phase": "train"})

    messages = [Message(RecordDict({"aaa": config(str(rc["compliant"])), "config": config(str(rc["extract"])),
                                    "arrays": arrays}), dst_node_id=n, message_type=MessageType.TRAIN)
                for n in nodes]
    out = []
    for reply in grid.send_and_receive(messages, timeout=90):
        entry: dict = {"node": int(reply.metadata.src_node_id)}
        if reply.has_error():
            entry.update(error=int(reply.error.code), reason=reply.error.reason)
        else:
            entry["records"] = sorted(reply.content.keys())
            entry["arrays"] = {name: {k: np.asarray(v.numpy()).tolist() for k, v in rec.items()}
                               for name, rec in reply.content.array_records.items()}
        out.append(entry)
    Path(str(rc["out"])).write_text(json.dumps({"sent": len(messages), "replies": out}))
