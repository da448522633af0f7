"""W&B's own agent code (`wandb.wandb_agent.Agent`), run for real and offline in a child process by
`tests/wandb_agent_driver.py`, with a stand-in for the W&B server it talks to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
DRIVER = TESTS / "wandb_agent_driver.py"
SWEEP_YAML = TESTS.parent / "sweep.yaml"
SWEEP_ID = "agentsw1"


def start_agent(tmp_path: Path, run_id: str, params: dict, forward_signals: bool) -> tuple[subprocess.Popen, Path]:
    result = tmp_path / f"agent-{run_id}.json"
    spec = {"sweep_file": str(SWEEP_YAML), "sweep_id": SWEEP_ID, "run_id": run_id, "program": "cifar_resnet.train",
            "params": params, "forward_signals": forward_signals, "result": str(result)}
    env = dict(os.environ, WANDB_SWEEP_ID=SWEEP_ID)
    agent = subprocess.Popen([sys.executable, str(DRIVER), json.dumps(spec)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    return agent, result
