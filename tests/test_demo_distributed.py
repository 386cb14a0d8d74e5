"""``python -m lora_ops demo --distributed`` outside torchrun says how to start it (the 2-rank runs
themselves are in test_distributed_2ranks.py and the README)."""

import pytest

from lora_ops import demo


def test_distributed_demo_without_torchrun_says_how_to_start_it(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match="torchrun --nproc-per-node 2 -m lora_ops demo --distributed fsdp"):
        demo.run(["--distributed", "fsdp", "--size", "ci", "--device", "cpu"])


def test_distributed_demo_option_is_checked():
    with pytest.raises(SystemExit):
        demo.run(["--distributed", "zero3"])
