"""W&B's own sweep agent (`wandb.wandb_agent.Agent`, what `wandb agent` runs), driven with no W&B server.

Usage: python wandb_agent_driver.py SPEC_JSON, where the spec names the sweep file, the sweep id, one run (its id
and parameters), `forward_signals`, and a file for the result. The agent's own code does everything it does
under `wandb agent`: it reads the sweep's `command` from the sweep config, registers, heartbeats, receives the
run command, writes the parameter file, expands the macros, starts the run in its own process group, forwards
signals (with `forward_signals`) and runs its shutdown cascade. The one test double is the W&B server: a stand-in
answers the agent's three GraphQL calls (the sweep with its config, the agent registration, and the heartbeats:
the first one hands out the run, later ones nothing).

On exit it writes `{"runs": {run_id: exit code}, "heartbeats": [...]}` to the spec's result file.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
from pathlib import Path
from typing import Any

AGENT_POLL_SECONDS = 0.2  # the agent's wait for local commands per loop (W&B's is 5 s: only the test's pace)


class StandInServiceApi:
    """Answers the GraphQL queries `wandb.apis.public.sweeps` sends for an agent, as W&B's server would."""

    def __init__(self, sweep_yaml: str, run_command: dict[str, Any]) -> None:
        self.sweep_yaml, self.run_command = sweep_yaml, run_command
        self.heartbeats: list[dict[str, Any]] = []

    def execute_graphql(self, query: str, variables: dict[str, Any], timeout: float | None = None) -> dict:
        if "SweepWithRuns" in query:
            return {"project": {"sweep": {"name": variables["sweep"], "config": self.sweep_yaml,
                                          "runs": {"edges": []}}}}
        if "CreateAgent" in query:
            return {"createAgent": {"agent": {"id": "agent-1"}}}
        if "Heartbeat" in query:
            self.heartbeats.append(json.loads(variables["runState"]))
            commands = [self.run_command] if len(self.heartbeats) == 1 else []
            return {"agentHeartbeat": {"agent": {"id": variables["id"]}, "commands": json.dumps(commands)}}
        raise AssertionError(f"unexpected W&B query: {query[:80]}")


class StandInApi:
    """`wandb.Api()` as the agent uses it: settings and the GraphQL client."""

    def __init__(self, service: StandInServiceApi) -> None:
        self.settings = {"entity": "team", "project": "cifar"}
        self._service_api = service


def main(spec: dict[str, Any]) -> int:
    import wandb
    from wandb import wandb_agent

    logging.basicConfig(level=logging.INFO, format="agent: %(message)s", stream=sys.stderr)
    sweep_yaml = Path(spec["sweep_file"]).read_text()
    run_command = {"type": "run", "run_id": spec["run_id"], "program": spec["program"],
                   "args": {name: {"value": value} for name, value in spec["params"].items()}}
    service = StandInServiceApi(sweep_yaml, run_command)
    api = StandInApi(service)
    wandb.Api = lambda *args, **kwargs: api  # the agent renews its API client after each run
    wandb_agent.Agent.POLL_INTERVAL = AGENT_POLL_SECONDS

    agent = wandb_agent.Agent(api, queue.Queue(), sweep_id=spec["sweep_id"], count=1,
                              forward_signals=spec["forward_signals"])
    seen: dict[str, Any] = {}
    start_run = agent._command_run

    def command_run(command: dict[str, Any]) -> None:  # W&B's own, then note its process to report its exit
        start_run(command)
        seen.update(agent._run_processes)

    agent._command_run = command_run
    try:
        agent.run()
    finally:
        Path(spec["result"]).write_text(json.dumps({
            "runs": {run_id: process.poll() for run_id, process in seen.items()},
            "argv": {run_id: process._popen.args for run_id, process in seen.items()},
            "heartbeats": service.heartbeats,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
