"""Reinforcement learning on the fused state (simulation, agent, policy node)."""
