"""Training algorithms. Each agent joins a policy with data and/or batched envs and owns its optimiser,
checkpoints and exact resume."""
from distillery.agents.bc import BCAgent
from distillery.agents.distill import DistillAgent

__all__ = ["BCAgent", "DistillAgent"]
