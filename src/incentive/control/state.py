"""The augmented semantic state s = s_raw ⊕ s_hint: the raw observation, the scenario's 4 ordinal codes and a
one-hot direction sector per agent slot (all zeros where there is no hint or no agent)."""

from __future__ import annotations

import numpy as np

from incentive.control.hints import CATEGORIES, Hint
from incentive.control.scene import SECTORS


def hint_size(agents: int) -> int:
    """Features a hint adds: 4 scenario codes + 8 sectors per agent slot."""
    return len(CATEGORIES) + agents * len(SECTORS)


def hint_features(hint: Hint | None, agents: int) -> np.ndarray:
    """A hint as features: each scenario category as index / (levels − 1), then the one-hot sector per slot."""
    out = np.zeros(hint_size(agents), dtype=np.float32)
    if hint is None:
        return out
    for i, (index, names) in enumerate(zip(hint.scenario, CATEGORIES.values(), strict=True)):
        out[i] = index / (len(names) - 1)
    for slot, direction in enumerate(hint.directions[:agents]):
        if direction >= 0:
            out[len(CATEGORIES) + slot * len(SECTORS) + direction] = 1.0
    return out


def augment(raw: np.ndarray, hint: Hint | None, agents: int) -> np.ndarray:
    """s_raw ⊕ s_hint as one float32 vector."""
    return np.concatenate([np.asarray(raw, dtype=np.float32).reshape(-1), hint_features(hint, agents)])
