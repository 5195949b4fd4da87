"""The device agent's memory flags reach its Trainer: where a swapping device keeps its swap file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedpers import models
from fedpers.client.agent import Agent, AgentConfig
from fedpers.tls import TlsConfig


@pytest.mark.parametrize("memory", ["swap", "swap-all"])
def test_a_swapping_device_keeps_its_swap_file_under_its_state(tmp_path: Path, memory: str) -> None:
    """`run --memory swap|swap-all` without --swap-dir swaps under <state>/swap, as its help says."""
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    cfg = AgentConfig(server="127.0.0.1:1", data=data, state=tmp_path / "state", tls=TlsConfig(insecure=True),
                      memory=memory)
    agent = Agent(cfg)
    try:
        _, trainer = agent._model(Path(models.path("digits_cnn.ini")).read_text())
        assert trainer.memory == memory
        assert trainer.swap_dir == str(tmp_path / "state" / "swap") and (tmp_path / "state" / "swap").is_dir()
    finally:
        agent.close()
