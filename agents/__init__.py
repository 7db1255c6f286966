"""Training algorithms. Each agent joins a policy with data and/or batched envs and owns its optimiser,
checkpoints and exact resume. Import the RL agents from their modules (``distillery.agents.ppo``, ``.sac``,
``.offline``, ``.ofql``): they pull in more than imitation needs."""
from distillery.agents.bc import BCAgent
from distillery.agents.distill import ConsistencyHead, DistillAgent

__all__ = ["BCAgent", "ConsistencyHead", "DistillAgent"]
