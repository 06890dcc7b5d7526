"""Test plugin: the CNN plus probes a test can read. After every epoch each worker writes its
weights to $KILN_PROBE_DIR/rank<r>-epoch<e>.npz; with $KILN_PROBE_KILL_AT=E, the worker of rank
$KILN_PROBE_KILL_RANK (default 0) kills itself (SIGKILL) at the end of epoch E, once (a marker file
in $KILN_PROBE_DIR remembers), before that epoch's checkpoint is written."""

import os
import signal
import time
from pathlib import Path

import numpy as np

from kiln.plugins.cnn import CNN


class Probe(CNN):
    name = "probe"
    description = "CNN with test probes (weights per worker, fault injection)"

    def on_epoch_end(self, model, epoch, logs, rank):
        out = Path(os.environ["KILN_PROBE_DIR"])
        np.savez(out / f"rank{rank}-epoch{epoch}.npz", *[np.asarray(w) for w in model.get_weights()])
        kill_at = os.environ.get("KILN_PROBE_KILL_AT")
        marker = out / "killed"
        if kill_at and int(kill_at) == epoch and rank == int(os.environ.get("KILN_PROBE_KILL_RANK", 0)) \
                and not marker.exists():
            marker.write_text(str(os.getpid()))
            # Ray Train's controller registers reported checkpoints when it polls the workers
            # (every 2 s); a crash within that window can lose the newest report, so die a
            # little later, as a real failure mid-epoch would.
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)
