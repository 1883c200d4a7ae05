"""HCRMP-style LLM-hinted control RL: a continuous-action driving agent whose state and critic weights take hints
from a hint source (rule oracle, noisy oracle, or a language model) kept out of the control loop."""
